//! The QUIC layer end to end against real `sibyl-gateway` processes: hub admission
//! (Hello → Ticket | Refused), shard attach (Attach → Attached or a close with the refusal's
//! code), bad frames, token expiry and drain (GoAway). Raw quinn clients speak sibyl-proto
//! frames directly.

mod support;

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sibyl_proto::frame::{Action, Subscribe};
use sibyl_proto::{ALPN, ALPN_GROUP_HINT, ErrorCode, Frame};
use support::*;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn hub_refuses_bad_hellos_with_their_codes() {
    let gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());

        // Unknown key (well-formed) and garbage key: UNAUTHENTICATED, then the connection
        // is closed with that code.
        for key in [
            "sk_0123456789ab_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "nope",
        ] {
            let (conn, r) = ask_hub(&ep, gw.hub, hello(key, &[])).await;
            let r = r.unwrap_err();
            assert_eq!(r.code, ErrorCode::Unauthenticated, "{r:?}");
            assert_eq!(close_code(&conn).await, ErrorCode::Unauthenticated);
        }

        // No common version: the hub lists its versions.
        let mut h = hello(&gw.dev_key, &[]);
        h.versions = vec![7, 9];
        let (_c, r) = ask_hub(&ep, gw.hub, h).await;
        let r = r.unwrap_err();
        assert_eq!(r.code, ErrorCode::UnsupportedVersion);
        assert_eq!(r.versions, vec![1]);

        // A key limited to `allowed` (created while the hub runs; picked up without a
        // restart): a wanted stream outside its scope is FORBIDDEN, naming the stream.
        let narrow = tokio::task::block_in_place(|| gw.new_api_key("narrow", "allowed:subscribe"));
        let wants = [
            ("allowed", Action::Subscribe),
            ("secret", Action::Subscribe),
        ];
        let deadline = Instant::now() + PATIENCE;
        let refused = loop {
            let (_c, r) = ask_hub(&ep, gw.hub, hello(&narrow, &wants)).await;
            let r = r.unwrap_err();
            if r.code != ErrorCode::Unauthenticated || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(refused.code, ErrorCode::Forbidden, "{refused:?}");
        assert!(refused.reason.contains("\"secret\""), "{}", refused.reason);
        // Publishing is not in the scope either; the allowed stream alone gets a ticket.
        let (_c, r) = ask_hub(&ep, gw.hub, hello(&narrow, &[("allowed", Action::Publish)])).await;
        assert_eq!(r.unwrap_err().code, ErrorCode::Forbidden);
        let (_c, r) = ask_hub(
            &ep,
            gw.hub,
            hello(&narrow, &[("allowed", Action::Subscribe)]),
        )
        .await;
        r.expect("ticket for the allowed stream");

        // Garbage and an oversized header instead of Hello close that hub connection.
        assert_eq!(
            raw_first_stream(&ep, gw.hub, b"\xee\x00\x00\x00\x01x").await,
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            raw_first_stream(&ep, gw.hub, b"\x01\xff\xff\xff\xff").await,
            ErrorCode::FrameTooLarge
        );
        // A well-formed frame that is not Hello.
        let t = ticket(&ep, &gw).await;
        let mut buf = Vec::new();
        sibyl_proto::Codec::encode(&attach_frame(&t, [0; 32]), &mut buf);
        assert_eq!(
            raw_first_stream(&ep, gw.hub, &buf).await,
            ErrorCode::ProtocolViolation
        );
    });
}

