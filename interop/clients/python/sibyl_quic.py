"""QUIC connections for the Sibyl interop client on aioquic: a protocol that collects stream
data per stream and reads whole frames, connection setup with a timeout, keep-alive PINGs,
and moving a connection to a new local UDP socket (migration, for `rebind`).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Optional

from aioquic.asyncio import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, StreamDataReceived, StreamReset

import sibyl_wire as w

STEP = 20.0  # seconds, bound on any one network step


def log(msg: str) -> None:
    """Timestamped line on stderr (the cell's client.stderr.log)."""
    t = time.time()
    print(f"{time.strftime('%H:%M:%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d} {msg}", file=sys.stderr, flush=True)


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def quic_config(ca_file: str, server_name: str, idle_timeout: float) -> QuicConfiguration:
    c = QuicConfiguration(is_client=True, alpn_protocols=[w.ALPN], server_name=server_name)
    c.load_verify_locations(cafile=ca_file)
    c.idle_timeout = idle_timeout
    return c


class Stream:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.ended = False
        self.reset_code: Optional[int] = None
        self.event = asyncio.Event()


class Closed(Exception):
    """The connection ended. `app_code` is the peer's application error code (section 7)
    when it closed with one, else None (idle timeout, transport error, local close)."""

    def __init__(self, app_code: Optional[int], why: str) -> None:
        super().__init__(why)
        self.app_code = app_code


class Proto(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.streams: dict[int, Stream] = {}
        self.new_streams: asyncio.Queue[int] = asyncio.Queue()
        self.closed_code: Optional[int] = None  # error code of the close, whatever its kind
        self.closed_app: Optional[int] = None  # application error code, if the peer sent one
        self.closed_why = ""
        self.closed = asyncio.Event()
        self.remote = ""

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
        elif isinstance(event, StreamReset):
            s = self.stream(event.stream_id)
            s.ended = True
            s.reset_code = event.error_code
            s.event.set()
        elif isinstance(event, ConnectionTerminated):
            self.closed_code = event.error_code
            # aioquic: frame_type is None for an application CONNECTION_CLOSE (0x1d).
            if event.frame_type is None and not self.closed_why:
                self.closed_app = event.error_code
                self.closed_why = f"closed by peer with {w.error_name(event.error_code)} {event.reason_phrase!r}"
            elif not self.closed_why:
                self.closed_why = f"transport close: code {event.error_code:#x} {event.reason_phrase!r}"
            self._mark_closed()

    def _mark_closed(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            for s in self.streams.values():
                s.event.set()
            self.new_streams.put_nowait(-1)  # wakes stream acceptors

    def open_bidi(self) -> int:
        sid = self._quic.get_next_available_stream_id()
        self.stream(sid)
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self._quic.send_stream_data(sid, data, end)
        self.transmit()

    def stop(self, sid: int, code: int) -> None:
        """STOP_SENDING on a receive stream."""
        try:
            self._quic.stop_stream(sid, code)
            self.transmit()
        except Exception:  # stream already gone
            pass

    async def read_frame(self, sid: int, timeout: Optional[float] = STEP) -> Optional[tuple[int, bytes]]:
        """One frame from `sid`, or None when the stream or the connection ended first.
        `timeout` bounds the wait for more data (None: no bound)."""
        s = self.stream(sid)
        while True:
            f = w.split_frame(s.buf)
            if f is not None:
                return f
            if s.ended or self.closed.is_set():
                if s.buf and s.reset_code is None and not self.closed.is_set():
                    raise w.Fail("stream ended inside a frame")
                return None
            s.event.clear()
            if timeout is None:
                await s.event.wait()
            else:
                await asyncio.wait_for(s.event.wait(), timeout)

    def exporter(self) -> bytes:
        return w.attach_exporter(self._quic.tls)

    def alpn(self) -> Optional[str]:
        return self._quic.tls.alpn_negotiated

    def send_ping(self) -> None:
        """Sends a PING (keep-alive) without waiting for its ack (unlike aioquic's ping())."""
        if not self.closed.is_set():
            self._quic.send_ping(0)
            self.transmit()

    async def keepalive(self, interval: float) -> None:
        while not self.closed.is_set():
            await asyncio.sleep(interval)
            self.send_ping()

    def local_addr(self) -> tuple:
        return self._transport.get_extra_info("sockname")

    async def rebind(self) -> tuple[tuple, tuple]:
        """Moves the connection to a fresh UDP socket (new local port): connection migration.
        The old socket is closed; the same QuicConnection keeps going on the new one, with a
        fresh connection id if the peer gave us a spare one (RFC 9000 section 9.5)."""
        before = self.local_addr()
        sock = _udp_socket()
        proto = self
        loop = asyncio.get_running_loop()

        class Forward(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
                proto.datagram_received(data, addr)

        transport, _ = await loop.create_datagram_endpoint(Forward, sock=sock)
        old = self._transport
        self._transport = transport
        old.close()
        self._quic.change_connection_id()
        self.send_ping()
        return before, self.local_addr()

    async def shutdown(self, code: int = w.NO_ERROR, reason: str = "") -> None:
        """Closes the connection (if still open) and its socket. The CONNECTION_CLOSE leaves
        at once (transmit() hands it to the socket); the closing period is not waited out."""
        if not self.closed.is_set():
            self.closed_why = self.closed_why or f"closed locally with {w.error_name(code)}"
            self.close(error_code=code, reason_phrase=reason)
            self._mark_closed()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()
        await asyncio.sleep(0)


def _udp_socket() -> socket.socket:
    # Dual stack, as aioquic's own connect() does (IPv4 peers as ::ffff:a.b.c.d).
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0, 0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_conn(addr: str, config: QuicConfiguration, timeout: float = STEP) -> Proto:
    """QUIC connection to `addr` ("ip:port"), handshake complete within `timeout` (else
    asyncio.TimeoutError / ConnectionError, socket closed). Close it with `shutdown()`."""
    host, port = split_addr(addr)
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    peer = infos[0][4]
    if len(peer) == 2:
        peer = ("::ffff:" + peer[0], peer[1], 0, 0)
    conn = QuicConnection(configuration=config)
    transport, proto = await loop.create_datagram_endpoint(lambda: Proto(conn), sock=_udp_socket())
    assert isinstance(proto, Proto)
    proto.remote = addr
    try:
        proto.connect(peer)
        await asyncio.wait_for(proto.wait_connected(), timeout)
    except BaseException:
        proto._quic.close(error_code=w.NO_ERROR)
        proto.transmit()
        transport.close()
        raise
    return proto
