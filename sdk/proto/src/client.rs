//! The I/O-free client connection machine: hub → ticket → shard, with failover and backoff.
//!
//! [`ClientMachine`] decides *what* to connect to and *when*; the async SDK does the QUIC work
//! and reports outcomes back. It never reads a clock: every input carries `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::error::{ErrorCode, Retry};
use crate::frame::{Endpoint, Refused, Ticket};

/// Default [`ClientConfig::race_delay`]: 100 ms.
///
/// A healthy shard attaches in two round trips (QUIC/TLS handshake, then `Attach` →
/// `Attached`), so on edge paths up to about 50 ms RTT the first endpoint wins alone and the
/// round costs one handshake on the client and on the shards instead of two (which also
/// halves the handshake load a fleet-wide reconnect puts on a group). A shard that refuses
/// or is unreachable reports a failure and the next endpoint starts at once; only a
/// silently dead or stalled shard costs this delay, versus the whole
/// [`attach_timeout`](ClientConfig::attach_timeout) without racing. It is the lower bound
/// of RFC 8305's connection attempt delay (100 ms minimum, 250 ms recommended for one
/// TCP round trip).
pub const DEFAULT_RACE_DELAY: Duration = Duration::from_millis(100);

/// Configuration of [`ClientMachine`]. All fields have documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientConfig {
    /// A cached ticket is not used (the hub is asked again) once it expires within this
    /// margin. Default 30 s.
    pub token_expiry_margin: Duration,
    /// Backoff base: the first retry waits a uniformly random time in `[0, initial]`.
    /// Default 100 ms.
    pub backoff_initial: Duration,
    /// Backoff cap: the n-th consecutive failure waits uniformly in
    /// `[0, min(max, initial·2^(n−1))]` (full jitter). Default 10 s.
    pub backoff_max: Duration,
    /// A shard attempt that has not attached by then is abandoned and counted failed.
    /// Default 10 s.
    pub attach_timeout: Duration,
    /// How many endpoints may be in flight at once. Default 2 (minimum 1).
    pub race_width: usize,
    /// Staggered racing (Happy Eyeballs style): the round starts with the top endpoint
    /// alone; the next one joins only when no attempt has attached within `race_delay` of
    /// the latest start (a failure starts the next one at once). `Duration::ZERO` starts
    /// `race_width` endpoints together. Default [`DEFAULT_RACE_DELAY`] (100 ms).
    pub race_delay: Duration,
    /// Give up after this many consecutive failed rounds; `None` (default) retries forever
    /// (except on codes whose [`Retry`] is `Never`).
    pub max_failures: Option<u32>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            token_expiry_margin: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            attach_timeout: Duration::from_secs(10),
            race_width: 2,
            race_delay: DEFAULT_RACE_DELAY,
            max_failures: None,
        }
    }
}

/// Identifies one shard connection attempt (unique per machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptId(pub u64);

/// A shard connection to start: connect to `endpoint`, open the session stream, send
/// `Attach` built from [`ClientMachine::ticket`], and report back with `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardAttempt {
    /// Report outcomes with this id.
    pub id: AttemptId,
    /// Where to connect.
    pub endpoint: Endpoint,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientAction {
    /// Connect to the hub and send `Hello`; report with `handle_ticket`, `handle_refused`
    /// or `handle_hub_failed`.
    ConnectHub,
    /// Start these shard attempts (one at a time when staggered, up to `race_width` at
    /// once with `race_delay` zero; the next one down the list on each failure).
    ConnectShards {
        /// The attempts, in priority order.
        attempts: Vec<ShardAttempt>,
    },
    /// Close this attempt's connection (another attached first, or it timed out).
    Abandon {
        /// The attempt to close.
        id: AttemptId,
    },
    /// The session is up on this attempt's connection.
    Attached {
        /// The winning attempt.
        id: AttemptId,
        /// Its endpoint.
        endpoint: Endpoint,
    },
    /// Stop: retrying cannot help (or `max_failures` was reached).
    GiveUp {
        /// The code that caused it, if any.
        code: Option<ErrorCode>,
    },
}

