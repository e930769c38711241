"""Requirement checks of docs/PROTOCOL.md section 10, on the wire, against a running server.

The interop runner starts this program for TESTCASE=conformance (run.sh). Each check sends
exactly the bytes the document describes (hand-made frames, hand-made CBOR where a check needs
bytes an encoder would not write) and compares what comes back with what the document says.
It writes OUTPUT_DIR/requirements.json ({"R01": "pass", "R07": "fail: why", ...}) and exits 0
when every check passed, 1 otherwise. Like client.py it is written from PROTOCOL.md alone and
shares no code with the gateway.

Only requirements a server can be seen to keep are checked here; the ones on clients are
listed in PROTOCOL.md section 10 with the test of the reference client that covers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import sys
import traceback
from typing import AsyncIterator, Awaitable, Callable

import cbor2

import sibyl_wire as w
from client import Env, ask_ticket, attach, hello, hub_config, shard_config
from sibyl_quic import Proto, open_conn
from sibyl_wire import (
    ASSIGNMENT,
    ATTACH,
    ATTACH_PROOF,
    ATTACHED,
    EARLY_ATTACH,
    FETCH,
    FORECAST,
    FRAME_TOO_LARGE,
    GRANT,
    HELLO,
    IDLE,
    LIMIT_EXCEEDED,
    MALFORMED_FRAME,
    POSITION,
    PRODUCE,
    PRODUCE_ACK,
    PROOF_FAILED,
    PROTOCOL_VIOLATION,
    PUBLISH_ACCEPTED,
    PUBLISH_OPEN,
    RECORDS,
    REFUSED,
    SUB_ERROR,
    SUBSCRIBE,
    TICKET,
    TOKEN_INVALID,
    UNSUPPORTED_VERSION,
    Fail,
    attach_proof,
    cbor_frame,
    decode_cbor,
    frame,
)

STEP = 15.0
UNDEFINED_TYPE = 0x7F
# TLS alert no_application_protocol (120) as a QUIC CRYPTO_ERROR (RFC 9001 section 4.8).
CRYPTO_NO_APPLICATION_PROTOCOL = 0x100 + 120

CHECKS: list[tuple[str, str, Callable[[Env], Awaitable[str]]]] = []


def check(req: str, what: str):  # type: ignore[no-untyped-def]
    def register(fn):  # type: ignore[no-untyped-def]
        CHECKS.append((req, what, fn))
        return fn

    return register


# ---- helpers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def hub_conn(env: Env) -> AsyncIterator[Proto]:
    conn = await open_conn(env.hub, hub_config(env))
    try:
        yield conn
    finally:
        await conn.shutdown()


@contextlib.asynccontextmanager
async def shard_conn(env: Env, ep: dict) -> AsyncIterator[Proto]:
    conn = await open_conn(ep["addr"], shard_config(env, ep["server_name"]))
    try:
        yield conn
    finally:
        await conn.shutdown()


async def closed_with(conn: Proto, code: int, what: str) -> str:
    """Waits for the connection to close and checks its application error code."""
    try:
        await asyncio.wait_for(conn.closed.wait(), STEP)
    except asyncio.TimeoutError:
        raise Fail(f"{what}: connection still open after {STEP} s (expected close {code:#x})")
    if conn.closed_app != code:
        raise Fail(f"{what}: {conn.closed_why}, expected an application close with {code:#x}")
    return f"{what}: closed with {code:#x}"


async def answer(conn: Proto, sid: int) -> tuple[int, dict]:
    f = await conn.read_frame(sid)
    if f is None:
        raise Fail(f"stream {sid} ended without a frame (close code {conn.closed_code})")
    return f[0], decode_cbor(f[1])


def hello_fields(env: Env) -> dict:
    return decode_cbor(hello(env)[5:])


def cbor_map(pairs: list[tuple[object, object]]) -> bytes:
    """A CBOR map written pair by pair (keys may repeat, order is the caller's)."""
    n = len(pairs)
    head = bytes([0xA0 | n]) if n < 24 else bytes([0xB8, n])
    return head + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in pairs)


def varint8(v: int) -> bytes:
    """A QUIC varint in its longest (8-byte) form."""
    return struct.pack(">Q", v | 0xC000000000000000)