#[test]
fn ticket_attach_and_attach_refusals() {
    let gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let before = unix_now();
        let (hub_conn, t) = ask_hub(
            &ep,
            gw.hub,
            hello(&gw.dev_key, &[("prices", Action::Subscribe)]),
        )
        .await;
        let t = t.expect("ticket");
        assert_eq!(t.version, 1);
        // No connections anywhere: the tie goes to the lowest group id.
        assert_eq!(t.shard_group, 0);
        assert!(t.expires_at >= before + 3600 && t.expires_at <= unix_now() + 3600);
        let g0 = gw.shard_of(0);
        assert_eq!(t.endpoints.len(), 1);
        assert_eq!(t.endpoints[0].addr, g0.addr.to_string());
        assert_eq!(t.endpoints[0].server_name, "localhost");
        // The hub connection stays open after a ticket.
        assert!(hub_conn.close_reason().is_none());

        // `token inspect` opens the token with the default AAD (the deployment id).
        let out = Command::new(BIN)
            .args(["token", "inspect", "--keys"])
            .arg(gw.data().join("keyring.cbor"))
            .arg(sibyl_tokens::to_text(&t.token))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["shard_group"], 0);
        assert_eq!(claims["client_id"], "app-1");
        assert_eq!(claims["scopes"][0]["stream"], "prices");
        assert_eq!(claims["scopes"][0]["publish"], false);

        // Happy path: attach to the first endpoint.
        let addr = t.endpoints[0].addr.parse().unwrap();
        let mut s = attach(&ep, addr, &t, None).await;
        let Some(Frame::Attached(a)) = s.first.take() else {
            panic!("expected Attached, got {:?}", s.first)
        };
        assert_eq!(a.limits.max_streams, 100);
        assert_eq!(a.limits.max_frame, 65536);
        assert_eq!(a.limits.idle_timeout_ms, 30_000);
        assert!(a.server_time / 1000 >= before);

        // A control stream is read and answered (subscriptions are not served yet).
        let (mut cs, mut cr) = s.conn.open_bi().await.unwrap();
        send_frame(
            &mut cs,
            Frame::Subscribe(Subscribe {
                sub_id: 1,
                stream: "prices".into(),
                start: sibyl_proto::frame::Start::Earliest,
                group: None,
                mode: sibyl_proto::frame::Mode::Predictive,
            }),
        )
        .await;
        let Some(Frame::SubError(e)) = recv_frame(&mut cr).await else {
            panic!("expected SubError")
        };
        assert_eq!(e.code, ErrorCode::NotFound);

        // The attached session is counted in heartbeats: the hub sends the next client to
        // the idle group 1.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let t2 = ticket(&ep, &gw).await;
            if t2.shard_group == 1 {
                assert_eq!(t2.endpoints[0].addr, gw.shard_of(1).addr.to_string());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "group 0's connection never counted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Replay: the same Attach (proof bound to the first connection) on another one.
        let replay = attach_frame(&t, proof(&s.conn, &t));
        let r = attach(&ep, addr, &t, Some(replay)).await;
        assert!(r.first.is_none());
        assert_eq!(close_code(&r.conn).await, ErrorCode::ProofFailed);

        // A group-0 token presented to the shard of group 1.
        let other = gw.shard_of(1).addr;
        let r = attach(&ep, other, &t, None).await;
        assert!(r.first.is_none());
        assert_eq!(close_code(&r.conn).await, ErrorCode::WrongGroup);

        // A token that does not open.
        let mut bad = t.clone();
        let last = bad.token.len() - 1;
        bad.token[last] ^= 1;
        let r = attach(&ep, addr, &bad, None).await;
        assert_eq!(close_code(&r.conn).await, ErrorCode::TokenInvalid);

        // The first session is still attached through all of that.
        assert!(s.conn.close_reason().is_none());
        s.conn.close(0u32.into(), b"done");
    });
}

