//! Oracles for cargo-fuzz targets (feature `fuzzing` or `cfg(fuzzing)`), not a stable API.
//!
//! Every decoder the gateway runs on bytes it did not write itself — the hub↔shard IPC
//! channel, the store link, and segment files read back at recovery — is reachable from here.
//! Each function panics only when an oracle fails: a decoded value must re-encode and decode
//! to itself, and a segment scan must stay within the input.

use crate::ipc::{self, HubToShard, ShardToHub};
use crate::storelink::codec::{self as link, ServerMsg, ShardMsg};
use crate::storelink::group;

/// Decodes an IPC frame both ways (hub → shard and shard → hub); anything decoded must
/// re-encode and decode to an equal message.
pub fn ipc_decode(data: &[u8]) {
    if let Ok(Some((msg, used))) = ipc::decode::<HubToShard>(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        ipc::encode(&msg, &mut out).expect("a decoded message re-encodes");
        let (again, _) = ipc::decode::<HubToShard>(&out)
            .expect("re-encoded message decodes")
            .expect("re-encoded message is complete");
        assert!(again == msg, "hub→shard IPC round trip changed the message");
    }
    if let Ok(Some((msg, used))) = ipc::decode::<ShardToHub>(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        ipc::encode(&msg, &mut out).expect("a decoded message re-encodes");
        let (again, _) = ipc::decode::<ShardToHub>(&out)
            .expect("re-encoded message decodes")
            .expect("re-encoded message is complete");
        assert_eq!(again, msg, "shard→hub IPC round trip changed the message");
    }
}

/// Splits store-link frames out of `data` and decodes each body as a shard message (a store
/// request or a consumer-group message, bounds included) and as a hub message; decoded
/// requests, group messages, responses and group pushes must round-trip.
pub fn storelink_decode(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((body, used))) = link::split_frame(rest, 1 << 20) {
        assert!(used > 0 && used <= rest.len());
        if let Ok(msg) = link::decode_shard_msg(body) {
            let mut out = Vec::new();
            match &msg {
                ShardMsg::Store(req) => link::encode_request(req, &mut out),
                ShardMsg::Group(g) => group::encode_group_msg(g, &mut out),
            }
            .expect("a decoded shard message re-encodes");
            let (again, _) = link::split_frame(&out, usize::MAX)
                .expect("re-encoded shard message frames")
                .expect("re-encoded shard message is complete");
            assert_eq!(link::decode_shard_msg(again).ok(), Some(msg));
        }
        if let Ok(msg @ (ServerMsg::Response(_) | ServerMsg::Group(_))) =
            link::decode_server_msg(body)
        {
            let mut out = Vec::new();
            match &msg {
                ServerMsg::Response(resp) => link::encode_response(resp, &mut out),
                ServerMsg::Group(push) => group::encode_group_assign(push, &mut out),
                _ => unreachable!("matched above"),
            }
            .expect("a decoded hub message re-encodes");
            let (again, _) = link::split_frame(&out, usize::MAX)
                .expect("re-encoded hub message frames")
                .expect("re-encoded hub message is complete");
            assert_eq!(link::decode_server_msg(again).ok(), Some(msg));
        }
        if let Ok(ServerMsg::Raw {
            segment_base,
            pos,
            data,
            ..
        }) = link::decode_server_msg(body)
        {
            raw_decode_checked(segment_base % 4, segment_base, pos, &data);
        }
        rest = &rest[used..];
    }
    // Segment bytes the hub could send for a raw read: a few valid frames built from the
    // input, then the input itself, cut where the input says.
    if let Some((&sel, tail)) = data.split_first() {
        let mut seg = Vec::new();
        for (i, chunk) in tail.chunks(7).take(usize::from(sel % 5)).enumerate() {
            crate::store::fuzz_encode_record(&mut seg, i as u64, 0, &chunk[..1], chunk);
        }
        seg.extend_from_slice(tail);
        let cut = seg.len().saturating_sub(usize::from(sel >> 4));
        raw_decode_checked(u64::from(sel % 3), 0, 0, &seg[..cut]);
    }
}

/// [`decode_raw`](crate::storelink::raw::decode_raw) of `data` from `from`: a batch it
/// returns starts at `from`, counts its records consecutively and points the next read
/// inside `data`.
fn raw_decode_checked(from: u64, segment_base: u64, pos: u64, data: &[u8]) {
    use crate::storelink::raw::decode_raw;
    if let Ok((records, hint)) = decode_raw(1, from, 64, segment_base, pos, data) {
        assert_eq!(records.base_offset(), from);
        assert_eq!(records.partition(), 1);
        let mut next = from;
        for r in records.iter() {
            assert_eq!(r.offset, next, "raw records are consecutive");
            next += 1;
        }
        assert!(next - from <= 64);
        assert_eq!(hint.next, next);
        assert_eq!(hint.segment_base, segment_base);
        assert!(hint.pos >= pos && hint.pos - pos <= data.len() as u64);
    }
}

/// Scans `data` as a segment file, as recovery does; the scan must stay within the input and
/// account for every record it reports.
pub fn store_scan(data: &[u8]) {
    crate::store::fuzz_scan_segment(data);
}

