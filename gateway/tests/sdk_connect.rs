//! The SDK against real `sibyl-gateway` processes: `Client::connect()` through the hub to a
//! shard, typed refusals (wrong key, forbidden stream), failover when the attached shard is
//! SIGKILLed (and the hub restarting it), and moving on a shard's SIGTERM drain. One group of
//! two shards, so "another shard of the same group" exists. Waits are bounded generously;
//! nothing is timed.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sibyl_proto::ErrorCode;
use sibyl_sdk::{Client, ClientBuilder, ConnectError, ConnectionState, Trust};
use support::*;

/// One group (id 7) of two shards.
const ONE_GROUP_TWO_SHARDS: &str = "[[shards.groups]]\nid = 7\nshards = 2\n";

/// Bound on any one wait (state change, log line); never a timing assertion.
const WAIT: Duration = Duration::from_secs(30);

fn builder(gw: &Gateway, key: &str) -> ClientBuilder {
    Client::builder()
        .hub(gw.hub)
        .trust(Trust::CaFile(gw.ca()))
        .api_key(key)
        // Short idle timeout so that a SIGKILLed shard is noticed within seconds.
        .idle_timeout(Duration::from_secs(3))
        .unwrap()
        .keep_alive_interval(Some(Duration::from_millis(500)))
        .unwrap()
        .connect_timeout(Some(WAIT))
        .unwrap()
}

async fn connect(b: ClientBuilder) -> Result<Client, ConnectError> {
    tokio::time::timeout(WAIT + Duration::from_secs(5), b.connect())
        .await
        .expect("connect() returned within its own timeout")
}

/// Polls the client's state watch until attached to an endpoint other than `away_from`.
async fn attached_elsewhere(client: &Client, away_from: &str) -> (String, u64) {
    let mut states = client.watch_state();
    let wait = async {
        loop {
            if let ConnectionState::Attached {
                endpoint,
                session_id,
            } = &*states.borrow_and_update()
                && endpoint.addr != away_from
            {
                return (endpoint.addr.clone(), *session_id);
            }
            if states.changed().await.is_err() {
                panic!("client state watch closed");
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.unwrap_or_else(|_| {
        panic!(
            "not re-attached away from {away_from}: {:?}",
            client.state()
        )
    })
}

/// The ready shard whose address is `addr`.
fn shard_at(gw: &Gateway, addr: &str) -> Ready {
    gw.ready
        .iter()
        .rev()
        .find(|r| r.addr.to_string() == addr)
        .cloned()
        .unwrap_or_else(|| panic!("no ready shard at {addr}: {:?}", gw.ready))
}

#[test]
fn connect_attaches_and_reports_group_and_endpoint() {
    let gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(builder(&gw, &gw.dev_key).want_subscribe("prices"))
            .await
            .expect("connect");
        assert!(
            matches!(client.state(), ConnectionState::Attached { .. }),
            "{:?}",
            client.state()
        );
        let s = client.session().expect("session info");
        assert_eq!(s.shard_group, 7);
        assert_eq!(client.shard_group(), Some(7));
        assert_eq!(client.session_id(), Some(s.session_id));
        // The endpoint is one of the group's shards, as the hub's log reported them.
        let ready: Vec<String> = gw.ready.iter().map(|r| r.addr.to_string()).collect();
        assert!(ready.contains(&s.endpoint.addr), "{s:?} not in {ready:?}");
        assert_eq!(s.endpoint.server_name, "localhost");
        assert_eq!(client.shard_endpoint(), Some(s.endpoint.clone()));
        // The ticket lists both shards of the group, and the limits are the gateway's.
        assert_eq!(s.ticket.shard_group, 7);
        let mut listed: Vec<String> = s.ticket.endpoints.iter().map(|e| e.addr.clone()).collect();
        listed.sort();
        let mut expected = ready.clone();
        expected.sort();
        assert_eq!(listed, expected);
        assert_eq!(s.limits.max_frame, 65536);
        // A fresh client has no TLS session with the shard: a full handshake, then Attach.
        assert!(!s.zero_rtt);
        client.close().await;
    });
}

#[test]
fn reconnect_to_a_known_shard_attaches_in_0rtt() {
    let gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(builder(&gw, &gw.dev_key).want_subscribe("prices"))
            .await
            .expect("connect");
        let first = client.session().expect("session info");
        assert!(!first.zero_rtt);
        // The shard sends its TLS session tickets as its handshake completes, which may be
        // after the client saw `Attached`: one request/response on the session (a
        // subscription to a stream this gateway does not have) lets them arrive. Then the
        // reconnect resumes, sends EarlyAttach as 0-RTT data and proves afterwards.
        for _ in 0..3 {
            let answered = tokio::time::timeout(WAIT, client.subscribe("prices").open()).await;
            assert!(answered.expect("subscribe answered in time").is_err());
            let again = tokio::time::timeout(WAIT, client.reconnect())
                .await
                .expect("reconnect in time")
                .expect("reconnect");
            assert_ne!(again.session_id, first.session_id);
            assert!(again.zero_rtt, "{again:?}");
            assert_eq!(again.endpoint, first.endpoint);
            assert_eq!(again.shard_group, 7);
        }
        client.close().await;
    });
}

