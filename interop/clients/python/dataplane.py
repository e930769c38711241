"""The data-plane cases of the Python interop client: transfer, resume, loss, blackhole,
rebind, drain (interop/README.md), written from docs/PROTOCOL.md.

One hub connection publishes RECORDS records (section 5.2); a subscriber reads them from a
shard (sections 6.1-6.3) and survives losing it the way section 8 recommends: on GoAway,
DRAINING or a lost connection it attaches to the next endpoint of the cached ticket (the lost
one last), goes back to the hub on "after hub" codes or when every endpoint failed, backs off
between failed rounds, and re-subscribes from the next offset it expects
(`start: {"offsets": {...}}`), dropping repeats by offset. A dead path is noticed by the QUIC
idle timeout of the shard connection (5 s, PINGs every second keep a live one up).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import time
from typing import Callable, Optional

import sibyl_wire as w
from client import Env, HubRefused, attach, ask_ticket, get_ticket, hub_config, shard_config
from sibyl_quic import STEP, Closed, Proto, log, open_conn

CASES = ("transfer", "resume", "loss", "blackhole", "rebind", "drain")
EVENT_CASES = ("resume", "drain", "blackhole")  # the runner's event, asked for at EVENT_AT
GATED = EVENT_CASES + ("rebind",)  # the second half is published only after the event

SHARD_IDLE_TIMEOUT = 5.0  # seconds: how long a silent shard path takes to count as lost
ATTEMPT_TIMEOUT = 10.0  # section 8: an attempt that has not attached in 10 s failed
HUB_KEEPALIVE = 5.0  # the hub sends no keep-alives; its idle timeout is ours (30 s) or less
POSITION_EVERY = 0.05  # section 6.2: the SDK sends Position every 50 ms
TICKET_MARGIN = 30.0  # section 8: reuse the ticket while it expires more than 30 s from now
BATCH = 100


def payload(i: int) -> bytes:
    return f"record-{i:08}".encode()


def backoff_delay(failures: int) -> float:
    """Section 8: the n-th consecutive failure waits U[0, min(10 s, 100 ms * 2^(n-1))]."""
    return random.uniform(0, min(10.0, 0.1 * 2 ** (failures - 1)))


class Receiver:
    """Delivers records from every session to the check, in order: a record below the next
    expected offset of its partition is a repeat (after a re-subscribe, or from the old
    session during make-before-break) and is dropped; anything else must be the next
    payload. Writes progress.txt."""

    def __init__(self, env: Env, on_count: Callable[[int], None]) -> None:
        self.env = env
        self.n = env.records
        self.next: dict[int, int] = {}
        self.count = 0
        self.hash = hashlib.sha256()
        self.repeats = 0
        self.on_count = on_count
        self.finished = asyncio.Event()
        self.error: Optional[BaseException] = None

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.finished.set()

    def start(self):  # type: ignore[no-untyped-def]
        """Subscribe.start for a (re-)subscription: from the next expected offsets."""
        return {"offsets": dict(self.next)} if self.next else "earliest"

    def feed(self, part: int, recs: list) -> None:
        for off, _ts, _key, p in recs:
            nxt = self.next.get(part)
            if nxt is not None and off < nxt:
                self.repeats += 1
                continue
            if self.count >= self.n:
                raise w.Fail(f"record beyond the {self.n} published: partition {part} offset {off}")
            if p != payload(self.count):
                raise w.Fail(f"record {self.count} (partition {part} offset {off}): payload {p!r}")
            self.hash.update(p)
            self.count += 1
            self.next[part] = off + 1
            self.on_count(self.count)
        self.env.write("progress.txt", str(self.count))
        if self.count >= self.n:
            self.finished.set()


class ShardSession:
    """One shard connection: attach, one subscription, partition streams into the receiver.
    `changed` is set when the session ends (connection or session stream lost) or the shard
    sent GoAway."""

    def __init__(self, env: Env, ticket: dict, ep: dict, rx: Receiver) -> None:
        self.env, self.ticket, self.ep, self.rx = env, ticket, ep, rx
        self.addr = ep["addr"]
        self.conn: Optional[Proto] = None
        self.session_id = None
        self.goaway: Optional[dict] = None
        self.lost = False
        self.why = ""
        self.changed = asyncio.Event()
        self.epoch = -1
        self.assigned: set[int] = set()
        self.delivered: dict[int, int] = {}  # partition -> next offset this session delivered
        self.positions: dict[int, int] = {}  # last Position sent
        self.tasks: list[asyncio.Task] = []

    async def open(self, sub_id: int) -> None:
        self.conn = await open_conn(self.addr, shard_config(self.env, self.ep["server_name"], SHARD_IDLE_TIMEOUT), ATTEMPT_TIMEOUT)
        try:
            self.sid, a = await asyncio.wait_for(attach(self.env, self.ticket, self.conn), ATTEMPT_TIMEOUT)
        except BaseException:
            await self.conn.shutdown()
            raise
        self.session_id = a.get("session_id")
        limits = a.get("limits") or {}
        idle = min(SHARD_IDLE_TIMEOUT, (limits.get("idle_timeout_ms") or 30000) / 1000)
        self.csid = self.conn.open_bidi()
        self.conn.send(self.csid, w.subscribe_frame(sub_id, self.env.stream, self.rx.start()))
        log(f"attached to {self.addr} (session {self.session_id}, limits {limits}); subscribed, start {self.rx.start()}")
        for coro in (
            self.conn.keepalive(max(0.2, idle / 5)),
            self.watch_session(),
            self.accept_streams(),
            self.read_control(),
            self.send_positions(),
        ):
            self.spawn(coro)

    def spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        async def guarded() -> None:
            try:
                await coro
            except w.Fail as e:
                self.rx.fail(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a broken session, not a broken test
                self.end(f"{type(e).__name__}: {e}")

        self.tasks.append(asyncio.ensure_future(guarded()))

    def end(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            self.why = why
            log(f"session on {self.addr} lost: {why}")
            self.changed.set()

    def app_code(self) -> Optional[int]:
        return self.conn.closed_app if self.conn else None

    async def watch_session(self) -> None:
        assert self.conn
        while True:
            f = await self.conn.read_frame(self.sid, timeout=None)
            if f is None:
                break
            if f[0] != w.GOAWAY:
                raise w.Fail(f"frame {f[0]:#x} on the session stream after Attached")
            self.goaway = w.decode_cbor(f[1])
            log(f"GoAway from {self.addr}: {self.goaway}")
            self.changed.set()
        self.end(self.conn.closed_why or "session stream finished")

    async def accept_streams(self) -> None:
        assert self.conn
        while True:
            sid = await self.conn.new_streams.get()
            if sid < 0:
                return
            if sid & 2:  # server-initiated unidirectional: a partition stream
                self.spawn(self.read_partition(sid))

    async def read_partition(self, sid: int) -> None:
        assert self.conn
        f = await self.conn.read_frame(sid, timeout=None)
        if f is None:
            return
        if f[0] != w.PARTITION_OPEN:
            raise w.Fail(f"partition stream starts with frame {f[0]:#x}")
        m = w.decode_cbor(f[1])
        if m.get("epoch", 0) < self.epoch:
            self.conn.stop(sid, w.REVOKED)  # stale (section 6.3)
            return
        while True:
            f = await self.conn.read_frame(sid, timeout=None)
            if f is None:
                return
            if f[0] != w.RECORDS:
                raise w.Fail(f"frame {f[0]:#x} on a partition stream")
            part, recs = w.parse_records(f[1])
            if recs:
                self.delivered[part] = max(self.delivered.get(part, 0), recs[-1][0] + 1)
            self.rx.feed(part, recs)

    async def read_control(self) -> None:
        assert self.conn
        while True:
            f = await self.conn.read_frame(self.csid, timeout=None)
            if f is None:
                if not self.conn.closed.is_set():
                    self.end("control stream finished")
                return
            ftype, m = f[0], w.decode_cbor(f[1])
            if ftype == w.ASSIGNMENT:
                now = {p["partition"] for p in m.get("partitions") or []}
                for p in self.assigned - now:  # revoked: a final Position at once
                    self.position(p, force=True)
                self.epoch, self.assigned = m.get("epoch", 0), now
                log(f"assignment epoch {self.epoch}: {m.get('partitions')}")
            elif ftype == w.SUB_ERROR:
                code = m.get("code", -1)
                if w.retry_class(code) == w.NEVER:
                    raise w.Fail(f"SubError {w.error_name(code)}: {m.get('reason')}")
                self.end(f"SubError {w.error_name(code)}: {m.get('reason')}")
                return
            elif ftype not in (w.GRANT, w.FLIP_HINT, w.FLIP):
                raise w.Fail(f"frame {ftype:#x} on the control stream")

    def position(self, p: int, force: bool = False) -> None:
        """Position for partition `p`: what the application consumed, but never beyond what
        this session delivered (records taken from an older session are not its business)."""
        assert self.conn
        nxt = min(self.rx.next.get(p, 0), self.delivered.get(p, 0))
        if nxt and (force or self.positions.get(p) != nxt) and not self.conn.closed.is_set():
            self.positions[p] = nxt
            self.conn.send(self.csid, w.position_frame(p, nxt))

    async def send_positions(self) -> None:
        assert self.conn
        while not self.conn.closed.is_set():
            await asyncio.sleep(POSITION_EVERY)
            for p in sorted(self.assigned):
                self.position(p)

    async def close(self, code: int = w.NO_ERROR) -> None:
        if self.conn:
            if not self.conn.closed.is_set() and hasattr(self, "csid"):
                self.conn.send(self.csid, b"", end=True)  # ends the subscription (section 6.2)
            await self.conn.shutdown(code)
        for t in self.tasks:
            t.cancel()


class Subscriber:
    """Keeps one subscription alive across shard losses (section 8)."""

    def __init__(self, env: Env, ticket: dict, rx: Receiver) -> None:
        self.env, self.ticket, self.rx = env, ticket, rx
        self.session: Optional[ShardSession] = None
        self.sub_ids = itertools.count(1)
        self.ticket_fresh = True  # not used for an attach yet
        self.attaches = 0
        self.tickets = 1

    def need_ticket(self) -> bool:
        """A fresh ticket is used as it is; a cached one while it expires more than 30 s
        from now (section 8)."""
        if self.ticket is None:
            return True
        return not self.ticket_fresh and self.ticket["expires_at"] - time.time() <= TICKET_MARGIN

    async def connect(self, avoid: Optional[str]) -> ShardSession:
        """A session on the ticket's endpoints in order (`avoid`, the one just lost, last);
        a new ticket when the cached one is near expiry, was refused "after hub", or every
        endpoint failed; backoff between failed rounds."""
        failures = 0
        while True:
            if failures:
                delay = backoff_delay(failures)
                log(f"round {failures} failed; backing off {delay * 1000:.0f} ms")
                await asyncio.sleep(delay)
            if self.need_ticket():
                try:
                    self.ticket = await asyncio.wait_for(get_ticket(self.env), ATTEMPT_TIMEOUT)
                    self.ticket_fresh = True
                    self.tickets += 1
                    log(f"new ticket: group {self.ticket['shard_group']}, endpoints {[e['addr'] for e in self.ticket['endpoints']]}")
                except HubRefused as e:
                    if w.retry_class(e.code) == w.NEVER:
                        raise
                    log(f"hub: {e}")
                    failures += 1
                    await asyncio.sleep((e.retry_after_ms or 0) / 1000)
                    continue
                except (ConnectionError, OSError, asyncio.TimeoutError, Closed) as e:
                    log(f"hub unreachable: {type(e).__name__}: {e}")
                    failures += 1
                    continue
            assert self.ticket is not None
            self.ticket_fresh = False
            eps = [e for e in self.ticket["endpoints"] if e["addr"] != avoid]
            eps += [e for e in self.ticket["endpoints"] if e["addr"] == avoid]
            for ep in eps:
                s = ShardSession(self.env, self.ticket, ep, self.rx)
                try:
                    await s.open(next(self.sub_ids))
                except Closed as e:
                    code = e.app_code
                    log(f"attach to {ep['addr']} refused: {e}")
                    if code is not None and w.retry_class(code) == w.NEVER:
                        raise w.Fail(f"attach refused by {ep['addr']}: {e}")
                    if code is not None and w.retry_class(code) == w.AFTER_HUB:
                        break
                    continue
                except (ConnectionError, OSError, asyncio.TimeoutError) as e:
                    log(f"attach to {ep['addr']} failed: {type(e).__name__}: {e}")
                    continue
                self.attaches += 1
                self.env.write("attached.txt", ep["addr"] + "\n")
                return s
            # An "after hub" refusal, or every endpoint failed: back to the hub.
            self.ticket = None
            failures += 1

    async def run(self) -> None:
        """Until the receiver has every record (or failed); then closes the session."""
        try:
            await self.follow()
        finally:
            if self.session:
                await self.session.close()

    async def follow(self) -> None:
        self.session = await self.connect(None)
        while not self.rx.finished.is_set():
            s = self.session
            await first(self.rx.finished.wait(), s.changed.wait())
            if self.rx.finished.is_set():
                break
            code = s.app_code()
            if code is not None and w.retry_class(code) == w.NEVER:
                raise w.Fail(f"shard {s.addr} closed with {w.error_name(code)}")
            if code is not None and w.retry_class(code) == w.AFTER_HUB:
                self.ticket = None
            # "same endpoint" closes (NO_ERROR, IDLE) may go back to it; else it comes last.
            avoid = None if code is not None and w.retry_class(code) == w.SAME_ENDPOINT else s.addr
            log(f"re-attaching after {s.addr}: {s.why or 'GoAway'}; next offsets {self.rx.next}")
            # Make before break: the old session keeps delivering while the new one attaches.
            new = asyncio.ensure_future(self.connect(avoid))
            await first(self.rx.finished.wait(), new)
            if not new.done():
                new.cancel()
                break
            self.session = new.result()
            asyncio.ensure_future(s.close())


async def first(*aws) -> None:  # type: ignore[no-untyped-def]
    """Waits for the first of `aws` (coroutines or futures); cancels the other coroutines."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t, a in zip(tasks, aws):
        if t in pending and t is not a:
            t.cancel()