/// Seed inputs for each target, by target name: real encodings of typical messages and a
/// segment with a few records, so the fuzzers start from valid structure.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::ipc::Load;
    use crate::predict::{MemberId, PartitionLoad};
    use crate::storelink::codec::Request;
    use crate::storelink::group::GroupMsg;
    let mut out = Vec::new();
    let ipc_msgs: Vec<(String, Vec<u8>)> = vec![
        ("ready", ShardToHub::Ready { udp_port: 4433 }),
        (
            "heartbeat",
            ShardToHub::Heartbeat(Load {
                connections: 3,
                subscriptions: 5,
                rss_bytes: 1 << 24,
            }),
        ),
        ("draining", ShardToHub::Draining),
        (
            "exiting",
            ShardToHub::Exiting {
                reason: "drained".into(),
            },
        ),
    ]
    .into_iter()
    .map(|(name, m)| {
        let mut b = Vec::new();
        ipc::encode(&m, &mut b).expect("seed encodes");
        (name.to_owned(), b)
    })
    .chain(
        [
            (
                "drain",
                HubToShard::Drain {
                    within: std::time::Duration::from_secs(10),
                },
            ),
            (
                "keyring",
                HubToShard::KeyringUpdate {
                    keyring: vec![0xa2; 40],
                },
            ),
        ]
        .into_iter()
        .map(|(name, m)| {
            let mut b = Vec::new();
            ipc::encode(&m, &mut b).expect("seed encodes");
            (name.to_owned(), b)
        }),
    )
    .collect();
    for (name, b) in ipc_msgs {
        out.push(("ipc_decode", name, b));
    }
    let reqs = [
        Request::Streams { id: 1 },
        Request::Bounds {
            id: 2,
            stream: "events".into(),
            partition: 3,
        },
        Request::Read {
            id: 3,
            stream: "events".into(),
            partition: 0,
            from: 42,
            max_records: 1000,
            max_bytes: 1 << 20,
        },
        Request::WatchTail {
            id: 4,
            stream: "events".into(),
            partition: 1,
        },
        Request::Unwatch { watch: 4 },
        Request::ReadRaw {
            id: 5,
            stream: "events".into(),
            partition: 2,
            from: 7,
            max_records: 100,
            max_bytes: 1 << 20,
            hint: Some((0, 4096)),
        },
    ];
    let mut all = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let mut b = Vec::new();
        link::encode_request(r, &mut b).expect("seed encodes");
        all.extend_from_slice(&b);
        out.push(("storelink_decode", format!("request-{i}"), b));
    }
    let member = MemberId(7);
    let group_msgs = [
        GroupMsg::Join {
            member,
            stream: "events".into(),
            group: "billing".into(),
            starts: vec![(0, 0), (1, 42)],
        },
        GroupMsg::Position {
            member,
            partition: 1,
            next_offset: 43,
            serving: false,
        },
        GroupMsg::Forecast {
            member,
            loads: vec![
                PartitionLoad {
                    partition: 0,
                    records_per_s: 100,
                    bytes_per_s: 10_000,
                },
                PartitionLoad {
                    partition: 1,
                    records_per_s: 5,
                    bytes_per_s: 500,
                },
            ],
        },
        GroupMsg::Leave { member },
    ];
    for (i, m) in group_msgs.iter().enumerate() {
        let mut b = Vec::new();
        group::encode_group_msg(m, &mut b).expect("seed encodes");
        all.extend_from_slice(&b);
        out.push(("storelink_decode", format!("group-{i}"), b));
    }
    out.push(("storelink_decode", "all-requests".into(), all));
    let mut push = Vec::new();
    group::encode_group_assign(
        &group::GroupAssign {
            member,
            epoch: 3,
            partitions: vec![(0, 0), (2, 99)],
        },
        &mut push,
    )
    .expect("seed encodes");
    out.push(("storelink_decode", "group-assign".into(), push));
    // A raw answer: the frame prefix, then three stored records from offset 2.
    let mut frames = Vec::new();
    for i in 2..5u64 {
        crate::store::fuzz_encode_record(&mut frames, i, 1_700_000_000_000 + i, b"k", b"payload");
    }
    let mut raw = Vec::new();
    link::encode_raw_prefix(9, 2, 4096, frames.len(), &mut raw).expect("seed encodes");
    raw.extend_from_slice(&frames);
    out.push(("storelink_decode", "raw-records".into(), raw));
    let mut seg = vec![0u8];
    for i in 0..4u64 {
        crate::store::fuzz_encode_record(&mut seg, i, 1_700_000_000_000 + i, b"key", b"payload");
    }
    out.push(("store_scan", "four-records".into(), seg.clone()));
    let mut torn = seg.clone();
    torn.truncate(seg.len() - 5);
    out.push(("store_scan", "torn-tail".into(), torn));
    let mut flipped = seg;
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    out.push(("store_scan", "corrupt-middle".into(), flipped));
    // Two idempotent batches (producer marks on their first records), the second cut short.
    let mut marked = vec![0u8];
    crate::store::fuzz_encode_marked_record(&mut marked, 0, (7, 1, 2), b"first");
    crate::store::fuzz_encode_record(&mut marked, 1, 1_700_000_000_000, b"k", b"second");
    crate::store::fuzz_encode_marked_record(&mut marked, 2, (7, 2, 3), b"third");
    crate::store::fuzz_encode_record(&mut marked, 3, 1_700_000_000_000, b"k", b"fourth");
    out.push(("store_scan", "marked-batch-cut".into(), marked.clone()));
    crate::store::fuzz_encode_record(&mut marked, 4, 1_700_000_000_000, b"k", b"fifth");
    out.push(("store_scan", "marked-batches".into(), marked));
    out
}

#[cfg(test)]
mod tests {
    /// Every seed passes its target's oracle (`cargo test --features fuzzing`).
    #[test]
    fn seeds_pass_their_oracles() {
        for (target, name, bytes) in super::seeds() {
            match target {
                "store_scan" => super::store_scan(&bytes),
                "ipc_decode" => super::ipc_decode(&bytes),
                "storelink_decode" => super::storelink_decode(&bytes),
                other => panic!("seed {name} of unknown target {other}"),
            }
        }
    }
}
