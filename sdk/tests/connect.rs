//! The SDK against in-test fake hub and shards (see `support/`): admission, raced attach,
//! fallback, reconnect with the cached ticket, and the way back to the hub.

mod support;

use std::time::Duration;

use sibyl_proto::frame::Refused;
use sibyl_sdk::{
    Client, ClientBuilder, ClientConfig, ConnectError, ConnectionState, ErrorCode, Trust,
};
use support::*;

fn builder(pki: &Pki, hub: &FakeHub) -> ClientBuilder {
    Client::builder()
        .hub(hub.addr)
        .trust(Trust::CaFile(pki.ca_pem.clone()))
        .api_key("sk_test")
        .client_id("app-1")
        .want_subscribe("orders")
}

/// One accepting shard and a hub that tickets it for an hour.
fn one_shard(pki: &Pki, keys: &Keys) -> (FakeShard, FakeHub) {
    let shard = FakeShard::start(pki, keys, ShardMode::Accept);
    let hub = FakeHub::start(
        pki,
        keys,
        vec![shard.endpoint()],
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    (shard, hub)
}

async fn connect(b: ClientBuilder) -> Result<Client, ConnectError> {
    tokio::time::timeout(HANG_GUARD, b.connect())
        .await
        .expect("connect finished before the hang guard")
}

#[tokio::test]
async fn happy_path_attaches_with_a_valid_proof() {
    let (pki, keys) = (pki(), Keys::default());
    let shards = [
        FakeShard::start(&pki, &keys, ShardMode::Accept),
        FakeShard::start(&pki, &keys, ShardMode::Accept),
    ];
    let hub = FakeHub::start(
        &pki,
        &keys,
        shards.iter().map(FakeShard::endpoint).collect(),
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );

    let client = connect(builder(&pki, &hub).region("eu").device_class("server"))
        .await
        .unwrap();

    let hellos = hub.hellos();
    assert_eq!(hellos.len(), 1);
    assert_eq!(hellos[0].api_key, "sk_test");
    assert_eq!(hellos[0].client_id, "app-1");
    assert_eq!(hellos[0].profile.region, "eu");
    assert_eq!(hellos[0].profile.sdk_version, sibyl_sdk::SDK_VERSION);
    assert_eq!(hellos[0].wants[0].stream, "orders");
    assert_eq!(hellos[0].versions, [1]);

    let session = client.session().expect("attached");
    let ticket = &hub.tickets()[0];
    assert_eq!(client.shard_group(), Some(FakeHub::GROUP));
    assert_eq!(session.ticket.expires_at, ticket.expires_at);
    assert_eq!(session.ticket.endpoints, ticket.endpoints);
    assert!(ticket.endpoints.contains(&session.endpoint));
    assert_eq!(session.limits.max_frame, 65_536);
    let winner = shards
        .iter()
        .find(|s| s.endpoint() == session.endpoint)
        .unwrap();
    let seen = winner.attaches();
    assert!(seen.iter().all(|a| a.proof_ok
        && a.attach.client_id == "app-1"
        && a.attach.token == ticket.token
        && a.attach.resume.is_none()));
    assert!(
        matches!(client.state(), ConnectionState::Attached { session_id, .. } if Some(session_id) == client.session_id())
    );
    client.close().await;
}

#[tokio::test]
async fn pinned_fingerprint_trust_connects() {
    let (pki, keys) = (pki(), Keys::default());
    let (shard, hub) = one_shard(&pki, &keys);
    let b = builder(&pki, &hub).trust(Trust::PinnedSha256(pki.server_fingerprint));
    let client = connect(b).await.unwrap();
    assert_eq!(client.shard_endpoint(), Some(shard.endpoint()));
    client.close().await;
}

#[tokio::test]
async fn untrusted_hub_certificate_is_a_tls_error_not_retryable() {
    let (pki, other, keys) = (pki(), support::pki(), Keys::default());
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![dead_endpoint()],
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    let mut cfg = ClientConfig::default();
    cfg.max_failures = Some(1);
    let b = builder(&pki, &hub)
        .trust(Trust::CaFile(other.ca_pem.clone()))
        .config(cfg)
        .unwrap();
    let err = connect(b).await.unwrap_err();
    match &err {
        ConnectError::GiveUp {
            last: Some(last), ..
        } => {
            assert!(matches!(**last, ConnectError::Tls(_)), "{last:?}")
        }
        other => panic!("expected GiveUp with a TLS error, got {other:?}"),
    }
    assert!(!err.retryable());
    assert!(hub.hellos().is_empty());
}

#[tokio::test]
async fn hub_refusal_is_typed_and_unauthenticated_is_not_retryable() {
    let (pki, keys) = (pki(), Keys::default());
    let refused = Refused {
        code: ErrorCode::Unauthenticated,
        reason: "unknown key".into(),
        retry_after_ms: None,
        versions: vec![],
    };
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![dead_endpoint()],
        vec![HubReply::Refused(refused)],
    );
    let err = connect(builder(&pki, &hub)).await.unwrap_err();
    match &err {
        ConnectError::Refused {
            code,
            reason,
            retry_after,
        } => {
            assert_eq!(*code, ErrorCode::Unauthenticated);
            assert_eq!(reason, "unknown key");
            assert_eq!(*retry_after, None);
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!err.retryable());
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated));
    assert_eq!(err.retry(), Some(sibyl_sdk::Retry::Never));
    assert_eq!(hub.hellos().len(), 1, "a Never code is not retried");
}