async def publish(env: Env, hub: Proto, psid: int, gate: Optional[asyncio.Event]) -> bytes:
    """Produces RECORDS records to partition 0, BATCH per Produce; with `gate`, the second
    half only once it is set. Returns the SHA-256 over the payloads once all are acked."""
    n = env.records
    sent = hashlib.sha256()
    seq = 0

    def produce(lo: int, hi: int) -> None:
        nonlocal seq
        for b in range(lo, hi, BATCH):
            seq += 1
            batch = [(b"", payload(i)) for i in range(b, min(hi, b + BATCH))]
            for _, p in batch:
                sent.update(p)
            hub.send(psid, w.frame(w.PRODUCE, w.produce_body(seq, 0, batch)))

    half = n // 2 if gate else n
    produce(0, half)
    if gate:
        await asyncio.wait_for(gate.wait(), STEP * 3)
        log(f"event started: publishing records {half}..{n}")
    produce(half, n)
    next_offset = 0
    for want in range(1, seq + 1):
        f = await hub.read_frame(psid, timeout=STEP * 3)
        if f is None:
            raise w.Fail(f"publish stream ended before ack {want} ({hub.closed_why})")
        m = w.decode_cbor(f[1])
        if f[0] != w.PRODUCE_ACK:
            raise w.Fail(f"Produce {want} not acknowledged: {m}")
        if m.get("seq") != want or m.get("base_offset") != next_offset:
            raise w.Fail(f"ProduceAck {m} (expected seq {want}, base_offset {next_offset})")
        next_offset += m.get("count", 0)
    hub.send(psid, b"", end=True)  # done publishing
    return sent.digest()


