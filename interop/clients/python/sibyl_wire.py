"""Sibyl wire helpers written from docs/PROTOCOL.md only: framing (section 3), CBOR bodies
(3.2), the binary Produce/Records layouts (5.2, 6.3), error codes with their retry classes
(7) and the attach proof over the TLS exporter (6.1), computed from aioquic's key schedule.

Importing this module installs the exporter hook on aioquic's TLS context (see below).
Everything here is a plain function or constant, for the interop client (client.py,
dataplane.py) and other tools next to it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import cbor2
from aioquic import tls
from cryptography.hazmat.primitives import hashes

ALPN = "sibyl/1"
PROTOCOL_VERSION = 1


class Fail(Exception):
    """A protocol or test failure (the client's verdict is fail)."""


# ---- frame types (section 4) ----------------------------------------------------------

HELLO, TICKET, REFUSED, GROUP_HINT = 0x01, 0x02, 0x03, 0x04
PUBLISH_OPEN, PUBLISH_ACCEPTED, PRODUCE, PRODUCE_ACK, PRODUCE_ERROR = 0x10, 0x11, 0x12, 0x13, 0x14
ATTACH, ATTACHED, GOAWAY, EARLY_ATTACH, ATTACH_PROOF = 0x20, 0x21, 0x22, 0x23, 0x24
SUBSCRIBE, ASSIGNMENT, GRANT, SUB_ERROR, POSITION, FETCH, FORECAST = (
    0x30, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36,
)
FLIP_HINT, FLIP = 0x37, 0x38
PARTITION_OPEN, RECORDS = 0x40, 0x41

BINARY_FRAMES = (PRODUCE, RECORDS)

# ---- limits (section 3.1) -------------------------------------------------------------

MAX_CONTROL_BODY = 65536
MAX_BATCH_PAYLOAD = 1048576
MAX_BATCH_RECORDS = 16384
MAX_BATCH_BODY = 16 + 32 * MAX_BATCH_RECORDS + MAX_BATCH_PAYLOAD


def max_body(ftype: int) -> int:
    return MAX_BATCH_BODY if ftype in BINARY_FRAMES else MAX_CONTROL_BODY


# ---- error codes (section 7): value -> (name, fault, retry) ---------------------------

NO_ERROR = 0x00
INTERNAL = 0x01
PROTOCOL_VIOLATION = 0x02
FRAME_TOO_LARGE = 0x03
MALFORMED_FRAME = 0x04
UNSUPPORTED_VERSION = 0x05
UNAUTHENTICATED = 0x10
FORBIDDEN = 0x11
TOKEN_EXPIRED = 0x12
TOKEN_INVALID = 0x13
WRONG_GROUP = 0x14
PROOF_FAILED = 0x15
OVERLOADED = 0x16
DRAINING = 0x17
LIMIT_EXCEEDED = 0x18
IDLE = 0x19
NOT_FOUND = 0x1A
GRANT_EXCEEDED = 0x1B
REVOKED = 0x1C
OUT_OF_ORDER_SEQUENCE = 0x1D
UNKNOWN_PRODUCER = 0x1E

# Retry classes.
SAME_ENDPOINT, OTHER_ENDPOINT, NEVER, AFTER_HUB = "same endpoint", "other endpoint", "never", "after hub"

ERRORS = {
    NO_ERROR: ("NO_ERROR", "none", SAME_ENDPOINT),
    INTERNAL: ("INTERNAL", "server", OTHER_ENDPOINT),
    PROTOCOL_VIOLATION: ("PROTOCOL_VIOLATION", "client", NEVER),
    FRAME_TOO_LARGE: ("FRAME_TOO_LARGE", "client", NEVER),
    MALFORMED_FRAME: ("MALFORMED_FRAME", "client", NEVER),
    UNSUPPORTED_VERSION: ("UNSUPPORTED_VERSION", "client", NEVER),
    UNAUTHENTICATED: ("UNAUTHENTICATED", "client", NEVER),
    FORBIDDEN: ("FORBIDDEN", "client", NEVER),
    TOKEN_EXPIRED: ("TOKEN_EXPIRED", "client", AFTER_HUB),
    TOKEN_INVALID: ("TOKEN_INVALID", "client", AFTER_HUB),
    WRONG_GROUP: ("WRONG_GROUP", "client", AFTER_HUB),
    PROOF_FAILED: ("PROOF_FAILED", "client", AFTER_HUB),
    OVERLOADED: ("OVERLOADED", "server", OTHER_ENDPOINT),
    DRAINING: ("DRAINING", "server", OTHER_ENDPOINT),
    LIMIT_EXCEEDED: ("LIMIT_EXCEEDED", "client", NEVER),
    IDLE: ("IDLE", "none", SAME_ENDPOINT),
    NOT_FOUND: ("NOT_FOUND", "client", NEVER),
    GRANT_EXCEEDED: ("GRANT_EXCEEDED", "client", NEVER),
    REVOKED: ("REVOKED", "none", SAME_ENDPOINT),
    OUT_OF_ORDER_SEQUENCE: ("OUT_OF_ORDER_SEQUENCE", "client", NEVER),
    UNKNOWN_PRODUCER: ("UNKNOWN_PRODUCER", "client", NEVER),
}


def error_name(code: int) -> str:
    e = ERRORS.get(code)
    return f"{e[0]} ({code:#x})" if e else f"unknown code {code:#x}"


def retry_class(code: int) -> str:
    """Section 7: unknown values are server faults, retryable on another endpoint."""
    e = ERRORS.get(code)
    return e[2] if e else OTHER_ENDPOINT


# ---- TLS exporter and attach proof (section 6.1) ---------------------------------------
# aioquic 1.x has no TLS exporter API. RFC 8446 section 7.5:
#   exporter_master_secret = Derive-Secret(master_secret, "exp master", CH..server Finished)
#   TLS-Exporter(label, ctx, L) =
#       HKDF-Expand-Label(Derive-Secret(exporter_master_secret, label, ""), "exporter", Hash(ctx), L)
# aioquic's client derives "s ap traffic" right after extracting the master secret, with the
# transcript hash at server Finished: the same moment "exp master" is derived. We hook there.

EXPORTER_LABEL = b"EXPORTER-sibyl-attach-v1"
EXPORTER_CONTEXT = b""

_orig_setup = tls.Context._setup_traffic_protection


def _setup_with_exporter(self, direction, epoch, label):  # type: ignore[no-untyped-def]
    if label == b"s ap traffic" and not hasattr(self, "sibyl_exporter_master"):
        self.sibyl_exporter_master = self.key_schedule.derive_secret(b"exp master")
        self.sibyl_hash = self.key_schedule.algorithm
    return _orig_setup(self, direction, epoch, label)


tls.Context._setup_traffic_protection = _setup_with_exporter


def tls_exporter(ctx: tls.Context, label: bytes, context: bytes, length: int) -> bytes:
    """The RFC 8446 exporter of a completed aioquic TLS context (client side)."""
    ems = getattr(ctx, "sibyl_exporter_master", None)
    if ems is None:
        raise Fail("TLS exporter secret not captured (handshake incomplete?)")
    alg = ctx.sibyl_hash

    def digest(data: bytes) -> bytes:
        h = hashes.Hash(alg)
        h.update(data)
        return h.finalize()

    secret = tls.hkdf_expand_label(alg, ems, label, digest(b""), alg.digest_size)
    return tls.hkdf_expand_label(alg, secret, b"exporter", digest(context), length)


def attach_exporter(ctx: tls.Context) -> bytes:
    return tls_exporter(ctx, EXPORTER_LABEL, EXPORTER_CONTEXT, 32)


def attach_proof(secret: bytes, exporter: bytes) -> bytes:
    return hmac.new(secret, exporter, hashlib.sha256).digest()


# ---- framing (section 3) ---------------------------------------------------------------


def frame(ftype: int, body: bytes) -> bytes:
    return struct.pack(">BI", ftype, len(body)) + body


def cbor_frame(ftype: int, fields: dict) -> bytes:
    return frame(ftype, cbor2.dumps(fields))


def split_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Takes one whole frame off the front of `buf`, or None if it holds no whole frame yet.
    Checks the length against the type's maximum before the body is buffered (section 3)."""
    if len(buf) < 5:
        return None
    ftype, length = struct.unpack_from(">BI", buf, 0)
    if length > max_body(ftype):
        raise Fail(f"frame type {ftype:#x} length {length} above the limit")
    if len(buf) < 5 + length:
        return None
    body = bytes(buf[5 : 5 + length])
    del buf[: 5 + length]
    return ftype, body


def put_varint(v: int) -> bytes:
    if v < 1 << 6:
        return struct.pack(">B", v)
    if v < 1 << 14:
        return struct.pack(">H", v | 0x4000)
    if v < 1 << 30:
        return struct.pack(">I", v | 0x80000000)
    return struct.pack(">Q", v | 0xC000000000000000)


def get_varint(buf: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(buf):
        raise Fail("truncated varint")
    n = 1 << (buf[pos] >> 6)
    if pos + n > len(buf):
        raise Fail("truncated varint")
    v = buf[pos] & 0x3F
    for b in buf[pos + 1 : pos + n]:
        v = (v << 8) | b
    return v, pos + n


def decode_cbor(body: bytes) -> dict:
    try:
        v = cbor2.loads(body)
    except Exception as e:  # cbor2 raises several types
        raise Fail(f"malformed CBOR body: {e}")
    if not isinstance(v, dict):
        raise Fail("CBOR body is not a map")
    return v


def produce_body(seq: int, partition: int, records: list[tuple[bytes, bytes]]) -> bytes:
    """Produce (0x12) body: records are (key, payload), timestamp 0 (the hub stamps)."""
    out = bytearray(struct.pack(">QII", seq, partition, len(records)))
    for key, payload in records:
        out += struct.pack(">Q", 0)
        out += put_varint(len(key)) + key
        out += put_varint(len(payload)) + payload
    return bytes(out)


def parse_records(body: bytes) -> tuple[int, list[tuple[int, int, bytes, bytes]]]:
    """Records (0x41) body -> (partition, [(offset, timestamp, key, payload)])."""
    if len(body) < 16:
        raise Fail("Records body too short")
    partition, base, count = struct.unpack_from(">IQI", body, 0)
    if count < 1:
        raise Fail("Records with count 0")
    pos = 16
    out = []
    prev = -1
    for _ in range(count):
        delta, pos = get_varint(body, pos)
        if delta <= prev:
            raise Fail("Records offset deltas not increasing")
        prev = delta
        if pos + 8 > len(body):
            raise Fail("truncated record")
        (ts,) = struct.unpack_from(">Q", body, pos)
        pos += 8
        klen, pos = get_varint(body, pos)
        key = body[pos : pos + klen]
        pos += klen
        plen, pos = get_varint(body, pos)
        payload = body[pos : pos + plen]
        pos += plen
        if pos > len(body):
            raise Fail("truncated record")
        out.append((base + delta, ts, key, payload))
    if pos != len(body):
        raise Fail("bytes after the last record")
    return partition, out


# ---- frame bodies the client sends -----------------------------------------------------


def hello_frame(client_id: str, api_key: str, stream: str, sdk_version: str) -> bytes:
    return cbor_frame(
        HELLO,
        {
            "client_id": client_id,
            "api_key": api_key,
            "profile": {"region": "", "device_class": "", "sdk_version": sdk_version},
            "wants": [
                {"stream": stream, "action": "subscribe"},
                {"stream": stream, "action": "publish"},
            ],
            "versions": [PROTOCOL_VERSION],
        },
    )


def attach_frame(token: bytes, proof: bytes, client_id: str) -> bytes:
    return cbor_frame(ATTACH, {"token": token, "proof": proof, "client_id": client_id})


def subscribe_frame(sub_id: int, stream: str, start, mode: str = "predictive") -> bytes:  # type: ignore[no-untyped-def]
    """`start`: "earliest", "latest", {"offsets": {partition: next_offset}} or {"timestamp": ms}."""
    return cbor_frame(SUBSCRIBE, {"sub_id": sub_id, "stream": stream, "start": start, "mode": mode})


def position_frame(partition: int, next_offset: int, epoch: int | None = None) -> bytes:
    # `epoch`: the latest Assignment epoch processed (PROTOCOL.md §6.2); omitted when None.
    body = {"partition": partition, "next_offset": next_offset}
    if epoch is not None:
        body["epoch"] = epoch
    return cbor_frame(POSITION, body)