async def open_publisher(env: Env, hub: Proto, **keys: object) -> tuple[int, int, dict]:
    """A publish stream on `hub` (a ticket first): (stream id, frame type, answer)."""
    sid = hub.open_bidi()
    hub.send(sid, cbor_frame(PUBLISH_OPEN, {"stream": env.stream, **keys}))
    ty, m = await answer(hub, sid)
    return sid, ty, m


def one_record(seq: int, payload: bytes) -> bytes:
    return frame(PRODUCE, struct.pack(">QII", seq, 0, 1) + struct.pack(">Q", 0) + b"\x00" + bytes([len(payload)]) + payload)


async def accepted_publisher(env: Env, hub: Proto) -> int:
    """A publish stream on `hub` (ticket already asked) that got PublishAccepted."""
    sid, ty, m = await open_publisher(env, hub)
    if ty != PUBLISH_ACCEPTED:
        raise Fail(f"PublishOpen: {ty:#x} {m}")
    return sid


async def attached_session(env: Env, shard: Proto, t: dict) -> dict:
    _, a = await attach(env, t, shard)
    return a


async def ticket(env: Env) -> tuple[dict, dict]:
    async with hub_conn(env) as hub:
        t = await ask_ticket(env, hub)
    return t, t["endpoints"][0]


async def publish(env: Env, n: int) -> None:
    """Publishes n records to partition 0 of the interop stream (acknowledged)."""
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        sid = await accepted_publisher(env, hub)
        body = bytearray(struct.pack(">QII", 1, 0, n))
        for i in range(n):
            p = f"conformance-{i}".encode()
            body += struct.pack(">Q", 0) + bytes([0]) + bytes([len(p)]) + p
        hub.send(sid, frame(PRODUCE, bytes(body)))
        ty, m = await answer(hub, sid)
        if ty != PRODUCE_ACK:
            raise Fail(f"Produce: {m}")


def subscribe(sub_id: int, env: Env, **extra: object) -> bytes:
    fields = {"sub_id": sub_id, "stream": env.stream, "start": "earliest", "mode": "predictive"}
    fields.update(extra)
    return cbor_frame(SUBSCRIBE, fields)


async def subscribed(shard: Proto, sid: int) -> str:
    """Reads the shard's answer to Subscribe: Grant, then Assignment."""
    seen = []
    for _ in range(2):
        ty, m = await answer(shard, sid)
        if ty == SUB_ERROR:
            raise Fail(f"SubError {m}")
        seen.append(ty)
    if seen != [GRANT, ASSIGNMENT]:
        raise Fail(f"expected Grant, Assignment; got {[hex(t) for t in seen]}")
    return "Grant, Assignment"


# ---- section 2 -------------------------------------------------------------------------


@check("R01", "a server refuses an ALPN other than sibyl/1 at the TLS layer")
async def alpn_refused(env: Env) -> str:
    cfg = hub_config(env)
    cfg.alpn_protocols = ["h3"]
    try:
        conn = await open_conn(env.hub, cfg)
    except (ConnectionError, asyncio.TimeoutError) as e:
        return f"handshake failed: {type(e).__name__} {e}"
    try:
        await asyncio.wait_for(conn.closed.wait(), STEP)
        if conn.closed_code != CRYPTO_NO_APPLICATION_PROTOCOL:
            raise Fail(f"{conn.closed_why}, expected {CRYPTO_NO_APPLICATION_PROTOCOL:#x}")
        return "TLS alert no_application_protocol"
    finally:
        await conn.shutdown()


# ---- section 3 -------------------------------------------------------------------------


@check("R02", "a length above the type's maximum is FRAME_TOO_LARGE, before any body")
async def too_large(env: Env) -> str:
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), struct.pack(">BI", HELLO, 16 << 20))
        return await closed_with(hub, FRAME_TOO_LARGE, "Hello header announcing 16 MiB, no body")


@check("R03", "a frame type the stream does not carry is PROTOCOL_VIOLATION from its header")
async def not_allowed(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        # A Records header (a shard-to-client batch) announcing the largest batch body.
        shard.send(shard.open_bidi(), struct.pack(">BI", RECORDS, 1_572_880))
        return await closed_with(shard, PROTOCOL_VIOLATION, "Records header on a control stream")


@check("R04", "an undefined frame type is MALFORMED_FRAME")
async def undefined_type(env: Env) -> str:
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), struct.pack(">BI", UNDEFINED_TYPE, 0))
        return await closed_with(hub, MALFORMED_FRAME, "type 0x7f")