#[tokio::test]
async fn overloaded_hub_is_retried_then_admits() {
    let (pki, keys) = (pki(), Keys::default());
    let shard = FakeShard::start(&pki, &keys, ShardMode::Accept);
    let busy = Refused {
        code: ErrorCode::Overloaded,
        reason: "busy".into(),
        retry_after_ms: Some(1),
        versions: vec![],
    };
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![shard.endpoint()],
        vec![HubReply::Refused(busy), HubReply::Ticket { ttl_s: 3600 }],
    );
    let client = connect(builder(&pki, &hub)).await.unwrap();
    assert_eq!(hub.hellos().len(), 2);
    assert_eq!(client.shard_endpoint(), Some(shard.endpoint()));
    client.close().await;
}

#[tokio::test]
async fn dead_first_endpoint_attaches_to_the_second() {
    let (pki, keys) = (pki(), Keys::default());
    let good = FakeShard::start(&pki, &keys, ShardMode::Accept);
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![dead_endpoint(), good.endpoint()],
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    let client = connect(builder(&pki, &hub)).await.unwrap();
    assert_eq!(client.shard_endpoint(), Some(good.endpoint()));
    assert_eq!(hub.hellos().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn refusing_and_dead_endpoints_fall_back_down_the_list() {
    let (pki, keys) = (pki(), Keys::default());
    let overloaded = FakeShard::start(&pki, &keys, ShardMode::Refuse(ErrorCode::Overloaded));
    let good = FakeShard::start(&pki, &keys, ShardMode::Accept);
    let eps = vec![overloaded.endpoint(), dead_endpoint(), good.endpoint()];
    let hub = FakeHub::start(&pki, &keys, eps, vec![HubReply::Ticket { ttl_s: 3600 }]);
    let client = connect(builder(&pki, &hub)).await.unwrap();
    assert_eq!(client.shard_endpoint(), Some(good.endpoint()));
    assert_eq!(overloaded.attaches().len(), 1);
    assert_eq!(hub.hellos().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn token_code_from_shard_goes_back_to_the_hub() {
    let (pki, keys) = (pki(), Keys::default());
    let bad = FakeShard::start(&pki, &keys, ShardMode::Refuse(ErrorCode::WrongGroup));
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![bad.endpoint()],
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    let mut cfg = ClientConfig::default();
    cfg.max_failures = Some(2);
    let err = connect(builder(&pki, &hub).config(cfg).unwrap())
        .await
        .unwrap_err();
    // WRONG_GROUP discards the ticket at once: every round asks the hub again.
    assert_eq!(err.code(), Some(ErrorCode::WrongGroup), "{err:?}");
    assert!(err.retryable());
    assert_eq!(hub.hellos().len(), 2);
    let seen = bad.attaches_settled(2).await;
    assert_eq!(seen.len(), 2);
    // The second round resumes the TLS session: its EarlyAttach is refused before a proof.
    assert!(seen.iter().all(|a| a.proof_ok || a.early), "{seen:?}");
}

/// Which of `shards` the client is attached to.
fn winner<'a>(client: &Client, shards: &'a [FakeShard]) -> &'a FakeShard {
    let ep = client.shard_endpoint().expect("attached");
    shards
        .iter()
        .find(|s| s.endpoint() == ep)
        .expect("a known shard")
}

#[tokio::test]
async fn shard_close_reconnects_with_the_cached_ticket() {
    let (pki, keys) = (pki(), Keys::default());
    let shards = [
        FakeShard::start(&pki, &keys, ShardMode::Accept),
        FakeShard::start(&pki, &keys, ShardMode::Accept),
    ];
    let hub = FakeHub::start(
        &pki,
        &keys,
        shards.iter().map(FakeShard::endpoint).collect(),
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    let client = connect(builder(&pki, &hub)).await.unwrap();
    let first = client.session_id().unwrap();
    let mut states = client.watch_state();
    states.borrow_and_update();

    winner(&client, &shards).close_sessions(ErrorCode::Internal);
    wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Reconnecting { .. })
    })
    .await;
    let state = wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Attached { .. })
    })
    .await;

    let ConnectionState::Attached { session_id, .. } = state else {
        unreachable!()
    };
    assert_ne!(session_id, first);
    assert_eq!(hub.hellos().len(), 1, "the cached ticket skips the hub");
    let token = &hub.tickets()[0].token;
    let all: Vec<_> = shards.iter().flat_map(FakeShard::attaches).collect();
    assert!(all.iter().all(|a| &a.attach.token == token && a.proof_ok));
    assert!(
        all.iter().any(|a| a.attach.resume == Some(first)),
        "reattach resumes the old session"
    );
    client.close().await;
}