#[test]
fn wrong_api_key_is_a_typed_non_retryable_refusal() {
    let gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        for key in [
            "sk_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "not-a-key",
        ] {
            let err = connect(builder(&gw, key).want_subscribe("prices"))
                .await
                .expect_err("a wrong key must not connect");
            assert!(
                matches!(
                    err,
                    ConnectError::Refused {
                        code: ErrorCode::Unauthenticated,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert_eq!(err.code(), Some(ErrorCode::Unauthenticated));
            assert!(!err.retryable(), "{err:?}");
        }
    });
}

#[test]
fn forbidden_stream_on_a_narrow_key() {
    let gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let narrow = gw.new_api_key("narrow", "allowed:subscribe");
    let rt = runtime();
    rt.block_on(async {
        // The hub picks the new key up from its file (checked once a second): until then
        // the key is unknown.
        let deadline = Instant::now() + WAIT;
        let err = loop {
            let err = connect(
                builder(&gw, &narrow)
                    .want_subscribe("allowed")
                    .want_subscribe("secret"),
            )
            .await
            .expect_err("a stream outside the key's scope must not connect");
            if err.code() != Some(ErrorCode::Unauthenticated) || Instant::now() > deadline {
                break err;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match &err {
            ConnectError::Refused { code, reason, .. } => {
                assert_eq!(*code, ErrorCode::Forbidden);
                assert!(reason.contains("\"secret\""), "{reason}");
            }
            other => panic!("expected Refused{{FORBIDDEN}}, got {other:?}"),
        }
        assert!(!err.retryable());
        // Publishing is outside the scope too; the allowed stream alone connects.
        let err = connect(builder(&gw, &narrow).want_publish("allowed"))
            .await
            .expect_err("publish is not in the scope");
        assert_eq!(err.code(), Some(ErrorCode::Forbidden), "{err:?}");
        let client = connect(builder(&gw, &narrow).want_subscribe("allowed"))
            .await
            .expect("the allowed stream connects");
        assert_eq!(client.shard_group(), Some(7));
        client.close().await;
    });
}

#[test]
fn sigkill_of_the_attached_shard_fails_over_and_the_hub_restarts_it() {
    let mut gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(builder(&gw, &gw.dev_key).want_subscribe("prices"))
            .await
            .expect("connect");
        let first = client.session().expect("attached").endpoint.addr;
        let victim = shard_at(&gw, &first);

        kill(Pid::from_raw(victim.pid), Signal::SIGKILL).unwrap();
        let (now_at, _) = attached_elsewhere(&client, &first).await;
        let other = gw
            .ready
            .iter()
            .find(|r| r.group == victim.group && r.shard != victim.shard)
            .expect("the group's other shard")
            .addr
            .to_string();
        assert_eq!(now_at, other);
        assert_eq!(client.shard_group(), Some(7));

        // The supervisor restarts the killed slot: a new process, same group and shard id.
        let restarted = tokio::task::block_in_place(|| {
            gw.until(|l| {
                parse_ready(l)
                    .filter(|r| r.group == victim.group && r.shard == victim.shard)
                    .filter(|r| r.pid != victim.pid)
            })
        });
        assert_ne!(restarted.pid, victim.pid);
        gw.ready.push(restarted);
        // The client stayed attached to the survivor throughout.
        assert!(
            matches!(client.state(), ConnectionState::Attached { .. }),
            "{:?}",
            client.state()
        );
        client.close().await;
    });
}

#[test]
fn sigterm_drain_moves_the_client_to_the_other_shard() {
    let gw = Gateway::start(ONE_GROUP_TWO_SHARDS, 2);
    let rt = runtime();
    rt.block_on(async {
        let client = connect(builder(&gw, &gw.dev_key).want_subscribe("prices"))
            .await
            .expect("connect");
        let first = client.session().expect("attached").endpoint.addr;
        let victim = shard_at(&gw, &first);
        let mut states = client.watch_state();
        states.borrow_and_update();

        kill(Pid::from_raw(victim.pid), Signal::SIGTERM).unwrap();
        // The drain is seen: the attached state changes (GoAway, then a new session).
        tokio::time::timeout(WAIT, states.changed())
            .await
            .expect("the drain changes the client's state")
            .expect("state watch open");
        let (now_at, _) = attached_elsewhere(&client, &first).await;
        let other = gw
            .ready
            .iter()
            .find(|r| r.group == victim.group && r.shard != victim.shard)
            .expect("the group's other shard")
            .addr
            .to_string();
        assert_eq!(now_at, other);
        assert_eq!(client.shard_group(), Some(7));
        client.close().await;
    });
}
