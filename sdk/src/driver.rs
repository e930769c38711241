//! The thin async driver of [`ClientMachine`]: it carries out the machine's actions with
//! quinn (hub exchanges and shard attempts run as tasks), feeds every outcome back with
//! `handle_*` and arms one timer for `poll_timeout`. It makes no decision of its own.

use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sibyl_proto::frame::{GroupHint, Ticket};
use sibyl_proto::{AttemptId, ClientAction, ClientConfig, ClientMachine, ErrorCode, Retry};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::config::HubAddress;
use crate::error::ConnectError;
use crate::hub::{self, HubAnswer};
use crate::inner::TicketInfo;
use crate::shard::{self, AttachRequest, ShardQuic, ShardSession, peer_code};
use sibyl_proto::frame::Hello;

/// A finished task's outcome.
enum Event {
    Hub(Result<(quinn::Connection, HubAnswer), ConnectError>),
    Shard(AttemptId, Box<Result<ShardSession, ConnectError>>),
}

/// Drives one [`ClientMachine`] over one quinn endpoint.
pub(crate) struct Driver {
    machine: ClientMachine,
    attach_timeout: std::time::Duration,
    endpoint: quinn::Endpoint,
    /// Hub connections.
    quic: quinn::ClientConfig,
    /// Shard connections (their own idle timeout and keep-alive).
    shard_quic: ShardQuic,
    hub_addr: HubAddress,
    hub_server_name: String,
    hello: Hello,
    tasks: JoinSet<Event>,
    hub_task: Option<AbortHandle>,
    attempts: HashMap<AttemptId, AbortHandle>,
    ready: HashMap<AttemptId, ShardSession>,
    last_error: Option<ConnectError>,
    /// The hub connection of the last ticket (kept for publishing).
    hub_conn: Option<quinn::Connection>,
    /// The last attached session id, sent as `Attach.resume`.
    pub(crate) resume: Option<u64>,
    /// `GroupHint`s the hub task read (sender cloned into each hub task).
    hints: (
        mpsc::UnboundedSender<GroupHint>,
        mpsc::UnboundedReceiver<GroupHint>,
    ),
    /// Shard handshakes started from a hint, by endpoint address: an attempt on that
    /// endpoint takes its connection instead of connecting again.
    preconnected: HashMap<String, quinn::Connecting>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("machine", &self.machine)
            .field("in_flight", &self.attempts.len())
            .finish_non_exhaustive()
    }
}

impl Driver {
    pub(crate) fn new(
        config: ClientConfig,
        endpoint: quinn::Endpoint,
        quic: quinn::ClientConfig,
        shard_quic: ShardQuic,
        hub_addr: HubAddress,
        hub_server_name: String,
        hello: Hello,
    ) -> Self {
        Self {
            attach_timeout: config.attach_timeout,
            machine: ClientMachine::new(config, rand::random()),
            endpoint,
            quic,
            shard_quic,
            hub_addr,
            hub_server_name,
            hello,
            tasks: JoinSet::new(),
            hub_task: None,
            attempts: HashMap::new(),
            ready: HashMap::new(),
            last_error: None,
            hub_conn: None,
            resume: None,
            hints: mpsc::unbounded_channel(),
            preconnected: HashMap::new(),
        }
    }

    /// (Re)starts the machine after creation or after it gave up.
    pub(crate) fn start(&mut self) {
        self.last_error = None;
        self.machine.connect(Instant::now());
    }

    /// Reports the end of the attached session.
    pub(crate) fn disconnected(&mut self, code: Option<ErrorCode>) {
        self.machine.handle_disconnected(code, Instant::now());
    }

    /// The application asked for a new session (not a failure: no backoff).
    pub(crate) fn reconnect_requested(&mut self) {
        self.machine.handle_reconnect_requested(Instant::now());
    }

    /// The hub connection that issued the current ticket.
    pub(crate) fn hub_connection(&self) -> Option<&quinn::Connection> {
        self.hub_conn.as_ref()
    }

