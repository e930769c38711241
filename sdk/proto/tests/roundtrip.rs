//! Property tests: every frame type round-trips, and the stream decoder is chunking-agnostic.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sibyl_proto::frame::*;
use sibyl_proto::{Codec, DecodeLimits, ErrorCode, Frame, FrameDecoder, Reader};

fn s() -> impl Strategy<Value = String> {
    "[a-z0-9._:-]{0,12}"
}
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}
fn code() -> impl Strategy<Value = ErrorCode> {
    any::<u32>().prop_map(ErrorCode::from_u32)
}
fn posmap() -> impl Strategy<Value = BTreeMap<u32, u64>> {
    proptest::collection::btree_map(any::<u32>(), any::<u64>(), 0..4)
}

fn control() -> impl Strategy<Value = Frame> {
    let hello = (
        s(),
        s(),
        (s(), s(), s()),
        proptest::collection::vec((s(), any::<bool>()), 0..3),
        proptest::collection::vec(any::<u32>(), 1..4),
    )
        .prop_map(
            |(client_id, api_key, (region, device_class, sdk_version), wants, versions)| {
                Frame::from(Hello {
                    client_id,
                    api_key,
                    profile: Profile {
                        region,
                        device_class,
                        sdk_version,
                    },
                    wants: wants
                        .into_iter()
                        .map(|(stream, p)| Want {
                            stream,
                            action: if p {
                                Action::Publish
                            } else {
                                Action::Subscribe
                            },
                        })
                        .collect(),
                    versions,
                })
            },
        );
    let ticket = (
        any::<u32>(),
        bytes(64),
        any::<[u8; 32]>(),
        any::<u32>(),
        any::<u64>(),
        proptest::collection::vec((s(), s()), 1..4),
    )
        .prop_map(
            |(version, token, session_secret, shard_group, expires_at, eps)| {
                Frame::from(Ticket {
                    version,
                    token,
                    session_secret,
                    shard_group,
                    expires_at,
                    endpoints: eps
                        .into_iter()
                        .map(|(addr, server_name)| Endpoint { addr, server_name })
                        .collect(),
                })
            },
        );
    let hint = (any::<u32>(), proptest::collection::vec((s(), s()), 1..4)).prop_map(
        |(shard_group, eps)| {
            Frame::from(GroupHint {
                shard_group,
                endpoints: eps
                    .into_iter()
                    .map(|(addr, server_name)| Endpoint { addr, server_name })
                    .collect(),
            })
        },
    );
    let refused = (
        code(),
        s(),
        any::<Option<u64>>(),
        proptest::collection::vec(any::<u32>(), 0..3),
    )
        .prop_map(|(code, reason, retry_after_ms, versions)| {
            Frame::from(Refused {
                code,
                reason,
                retry_after_ms,
                versions,
            })
        });
    let publish = prop_oneof![
        (
            s(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<[u8; 16]>())
        )
            .prop_map(
                |(stream, producer_id, producer_token)| Frame::from(PublishOpen {
                    stream,
                    producer_id,
                    producer_token,
                })
            ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<[u8; 16]>()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(
                |(partitions, max_frame, producer_id, producer_token, max_in_flight)| {
                    Frame::from(PublishAccepted {
                        partitions,
                        max_frame,
                        producer_id,
                        producer_token,
                        max_in_flight,
                    })
                }
            ),
        (any::<u64>(), any::<u32>(), any::<u64>(), any::<u32>()).prop_map(
            |(seq, partition, base_offset, count)| Frame::from(ProduceAck {
                seq,
                partition,
                base_offset,
                count
            })
        ),
        (any::<u64>(), code(), s()).prop_map(|(seq, code, reason)| Frame::from(ProduceError {
            seq,
            code,
            reason
        })),
    ];
    let session = prop_oneof![
        (bytes(64), any::<[u8; 32]>(), s(), any::<Option<u64>>()).prop_map(
            |(token, proof, client_id, resume)| Frame::from(Attach {
                token,
                proof,
                client_id,
                resume
            })
        ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(
                |(session_id, max_streams, max_frame, idle_timeout_ms, server_time)| {
                    Frame::from(Attached {
                        session_id,
                        limits: SessionLimits {
                            max_streams,
                            max_frame,
                            idle_timeout_ms,
                        },
                        server_time,
                    })
                }
            ),
        (code(), s(), any::<u64>()).prop_map(|(code, reason, reconnect_after_ms)| Frame::from(
            GoAway {
                code,
                reason,
                reconnect_after_ms
            }
        )),
        (bytes(64), s(), any::<Option<u64>>()).prop_map(|(token, client_id, resume)| {
            Frame::from(EarlyAttach {
                token,
                client_id,
                resume,
            })
        }),
        any::<[u8; 32]>().prop_map(|proof| Frame::from(AttachProof { proof })),
    ];
    let start = prop_oneof![
        Just(Start::Earliest),
        Just(Start::Latest),
        posmap().prop_map(Start::Offsets),
        any::<u64>().prop_map(Start::Timestamp),
    ];
    let sub = prop_oneof![
        (
            any::<u32>(),
            s(),
            start,
            proptest::option::of(s()),
            any::<bool>()
        )
            .prop_map(|(sub_id, stream, start, group, r)| {
                Frame::from(Subscribe {
                    sub_id,
                    stream,
                    start,
                    group,
                    mode: if r { Mode::Reactive } else { Mode::Predictive },
                })
            }),
        (
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec((any::<u32>(), any::<u64>(), any::<i32>()), 0..4)
        )
            .prop_map(|(sub_id, epoch, ps)| {
                Frame::from(Assignment {
                    sub_id,
                    epoch,
                    partitions: ps
                        .into_iter()
                        .map(|(partition, start_offset, priority)| AssignedPartition {
                            partition,
                            start_offset,
                            priority,
                        })
                        .collect(),
                })
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
            |(rate_records_per_s, burst, lease_expires_ms)| Frame::from(Grant {
                rate_records_per_s,
                burst,
                lease_expires_ms
            })
        ),
        (code(), s()).prop_map(|(code, reason)| Frame::from(SubError { code, reason })),
        (any::<u32>(), any::<u64>(), any::<Option<u64>>()).prop_map(
            |(partition, next_offset, epoch)| Frame::from(Position {
                partition,
                next_offset,
                epoch
            })
        ),
        (any::<u32>(), 1..=u32::MAX).prop_map(|(partition, max_records)| Frame::from(Fetch {
            partition,
            max_records
        })),
        (
            proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..4),
            any::<u64>()
        )
            .prop_map(|(ps, buffer_capacity_bytes)| {
                Frame::from(Forecast {
                    partitions: ps
                        .into_iter()
                        .map(
                            |(partition, records_per_s, bytes_per_s)| PartitionForecast {
                                partition,
                                records_per_s,
                                bytes_per_s,
                            },
                        )
                        .collect(),
                    buffer_capacity_bytes,
                })
            }),
        (s(), s(), 0..=100u8, any::<Option<u64>>()).prop_map(
            |(from_stream, to_stream, confidence_pct, expected_at_ms)| {
                Frame::from(FlipHint {
                    from_stream,
                    to_stream,
                    confidence_pct,
                    expected_at_ms,
                })
            }
        ),
        (s(), s(), posmap(), posmap()).prop_map(
            |(from_stream, to_stream, from_positions, to_positions)| {
                Frame::from(Flip {
                    from_stream,
                    to_stream,
                    from_positions,
                    to_positions,
                })
            }
        ),
        (any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(sub_id, partition, epoch)| {
            Frame::from(PartitionOpen {
                sub_id,
                partition,
                epoch,
            })
        }),
    ];
    prop_oneof![hello, ticket, hint, refused, publish, session, sub]
}

fn batches() -> impl Strategy<Value = Frame> {
    let recs =
        || proptest::collection::vec((1..1000u64, any::<u64>(), bytes(20), bytes(200)), 1..20);
    let records = (any::<u32>(), 0..u64::MAX / 2, recs()).prop_map(|(partition, base, rs)| {
        let mut off = base;
        let owned: Vec<Record> = rs
            .into_iter()
            .enumerate()
            .map(|(i, (gap, timestamp, key, payload))| {
                if i > 0 {
                    off += gap;
                }
                Record {
                    offset: off,
                    timestamp,
                    key,
                    payload,
                }
            })
            .collect();
        Frame::from(Records::from_records(partition, &owned).expect("non-empty, increasing"))
    });
    let produce = (any::<u64>(), any::<u32>(), recs()).prop_map(|(seq, partition, rs)| {
        let owned: Vec<NewRecord> = rs
            .into_iter()
            .map(|(_, timestamp, key, payload)| NewRecord {
                timestamp,
                key,
                payload,
            })
            .collect();
        Frame::from(Produce::from_records(seq, partition, &owned).expect("non-empty"))
    });
    prop_oneof![records, produce]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![3 => control(), 1 => batches()]
}

proptest! {
    #[test]
    fn every_frame_round_trips(f in any_frame()) {
        let bytes = f.to_vec();
        let mut r = Reader::new(&bytes);
        let g = Frame::decode(&mut r).unwrap();
        prop_assert_eq!(&g, &f);
        prop_assert_eq!(r.remaining(), 0);
        // Every strict prefix is incomplete, never invalid.
        for cut in [0, 1, 4, 5, bytes.len() / 2, bytes.len() - 1] {
            let e = Frame::decode(&mut Reader::new(&bytes[..cut])).unwrap_err();
            prop_assert!(e.is_incomplete(), "cut {}: {:?}", cut, e);
        }
    }

    #[test]
    fn decoder_byte_by_byte_equals_whole(frames in proptest::collection::vec(any_frame(), 1..6)) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let mut whole = FrameDecoder::new(DecodeLimits::default());
        whole.push(&wire);
        let a: Vec<Frame> = std::iter::from_fn(|| whole.next_frame().unwrap()).collect();
        whole.finish().unwrap();
        let mut bytewise = FrameDecoder::new(DecodeLimits::default());
        let mut b = Vec::new();
        for byte in &wire {
            bytewise.push(std::slice::from_ref(byte));
            while let Some(f) = bytewise.next_frame().unwrap() {
                b.push(f);
            }
        }
        bytewise.finish().unwrap();
        prop_assert_eq!(&a, &frames);
        prop_assert_eq!(&b, &frames);
    }

    #[test]
    fn decoder_read_buffer_equals_push(
        frames in proptest::collection::vec(any_frame(), 1..6),
        step in 1usize..700,
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        // A transport that appends up to `step` bytes per read into the decoder's buffer.
        let mut d = FrameDecoder::new(DecodeLimits::default());
        let mut got = Vec::new();
        for piece in wire.chunks(step) {
            let buf = d.read_buffer(step);
            prop_assert!(buf.capacity() > buf.len());
            buf.extend_from_slice(piece);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        prop_assert_eq!(&got, &frames);
    }
}

#[test]
fn decoder_read_buffer_makes_room_for_a_whole_records_frame_once_its_header_is_in() {
    let recs: Vec<Record> = (0..4)
        .map(|i| Record {
            offset: i,
            timestamp: 1,
            key: vec![],
            payload: vec![7; 20_000],
        })
        .collect();
    let mut wire = Vec::new();
    Frame::from(Records::from_records(0, &recs).unwrap()).encode(&mut wire);
    let mut d = FrameDecoder::new(DecodeLimits::default());
    d.read_buffer(64).extend_from_slice(&wire[..10]);
    assert!(d.next_frame().unwrap().is_none());
    let buf = d.read_buffer(64);
    assert!(
        buf.capacity() >= wire.len(),
        "the whole frame fits without moving"
    );
    let at = buf.as_ptr();
    buf.extend_from_slice(&wire[10..]);
    assert_eq!(buf.as_ptr(), at);
    let Some(Frame::Records(r)) = d.next_frame().unwrap() else {
        panic!("a Records frame")
    };
    assert_eq!(r.to_records(), recs);
    d.finish().unwrap();
}

#[test]
fn decoder_hands_out_records_as_views_of_one_frame_buffer() {
    let recs: Vec<Record> = (0..3)
        .map(|i| Record {
            offset: 100 + i,
            timestamp: 5,
            key: vec![],
            payload: vec![i as u8; 3000],
        })
        .collect();
    let batch = Records::from_records(1, &recs).unwrap();
    let open = Frame::from(PartitionOpen {
        sub_id: 1,
        partition: 1,
        epoch: 2,
    });
    let mut wire = Vec::new();
    open.encode(&mut wire);
    Frame::from(batch.clone()).encode(&mut wire);
    open.encode(&mut wire);
    // Chunks that never line up with frame boundaries, as quinn delivers them.
    let mut d = FrameDecoder::new(DecodeLimits::default());
    let mut got = Vec::new();
    for piece in wire.chunks(1000) {
        d.push(piece);
        while let Some(f) = d.next_frame().unwrap() {
            got.push(f);
        }
    }
    d.finish().unwrap();
    assert_eq!(got, vec![open.clone(), Frame::from(batch), open]);
    let Frame::Records(r) = &got[1] else {
        panic!("not records")
    };
    // Payloads borrow from the batch's own buffer.
    let data = r.data().as_ptr_range();
    assert!(r.iter().all(|rec| data.contains(&rec.payload.as_ptr())));
    assert_eq!(r.to_records(), recs);
}

#[test]
fn decoder_rejects_unknown_type_and_oversize_before_body() {
    let mut d = FrameDecoder::new(DecodeLimits::default());
    d.push(&[0x7f]);
    assert_eq!(
        d.next_frame(),
        Err(sibyl_proto::FrameError::UnknownType(0x7f))
    );
    let mut d = FrameDecoder::new(DecodeLimits::default());
    d.push(&[0x01, 0x00, 0x01, 0x00, 0x01]); // Hello of 65 537 bytes announced, none sent
    let e = d.next_frame().unwrap_err();
    assert_eq!(
        e,
        sibyl_proto::FrameError::TooLarge {
            ty: 1,
            len: 65_537,
            max: 65_536
        }
    );
    assert_eq!(e.code(), ErrorCode::FrameTooLarge);
}

#[test]
fn decoder_finish_reports_truncation() {
    let f = Frame::from(Position {
        partition: 1,
        next_offset: 2,
        epoch: None,
    });
    let bytes = f.to_vec();
    let mut d = FrameDecoder::new(DecodeLimits::default());
    d.push(&bytes[..bytes.len() - 1]);
    assert_eq!(d.next_frame(), Ok(None));
    let e = d.finish().unwrap_err();
    assert!(e.is_incomplete());
    assert_eq!(e.code(), ErrorCode::MalformedFrame);
}

#[test]
fn malformed_cbor_and_trailing_bytes_are_invalid() {
    // A Position body that is not a map.
    let mut d = FrameDecoder::new(DecodeLimits::default());
    d.push(&[0x34, 0, 0, 0, 1, 0x01]);
    let e = d.next_frame().unwrap_err();
    assert!(
        matches!(e, sibyl_proto::FrameError::Malformed { ty: 0x34, .. }),
        "{e:?}"
    );
    // A valid Position body followed by one extra byte inside the frame.
    let mut body = Vec::new();
    Position {
        partition: 1,
        next_offset: 2,
        epoch: None,
    }
    .encode(&mut body);
    body.push(0);
    let mut wire = vec![0x34];
    wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
    wire.extend_from_slice(&body);
    let e = Frame::decode(&mut Reader::new(&wire)).unwrap_err();
    assert_eq!(e, sibyl_proto::FrameError::TrailingBytes { ty: 0x34 });
    // Semantic checks: Hello without versions.
    let h = Hello {
        client_id: "c".into(),
        api_key: "k".into(),
        profile: Profile::default(),
        wants: vec![],
        versions: vec![],
    };
    let e = Frame::decode(&mut Reader::new(&Frame::from(h).to_vec())).unwrap_err();
    assert!(
        matches!(e, sibyl_proto::FrameError::Malformed { ty: 0x01, .. }),
        "{e:?}"
    );
}

#[cfg(feature = "fuzzing")]
proptest! {
    #[test]
    fn fuzz_oracle_holds_on_valid_and_random_input(frames in proptest::collection::vec(any_frame(), 0..4), junk in bytes(64), chunk in 1u8..=255) {
        let mut data = vec![chunk];
        for f in &frames {
            f.encode(&mut data);
        }
        data.extend_from_slice(&junk);
        sibyl_proto::fuzzing::decode_frames(&data);
    }
}

/// PROTOCOL.md §7 (R28): an error code of any size a CBOR `code` can carry decodes, keeps its
/// value and is treated as a server fault retryable on another endpoint.
#[test]
fn unknown_error_codes_of_any_size_decode() {
    use sibyl_proto::Retry;
    for code in [0xdead_u64, u64::from(u32::MAX) + 1, (1 << 62) - 1, u64::MAX] {
        let mut body = vec![0xa2];
        body.extend(sibyl_proto::cbor::to_vec(&"code").unwrap());
        body.extend(sibyl_proto::cbor::to_vec(&code).unwrap());
        body.extend(sibyl_proto::cbor::to_vec(&"reason").unwrap());
        body.extend(sibyl_proto::cbor::to_vec(&"later").unwrap());
        let mut frame = vec![0x33];
        frame.extend((body.len() as u32).to_be_bytes());
        frame.extend(&body);
        let Frame::SubError(e) = Frame::decode(&mut Reader::new(&frame)).unwrap() else {
            panic!("not a SubError");
        };
        assert_eq!(e.code, ErrorCode::Unknown(code));
        assert_eq!(e.code.to_u64(), code);
        assert_eq!(e.code.retry(), Retry::OtherEndpoint);
    }
}

/// PROTOCOL.md §3.2 (R10, R11): a duplicate key in a nested map is malformed; `null` reads as
/// absent for an optional field that is not an `Option`.
#[test]
fn duplicate_nested_keys_are_malformed_and_null_is_absent() {
    use sibyl_proto::FrameError;
    // {"sub_id": 1, "stream": "s", "start": {"offsets": {0: 5, 0: 6}}, "mode": "reactive"}
    let mut body = vec![0xa4];
    for (k, v) in [("sub_id", None), ("stream", Some("s"))] {
        body.extend(sibyl_proto::cbor::to_vec(&k).unwrap());
        match v {
            Some(v) => body.extend(sibyl_proto::cbor::to_vec(&v).unwrap()),
            None => body.push(0x01),
        }
    }
    body.extend(sibyl_proto::cbor::to_vec(&"start").unwrap());
    body.extend([0xa1]);
    body.extend(sibyl_proto::cbor::to_vec(&"offsets").unwrap());
    let dup = [0xa2, 0x00, 0x05, 0x00, 0x06];
    let mut good = body.clone();
    body.extend(dup);
    good.extend([0xa2, 0x00, 0x05, 0x01, 0x06]);
    for b in [&mut body, &mut good] {
        b.extend(sibyl_proto::cbor::to_vec(&"mode").unwrap());
        b.extend(sibyl_proto::cbor::to_vec(&"reactive").unwrap());
    }
    assert!(matches!(
        Subscribe::decode(&mut Reader::new(&body)),
        Err(FrameError::Malformed { .. })
    ));
    let s = Subscribe::decode(&mut Reader::new(&good)).unwrap();
    assert_eq!(s.start, Start::Offsets([(0, 5), (1, 6)].into()));
    // Refused with "versions": null.
    let mut refused = vec![0xa3];
    refused.extend(sibyl_proto::cbor::to_vec(&"code").unwrap());
    refused.push(0x05);
    refused.extend(sibyl_proto::cbor::to_vec(&"reason").unwrap());
    refused.extend(sibyl_proto::cbor::to_vec(&"no").unwrap());
    refused.extend(sibyl_proto::cbor::to_vec(&"versions").unwrap());
    refused.push(0xf6);
    let r = Refused::decode(&mut Reader::new(&refused)).unwrap();
    assert!(r.versions.is_empty());
}

/// A decoder for a stream that does not carry a type refuses it from the type byte alone.
#[test]
fn a_stream_refuses_types_it_does_not_carry_from_the_type_byte() {
    use sibyl_proto::FrameError;
    let mut dec = FrameDecoder::accepting(DecodeLimits::default(), inbound::CONTROL_STREAM);
    dec.push(&[0x41]);
    let e = dec.next_frame().unwrap_err();
    assert_eq!(e, FrameError::NotAllowed { ty: 0x41 });
    assert_eq!(e.code(), ErrorCode::ProtocolViolation);
    // Nothing was reserved for the announced body.
    let mut dec = FrameDecoder::accepting(DecodeLimits::default(), inbound::SESSION_STREAM);
    dec.push(&[0x41, 0x00, 0x18, 0x00, 0x10]);
    assert!(dec.read_buffer(0).capacity() < 64 * 1024);
    assert!(dec.next_frame().is_err());
}

/// `Debug` of the frames that carry credentials prints none of them.
#[test]
fn debug_output_holds_no_api_key_or_session_secret() {
    let hello = Hello {
        client_id: "app".into(),
        api_key: "sk_live_secret-key-material".into(),
        profile: Profile::default(),
        wants: vec![],
        versions: vec![1],
    };
    let d = format!("{hello:?} {:?}", Frame::Hello(hello.clone()));
    assert!(!d.contains("secret-key-material"), "{d}");
    assert!(d.contains("app"), "{d}");
    let ticket = Ticket {
        version: 1,
        token: vec![0xee; 40],
        session_secret: [0xab; 32],
        shard_group: 3,
        expires_at: 9,
        endpoints: vec![],
    };
    let d = format!("{ticket:?} {:?}", Frame::Ticket(ticket.clone()));
    assert!(!d.contains("171") && !d.contains("238"), "{d}");
    assert!(
        d.contains("shard_group: 3") && d.contains("<40 bytes>"),
        "{d}"
    );
}
