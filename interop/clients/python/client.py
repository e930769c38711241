"""Sibyl interop client on aioquic, written from docs/PROTOCOL.md only.

Implements the interop contract (interop/README.md): reads TESTCASE, HUB_ADDR, CA_FILE,
SERVER_NAME, API_KEY, STREAMS, OUTPUT_DIR, CLIENT_ID, SHARD_ADDRS, WAIT_MS, RECORDS, EVENT_AT
from the environment and exits 0 (pass), 127 (case not supported) or 1 (fail; the reason
goes to OUTPUT_DIR/reason.txt and stderr).

Cases: handshake, ticket, direct-connect, refuse-bad-key, refuse-forged-token,
refuse-expired, refuse-wrong-group, token-replay here; the data-plane cases (transfer,
resume, loss, blackhole, rebind, drain) in dataplane.py. Wire helpers: sibyl_wire.py
(including the TLS exporter for the attach proof, PROTOCOL.md section 6.1: aioquic has no
exporter API, sibyl_wire hooks its key schedule to capture the exporter master secret); QUIC
connections: sibyl_quic.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Optional

import sibyl_wire as w
from sibyl_quic import STEP, Closed, Proto, log, open_conn, quic_config

EXIT_UNSUPPORTED = 127
SDK_VERSION = "sibyl-py-interop/0.2"
HUB_IDLE_TIMEOUT = 30.0  # seconds; the hub sends no keep-alives, we PING below this


class Unsupported(Exception):
    pass


class HubRefused(w.Fail):
    """Refused on the hub stream (section 5.1)."""

    def __init__(self, m: dict) -> None:
        self.code = m.get("code", -1)
        self.retry_after_ms = m.get("retry_after_ms")
        super().__init__(f"hub refused: {w.error_name(self.code)}: {m.get('reason')}")


Fail = w.Fail


class Env:
    def __init__(self) -> None:
        def need(k: str) -> str:
            v = os.environ.get(k)
            if not v:
                raise Fail(f"environment variable {k} is not set")
            return v

        def opt(k: str) -> Optional[str]:
            return os.environ.get(k) or None

        self.case = need("TESTCASE")
        self.hub = need("HUB_ADDR")
        self.ca = need("CA_FILE")
        self.server_name = opt("SERVER_NAME") or "localhost"
        self.api_key = need("API_KEY")
        self.stream = (opt("STREAMS") or "interop").split(",")[0]
        self.out = need("OUTPUT_DIR")
        self.client_id = opt("CLIENT_ID") or "interop-python"
        self.records = int(opt("RECORDS") or "1000")
        self.event_at = int(opt("EVENT_AT") or max(1, self.records // 3))
        self.wait_ms = int(opt("WAIT_MS") or "2000")
        # SHARD_ADDRS: "group=ip:port,..."
        self.shards: list[tuple[int, str]] = []
        for part in (opt("SHARD_ADDRS") or "").split(","):
            if part.strip():
                g, _, a = part.strip().partition("=")
                self.shards.append((int(g), a))

    def write(self, name: str, text: str) -> None:
        """Writes OUTPUT_DIR/name atomically (the runner polls these files)."""
        path = os.path.join(self.out, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.out, name))


def hub_config(env: Env):  # type: ignore[no-untyped-def]
    return quic_config(env.ca, env.server_name, HUB_IDLE_TIMEOUT)


def shard_config(env: Env, server_name: str, idle_timeout: float = 30.0):  # type: ignore[no-untyped-def]
    return quic_config(env.ca, server_name, idle_timeout)


def hello(env: Env, api_key: Optional[str] = None) -> bytes:
    return w.hello_frame(env.client_id, env.api_key if api_key is None else api_key, env.stream, SDK_VERSION)


async def ask_ticket(env: Env, hub: Proto) -> dict:
    """Hello on the hub stream (the connection's first bidi stream) -> the Ticket."""
    sid = hub.open_bidi()
    hub.send(sid, hello(env))
    f = await hub.read_frame(sid)
    if f is None:
        if hub.closed.is_set():  # a lost connection, worth another try
            raise ConnectionError(f"hub connection ended before the answer: {hub.closed_why}")
        raise Fail("hub finished the hub stream without an answer")
    ftype, body = f
    m = w.decode_cbor(body)
    if ftype == w.REFUSED:
        raise HubRefused(m)
    if ftype != w.TICKET:
        raise Fail(f"unexpected frame {ftype:#x} on the hub stream")
    for k in ("version", "token", "session_secret", "shard_group", "expires_at", "endpoints"):
        if k not in m:
            raise Fail(f"Ticket without {k}")
    if len(m["session_secret"]) != 32:
        raise Fail("session_secret is not 32 bytes")
    if not m["endpoints"]:
        raise Fail("Ticket with no endpoints")
    return m


async def get_ticket(env: Env) -> dict:
    """A ticket on a hub connection of its own, closed right after."""
    hub = await open_conn(env.hub, hub_config(env))
    try:
        return await ask_ticket(env, hub)
    finally:
        await hub.shutdown()


async def attach(env: Env, t: dict, shard: Proto, token: Optional[bytes] = None, proof: Optional[bytes] = None) -> tuple[int, dict]:
    """Attach on the session stream (the connection's first bidi stream) -> (sid, Attached).
    A refusal (the shard closes the connection, section 6.1) raises sibyl_quic.Closed."""
    sid = shard.open_bidi()
    if proof is None:
        proof = w.attach_proof(t["session_secret"], shard.exporter())
    shard.send(sid, w.attach_frame(t["token"] if token is None else token, proof, env.client_id))
    f = await shard.read_frame(sid)
    if f is None:
        if not shard.closed.is_set():
            await asyncio.wait_for(shard.closed.wait(), STEP)
        raise Closed(shard.closed_app, f"no Attached: {shard.closed_why}")
    ftype, body = f
    if ftype != w.ATTACHED:
        raise Fail(f"expected Attached, got frame {ftype:#x}")
    return sid, w.decode_cbor(body)


async def expect_refusal(env: Env, t: dict, addr: str, server_name: str, want: int, token: Optional[bytes] = None) -> str:
    """Attach to `addr` and expect the shard to close the connection with `want`."""
    shard = await open_conn(addr, shard_config(env, server_name))
    try:
        try:
            _, a = await attach(env, t, shard, token=token)
        except Closed as e:
            if e.app_code != want:
                raise Fail(f"expected close with {w.error_name(want)}, got {e}")
            return f"{addr} closed with {w.error_name(want)}"
        raise Fail(f"expected close with {w.error_name(want)}, got Attached (session {a.get('session_id')})")
    finally:
        await shard.shutdown()


# ---- cases -----------------------------------------------------------------------------


async def case_handshake(env: Env) -> str:
    hub = await open_conn(env.hub, hub_config(env))
    try:
        if hub.alpn() != w.ALPN:
            raise Fail(f"ALPN {hub.alpn()!r}")
    finally:
        await hub.shutdown()
    return "TLS 1.3 handshake, ALPN sibyl/1"


async def case_ticket(env: Env) -> str:
    t = await get_ticket(env)
    if t["version"] != 1:
        raise Fail(f"ticket version {t['version']}")
    return f"ticket: group {t['shard_group']}, {len(t['endpoints'])} endpoints"


async def case_direct_connect(env: Env) -> str:
    t = await get_ticket(env)
    ep = t["endpoints"][0]
    shard = await open_conn(ep["addr"], shard_config(env, ep["server_name"]))
    try:
        _, a = await attach(env, t, shard)
    finally:
        await shard.shutdown()
    env.write("attached.txt", ep["addr"] + "\n")
    return f"attached to {ep['addr']} (session {a.get('session_id')})"


async def case_refuse_bad_key(env: Env) -> str:
    bogus = "sk_000000000000_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    hub = await open_conn(env.hub, hub_config(env))
    try:
        sid = hub.open_bidi()
        hub.send(sid, hello(env, api_key=bogus))
        f = await hub.read_frame(sid)
        if f is None:
            raise Fail(f"hub ended the hub stream without an answer ({hub.closed_why})")
        ftype, body = f
        if ftype != w.REFUSED:
            raise Fail(f"expected Refused, got frame {ftype:#x}")
        m = w.decode_cbor(body)
        if m.get("code") != w.UNAUTHENTICATED:
            raise Fail(f"expected {w.error_name(w.UNAUTHENTICATED)}, got code {m.get('code')}")
    finally:
        await hub.shutdown()
    return f"refused: UNAUTHENTICATED ({m.get('reason')})"


async def case_refuse_forged_token(env: Env) -> str:
    t = await get_ticket(env)
    token = bytearray(t["token"])
    token[len(token) // 2] ^= 0x01
    ep = t["endpoints"][0]
    return await expect_refusal(env, t, ep["addr"], ep["server_name"], w.TOKEN_INVALID, token=bytes(token))


async def case_refuse_expired(env: Env) -> str:
    t = await get_ticket(env)
    log(f"ticket expires_at {t['expires_at']}; waiting {env.wait_ms} ms before attaching")
    await asyncio.sleep(env.wait_ms / 1000)
    ep = t["endpoints"][0]
    return await expect_refusal(env, t, ep["addr"], ep["server_name"], w.TOKEN_EXPIRED)


async def case_refuse_wrong_group(env: Env) -> str:
    t = await get_ticket(env)
    others = [a for g, a in env.shards if g != t["shard_group"]]
    if not others:
        raise Unsupported(f"SHARD_ADDRS names no shard outside group {t['shard_group']}")
    # SHARD_ADDRS gives no server name; the ticket's is the best guess (the interop gateway
    # uses one certificate name for every shard).
    return await expect_refusal(env, t, others[0], t["endpoints"][0]["server_name"], w.WRONG_GROUP)


async def case_token_replay(env: Env) -> str:
    t = await get_ticket(env)
    ep = t["endpoints"][0]
    a = await open_conn(ep["addr"], shard_config(env, ep["server_name"]))
    try:
        proof_a = w.attach_proof(t["session_secret"], a.exporter())
        b = await open_conn(ep["addr"], shard_config(env, ep["server_name"]))
        try:
            try:
                await attach(env, t, b, proof=proof_a)
            except Closed as e:
                if e.app_code != w.PROOF_FAILED:
                    raise Fail(f"expected close with {w.error_name(w.PROOF_FAILED)}, got {e}")
                return "replayed proof refused with PROOF_FAILED"
            raise Fail("replayed proof accepted (Attached)")
        finally:
            await b.shutdown()
    finally:
        await a.shutdown()


def cases() -> dict:
    import dataplane

    return {
        "handshake": case_handshake,
        "ticket": case_ticket,
        "direct-connect": case_direct_connect,
        "refuse-bad-key": case_refuse_bad_key,
        "refuse-forged-token": case_refuse_forged_token,
        "refuse-expired": case_refuse_expired,
        "refuse-wrong-group": case_refuse_wrong_group,
        "token-replay": case_token_replay,
        **{c: dataplane.run_case for c in dataplane.CASES},
    }


def main() -> int:
    out = os.environ.get("OUTPUT_DIR", ".")
    try:
        env = Env()
        fn = cases().get(env.case)
        if fn is None:
            raise Unsupported(f"python client does not implement {env.case!r}")
        msg = asyncio.run(asyncio.wait_for(fn(env), 110))
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
    # Run as the module `client` (dataplane.py imports it), not as a second copy `__main__`.
    import client

    sys.exit(client.main())