#[test]
fn bad_frames_close_only_their_connection() {
    let gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let t = ticket(&ep, &gw).await;
        let addr = t.endpoints[0].addr.parse().unwrap();
        let mut good = attach(&ep, addr, &t, None).await;
        assert!(matches!(good.first, Some(Frame::Attached(_))));

        // Before Attach: garbage, a huge length, a truncated frame, a wrong first frame.
        assert_eq!(
            raw_first_stream(&ep, addr, b"garbage bytes").await,
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            raw_first_stream(&ep, addr, b"\x20\xff\xff\xff\xf0").await,
            ErrorCode::FrameTooLarge
        );
        {
            let conn = connect(&ep, addr).await;
            let (mut send, _r) = conn.open_bi().await.unwrap();
            send.write_all(b"\x20\x00\x00\x00\x10abc").await.unwrap();
            send.finish().unwrap();
            assert_eq!(close_code(&conn).await, ErrorCode::MalformedFrame);
        }
        assert_eq!(
            raw_first_stream(
                &ep,
                addr,
                &Frame::GoAway(sibyl_proto::frame::GoAway {
                    code: ErrorCode::Draining,
                    reason: String::new(),
                    reconnect_after_ms: 0,
                })
                .to_vec()
            )
            .await,
            ErrorCode::ProtocolViolation
        );

        // After Attach: garbage on another attached session's control stream.
        let victim = attach(&ep, addr, &t, None).await;
        assert!(matches!(victim.first, Some(Frame::Attached(_))));
        let (mut cs, _cr) = victim.conn.open_bi().await.unwrap();
        cs.write_all(b"\x30\x7f\xff\xff\xff").await.unwrap();
        assert_eq!(close_code(&victim.conn).await, ErrorCode::FrameTooLarge);

        // The good connection was never disturbed and still works, and the shard still
        // attaches new clients.
        assert!(good.conn.close_reason().is_none());
        let (mut cs, mut cr) = good.conn.open_bi().await.unwrap();
        send_frame(
            &mut cs,
            Frame::Subscribe(Subscribe {
                sub_id: 1,
                stream: "prices".into(),
                start: sibyl_proto::frame::Start::Latest,
                group: None,
                mode: sibyl_proto::frame::Mode::Reactive,
            }),
        )
        .await;
        assert!(matches!(
            recv_frame(&mut cr).await,
            Some(Frame::SubError(_))
        ));
        let again = attach(&ep, addr, &t, None).await;
        assert!(matches!(again.first, Some(Frame::Attached(_))));
        // Frames on the session stream after Attach are a protocol violation.
        send_frame(&mut good.send, attach_frame(&t, [0; 32])).await;
        assert_eq!(close_code(&good.conn).await, ErrorCode::ProtocolViolation);
        assert!(again.conn.close_reason().is_none());
    });
}

#[test]
fn a_shard_at_its_session_limit_refuses_with_overloaded() {
    let config = format!("{TWO_GROUPS}[connection]\nmax_sessions = 1\n");
    let gw = Gateway::start(&config, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let t = ticket(&ep, &gw).await;
        let addr = t.endpoints[0].addr.parse().unwrap();
        let first = attach(&ep, addr, &t, None).await;
        assert!(matches!(first.first, Some(Frame::Attached(_))));
        // The shard serves its one session: the next attach is refused, and says so.
        let second = attach(&ep, addr, &t, None).await;
        assert!(second.first.is_none());
        assert_eq!(close_code(&second.conn).await, ErrorCode::Overloaded);
        // Once the first session is gone there is room again.
        first.conn.close(0u32.into(), b"done");
        let mut again = attach(&ep, addr, &t, None).await;
        for _ in 0..50 {
            if matches!(again.first, Some(Frame::Attached(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            again = attach(&ep, addr, &t, None).await;
        }
        assert!(matches!(again.first, Some(Frame::Attached(_))));
    });
}

#[test]
fn expired_token_is_refused() {
    let config = format!("{TWO_GROUPS}[tokens]\nlifetime = \"1s\"\nclock_skew = \"0s\"\n");
    let gw = Gateway::start(&config, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let t = ticket(&ep, &gw).await;
        assert!(t.expires_at <= unix_now() + 1);
        // Wait until the token's expiry second has passed (at most about 2 s).
        while unix_now() < t.expires_at {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let addr = t.endpoints[0].addr.parse().unwrap();
        let r = attach(&ep, addr, &t, None).await;
        assert!(r.first.is_none());
        assert_eq!(close_code(&r.conn).await, ErrorCode::TokenExpired);
    });
}

#[test]
fn sigterm_on_a_shard_sends_goaway_and_the_hub_replaces_it() {
    let mut gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client(&gw.ca());
        let t = ticket(&ep, &gw).await;
        let victim = gw.shard_of(t.shard_group);
        let addr = t.endpoints[0].addr.parse().unwrap();
        let mut a = attach(&ep, addr, &t, None).await;
        let mut b = attach(&ep, addr, &t, None).await;
        assert!(matches!(a.first, Some(Frame::Attached(_))));
        assert!(matches!(b.first, Some(Frame::Attached(_))));
        // A connection that never attached (a handshake started from a group hint, say).
        let idle = connect(&ep, addr).await;

        kill(Pid::from_raw(victim.pid), Signal::SIGTERM).unwrap();
        // It is closed with DRAINING at once, by its own close (not by the endpoint's at the
        // drain deadline, which gives the reason "shard draining").
        match idle.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, ErrorCode::Draining.to_u32().into());
                assert_eq!(&c.reason[..], b"shard draining (not attached)");
            }
            other => panic!("expected an application close, got {other}"),
        }
        for s in [&mut a, &mut b] {
            let Some(Frame::GoAway(g)) = recv_frame(&mut s.recv).await else {
                panic!("expected GoAway")
            };
            assert_eq!(g.code, ErrorCode::Draining);
            assert_eq!(g.reconnect_after_ms, 0);
            assert_eq!(close_code(&s.conn).await, ErrorCode::Draining);
        }

        // The supervisor starts a replacement in the same slot; it attaches clients.
        let replacement = tokio::task::block_in_place(|| {
            gw.until(|l| parse_ready(l).filter(|r| r.group == victim.group && r.pid != victim.pid))
        });
        gw.ready.push(replacement);
        let deadline = Instant::now() + PATIENCE;
        let t2 = loop {
            let t2 = ticket(&ep, &gw).await;
            if t2.shard_group == victim.group
                && t2.endpoints[0].addr == replacement.addr.to_string()
            {
                break t2;
            }
            assert!(Instant::now() < deadline, "replacement never routed to");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let s = attach(&ep, replacement.addr, &t2, None).await;
        assert!(matches!(s.first, Some(Frame::Attached(_))));
    });
}

