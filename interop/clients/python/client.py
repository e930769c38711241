"""Sibyl interop client on aioquic, written from docs/PROTOCOL.md only.

Implements the interop contract (interop/README.md): reads TESTCASE, HUB_ADDR, CA_FILE,
SERVER_NAME, API_KEY, STREAMS, OUTPUT_DIR, CLIENT_ID, RECORDS from the environment and exits
0 (pass), 127 (case not supported) or 1 (fail; the reason goes to OUTPUT_DIR/reason.txt and
stderr).

Supported cases: handshake, ticket, direct-connect, token-replay, transfer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import struct
import sys
from typing import Optional

import cbor2
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived
from aioquic import tls
from cryptography.hazmat.primitives import hashes

EXIT_UNSUPPORTED = 127
ALPN = "sibyl/1"
STEP = 20.0  # seconds, bound on any one network step

# Frame types (PROTOCOL.md section 4).
HELLO, TICKET, REFUSED = 0x01, 0x02, 0x03
PUBLISH_OPEN, PUBLISH_ACCEPTED, PRODUCE, PRODUCE_ACK, PRODUCE_ERROR = 0x10, 0x11, 0x12, 0x13, 0x14
ATTACH, ATTACHED, GOAWAY = 0x20, 0x21, 0x22
SUBSCRIBE, ASSIGNMENT, GRANT, SUB_ERROR, POSITION = 0x30, 0x31, 0x32, 0x33, 0x34
PARTITION_OPEN, RECORDS = 0x40, 0x41
CONTROL_MAX = 65536
BATCH_MAX = 16 + 32 * 16384 + 1048576

# Error codes (section 7).
NO_ERROR, UNAUTHENTICATED, TOKEN_INVALID, PROOF_FAILED = 0x00, 0x10, 0x13, 0x15

EXPORTER_LABEL = b"EXPORTER-sibyl-attach-v1"


class Unsupported(Exception):
    pass


class Fail(Exception):
    pass


# ---- TLS exporter ----------------------------------------------------------------------
# aioquic 1.x has no TLS exporter API. RFC 8446 section 7.5:
#   exporter_master_secret = Derive-Secret(master_secret, "exp master", CH..server Finished)
#   TLS-Exporter(label, ctx, L) =
#       HKDF-Expand-Label(Derive-Secret(exporter_master_secret, label, ""), "exporter", Hash(ctx), L)
# aioquic's client derives "s ap traffic" right after extracting the master secret, with the
# transcript hash at server Finished: the same moment "exp master" is derived. We hook there.

_orig_setup = tls.Context._setup_traffic_protection


def _setup_with_exporter(self, direction, epoch, label):  # type: ignore[no-untyped-def]
    if label == b"s ap traffic" and not hasattr(self, "sibyl_exporter_master"):
        self.sibyl_exporter_master = self.key_schedule.derive_secret(b"exp master")
        self.sibyl_hash = self.key_schedule.algorithm
    return _orig_setup(self, direction, epoch, label)


tls.Context._setup_traffic_protection = _setup_with_exporter


def tls_exporter(ctx: tls.Context, label: bytes, context: bytes, length: int) -> bytes:
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


def attach_proof(secret: bytes, exporter: bytes) -> bytes:
    return hmac.new(secret, exporter, hashlib.sha256).digest()


# ---- framing ---------------------------------------------------------------------------


def frame(ftype: int, body: bytes) -> bytes:
    return struct.pack(">BI", ftype, len(body)) + body


def cbor_frame(ftype: int, fields: dict) -> bytes:
    return frame(ftype, cbor2.dumps(fields))


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
    out = bytearray(struct.pack(">QII", seq, partition, len(records)))
    for key, payload in records:
        out += struct.pack(">Q", 0)
        out += put_varint(len(key)) + key
        out += put_varint(len(payload)) + payload
    return bytes(out)


def parse_records(body: bytes) -> tuple[int, list[tuple[int, int, bytes, bytes]]]:
    if len(body) < 16:
        raise Fail("Records body too short")
    partition, base, count = struct.unpack_from(">IQI", body, 0)
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


# ---- connection ------------------------------------------------------------------------


class Stream:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.ended = False
        self.event = asyncio.Event()


class Proto(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.streams: dict[int, Stream] = {}
        self.new_streams: asyncio.Queue[int] = asyncio.Queue()
        self.closed_code: Optional[int] = None
        self.closed = asyncio.Event()

    def stream(self, sid: int) -> Stream:
        s = self.streams.get(sid)
        if s is None:
            s = self.streams[sid] = Stream()
            # Server-initiated streams have bit 0 set.
            if sid & 1:
                self.new_streams.put_nowait(sid)
        return s

    def quic_event_received(self, event) -> None:  # type: ignore[no-untyped-def]
        if isinstance(event, StreamDataReceived):
            s = self.stream(event.stream_id)
            s.buf += event.data
            s.ended = s.ended or event.end_stream
            s.event.set()
        elif isinstance(event, ConnectionTerminated):
            self.closed_code = event.error_code
            self.closed.set()
            for s in self.streams.values():
                s.event.set()

    def open_bidi(self) -> int:
        sid = self._quic.get_next_available_stream_id()
        self.stream(sid)
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(sid, data, end)
        self.transmit()

    async def read_frame(self, sid: int) -> Optional[tuple[int, bytes]]:
        """One frame from `sid`, or None when the stream or the connection ended first."""
        s = self.stream(sid)
        while True:
            if len(s.buf) >= 5:
                ftype, length = struct.unpack_from(">BI", s.buf, 0)
                limit = BATCH_MAX if ftype in (RECORDS, PRODUCE) else CONTROL_MAX
                if length > limit:
                    raise Fail(f"frame type {ftype:#x} length {length} above the limit")
                if len(s.buf) >= 5 + length:
                    body = bytes(s.buf[5 : 5 + length])
                    del s.buf[: 5 + length]
                    return ftype, body
            if s.ended or self.closed.is_set():
                if s.buf:
                    raise Fail("stream ended inside a frame")
                return None
            s.event.clear()
            await asyncio.wait_for(s.event.wait(), STEP)

    def exporter(self) -> bytes:
        return tls_exporter(self._quic.tls, EXPORTER_LABEL, b"", 32)

    def alpn(self) -> Optional[str]:
        return self._quic.tls.alpn_negotiated


class Env:
    def __init__(self) -> None:
        def need(k: str) -> str:
            v = os.environ.get(k)
            if not v:
                raise Fail(f"environment variable {k} is not set")
            return v

        self.case = need("TESTCASE")
        host, _, port = need("HUB_ADDR").rpartition(":")
        self.hub = (host.strip("[]"), int(port))
        self.ca = need("CA_FILE")
        self.server_name = os.environ.get("SERVER_NAME") or "localhost"
        self.api_key = need("API_KEY")
        self.stream = (os.environ.get("STREAMS") or "interop").split(",")[0]
        self.out = need("OUTPUT_DIR")
        self.client_id = os.environ.get("CLIENT_ID") or "interop-python"
        self.records = int(os.environ.get("RECORDS") or "1000")


def config(env: Env, server_name: str) -> QuicConfiguration:
    c = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_name)
    c.load_verify_locations(cafile=env.ca)
    return c


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def hello(env: Env, api_key: Optional[str] = None) -> bytes:
    return cbor_frame(
        HELLO,
        {
            "client_id": env.client_id,
            "api_key": env.api_key if api_key is None else api_key,
            "profile": {"region": "", "device_class": "", "sdk_version": "sibyl-py-interop/0.1"},
            "wants": [
                {"stream": env.stream, "action": "subscribe"},
                {"stream": env.stream, "action": "publish"},
            ],
            "versions": [1],
        },
    )


async def ask_ticket(env: Env, hub: Proto) -> dict:
    sid = hub.open_bidi()
    hub.send(sid, hello(env))
    f = await hub.read_frame(sid)
    if f is None:
        raise Fail(f"hub ended the hub stream without an answer (close code {hub.closed_code})")
    ftype, body = f
    m = decode_cbor(body)
    if ftype == REFUSED:
        raise Fail(f"hub refused: code {m.get('code')}: {m.get('reason')}")
    if ftype != TICKET:
        raise Fail(f"unexpected frame {ftype:#x} on the hub stream")
    for k in ("version", "token", "session_secret", "shard_group", "expires_at", "endpoints"):
        if k not in m:
            raise Fail(f"Ticket without {k}")
    if len(m["session_secret"]) != 32:
        raise Fail("session_secret is not 32 bytes")
    if not m["endpoints"]:
        raise Fail("Ticket with no endpoints")
    return m


def attach_frame(env: Env, token: bytes, proof: bytes) -> bytes:
    return cbor_frame(ATTACH, {"token": token, "proof": proof, "client_id": env.client_id})


# ---- cases -----------------------------------------------------------------------------


async def case_handshake(env: Env) -> str:
    async with connect(*env.hub, configuration=config(env, env.server_name), create_protocol=Proto) as hub:
        if hub.alpn() != ALPN:
            raise Fail(f"ALPN {hub.alpn()!r}")
        hub.close(error_code=NO_ERROR)
    return "TLS 1.3 handshake, ALPN sibyl/1"


async def case_ticket(env: Env) -> str:
    async with connect(*env.hub, configuration=config(env, env.server_name), create_protocol=Proto) as hub:
        t = await ask_ticket(env, hub)
        hub.close(error_code=NO_ERROR)
    if t["version"] != 1:
        raise Fail(f"ticket version {t['version']}")
    return f"ticket: group {t['shard_group']}, {len(t['endpoints'])} endpoints"


async def get_ticket(env: Env) -> dict:
    async with connect(*env.hub, configuration=config(env, env.server_name), create_protocol=Proto) as hub:
        t = await ask_ticket(env, hub)
        hub.close(error_code=NO_ERROR)
    return t


async def attach(env: Env, t: dict, shard: Proto) -> tuple[int, dict]:
    sid = shard.open_bidi()
    proof = attach_proof(t["session_secret"], shard.exporter())
    shard.send(sid, attach_frame(env, t["token"], proof))
    f = await shard.read_frame(sid)
    if f is None:
        raise Fail(f"shard closed the session stream (close code {shard.closed_code})")
    ftype, body = f
    if ftype != ATTACHED:
        raise Fail(f"expected Attached, got frame {ftype:#x}")
    return sid, decode_cbor(body)


async def case_direct_connect(env: Env) -> str:
    t = await get_ticket(env)
    ep = t["endpoints"][0]
    host, port = split_addr(ep["addr"])
    async with connect(host, port, configuration=config(env, ep["server_name"]), create_protocol=Proto) as shard:
        _, a = await attach(env, t, shard)
        shard.close(error_code=NO_ERROR)
    with open(os.path.join(env.out, "attached.txt"), "w") as f:
        f.write(ep["addr"] + "\n")
    return f"attached to {ep['addr']} (session {a.get('session_id')})"


async def case_refuse_bad_key(env: Env) -> str:
    bogus = "sk_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    async with connect(*env.hub, configuration=config(env, env.server_name), create_protocol=Proto) as hub:
        sid = hub.open_bidi()
        hub.send(sid, hello(env, api_key=bogus))
        f = await hub.read_frame(sid)
        if f is None:
            raise Fail(f"hub ended the hub stream without an answer (close code {hub.closed_code})")
        ftype, body = f
        if ftype != REFUSED:
            raise Fail(f"expected Refused, got frame {ftype:#x}")
        m = decode_cbor(body)
        if m.get("code") != UNAUTHENTICATED:
            raise Fail(f"expected code {UNAUTHENTICATED:#x}, got {m.get('code')}")
        hub.close(error_code=NO_ERROR)
    return f"refused: UNAUTHENTICATED ({m.get('reason')})"


async def case_refuse_forged_token(env: Env) -> str:
    t = await get_ticket(env)
    token = bytearray(t["token"])
    token[len(token) // 2] ^= 0x01
    ep = t["endpoints"][0]
    host, port = split_addr(ep["addr"])
    async with connect(host, port, configuration=config(env, ep["server_name"]), create_protocol=Proto) as shard:
        sid = shard.open_bidi()
        proof = attach_proof(t["session_secret"], shard.exporter())
        shard.send(sid, attach_frame(env, bytes(token), proof))
        f = await shard.read_frame(sid)
        if f is not None:
            raise Fail(f"expected close with TOKEN_INVALID, got frame {f[0]:#x}")
        await asyncio.wait_for(shard.closed.wait(), STEP)
        if shard.closed_code != TOKEN_INVALID:
            raise Fail(f"expected close code {TOKEN_INVALID:#x}, got {shard.closed_code}")
    return "forged token refused with TOKEN_INVALID"


async def case_token_replay(env: Env) -> str:
    t = await get_ticket(env)
    ep = t["endpoints"][0]
    host, port = split_addr(ep["addr"])
    cfg = lambda: config(env, ep["server_name"])  # noqa: E731
    async with connect(host, port, configuration=cfg(), create_protocol=Proto) as a:
        proof_a = attach_proof(t["session_secret"], a.exporter())
        async with connect(host, port, configuration=cfg(), create_protocol=Proto) as b:
            sid = b.open_bidi()
            b.send(sid, attach_frame(env, t["token"], proof_a))
            f = await b.read_frame(sid)
            if f is not None:
                raise Fail(f"expected close with PROOF_FAILED, got frame {f[0]:#x}")
            await asyncio.wait_for(b.closed.wait(), STEP)
            if b.closed_code != PROOF_FAILED:
                raise Fail(f"expected close code {PROOF_FAILED:#x}, got {b.closed_code}")
        a.close(error_code=NO_ERROR)
    return "replayed proof refused with PROOF_FAILED"


async def case_transfer(env: Env) -> str:
    n = env.records
    payload = lambda i: f"record-{i:08}".encode()  # noqa: E731
    async with connect(*env.hub, configuration=config(env, env.server_name), create_protocol=Proto) as hub:
        # The ticket on this connection enables publishing (section 5.2).
        t = await ask_ticket(env, hub)
        psid = hub.open_bidi()
        hub.send(psid, cbor_frame(PUBLISH_OPEN, {"stream": env.stream}))
        f = await hub.read_frame(psid)
        if f is None or f[0] != PUBLISH_ACCEPTED:
            m = decode_cbor(f[1]) if f else {}
            raise Fail(f"PublishOpen not accepted: {m.get('code')} {m.get('reason')}")
        ep = t["endpoints"][0]
        host, port = split_addr(ep["addr"])
        async with connect(host, port, configuration=config(env, ep["server_name"]), create_protocol=Proto) as shard:
            await attach(env, t, shard)
            with open(os.path.join(env.out, "attached.txt"), "w") as fh:
                fh.write(ep["addr"] + "\n")
            csid = shard.open_bidi()
            shard.send(csid, cbor_frame(SUBSCRIBE, {"sub_id": 1, "stream": env.stream, "start": "earliest", "mode": "predictive"}))
            # Publish everything to partition 0, 100 records per batch.
            sent = hashlib.sha256()
            seq = 0
            for lo in range(0, n, 100):
                seq += 1
                batch = [(b"", payload(i)) for i in range(lo, min(n, lo + 100))]
                for _, p in batch:
                    sent.update(p)
                hub.send(psid, frame(PRODUCE, produce_body(seq, 0, batch)))
            acked = 0
            while acked < seq:
                f = await hub.read_frame(psid)
                if f is None or f[0] != PRODUCE_ACK:
                    m = decode_cbor(f[1]) if f else {}
                    raise Fail(f"Produce not acknowledged: {m}")
                acked += 1
            got = hashlib.sha256()
            count = 0
            last: dict[int, int] = {}
            while count < n:
                usid = await asyncio.wait_for(shard.new_streams.get(), STEP * 3)
                f = await shard.read_frame(usid)
                if f is None or f[0] != PARTITION_OPEN:
                    raise Fail("partition stream without PartitionOpen")
                while count < n:
                    f = await shard.read_frame(usid)
                    if f is None:
                        break
                    if f[0] != RECORDS:
                        raise Fail(f"frame {f[0]:#x} on a partition stream")
                    part, recs = parse_records(f[1])
                    for off, _ts, _key, p in recs:
                        if part in last and off <= last[part]:
                            raise Fail(f"partition {part}: offset {off} after {last[part]}")
                        last[part] = off
                        if p != payload(count):
                            raise Fail(f"record {count}: payload {p!r}")
                        got.update(p)
                        count += 1
            if got.digest() != sent.digest():
                raise Fail("hash mismatch")
            shard.close(error_code=NO_ERROR)
        hub.close(error_code=NO_ERROR)
    return f"{n} records in order, sha256 {sent.hexdigest()}"


CASES = {
    "handshake": case_handshake,
    "ticket": case_ticket,
    "direct-connect": case_direct_connect,
    "refuse-bad-key": case_refuse_bad_key,
    "refuse-forged-token": case_refuse_forged_token,
    "token-replay": case_token_replay,
    "transfer": case_transfer,
}


def main() -> int:
    out = os.environ.get("OUTPUT_DIR", ".")
    try:
        env = Env()
        fn = CASES.get(env.case)
        if fn is None:
            raise Unsupported(f"python client does not implement {env.case!r}")
        msg = asyncio.run(asyncio.wait_for(fn(env), 120))
        print(f"pass: {msg}")
        return 0
    except Unsupported as e:
        reason, code = str(e), EXIT_UNSUPPORTED
    except Exception as e:  # every failure is a verdict with a reason
        reason, code = f"{type(e).__name__}: {e}", 1
    try:
        with open(os.path.join(out, "reason.txt"), "w") as f:
            f.write(reason + "\n")
    except OSError:
        pass
    print(("unsupported: " if code == EXIT_UNSUPPORTED else "fail: ") + reason, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