/// The machine's timers (one `match` arm each in [`ClientMachine::handle_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// A backoff delay before the next hub or shard round.
    Backoff,
    /// The earliest in-flight shard attempt's attach deadline.
    Attach,
    /// Staggered racing: start the next endpoint of the round (`race_delay` after the
    /// latest start, while fewer than `race_width` are in flight and none attached).
    Race,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Hub,
    Shards,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Idle,
    Hub,
    Racing {
        order: Vec<usize>,
        next: usize,
        in_flight: Vec<(AttemptId, usize, Instant)>,
        /// When the latest attempt of the round started (the [`Timer::Race`] base).
        last_start: Instant,
    },
    Backoff {
        then: Next,
        until: Instant,
    },
    Attached {
        id: AttemptId,
        index: usize,
    },
    GaveUp,
}

#[derive(Debug, Clone)]
struct Cached {
    ticket: Ticket,
    expires: Instant,
}

/// The client's connection machine.
///
/// Call order (quinn-proto style; `now` never moves backwards):
///
/// 1. [`connect`](Self::connect) once.
/// 2. Loop: drain [`poll_action`](Self::poll_action) and carry out each action; arm a timer
///    for [`poll_timeout`](Self::poll_timeout) and call [`handle_timeout`](Self::handle_timeout)
///    when it fires; report every outcome with the `handle_*` methods.
/// 3. After [`ClientAction::Attached`], report the session's end with
///    [`handle_disconnected`](Self::handle_disconnected) (including on `GoAway`, with
///    `ErrorCode::Draining`); after a short jittered backoff the machine reconnects, reusing the cached ticket while it is
///    valid for more than `token_expiry_margin`, trying the lost endpoint last.
///
/// Failover: the top `race_width` endpoints of the ticket are raced, staggered: the first
/// starts alone and each further one joins when nothing attached within `race_delay` of the
/// latest start ([`Timer::Race`]); the first to attach wins and the others are abandoned;
/// each failure starts the next endpoint down the list at once; when all have failed the
/// ticket is dropped and the hub is asked again after backoff. A requested reconnect
/// ([`handle_reconnect_requested`](Self::handle_reconnect_requested)) tries the endpoint it
/// leaves first (it was healthy, and its TLS session can be resumed). Codes whose
/// [`Retry`] is `AfterHub` drop the ticket at once; `Never` gives up. Backoff is exponential
/// with full jitter, drawn from a deterministic generator seeded by the caller.
#[derive(Debug)]
pub struct ClientMachine {
    config: ClientConfig,
    state: State,
    ticket: Option<Cached>,
    actions: VecDeque<ClientAction>,
    failures: u32,
    last_code: Option<ErrorCode>,
    avoid: Option<usize>,
    next_id: u64,
    rng: u64,
}

impl ClientMachine {
    /// A new idle machine. `seed` drives the backoff jitter (use real randomness in
    /// production, a constant in tests).
    pub fn new(config: ClientConfig, seed: u64) -> Self {
        Self {
            config,
            state: State::Idle,
            ticket: None,
            actions: VecDeque::new(),
            failures: 0,
            last_code: None,
            avoid: None,
            next_id: 0,
            rng: seed,
        }
    }

    /// Starts connecting (ignored unless idle or given up).
    pub fn connect(&mut self, now: Instant) {
        if matches!(self.state, State::Idle | State::GaveUp) {
            self.failures = 0;
            self.start_round(now);
        }
    }