async def run_case(env: Env) -> str:
    n = env.records
    gate = asyncio.Event() if env.case in GATED else None
    trigger = min(max(env.event_at, 1), max(n // 2, 1))
    rebound: dict = {}
    sub: Optional[Subscriber] = None
    hub: Optional[Proto] = None
    background: list[asyncio.Task] = []

    async def rebind() -> None:
        assert sub and sub.session and sub.session.conn and hub and gate
        s = sub.session
        rebound["session"], rebound["conn"] = s.session_id, s.conn
        rebound["before"], rebound["after"] = await s.conn.rebind()
        hub_before, hub_after = await hub.rebind()
        rebound["at"] = rx.count  # records received before the move completed
        log(f"rebind at record {rx.count}: shard connection {rebound['before']} -> {rebound['after']}, hub connection {hub_before} -> {hub_after}")
        gate.set()

    async def wait_started() -> None:
        assert gate
        while not env.exists("event-started"):
            await asyncio.sleep(0.02)
        gate.set()

    def on_count(count: int) -> None:
        if count != trigger or gate is None:
            return
        if env.case == "rebind":
            background.append(asyncio.ensure_future(rebind()))
        else:
            env.write("event-request", "")
            log(f"asked for the {env.case} event at record {count}")

    rx = Receiver(env, on_count)
    hub = await open_conn(env.hub, hub_config(env))
    try:
        # The ticket on this connection enables publishing on it (section 5.2).
        ticket = await ask_ticket(env, hub)
        log(f"ticket: group {ticket['shard_group']}, endpoints {[e['addr'] for e in ticket['endpoints']]}")
        background.append(asyncio.ensure_future(hub.keepalive(HUB_KEEPALIVE)))
        psid = hub.open_bidi()
        hub.send(psid, w.cbor_frame(w.PUBLISH_OPEN, {"stream": env.stream}))
        f = await hub.read_frame(psid)
        if f is None or f[0] != w.PUBLISH_ACCEPTED:
            m = w.decode_cbor(f[1]) if f else {}
            raise w.Fail(f"PublishOpen not accepted: {m}")
        sub = Subscriber(env, ticket, rx)
        if env.case in EVENT_CASES:
            background.append(asyncio.ensure_future(wait_started()))
        sub_task = asyncio.ensure_future(sub.run())
        pub_task = asyncio.ensure_future(publish(env, hub, psid, gate))
        finished = asyncio.ensure_future(rx.finished.wait())
        try:
            # Until every record arrived; a failed publisher or subscriber ends it early.
            pending = {sub_task, pub_task, finished}
            while not rx.finished.is_set():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not finished and t.exception():
                        raise t.exception()  # type: ignore[misc]
            if rx.error:
                raise rx.error
            sent = await pub_task
            await asyncio.wait_for(sub_task, STEP)  # ends the subscription, closes the session
        finally:
            for t in (sub_task, pub_task, finished):
                if not t.done():
                    t.cancel()
            await asyncio.gather(sub_task, pub_task, return_exceptions=True)
        if rx.hash.digest() != sent:
            raise w.Fail("hash mismatch")
        note = f"{sub.attaches} attach(es), {sub.tickets} ticket(s), {rx.repeats} repeat(s) dropped"
        if env.case == "rebind":
            if not rebound.get("after"):
                raise w.Fail("never rebound")
            conn = sub.session.conn if sub.session else None
            if sub.attaches != 1 or conn is not rebound["conn"]:
                raise w.Fail(f"re-attached ({sub.attaches} attaches): a reconnect, not a migration")
            if conn.local_addr() != rebound["after"] or rebound["after"] == rebound["before"]:
                raise w.Fail(f"local address {conn.local_addr()} (was {rebound['before']}, rebound to {rebound['after']})")
            note += f", migrated {rebound['before'][1]} -> {rebound['after'][1]} in session {rebound['session']}, {n - rebound['at']} records after"
        if env.case in EVENT_CASES:
            for _ in range(100):  # the runner writes event-done right after the event
                if env.exists("event-done"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise w.Fail("all records received before the runner's event was over")
        return f"{n} records in order, sha256 {sent.hex()}; {note}"
    finally:
        for t in background:
            t.cancel()
        await hub.shutdown()