/// A resumed connection to `addr` carrying 0-RTT data: its session stream (opened in 0-RTT)
/// with `EarlyAttach` for `t` (or `early` instead) already written.
async fn early_attach(
    ep: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    t: &sibyl_proto::frame::Ticket,
    token: Option<Vec<u8>>,
) -> (
    quinn::Connection,
    quinn::ZeroRttAccepted,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let connecting = ep.connect(addr, "localhost").unwrap();
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("no 0-RTT: the shard's TLS session ticket does not allow early data")
    };
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let early = sibyl_proto::frame::EarlyAttach {
        token: token.unwrap_or_else(|| t.token.clone()),
        client_id: "app-1".into(),
        resume: None,
    };
    send_frame(&mut send, Frame::EarlyAttach(early)).await;
    (conn, accepted, send, recv)
}

/// The ALPN the handshake of `conn` selected.
fn alpn(conn: &quinn::Connection) -> Vec<u8> {
    conn.handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap()
        .protocol
        .unwrap()
}

#[test]
fn hub_sends_a_group_hint_to_clients_that_ask_and_the_ticket_follows_it() {
    let gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let hinting = client_tuned(&gw.ca(), |tls| {
            tls.alpn_protocols = vec![ALPN_GROUP_HINT.to_vec(), ALPN.to_vec()];
        });
        let conn = connect(&hinting, gw.hub).await;
        assert_eq!(alpn(&conn), ALPN_GROUP_HINT);
        // The hint came in 0.5-RTT, before this client sent anything.
        let mut uni = conn.accept_uni().await.expect("the hint stream");
        let Some(Frame::GroupHint(hint)) = recv_frame(&mut uni).await else {
            panic!("the hub's first uni stream carries a GroupHint")
        };
        assert!(!hint.endpoints.is_empty());
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let h = hello(&gw.dev_key, &[("prices", Action::Subscribe)]);
        send_frame(&mut send, Frame::Hello(h)).await;
        let Some(Frame::Ticket(t)) = recv_frame(&mut recv).await else {
            panic!("a ticket")
        };
        assert_eq!(
            t.shard_group, hint.shard_group,
            "the ticket is for the hinted group"
        );
        let mut hinted: Vec<_> = hint.endpoints.iter().map(|e| &e.addr).collect();
        let mut ticketed: Vec<_> = t.endpoints.iter().map(|e| &e.addr).collect();
        hinted.sort();
        ticketed.sort();
        assert_eq!(hinted, ticketed, "the hint names the group's ready shards");
        conn.close(0u32.into(), b"done");

        // A plain `sibyl/1` client gets `sibyl/1` and no hint: its Hello is answered as ever.
        let plain = client(&gw.ca());
        let (conn, t) = ask_hub(
            &plain,
            gw.hub,
            hello(&gw.dev_key, &[("prices", Action::Subscribe)]),
        )
        .await;
        assert_eq!(alpn(&conn), ALPN);
        assert!(t.is_ok());
        conn.close(0u32.into(), b"done");
    });
}