#[tokio::test]
async fn group_hint_starts_the_shard_handshake_before_the_ticket() {
    let (pki, keys) = (pki(), Keys::default());
    let shard = FakeShard::start(&pki, &keys, ShardMode::Accept);
    // This hub answers `Hello` only once the shard saw a connection: a client that waits
    // for the ticket before connecting to the shard makes it answer blind (after the guard).
    let hub = FakeHub::start_hinting(
        &pki,
        &keys,
        vec![shard.endpoint()],
        vec![HubReply::Ticket { ttl_s: 3600 }],
        &shard,
    );
    let client = tokio::time::timeout(HANG_GUARD, connect(builder(&pki, &hub)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        hub.answered_blind(),
        0,
        "the shard handshake waited for the ticket"
    );
    let attaches = shard.attaches_settled(1).await;
    assert_eq!(attaches.len(), 1);
    assert!(attaches[0].proof_ok, "attached on the hinted connection");
    assert_eq!(client.shard_endpoint(), Some(shard.endpoint()));
    client.close().await;
}

#[tokio::test]
async fn explicit_reconnect_reuses_the_ticket() {
    let (pki, keys) = (pki(), Keys::default());
    let (shard, hub) = one_shard(&pki, &keys);
    let client = connect(builder(&pki, &hub)).await.unwrap();
    let first = client.session_id().unwrap();
    let again = tokio::time::timeout(HANG_GUARD, client.reconnect())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(again.session_id, first);
    assert_eq!(client.session_id(), Some(again.session_id));
    assert_eq!(hub.hellos().len(), 1);
    let attaches = shard.attaches_settled(2).await;
    assert_eq!(attaches.len(), 2);
    // Make before break: the first session was still open when the second attached ...
    assert_eq!(
        attaches[1].open_before, 1,
        "old connection closed before the new attach"
    );
    // ... and is closed once it did.
    let old = shard.session_connection(0);
    tokio::time::timeout(HANG_GUARD, old.closed())
        .await
        .expect("the replaced connection is closed");
    client.close().await;
}

#[tokio::test]
async fn go_away_moves_to_another_endpoint() {
    let (pki, keys) = (pki(), Keys::default());
    let shards: Vec<_> = (0..3)
        .map(|_| FakeShard::start(&pki, &keys, ShardMode::Accept))
        .collect();
    let hub = FakeHub::start(
        &pki,
        &keys,
        shards.iter().map(FakeShard::endpoint).collect(),
        vec![HubReply::Ticket { ttl_s: 3600 }],
    );
    let client = connect(builder(&pki, &hub)).await.unwrap();
    let lost = client.shard_endpoint().unwrap();
    let mut states = client.watch_state();
    states.borrow_and_update();

    winner(&client, &shards).go_away().await;
    let cause = wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Reconnecting { .. })
    })
    .await;
    assert!(matches!(
        cause,
        ConnectionState::Reconnecting {
            cause: Some(ErrorCode::Draining)
        }
    ));
    let ConnectionState::Attached { endpoint, .. } = wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Attached { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert_ne!(endpoint, lost, "the draining endpoint is tried last");
    assert_eq!(hub.hellos().len(), 1);
    client.close().await;
}