@check("R05", "a CBOR body with bytes after the map is MALFORMED_FRAME")
async def trailing_bytes(env: Env) -> str:
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), frame(HELLO, hello(env)[5:] + b"\x00"))
        return await closed_with(hub, MALFORMED_FRAME, "Hello + one trailing byte")


@check("R06", "a stream that ends inside a frame is MALFORMED_FRAME")
async def truncated(env: Env) -> str:
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), hello(env)[:12], end=True)
        return await closed_with(hub, MALFORMED_FRAME, "12 bytes of a Hello, then FIN")


@check("R07", "a client frame above Attached.limits.max_frame is FRAME_TOO_LARGE")
async def above_max_frame(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        a = await attached_session(env, shard, t)
        limit = a["limits"]["max_frame"]
        shard.send(shard.open_bidi(), struct.pack(">BI", SUBSCRIBE, limit + 1))
        return await closed_with(shard, FRAME_TOO_LARGE, f"Subscribe of max_frame + 1 = {limit + 1}")


@check("R08", "unknown keys in a CBOR body are ignored")
async def unknown_keys(env: Env) -> str:
    fields = hello_fields(env)
    fields["x-future-field"] = {"nested": [1, 2, 3]}
    async with hub_conn(env) as hub:
        sid = hub.open_bidi()
        hub.send(sid, cbor_frame(HELLO, fields))
        ty, m = await answer(hub, sid)
        if ty != TICKET:
            raise Fail(f"expected Ticket, got {ty:#x} {m}")
    return "Hello with an unknown key got a Ticket"


@check("R09", "the keys of a CBOR body may come in any order")
async def any_order(env: Env) -> str:
    pairs = list(hello_fields(env).items())[::-1]
    async with hub_conn(env) as hub:
        sid = hub.open_bidi()
        hub.send(sid, frame(HELLO, cbor_map(pairs)))
        ty, m = await answer(hub, sid)
        if ty != TICKET:
            raise Fail(f"expected Ticket, got {ty:#x} {m}")
    return "Hello with its keys reversed got a Ticket"


@check("R10", "a CBOR map with a duplicate key is MALFORMED_FRAME")
async def duplicate_key(env: Env) -> str:
    pairs = list(hello_fields(env).items())
    pairs.append(("client_id", "someone-else"))
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), frame(HELLO, cbor_map(pairs)))
        return await closed_with(hub, MALFORMED_FRAME, "Hello with client_id twice")