    /// Runs the machine until a shard session is attached or it gives up; with `deadline`,
    /// stops then. Cancel-safe: all state lives in `self` and actions are carried out
    /// without awaiting.
    pub(crate) async fn run(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<(ShardSession, TicketInfo), ConnectError> {
        loop {
            while let Some(action) = self.machine.poll_action() {
                if let Some(done) = self.act(action) {
                    return done;
                }
            }
            let timer = self.machine.poll_timeout();
            tokio::select! {
                // A hint is read before the same hub task's answer is handled.
                biased;
                Some(hint) = self.hints.1.recv() => self.preconnect(&hint),
                Some(joined) = self.tasks.join_next() => {
                    // Aborted tasks (abandoned attempts) yield a cancelled JoinError.
                    if let Ok(event) = joined {
                        self.on_event(event);
                    }
                }
                () = sleep_until(timer), if timer.is_some() => {
                    self.machine.handle_timeout(Instant::now());
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    self.abort_all();
                    return Err(match self.last_error.take() {
                        None => ConnectError::Timeout,
                        Some(last) => ConnectError::GiveUp {
                            failures: self.machine.consecutive_failures(),
                            code: peer_code(&last),
                            last: Some(Box::new(last)),
                        },
                    });
                }
                else => {
                    // Nothing in flight and no timer: the machine is waiting for nothing.
                    return Err(self.give_up_error(None));
                }
            }
        }
    }

    /// Carries out one action; `Some` ends the run.
    fn act(
        &mut self,
        action: ClientAction,
    ) -> Option<Result<(ShardSession, TicketInfo), ConnectError>> {
        match action {
            ClientAction::ConnectHub => self.spawn_hub(),
            ClientAction::ConnectShards { attempts } => {
                let ticket = self.machine.ticket().cloned()?;
                for a in attempts {
                    self.spawn_attempt(a.id, &ticket, a.endpoint);
                }
            }
            ClientAction::Abandon { id } => {
                if let Some(h) = self.attempts.remove(&id) {
                    h.abort();
                }
                if let Some(s) = self.ready.remove(&id) {
                    s.conn
                        .close(ErrorCode::NoError.to_u32().into(), b"another shard won");
                }
            }
            ClientAction::Attached { id, .. } => {
                let session = self.ready.remove(&id)?;
                let info = self.machine.ticket().map(TicketInfo::from)?;
                self.abort_all();
                self.last_error = None;
                self.resume = Some(session.attached.session_id);
                return Some(Ok((session, info)));
            }
            ClientAction::GiveUp { code } => {
                self.abort_all();
                return Some(Err(self.give_up_error(code)));
            }
            // Future actions are unknown to this driver version; the machine only emits
            // those it documents, so nothing to do.
            _ => {}
        }
        None
    }

    fn spawn_hub(&mut self) {
        let endpoint = self.endpoint.clone();
        let quic = self.quic.clone();
        let addr = self.hub_addr.clone();
        let name = self.hub_server_name.clone();
        let hello = self.hello.clone();
        let timeout = self.attach_timeout;
        let hints = self.hints.0.clone();
        // A literal address: the handshake starts here, not when the task first runs (an
        // error is left for the task to meet and report).
        let started = match &self.hub_addr {
            HubAddress::Socket(a) => endpoint.connect_with(quic.clone(), *a, &name).ok(),
            HubAddress::HostPort(_) => None,
        };
        let task = async move {
            let exchange = async {
                let connecting = match started {
                    Some(c) => c,
                    None => {
                        let addr = addr.resolve().await?;
                        endpoint
                            .connect_with(quic, addr, &name)
                            .map_err(ConnectError::from_connect)?
                    }
                };
                hub::exchange(connecting, hello, Some(hints)).await
            };
            Event::Hub(
                tokio::time::timeout(timeout, exchange)
                    .await
                    .unwrap_or(Err(ConnectError::Timeout)),
            )
        };
        self.hub_task = Some(self.tasks.spawn(task));
    }

    fn spawn_attempt(
        &mut self,
        id: AttemptId,
        ticket: &Ticket,
        endpoint: sibyl_proto::frame::Endpoint,
    ) {
        let req = AttachRequest {
            endpoint,
            token: ticket.token.clone(),
            secret: ticket.session_secret,
            client_id: self.hello.client_id.clone(),
            resume: self.resume,
        };
        let quic_endpoint = self.endpoint.clone();
        // The shard's own config (its TLS session cache); an error is reported as the
        // attempt's outcome like any other.
        let quic = self.shard_quic.for_addr(&req.endpoint.addr);
        let started = self.preconnected.remove(&req.endpoint.addr);
        let handle = self.tasks.spawn(async move {
            let result = match quic {
                Ok(quic) => shard::attach(&quic_endpoint, quic, req, started).await,
                Err(e) => Err(e),
            };
            Event::Shard(id, Box::new(result))
        });
        self.attempts.insert(id, handle);
    }

    fn on_event(&mut self, event: Event) {
        let now = Instant::now();
        match event {
            Event::Hub(result) => {
                self.hub_task = None;
                if !matches!(result, Ok((_, HubAnswer::Ticket(_)))) {
                    // No ticket: hinted handshakes have nothing to attach with; the next
                    // hub round hints afresh.
                    self.preconnected.clear();
                }
                match result {
                    Ok((conn, HubAnswer::Ticket(ticket))) => {
                        tracing::debug!(
                            group = ticket.shard_group,
                            endpoints = ticket.endpoints.len(),
                            "ticket"
                        );
                        // The previous hub connection is not closed: publishers may still use
                        // it; it closes when the last handle is dropped.
                        self.hub_conn = Some(conn);
                        self.machine.handle_ticket(ticket, now, unix_now_s());
                    }
                    Ok((conn, HubAnswer::Refused(refused))) => {
                        tracing::debug!(code = %refused.code, reason = %refused.reason, "hub refused");
                        conn.close(ErrorCode::NoError.to_u32().into(), b"refused");
                        self.last_error = Some(ConnectError::Refused {
                            code: refused.code,
                            reason: refused.reason.clone(),
                            retry_after: refused
                                .retry_after_ms
                                .map(std::time::Duration::from_millis),
                        });
                        self.machine.handle_refused(&refused, now);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "hub failed");
                        let code = peer_code(&e);
                        self.last_error = Some(e);
                        self.machine.handle_hub_failed(code, now);
                    }
                }
            }
            Event::Shard(id, result) => {
                if self.attempts.remove(&id).is_none() {
                    // Abandoned while finishing: close whatever it produced.
                    if let Ok(s) = *result {
                        s.conn
                            .close(ErrorCode::NoError.to_u32().into(), b"abandoned");
                    }
                    return;
                }
                match *result {
                    Ok(session) => {
                        tracing::debug!(endpoint = %session.endpoint.addr, session = session.attached.session_id, "attached");
                        self.ready.insert(id, session);
                        self.machine.handle_attached(id, now);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "shard attempt failed");
                        let code = peer_code(&e);
                        self.last_error = Some(e);
                        self.machine.handle_shard_failed(id, code, now);
                    }
                }
            }
        }
    }

    /// The error for `GiveUp{code}`: the peer's own error when it carries that final code
    /// (e.g. `Refused{UNAUTHENTICATED}`), else `GiveUp` with the last error.
    fn give_up_error(&mut self, code: Option<ErrorCode>) -> ConnectError {
        let last = self.last_error.take();
        match (last, code) {
            (Some(e), Some(k)) if e.code() == Some(k) && k.retry() == Retry::Never => e,
            (last, code) => ConnectError::GiveUp {
                failures: self.machine.consecutive_failures(),
                code,
                last: last.map(Box::new),
            },
        }
    }

    /// Starts the QUIC handshake with the hint's first endpoint while `Hello` is on its way
    /// (PROTOCOL.md §5.1): nothing is sent on it before the ticket, whose attempt on that
    /// endpoint then takes the connection. Only while no ticket is held (a ticket's own
    /// attempts are under way otherwise); at most one per endpoint.
    fn preconnect(&mut self, hint: &GroupHint) {
        if self.machine.ticket().is_some() {
            return;
        }
        let Some(first) = hint.endpoints.first() else {
            return;
        };
        if self.preconnected.contains_key(&first.addr) {
            return;
        }
        let Ok(addr) = first.addr.parse() else {
            return;
        };
        let Ok(quic) = self.shard_quic.for_addr(&first.addr) else {
            return;
        };
        if let Ok(c) = self.endpoint.connect_with(quic, addr, &first.server_name) {
            tracing::debug!(endpoint = %first.addr, group = hint.shard_group, "pre-connecting (group hint)");
            self.preconnected.insert(first.addr.clone(), c);
        }
    }

    /// Aborts every task and closes attached-but-unused sessions.
    pub(crate) fn abort_all(&mut self) {
        // Hinted handshakes no attempt took: dropping the last handle closes them.
        self.preconnected.clear();
        if let Some(h) = self.hub_task.take() {
            h.abort();
        }
        for (_, h) in self.attempts.drain() {
            h.abort();
        }
        for (_, s) in self.ready.drain() {
            s.conn
                .close(ErrorCode::NoError.to_u32().into(), b"abandoned");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