#[test]
fn early_attach_in_0rtt_is_served_only_after_its_proof() {
    let gw = Gateway::start(TWO_GROUPS, 2);
    let rt = runtime();
    rt.block_on(async {
        let ep = client_with(&gw.ca(), true);
        let t = ticket(&ep, &gw).await;
        let addr = t.endpoints[0].addr.parse().unwrap();
        // A first (full) handshake with the shard leaves TLS session tickets behind.
        let s = attach(&ep, addr, &t, None).await;
        assert!(matches!(s.first, Some(Frame::Attached(_))), "{:?}", s.first);
        s.conn.close(0u32.into(), b"done");

        // Resumed, 0-RTT: Attached comes back before any proof; a control stream opened
        // before the proof is not served, and a wrong proof closes with PROOF_FAILED.
        let (conn, accepted, mut send, mut recv) = early_attach(&ep, addr, &t, None).await;
        assert!(
            matches!(recv_frame(&mut recv).await, Some(Frame::Attached(_))),
            "EarlyAttach answered"
        );
        assert!(accepted.await, "the shard took the 0-RTT data");
        let (mut cs, mut cr) = conn.open_bi().await.unwrap();
        send_frame(&mut cs, subscribe_prices()).await;
        let wrong = proof(&conn, &t).map(|b| b ^ 0xff);
        send_frame(
            &mut send,
            Frame::AttachProof(sibyl_proto::frame::AttachProof { proof: wrong }),
        )
        .await;
        assert_eq!(close_code(&conn).await, ErrorCode::ProofFailed);
        assert!(
            recv_frame(&mut cr).await.is_none(),
            "served before the proof"
        );

        // Anything but AttachProof after EarlyAttach is a protocol violation.
        let (conn, _accepted, mut send, mut recv) = early_attach(&ep, addr, &t, None).await;
        assert!(matches!(
            recv_frame(&mut recv).await,
            Some(Frame::Attached(_))
        ));
        send_frame(&mut send, attach_frame(&t, proof(&conn, &t))).await;
        assert_eq!(close_code(&conn).await, ErrorCode::ProtocolViolation);

        // A token that does not open is refused before any answer.
        let mut bad = t.token.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let (conn, _accepted, _send, mut recv) = early_attach(&ep, addr, &t, Some(bad)).await;
        assert!(recv_frame(&mut recv).await.is_none());
        assert_eq!(close_code(&conn).await, ErrorCode::TokenInvalid);

        // The right proof: the session is served.
        let (conn, _accepted, mut send, mut recv) = early_attach(&ep, addr, &t, None).await;
        assert!(matches!(
            recv_frame(&mut recv).await,
            Some(Frame::Attached(_))
        ));
        let right = proof(&conn, &t);
        send_frame(
            &mut send,
            Frame::AttachProof(sibyl_proto::frame::AttachProof { proof: right }),
        )
        .await;
        let (mut cs, mut cr) = conn.open_bi().await.unwrap();
        send_frame(&mut cs, subscribe_prices()).await;
        // No stream "prices" in this config: answered (NOT_FOUND), so the session is live.
        let Some(Frame::SubError(e)) = recv_frame(&mut cr).await else {
            panic!("expected SubError")
        };
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(conn.close_reason().is_none());
        conn.close(0u32.into(), b"done");
    });
}

fn subscribe_prices() -> Frame {
    Frame::Subscribe(Subscribe {
        sub_id: 1,
        stream: "prices".into(),
        start: sibyl_proto::frame::Start::Earliest,
        group: None,
        mode: sibyl_proto::frame::Mode::Predictive,
    })
}