#[tokio::test]
async fn ticket_inside_the_expiry_margin_goes_back_to_the_hub() {
    let (pki, keys) = (pki(), Keys::default());
    let shard = FakeShard::start(&pki, &keys, ShardMode::Accept);
    // The first ticket expires in 5 s, inside the default 30 s margin: unusable.
    let replies = vec![
        HubReply::Ticket { ttl_s: 5 },
        HubReply::Ticket { ttl_s: 3600 },
    ];
    let hub = FakeHub::start(&pki, &keys, vec![shard.endpoint()], replies);
    let client = connect(builder(&pki, &hub)).await.unwrap();
    let tickets = hub.tickets();
    assert_eq!(tickets.len(), 2);
    let seen = shard.attaches();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].attach.token, tickets[1].token);
    assert_eq!(client.ticket().unwrap().expires_at, tickets[1].expires_at);
    client.close().await;
}

#[tokio::test]
async fn reconnect_after_the_cached_ticket_aged_goes_back_to_the_hub() {
    let (pki, keys) = (pki(), Keys::default());
    let shard = FakeShard::start(&pki, &keys, ShardMode::Accept);
    let hub = FakeHub::start(
        &pki,
        &keys,
        vec![shard.endpoint()],
        vec![
            HubReply::Ticket { ttl_s: 3 },
            HubReply::Ticket { ttl_s: 3600 },
        ],
    );
    let mut cfg = ClientConfig::default();
    cfg.token_expiry_margin = Duration::from_secs(1);
    let client = connect(builder(&pki, &hub).config(cfg).unwrap())
        .await
        .unwrap();
    assert_eq!(hub.hellos().len(), 1);
    let expires_at = hub.tickets()[0].expires_at;
    // Let the cached ticket come within the margin (wall clock past its expiry second).
    while support::unix_now() < expires_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut states = client.watch_state();
    states.borrow_and_update();
    shard.close_sessions(ErrorCode::NoError);
    wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Reconnecting { .. })
    })
    .await;
    wait_state(&mut states, |s| {
        matches!(s, ConnectionState::Attached { .. })
    })
    .await;
    let tickets = hub.tickets();
    assert_eq!(tickets.len(), 2, "the aged ticket was not reused");
    let seen = shard.attaches_settled(2).await;
    assert_eq!(seen.last().unwrap().attach.token, tickets[1].token);
    client.close().await;
}

#[tokio::test]
async fn reconnect_attaches_in_0rtt_and_falls_back_when_the_shard_restarted() {
    let (pki, keys) = (pki(), Keys::default());
    let (shard, hub) = one_shard(&pki, &keys);
    let client = connect(builder(&pki, &hub)).await.unwrap();
    assert!(
        !client.session().unwrap().zero_rtt,
        "first contact: full handshake"
    );
    let again = tokio::time::timeout(HANG_GUARD, client.reconnect())
        .await
        .unwrap()
        .unwrap();
    assert!(
        again.zero_rtt,
        "resumed with the shard's TLS ticket: {again:?}"
    );
    let seen = shard.attaches_settled(2).await;
    assert_eq!(seen.len(), 2);
    assert!(!seen[0].early && seen[0].proof_ok);
    assert!(
        seen[1].early && seen[1].proof_ok,
        "EarlyAttach + AttachProof"
    );

    // A restarted shard does not know the client's TLS tickets: 0-RTT is rejected, the
    // handshake completes in full and the client attaches with Attach on that connection.
    let shard = shard.restarted(&pki, &keys, ShardMode::Accept).await;
    let mut states = client.watch_state();
    let reattached = async {
        loop {
            if !shard.attaches().is_empty()
                && matches!(
                    *states.borrow_and_update(),
                    ConnectionState::Attached { .. }
                )
            {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), states.changed()).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, reattached).await.unwrap();
    let seen = shard.attaches();
    assert!(
        !seen[0].early,
        "stale ticket: no 0-RTT on the restarted shard"
    );
    assert!(seen[0].proof_ok);
    // (While the shard was down every endpoint failed, so the client may have asked the hub
    // again meanwhile; the TLS tickets are kept per shard address across hub tickets.)
    client.close().await;
}