    /// The cached ticket (build `Attach` from it), if any.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.ticket.as_ref().map(|c| &c.ticket)
    }

    /// True while a session is attached.
    pub fn is_attached(&self) -> bool {
        matches!(self.state, State::Attached { .. })
    }

    /// Consecutive failed rounds since the last attach.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// The next action to carry out.
    pub fn poll_action(&mut self) -> Option<ClientAction> {
        self.actions.pop_front()
    }

    /// The earliest armed timer's deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [Timer::Backoff, Timer::Attach, Timer::Race]
            .iter()
            .filter_map(|t| self.timer(*t))
            .min()
    }

    fn timer(&self, t: Timer) -> Option<Instant> {
        match (t, &self.state) {
            (Timer::Backoff, State::Backoff { until, .. }) => Some(*until),
            (Timer::Attach, State::Racing { in_flight, .. }) => in_flight.iter().map(|a| a.2).min(),
            (
                Timer::Race,
                State::Racing {
                    order,
                    next,
                    in_flight,
                    last_start,
                },
            ) if in_flight.len() < self.config.race_width.max(1) && *next < order.len() => {
                Some(*last_start + self.config.race_delay)
            }
            _ => None,
        }
    }

    /// Fires every timer whose deadline is `<= now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        for t in [Timer::Backoff, Timer::Attach, Timer::Race] {
            if self.timer(t).is_none_or(|d| d > now) {
                continue;
            }
            match t {
                Timer::Backoff => {
                    if let State::Backoff { then, .. } = self.state {
                        match then {
                            Next::Hub => self.go_hub(),
                            Next::Shards => self.start_round(now),
                        }
                    }
                }
                Timer::Attach => {
                    let expired: Vec<AttemptId> = match &self.state {
                        State::Racing { in_flight, .. } => in_flight
                            .iter()
                            .filter(|a| a.2 <= now)
                            .map(|a| a.0)
                            .collect(),
                        _ => Vec::new(),
                    };
                    for id in expired {
                        self.actions.push_back(ClientAction::Abandon { id });
                        self.handle_shard_failed(id, None, now);
                    }
                }
                Timer::Race => self.launch(1, now),
            }
        }
    }

    /// The hub answered `Ticket`. `unix_now_s` is the wall clock (Unix seconds) at `now`,
    /// used once to turn `expires_at` into an `Instant`.
    pub fn handle_ticket(&mut self, ticket: Ticket, now: Instant, unix_now_s: u64) {
        if self.state != State::Hub {
            return;
        }
        let ttl = Duration::from_secs(ticket.expires_at.saturating_sub(unix_now_s));
        self.ticket = Some(Cached {
            ticket,
            expires: now + ttl,
        });
        self.avoid = None;
        if self.ticket_usable(now) {
            self.start_round(now);
        } else {
            // A ticket already inside the margin is useless: count a failure, ask again.
            self.ticket = None;
            self.fail(Next::Hub, None, Duration::ZERO, now);
        }
    }

    /// The hub answered `Refused`.
    pub fn handle_refused(&mut self, refused: &Refused, now: Instant) {
        if self.state != State::Hub {
            return;
        }
        if refused.code.retry() == Retry::Never {
            self.give_up(Some(refused.code));
            return;
        }
        let floor = Duration::from_millis(refused.retry_after_ms.unwrap_or(0));
        self.fail(Next::Hub, Some(refused.code), floor, now);
    }

    /// The hub connection failed (transport error, closed with `code`, timeout).
    pub fn handle_hub_failed(&mut self, code: Option<ErrorCode>, now: Instant) {
        if self.state != State::Hub {
            return;
        }
        if code.is_some_and(|c| c.retry() == Retry::Never) {
            self.give_up(code);
            return;
        }
        self.fail(Next::Hub, code, Duration::ZERO, now);
    }

    /// Attempt `id` received `Attached`.
    pub fn handle_attached(&mut self, id: AttemptId, _now: Instant) {
        let State::Racing { in_flight, .. } = &self.state else {
            return;
        };
        let Some(&(_, index, _)) = in_flight.iter().find(|a| a.0 == id) else {
            return;
        };
        for a in in_flight.iter().filter(|a| a.0 != id) {
            self.actions.push_back(ClientAction::Abandon { id: a.0 });
        }
        let endpoint = match &self.ticket {
            Some(c) => c.ticket.endpoints[index].clone(),
            None => return,
        };
        self.state = State::Attached { id, index };
        self.failures = 0;
        self.last_code = None;
        self.actions
            .push_back(ClientAction::Attached { id, endpoint });
    }

    /// Attempt `id` failed before attaching: connection error (`code` = `None`) or closed by
    /// the shard with `code`.
    pub fn handle_shard_failed(&mut self, id: AttemptId, code: Option<ErrorCode>, now: Instant) {
        let State::Racing { in_flight, .. } = &mut self.state else {
            return;
        };
        let Some(pos) = in_flight.iter().position(|a| a.0 == id) else {
            return;
        };
        in_flight.remove(pos);
        if code.is_some() {
            self.last_code = code;
        }
        match code.map(ErrorCode::retry) {
            Some(Retry::Never) => {
                self.abandon_all();
                self.give_up(code);
            }
            Some(Retry::AfterHub) => {
                self.abandon_all();
                self.ticket = None;
                self.fail(Next::Hub, code, Duration::ZERO, now);
            }
            _ => self.launch(1, now),
        }
    }

    /// The application asked to drop the attached session and attach again (e.g. the
    /// SDK's `Client::reconnect`): a new round starts at once, with the cached ticket while
    /// it is usable (else the hub), the endpoint just left first (it was healthy, and a TLS
    /// session ticket the client holds for it lets the handshake resume), then the ticket's
    /// order. Unlike
    /// [`handle_disconnected`](Self::handle_disconnected) this is not a failure: no backoff,
    /// nothing counted. Ignored unless attached.
    pub fn handle_reconnect_requested(&mut self, now: Instant) {
        let State::Attached { index, .. } = self.state else {
            return;
        };
        self.avoid = None;
        self.start_round_from(Some(index), now);
    }

    /// The attached session ended (connection lost or closed with `code`; on `GoAway` pass
    /// `Some(ErrorCode::Draining)`).
    pub fn handle_disconnected(&mut self, code: Option<ErrorCode>, now: Instant) {
        let State::Attached { index, .. } = self.state else {
            return;
        };
        match code.map(ErrorCode::retry) {
            Some(Retry::Never) => self.give_up(code),
            Some(Retry::AfterHub) => {
                self.ticket = None;
                self.go_hub();
            }
            Some(Retry::SameEndpoint) => {
                self.avoid = None;
                self.fail(Next::Shards, code, Duration::ZERO, now);
            }
            _ => {
                self.avoid = Some(index);
                self.fail(Next::Shards, code, Duration::ZERO, now);
            }
        }
    }

    fn ticket_usable(&self, now: Instant) -> bool {
        self.ticket
            .as_ref()
            .is_some_and(|c| now + self.config.token_expiry_margin < c.expires)
    }

    /// Starts a round: shards if the cached ticket is usable, else the hub.
    fn start_round(&mut self, now: Instant) {
        self.start_round_from(None, now);
    }

    /// [`start_round`](Self::start_round) with endpoint `first` (if any) moved to the front.
    fn start_round_from(&mut self, first: Option<usize>, now: Instant) {
        if !self.ticket_usable(now) {
            self.ticket = None;
            self.go_hub();
            return;
        }
        let n = self.ticket.as_ref().map_or(0, |c| c.ticket.endpoints.len());
        let mut order: Vec<usize> = (0..n).collect();
        if let Some(a) = self.avoid.filter(|a| *a < n) {
            order.retain(|i| *i != a);
            order.push(a);
        }
        if let Some(f) = first.filter(|f| *f < n) {
            order.retain(|i| *i != f);
            order.insert(0, f);
        }
        self.state = State::Racing {
            order,
            next: 0,
            in_flight: Vec::new(),
            last_start: now,
        };
        let width = if self.config.race_delay.is_zero() {
            self.config.race_width.max(1)
        } else {
            1
        };
        self.launch(width, now);
    }

    /// Launches up to `k` further endpoints of the round (never more than `race_width` in
    /// flight); ends the round if nothing is left.
    fn launch(&mut self, k: usize, now: Instant) {
        if !self.ticket_usable(now) {
            // The token nears expiry mid-round: finish with the hub instead.
            self.abandon_all();
            self.ticket = None;
            self.go_hub();
            return;
        }
        let mut attempts = Vec::new();
        let deadline = now + self.config.attach_timeout;
        let width = self.config.race_width.max(1);
        let State::Racing {
            order,
            next,
            in_flight,
            last_start,
        } = &mut self.state
        else {
            return;
        };
        let endpoints = self
            .ticket
            .as_ref()
            .map_or(&[][..], |c| &c.ticket.endpoints[..]);
        while attempts.len() < k && in_flight.len() < width && *next < order.len() {
            let index = order[*next];
            *next += 1;
            let id = AttemptId(self.next_id);
            self.next_id += 1;
            in_flight.push((id, index, deadline));
            attempts.push(ShardAttempt {
                id,
                endpoint: endpoints[index].clone(),
            });
        }
        let exhausted = in_flight.is_empty();
        if !attempts.is_empty() {
            *last_start = now;
            self.actions
                .push_back(ClientAction::ConnectShards { attempts });
        } else if exhausted {
            // Every endpoint failed: the ticket's group is unreachable; back to the hub.
            self.ticket = None;
            let code = self.last_code;
            self.fail(Next::Hub, code, Duration::ZERO, now);
        }
    }

    fn abandon_all(&mut self) {
        if let State::Racing { in_flight, .. } = &mut self.state {
            for (id, _, _) in in_flight.drain(..) {
                self.actions.push_back(ClientAction::Abandon { id });
            }
        }
    }

    fn go_hub(&mut self) {
        self.state = State::Hub;
        self.actions.push_back(ClientAction::ConnectHub);
    }

    fn give_up(&mut self, code: Option<ErrorCode>) {
        self.state = State::GaveUp;
        self.actions.push_back(ClientAction::GiveUp { code });
    }

    /// Counts a failed round and schedules `then` after a jittered backoff (at least `floor`).
    fn fail(&mut self, then: Next, code: Option<ErrorCode>, floor: Duration, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if code.is_some() {
            self.last_code = code;
        }
        if self.config.max_failures.is_some_and(|m| self.failures >= m) {
            let code = self.last_code;
            self.give_up(code);
            return;
        }
        let delay = self.backoff_delay().max(floor);
        self.state = State::Backoff {
            then,
            until: now + delay,
        };
    }

    /// Full jitter: uniform in `[0, min(max, initial·2^(failures−1))]`.
    fn backoff_delay(&mut self) -> Duration {
        let backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let sample = self.next_random();
        backoff.full_jitter(self.failures.saturating_sub(1), sample)
    }

    /// SplitMix64: a small deterministic generator for jitter (not for secrets).
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIX: u64 = 1_700_000_000;

    fn ticket(n: usize, ttl_s: u64) -> Ticket {
        Ticket {
            version: 1,
            token: vec![1, 2, 3],
            session_secret: [7; 32],
            shard_group: 4,
            expires_at: UNIX + ttl_s,
            endpoints: (0..n)
                .map(|i| Endpoint {
                    addr: format!("127.0.0.1:{}", 5000 + i),
                    server_name: format!("s{i}"),
                })
                .collect(),
        }
    }

    fn drain(m: &mut ClientMachine) -> Vec<ClientAction> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    fn shards(actions: &[ClientAction]) -> Vec<(AttemptId, String)> {
        actions
            .iter()
            .flat_map(|a| match a {
                ClientAction::ConnectShards { attempts } => attempts
                    .iter()
                    .map(|s| (s.id, s.endpoint.addr.clone()))
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Connects and delivers a ticket; returns the raced attempts.
    fn to_racing(m: &mut ClientMachine, t: Ticket, now: Instant) -> Vec<(AttemptId, String)> {
        m.connect(now);
        assert_eq!(drain(m), vec![ClientAction::ConnectHub]);
        m.handle_ticket(t, now, UNIX);
        shards(&drain(m))
    }

    const DELAY: Duration = DEFAULT_RACE_DELAY;

    fn addrs(raced: &[(AttemptId, String)]) -> Vec<&str> {
        raced.iter().map(|r| r.1.as_str()).collect()
    }

    #[test]
    fn happy_path_races_top_two_staggered_and_abandons_loser() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        // The top endpoint starts alone; the race timer is the earliest deadline.
        let first = to_racing(&mut m, ticket(3, 3600), t0);
        assert_eq!(addrs(&first), ["127.0.0.1:5000"]);
        assert_eq!(m.poll_timeout(), Some(t0 + DELAY));
        // Nothing happens before the delay.
        m.handle_timeout(t0 + DELAY - Duration::from_millis(1));
        assert!(drain(&mut m).is_empty());
        // Not attached within the delay: the second joins, and no third (width 2).
        let t1 = t0 + DELAY;
        m.handle_timeout(t1);
        let second = shards(&drain(&mut m));
        assert_eq!(addrs(&second), ["127.0.0.1:5001"]);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        // The later one wins; the first is abandoned.
        m.handle_attached(second[0].0, t1 + Duration::from_millis(20));
        let acts = drain(&mut m);
        assert_eq!(acts[0], ClientAction::Abandon { id: first[0].0 });
        assert!(
            matches!(&acts[1], ClientAction::Attached { id, endpoint } if *id == second[0].0 && endpoint.addr == "127.0.0.1:5001")
        );
        assert!(m.is_attached());
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn first_attached_within_the_delay_starts_no_second() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let first = to_racing(&mut m, ticket(3, 3600), t0);
        m.handle_attached(first[0].0, t0 + DELAY / 2);
        let acts = drain(&mut m);
        assert!(
            matches!(&acts[..], [ClientAction::Attached { id, .. }] if *id == first[0].0),
            "{acts:?}"
        );
        assert_eq!(m.poll_timeout(), None);
        m.handle_timeout(t0 + DELAY);
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn zero_race_delay_starts_the_top_two_together() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            race_delay: Duration::ZERO,
            ..ClientConfig::default()
        };
        let mut m = ClientMachine::new(cfg, 1);
        let raced = to_racing(&mut m, ticket(3, 3600), t0);
        assert_eq!(addrs(&raced), ["127.0.0.1:5000", "127.0.0.1:5001"]);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        m.handle_attached(raced[1].0, t0);
        let acts = drain(&mut m);
        assert_eq!(acts[0], ClientAction::Abandon { id: raced[0].0 });
        assert!(matches!(acts[1], ClientAction::Attached { .. }));
    }

    #[test]
    fn wider_races_add_one_endpoint_per_delay() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            race_width: 3,
            ..ClientConfig::default()
        };
        let mut m = ClientMachine::new(cfg, 1);
        assert_eq!(
            addrs(&to_racing(&mut m, ticket(4, 3600), t0)),
            ["127.0.0.1:5000"]
        );
        m.handle_timeout(t0 + DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5001"]);
        assert_eq!(m.poll_timeout(), Some(t0 + 2 * DELAY));
        m.handle_timeout(t0 + 2 * DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5002"]);
        // Three in flight: the race timer is off until one fails.
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn requested_reconnect_reuses_the_ticket_at_once_without_a_failure() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 3);
        let raced = to_racing(&mut m, ticket(2, 3600), t0);
        m.handle_attached(raced[0].0, t0);
        drain(&mut m);
        let t1 = t0 + Duration::from_secs(1);
        m.handle_reconnect_requested(t1);
        // Straight to the shards, same order, no backoff: only the race timer is armed.
        let again = shards(&drain(&mut m));
        assert_eq!(addrs(&again), ["127.0.0.1:5000"]);
        assert_eq!(m.consecutive_failures(), 0);
        assert_eq!(m.poll_timeout(), Some(t1 + DELAY));
        m.handle_timeout(t1 + DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5001"]);
        // Not attached any more: a second request is ignored.
        m.handle_reconnect_requested(t1);
        assert!(drain(&mut m).is_empty());
        // A ticket inside the expiry margin goes to the hub instead.
        let mut m = ClientMachine::new(ClientConfig::default(), 3);
        let raced = to_racing(&mut m, ticket(1, 40), t0);
        m.handle_attached(raced[0].0, t0);
        drain(&mut m);
        m.handle_reconnect_requested(t0 + Duration::from_secs(20));
        assert_eq!(drain(&mut m), vec![ClientAction::ConnectHub]);
    }

    #[test]
    fn requested_reconnect_tries_the_endpoint_it_leaves_first() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 3);
        let first = to_racing(&mut m, ticket(3, 3600), t0);
        m.handle_shard_failed(first[0].0, None, t0);
        let second = shards(&drain(&mut m));
        assert_eq!(addrs(&second), ["127.0.0.1:5001"]);
        m.handle_attached(second[0].0, t0);
        drain(&mut m);
        m.handle_reconnect_requested(t0 + Duration::from_secs(1));
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5001"]);
        m.handle_timeout(t0 + Duration::from_secs(1) + DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5000"]);
    }

    #[test]
    fn first_endpoint_fails_then_next_down_the_list() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let raced = to_racing(&mut m, ticket(3, 3600), t0);
        // A failure starts the next endpoint at once, without waiting for the delay...
        let t1 = t0 + Duration::from_millis(5);
        m.handle_shard_failed(raced[0].0, Some(ErrorCode::Overloaded), t1);
        let second = shards(&drain(&mut m));
        assert_eq!(addrs(&second), ["127.0.0.1:5001"]);
        // ...and the race timer counts from that start.
        assert_eq!(m.poll_timeout(), Some(t1 + DELAY));
        m.handle_timeout(t1 + DELAY);
        let third = shards(&drain(&mut m));
        assert_eq!(addrs(&third), ["127.0.0.1:5002"]);
        m.handle_attached(second[0].0, t1 + DELAY);
        let acts = drain(&mut m);
        assert_eq!(acts[0], ClientAction::Abandon { id: third[0].0 });
        assert!(matches!(acts[1], ClientAction::Attached { .. }));
        // Late reports for stale attempts are ignored.
        m.handle_shard_failed(raced[0].0, None, t0);
        assert!(m.is_attached());
    }

    #[test]
    fn all_fail_goes_back_to_hub_after_backoff() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 9);
        let raced = to_racing(&mut m, ticket(2, 3600), t0);
        m.handle_timeout(t0 + DELAY);
        let second = shards(&drain(&mut m));
        m.handle_shard_failed(raced[0].0, None, t0 + DELAY);
        assert!(drain(&mut m).is_empty());
        m.handle_shard_failed(second[0].0, Some(ErrorCode::Internal), t0 + DELAY);
        assert!(drain(&mut m).is_empty());
        assert!(m.ticket().is_none());
        let deadline = m.poll_timeout().expect("backoff armed");
        assert!(deadline <= t0 + DELAY + Duration::from_millis(100));
        m.handle_timeout(deadline);
        assert_eq!(drain(&mut m), vec![ClientAction::ConnectHub]);
        assert_eq!(m.consecutive_failures(), 1);
    }

    #[test]
    fn attach_timeout_abandons_and_falls_back() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let raced = to_racing(&mut m, ticket(3, 3600), t0);
        m.handle_timeout(t0 + DELAY);
        let second = shards(&drain(&mut m));
        // The first times out: abandoned, the third starts in its place.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(m.poll_timeout(), Some(t1));
        m.handle_timeout(t1);
        let acts = drain(&mut m);
        assert_eq!(acts[0], ClientAction::Abandon { id: raced[0].0 });
        assert_eq!(addrs(&shards(&acts[1..])), ["127.0.0.1:5002"]);
        // Then the second's own deadline.
        m.handle_timeout(t1 + DELAY);
        assert_eq!(
            drain(&mut m),
            vec![ClientAction::Abandon { id: second[0].0 }]
        );
    }

    #[test]
    fn cached_ticket_reused_on_reconnect_and_lost_endpoint_tried_last() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let raced = to_racing(&mut m, ticket(3, 3600), t0);
        m.handle_attached(raced[0].0, t0);
        drain(&mut m);
        let t1 = t0 + Duration::from_secs(600);
        m.handle_disconnected(Some(ErrorCode::Draining), t1);
        assert!(drain(&mut m).is_empty());
        let d = m.poll_timeout().expect("short reconnect backoff");
        assert!(d <= t1 + Duration::from_millis(100));
        m.handle_timeout(d);
        let acts = drain(&mut m);
        assert!(!acts.contains(&ClientAction::ConnectHub), "{acts:?}");
        assert_eq!(addrs(&shards(&acts)), ["127.0.0.1:5001"]);
        m.handle_timeout(d + DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5002"]);
        // The lost endpoint is last: a failure of 5001 brings it in.
        m.handle_shard_failed(shards(&acts)[0].0, None, d + DELAY);
        assert_eq!(addrs(&shards(&drain(&mut m))), ["127.0.0.1:5000"]);
    }

    #[test]
    fn ticket_near_expiry_goes_to_hub() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let raced = to_racing(&mut m, ticket(2, 100), t0);
        m.handle_attached(raced[0].0, t0);
        drain(&mut m);
        // 75 s later the ticket has 25 s left, inside the 30 s margin.
        m.handle_disconnected(None, t0 + Duration::from_secs(75));
        let d = m.poll_timeout().unwrap();
        m.handle_timeout(d);
        assert_eq!(drain(&mut m), vec![ClientAction::ConnectHub]);
        assert!(m.ticket().is_none());
    }

    #[test]
    fn token_codes_go_to_hub_and_never_codes_give_up() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        let raced = to_racing(&mut m, ticket(2, 3600), t0);
        m.handle_timeout(t0 + DELAY);
        let second = shards(&drain(&mut m));
        m.handle_shard_failed(raced[0].0, Some(ErrorCode::TokenExpired), t0 + DELAY);
        assert_eq!(
            drain(&mut m),
            vec![ClientAction::Abandon { id: second[0].0 }]
        );
        let d = m.poll_timeout().unwrap();
        m.handle_timeout(d);
        assert_eq!(drain(&mut m), vec![ClientAction::ConnectHub]);
        let refused = Refused {
            code: ErrorCode::Unauthenticated,
            reason: "bad key".into(),
            retry_after_ms: None,
            versions: vec![],
        };
        m.handle_refused(&refused, d);
        assert_eq!(
            drain(&mut m),
            vec![ClientAction::GiveUp {
                code: Some(ErrorCode::Unauthenticated)
            }]
        );
    }

    #[test]
    fn overloaded_hub_honours_retry_after() {
        let t0 = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), 1);
        m.connect(t0);
        drain(&mut m);
        let refused = Refused {
            code: ErrorCode::Overloaded,
            reason: "busy".into(),
            retry_after_ms: Some(5_000),
            versions: vec![],
        };
        m.handle_refused(&refused, t0);
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        m.handle_timeout(t0 + Duration::from_secs(4));
        assert!(drain(&mut m).is_empty());
    }

    fn hub_failure_delays(seed: u64, rounds: usize) -> Vec<Duration> {
        let mut now = Instant::now();
        let mut m = ClientMachine::new(ClientConfig::default(), seed);
        m.connect(now);
        let mut delays = Vec::new();
        for _ in 0..rounds {
            assert_eq!(drain(&mut m), vec![ClientAction::ConnectHub]);
            m.handle_hub_failed(None, now);
            let d = m.poll_timeout().unwrap();
            delays.push(d - now);
            now = d;
            m.handle_timeout(now);
        }
        delays
    }

    #[test]
    fn backoff_grows_bounded_with_jitter_and_is_deterministic() {
        let cfg = ClientConfig::default();
        let delays = hub_failure_delays(42, 20);
        for (i, d) in delays.iter().enumerate() {
            let cap = cfg
                .backoff_initial
                .saturating_mul(1 << i.min(31))
                .min(cfg.backoff_max);
            assert!(*d <= cap, "round {i}: {d:?} > {cap:?}");
        }
        // Later rounds reach well past the initial cap, yet never beyond the maximum.
        assert!(
            delays[10..].iter().any(|d| *d > Duration::from_secs(1)),
            "{delays:?}"
        );
        // Jitter: not all capped rounds wait the same.
        let tail: std::collections::HashSet<_> = delays[10..].iter().collect();
        assert!(tail.len() > 1);
        assert_eq!(delays, hub_failure_delays(42, 20));
        assert_ne!(delays, hub_failure_delays(43, 20));
    }

    #[test]
    fn max_failures_gives_up_with_last_code() {
        let t0 = Instant::now();
        let cfg = ClientConfig {
            max_failures: Some(2),
            ..ClientConfig::default()
        };
        let mut m = ClientMachine::new(cfg, 3);
        m.connect(t0);
        drain(&mut m);
        m.handle_hub_failed(Some(ErrorCode::Internal), t0);
        let d = m.poll_timeout().unwrap();
        m.handle_timeout(d);
        drain(&mut m);
        m.handle_hub_failed(None, d);
        assert_eq!(
            drain(&mut m),
            vec![ClientAction::GiveUp {
                code: Some(ErrorCode::Internal)
            }]
        );
    }
}