@check("R11", "null is accepted for an optional field")
async def null_optional(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        sid = shard.open_bidi()
        proof = attach_proof(t["session_secret"], shard.exporter())
        shard.send(
            sid,
            cbor_frame(ATTACH, {"token": t["token"], "proof": proof, "client_id": env.client_id, "resume": None}),
        )
        ty, m = await answer(shard, sid)
        if ty != ATTACHED:
            raise Fail(f"expected Attached, got {ty:#x} {m}")
    return "Attach with resume: null got Attached"


# ---- section 5 -------------------------------------------------------------------------


@check("R12", "Hello.versions must not be empty: an empty list is MALFORMED_FRAME")
async def empty_versions(env: Env) -> str:
    fields = hello_fields(env)
    fields["versions"] = []
    async with hub_conn(env) as hub:
        hub.send(hub.open_bidi(), cbor_frame(HELLO, fields))
        return await closed_with(hub, MALFORMED_FRAME, "Hello with versions []")


@check("R13", "no common version: Refused{UNSUPPORTED_VERSION, versions}, then close with its code")
async def no_common_version(env: Env) -> str:
    fields = hello_fields(env)
    fields["versions"] = [99]
    async with hub_conn(env) as hub:
        sid = hub.open_bidi()
        hub.send(sid, cbor_frame(HELLO, fields))
        ty, m = await answer(hub, sid)
        if ty != REFUSED or m.get("code") != UNSUPPORTED_VERSION:
            raise Fail(f"expected Refused{{UNSUPPORTED_VERSION}}, got {ty:#x} {m}")
        if 1 not in (m.get("versions") or []):
            raise Fail(f"Refused.versions {m.get('versions')} does not list 1")
        return await closed_with(hub, UNSUPPORTED_VERSION, f"Refused{{versions {m['versions']}}}")


@check("R14", "no Hello within the first-frame deadline: the hub closes with IDLE")
async def hello_deadline(env: Env) -> str:
    async with hub_conn(env) as hub:
        hub.open_bidi()
        try:
            await asyncio.wait_for(hub.closed.wait(), 30)
        except asyncio.TimeoutError:
            raise Fail("hub connection without Hello still open after 30 s")
        if hub.closed_app != IDLE:
            raise Fail(f"{hub.closed_why}, expected IDLE")
    return "closed with IDLE"


@check("R15", "a publish stream's first frame must be PublishOpen: Produce first is PROTOCOL_VIOLATION")
async def produce_first(env: Env) -> str:
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        hub.send(hub.open_bidi(), one_record(1, b"x"))
        return await closed_with(hub, PROTOCOL_VIOLATION, "Produce before PublishOpen")


@check("R16", "Produce.seq starts at 1: seq 0 is PROTOCOL_VIOLATION")
async def seq_zero(env: Env) -> str:
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        sid = await accepted_publisher(env, hub)
        hub.send(sid, one_record(0, b"x"))
        return await closed_with(hub, PROTOCOL_VIOLATION, "Produce with seq 0")


@check("R17", "receivers accept any varint form (Produce lengths as 8-byte varints)")
async def long_varints(env: Env) -> str:
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        sid = await accepted_publisher(env, hub)
        p = b"long-varints"
        body = struct.pack(">QII", 1, 0, 1) + struct.pack(">Q", 0) + varint8(0) + varint8(len(p)) + p
        hub.send(sid, frame(PRODUCE, body))
        ty, m = await answer(hub, sid)
        if ty != PRODUCE_ACK or m.get("count") != 1:
            raise Fail(f"expected ProduceAck for 1 record, got {ty:#x} {m}")
    return f"ProduceAck at offset {m.get('base_offset')}"


@check("R29", "an idempotent batch re-sent with its seq gets its original offsets, appended once")
async def idempotent_resend(env: Env) -> str:
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        sid, ty, acc = await open_publisher(env, hub, producer_id=0)
        if ty != PUBLISH_ACCEPTED or not acc.get("producer_id"):
            raise Fail(f"PublishOpen{{producer_id: 0}}: expected a producer id, got {ty:#x} {acc}")
        keys = {"producer_id": acc["producer_id"], "producer_token": acc["producer_token"]}
        hub.send(sid, one_record(1, b"idem-1"))
        ty, first = await answer(hub, sid)
        if ty != PRODUCE_ACK:
            raise Fail(f"seq 1: {ty:#x} {first}")
    # The "lost ack" case: a new connection, the same producer, the same seq.
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        sid, ty, acc2 = await open_publisher(env, hub, **keys)
        if ty != PUBLISH_ACCEPTED or acc2.get("producer_id") != keys["producer_id"]:
            raise Fail(f"re-open with the producer: {ty:#x} {acc2}")
        hub.send(sid, one_record(1, b"idem-1"))
        ty, again = await answer(hub, sid)
        if ty != PRODUCE_ACK or again.get("base_offset") != first.get("base_offset"):
            raise Fail(f"re-sent seq 1: expected the ack at {first.get('base_offset')}, got {ty:#x} {again}")
        hub.send(sid, one_record(2, b"idem-2"))
        ty, nxt = await answer(hub, sid)
        if ty != PRODUCE_ACK or nxt.get("base_offset") != first["base_offset"] + 1:
            raise Fail(f"seq 2 should follow seq 1 directly (nothing appended twice): {ty:#x} {nxt}")
    return f"seq 1 acked twice at offset {first['base_offset']}, seq 2 at {nxt['base_offset']}"


@check("R30", "a producer id with a token not issued for it is UNKNOWN_PRODUCER")
async def unknown_producer(env: Env) -> str:
    async with hub_conn(env) as hub:
        await ask_ticket(env, hub)
        _, ty, acc = await open_publisher(env, hub, producer_id=0)
        if ty != PUBLISH_ACCEPTED:
            raise Fail(f"PublishOpen: {acc}")
        forged = bytes(b ^ 0xFF for b in acc["producer_token"])
        _, ty, m = await open_publisher(env, hub, producer_id=acc["producer_id"], producer_token=forged)
        if m.get("code") != w.UNKNOWN_PRODUCER:
            raise Fail(f"expected UNKNOWN_PRODUCER, got {ty:#x} {m}")
    return "refused with UNKNOWN_PRODUCER"


@check("R31", "FORBIDDEN before NOT_FOUND on PublishOpen and Subscribe")
async def forbidden_first(env: Env) -> str:
    missing = "no-such-stream-conformance"
    async with hub_conn(env) as hub:
        t = await ask_ticket(env, hub)
        sid = hub.open_bidi()
        hub.send(sid, cbor_frame(PUBLISH_OPEN, {"stream": missing}))
        ty, m = await answer(hub, sid)
        if m.get("code") != w.FORBIDDEN:
            raise Fail(f"PublishOpen of a stream not wanted (and absent): expected FORBIDDEN, got {ty:#x} {m}")
    ep = t["endpoints"][0]
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        sid = shard.open_bidi()
        shard.send(sid, cbor_frame(SUBSCRIBE, {"sub_id": 1, "stream": missing, "start": "earliest", "mode": "predictive"}))
        ty, m = await answer(shard, sid)
        if ty != SUB_ERROR or m.get("code") != w.FORBIDDEN:
            raise Fail(f"Subscribe to a stream outside the token (and absent): expected FORBIDDEN, got {ty:#x} {m}")
    return "FORBIDDEN on PublishOpen and on Subscribe for an absent stream"


# ---- section 6 -------------------------------------------------------------------------


@check("R18", "a token longer than 1 KiB is TOKEN_INVALID")
async def long_token(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        sid = shard.open_bidi()
        proof = attach_proof(t["session_secret"], shard.exporter())
        token = t["token"] + bytes(2048 - len(t["token"]))
        shard.send(sid, cbor_frame(ATTACH, {"token": token, "proof": proof, "client_id": env.client_id}))
        return await closed_with(shard, TOKEN_INVALID, "Attach with a 2 KiB token")


@check("R19", "a control stream opened before Attached is served once the session is attached")
async def stream_before_attached(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        # The session stream gets the first byte of Attach (aioquic gives a stream its id on
        # first send), the control stream its whole Subscribe, then Attach is completed.
        proof = attach_proof(t["session_secret"], shard.exporter())
        att = cbor_frame(ATTACH, {"token": t["token"], "proof": proof, "client_id": env.client_id})
        session = shard.open_bidi()
        shard.send(session, att[:1])
        control = shard.open_bidi()
        shard.send(control, subscribe(1, env))
        await asyncio.sleep(0.05)
        shard.send(session, att[1:])
        ty, m = await answer(shard, session)
        if ty != ATTACHED:
            raise Fail(f"expected Attached, got {ty:#x} {m}")
        got = await subscribed(shard, control)
    return f"Subscribe sent before Attach answered: {got}"


async def early_attached(env: Env, shard: Proto, t: dict) -> int:
    """EarlyAttach in 1-RTT on the session stream until Attached; returns the stream id."""
    sid = shard.open_bidi()
    shard.send(sid, cbor_frame(EARLY_ATTACH, {"token": t["token"], "client_id": env.client_id}))
    ty, m = await answer(shard, sid)
    if ty != ATTACHED:
        raise Fail(f"expected Attached, got {ty:#x} {m}")
    return sid


@check("R20", "EarlyAttach + AttachProof also attach outside 0-RTT")
async def early_attach_1rtt(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        sid = await early_attached(env, shard, t)
        shard.send(sid, cbor_frame(ATTACH_PROOF, {"proof": attach_proof(t["session_secret"], shard.exporter())}))
        control = shard.open_bidi()
        shard.send(control, subscribe(1, env))
        got = await subscribed(shard, control)
    return f"EarlyAttach, AttachProof in 1-RTT: {got}"


@check("R21", "a wrong AttachProof after EarlyAttach is PROOF_FAILED")
async def early_attach_bad_proof(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        sid = await early_attached(env, shard, t)
        shard.send(sid, cbor_frame(ATTACH_PROOF, {"proof": bytes(32)}))
        return await closed_with(shard, PROOF_FAILED, "AttachProof of 32 zero bytes")


@check("R22", "a Subscribe reusing a live sub_id is PROTOCOL_VIOLATION")
async def duplicate_sub_id(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        first = shard.open_bidi()
        shard.send(first, subscribe(7, env))
        await subscribed(shard, first)
        shard.send(shard.open_bidi(), subscribe(7, env))
        return await closed_with(shard, PROTOCOL_VIOLATION, "second Subscribe with sub_id 7")


@check("R23", "a Subscribe with a group name over 255 bytes gets SubError{LIMIT_EXCEEDED}")
async def long_group(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        sid = shard.open_bidi()
        shard.send(sid, subscribe(1, env, group="g" * 300))
        ty, m = await answer(shard, sid)
        if ty != SUB_ERROR or m.get("code") != LIMIT_EXCEEDED:
            raise Fail(f"expected SubError{{LIMIT_EXCEEDED}}, got {ty:#x} {m}")
        # The session goes on.
        other = shard.open_bidi()
        shard.send(other, subscribe(2, env))
        await subscribed(shard, other)
    return "SubError{LIMIT_EXCEEDED}; the session goes on"


@check("R24", "resetting a control stream ends that subscription only")
async def reset_control(env: Env) -> str:
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        first = shard.open_bidi()
        shard.send(first, subscribe(1, env))
        await subscribed(shard, first)
        shard._quic.reset_stream(first, 0)
        shard.transmit()
        await asyncio.sleep(0.2)
        if shard.closed.is_set():
            raise Fail(f"{shard.closed_why} after a control stream reset")
        second = shard.open_bidi()
        shard.send(second, subscribe(1, env))
        got = await subscribed(shard, second)
    return f"after the reset a new subscription (same sub_id) got {got}"


@check("R25", "Position, Fetch and Forecast for partitions the stream lacks are ignored")
async def invented_partitions(env: Env) -> str:
    await publish(env, 5)
    t, ep = await ticket(env)
    async with shard_conn(env, ep) as shard:
        await attached_session(env, shard, t)
        sid = shard.open_bidi()
        shard.send(sid, subscribe(1, env))
        await subscribed(shard, sid)
        invented = [{"partition": 1000 + i, "records_per_s": 1, "bytes_per_s": 1} for i in range(2000)]
        shard.send(sid, cbor_frame(FORECAST, {"partitions": invented, "buffer_capacity_bytes": 1 << 20}))
        shard.send(sid, cbor_frame(POSITION, {"partition": 4_000_000_000, "next_offset": 1}))
        shard.send(sid, cbor_frame(FETCH, {"partition": 4_000_000_000, "max_records": 10}))
        usid = await asyncio.wait_for(shard.new_streams.get(), STEP)
        f = await shard.read_frame(usid)
        f = await shard.read_frame(usid)
        if f is None or f[0] != RECORDS:
            raise Fail(f"no Records after the invented partitions (close code {shard.closed_code})")
    return "the subscription kept delivering"


# ---- main ------------------------------------------------------------------------------


async def run_all(env: Env) -> dict[str, str]:
    async def one(req: str, fn: Callable[[Env], Awaitable[str]]) -> tuple[str, str]:
        try:
            detail = await asyncio.wait_for(fn(env), 45)
            print(f"{req} pass: {detail}")
            return req, "pass"
        except Exception as e:  # every failure is a verdict with a reason
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            print(f"{req} FAIL: {why}", file=sys.stderr)
            if not isinstance(e, Fail):
                traceback.print_exc()
            return req, f"fail: {why}"

    # The deadline check waits for the server's timer; it runs beside the others.
    slow = [c for c in CHECKS if c[0] == "R14"]
    rest = [c for c in CHECKS if c[0] != "R14"]
    waiting = [asyncio.create_task(one(req, fn)) for req, _, fn in slow]
    results = [await one(req, fn) for req, _, fn in rest]
    results += [await w for w in waiting]
    return dict(sorted(results))


def main() -> int:
    out = os.environ.get("OUTPUT_DIR", ".")
    try:
        env = Env()
        results = asyncio.run(run_all(env))
    except Exception as e:
        reason = f"{type(e).__name__}: {e}"
        print(f"fail: {reason}", file=sys.stderr)
        with open(os.path.join(out, "reason.txt"), "w") as f:
            f.write(reason + "\n")
        return 1
    with open(os.path.join(out, "requirements.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    failed = [k for k, v in results.items() if v != "pass"]
    if failed:
        with open(os.path.join(out, "reason.txt"), "w") as f:
            f.write(f"requirements failed: {', '.join(failed)}\n")
        print(f"fail: {len(failed)} of {len(results)} requirements: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"pass: {len(results)} requirements checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
