"""Publishing to RabbitMQ from the caller's thread: :class:`Publisher`, a small blocking
AMQP connection of our own (framing by pamqp), and :class:`PublisherPool`, which lends a
couple of them out, one thread at a time. Used by
:class:`~celeriac.transports.amqp.AMQPTransport` for publishes to queues its link has
already declared; anything unusual goes back through :class:`~celeriac.transports.amqp_io.Link`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from ..exceptions import TransportError
from .amqp_io import Settings, describe_error

try:
    from pamqp import commands as spec
    from pamqp import frame as pamqp_frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader, ProtocolHeader
except ImportError:  # pragma: no cover - the amqp extra is not installed
    spec = None  # type: ignore[assignment]

__all__ = ["Publisher", "PublisherPool", "Unroutable", "Unsure"]

log = logging.getLogger("celeriac.transports.amqp")


class Unsure(Exception):
    """The direct publisher cannot tell whether the broker has the message: publish it again
    through :class:`Link` (at least once, as after any connection lost before a confirm)."""


class Unroutable(Unsure):
    """The broker confirmed the message but returned it: the queue is gone; declare again."""


class Publisher:
    """A blocking AMQP connection of its own that publishes from the calling thread.

    Publishing through the I/O thread costs two thread wake-ups per message (to the loop and
    back), about half as much again as the broker's confirm. This connection writes the
    frames and reads the confirm in the caller's thread instead. It does one thing: publish
    one message to a queue through the default exchange (mandatory, persistent as its
    properties say) and wait for the broker's ack. Anything else that happens on the way
    (the connection or channel closed, a timeout, a returned message) raises
    :class:`Unsure`, and the caller publishes through :class:`Link`, which deals with it.

    Heartbeats are off (``heartbeat=0`` in Tune-Ok): an idle publisher needs no timer; a
    connection closed meanwhile is noticed by the next publish, which then goes through
    :class:`Link`. Not thread-safe: one thread at a time (see :class:`PublisherPool`).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock: socket.socket | None = None
        self.broken = False
        self._buffer = bytearray()
        self._tag = 0
        self._body_max = 131072 - 8
        self._methods: dict[str, bytes] = {}  # Basic.Publish frame per queue: constant
        self.used = time.monotonic()

    # -- framing --------------------------------------------------------------------------
    def _send(self, channel: int, method: Any) -> None:
        assert self.sock is not None
        self.sock.sendall(pamqp_frame.marshal(method, channel))

    def _read(self) -> Any:
        """The next frame from the broker (blocking, up to the socket's timeout)."""
        assert self.sock is not None
        buf = self._buffer
        while True:
            if len(buf) >= 7:
                size = struct.unpack_from(">I", buf, 3)[0]
                end = 8 + size
                if len(buf) >= end:
                    data = bytes(buf[:end])
                    del buf[:end]
                    return pamqp_frame.unmarshal(data)[2]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            buf += chunk

    def _expect(self, kind: type) -> Any:
        value = self._read()
        if isinstance(value, spec.Connection.Close):
            raise ConnectionError(f"the broker closed the connection: {value.reply_code} "
                                  f"{value.reply_text}")
        if not isinstance(value, kind):
            raise ConnectionError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    # -- life -----------------------------------------------------------------------------
    def connect(self) -> None:
        s = self.settings
        sock = socket.create_connection((s.hostname, s.port), timeout=s.connect_timeout)
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.sendall(ProtocolHeader().marshal())
            self._expect(spec.Connection.Start)
            self._send(0, spec.Connection.StartOk(
                client_properties={
                    "product": "celeriac",
                    "connection_name": f"celeriac pid {os.getpid()} publisher",
                    "capabilities": {"publisher_confirms": True,
                                     "authentication_failure_close": True}},
                mechanism="PLAIN", response=f"\0{s.userid}\0{s.password}"))
            tune = self._expect(spec.Connection.Tune)
            frame_max = min(tune.frame_max or 131072, 131072)
            self._body_max = frame_max - 8
            self._send(0, spec.Connection.TuneOk(channel_max=1, frame_max=frame_max,
                                                 heartbeat=0))
            self._send(0, spec.Connection.Open(virtual_host=s.virtual_host))
            self._expect(spec.Connection.OpenOk)
            self._send(1, spec.Channel.Open())
            self._expect(spec.Channel.OpenOk)
            self._send(1, spec.Confirm.Select())
            self._expect(spec.Confirm.SelectOk)
            sock.settimeout(s.operation_timeout)
        except BaseException:
            self.broken = True
            self.close()
            raise

    def close(self) -> None:
        """Say goodbye (when the connection is sound), then close the socket."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if not self.broken:
            with contextlib.suppress(OSError, ConnectionError, ValueError):
                self.sock = sock
                sock.settimeout(0.25)
                self._send(0, spec.Connection.Close(reply_code=200, reply_text="bye",
                                                    class_id=0, method_id=0))
                while not isinstance(self._read(), spec.Connection.CloseOk):
                    pass
            self.sock = None
        with contextlib.suppress(OSError):
            sock.close()

    # -- publishing -----------------------------------------------------------------------
    def _frames(self, queue: str, body: bytes, props: Any) -> bytes:
        method = self._methods.get(queue)
        if method is None:
            if len(self._methods) > 1000:
                self._methods.clear()
            method = self._methods[queue] = pamqp_frame.marshal(
                spec.Basic.Publish(exchange="", routing_key=queue, mandatory=True), 1)
        parts = [method, pamqp_frame.marshal(ContentHeader(0, len(body), props), 1)]
        step = self._body_max
        for start in range(0, len(body), step):
            parts.append(pamqp_frame.marshal(ContentBody(body[start:start + step]), 1))
        return b"".join(parts)

    def publish(self, queue: str, body: bytes, props: Any) -> None:
        """Publish to ``queue`` and return once the broker confirmed it.

        :class:`TransportError` when the broker refused it (nack); :class:`Unsure` (and the
        connection is broken) when it cannot tell; :class:`Unroutable` when it returned it.
        """
        data = self._frames(queue, body, props)
        if self.sock is None or self.broken:
            raise Unsure("the direct publisher is not connected")
        self._tag += 1
        try:
            self.sock.sendall(data)
            returned = self._confirm(queue, self._tag)
        except (OSError, ConnectionError, ValueError, struct.error) as exc:
            self.broken = True
            raise Unsure(f"publishing to {queue!r} directly: {describe_error(exc)}") from exc
        except TransportError:
            raise
        except BaseException:
            self.broken = True  # interrupted half way: the stream's state is unknown
            raise
        self.used = time.monotonic()
        if returned:
            raise Unroutable(f"the broker returned a message for {queue!r}")

    def _confirm(self, queue: str, tag: int) -> bool:
        """Read up to the broker's ack of ``tag``; whether the message was returned first."""
        returned = False
        while True:
            value = self._read()
            if isinstance(value, spec.Basic.Ack | spec.Basic.Nack):
                if value.delivery_tag == tag or (value.multiple and value.delivery_tag > tag):
                    if isinstance(value, spec.Basic.Nack):
                        raise TransportError(f"The broker refused a message for {queue!r} "
                                             "(nack)")
                    return returned
            elif isinstance(value, spec.Basic.Return):
                returned = True  # its header and body frames follow: skipped
            elif isinstance(value, spec.Connection.Close):
                with contextlib.suppress(OSError):
                    self._send(0, spec.Connection.CloseOk())
                raise ConnectionError(f"the broker closed the connection: "
                                      f"{value.reply_code} {value.reply_text}")
            elif isinstance(value, spec.Channel.Close):
                raise ConnectionError(f"the broker closed the channel: "
                                      f"{value.reply_code} {value.reply_text}")


class PublisherPool:
    """At most ``size`` direct publishers, lent to one thread at a time.

    When all are lent out, :meth:`take` returns ``None`` and the caller goes through the I/O
    thread (which pipelines many callers' publishes anyway). After a failed connect nobody
    tries again for ``backoff`` seconds. A publisher idle for longer than the heartbeat
    interval is replaced: without heartbeats, a connection a firewall dropped silently would
    otherwise hold up its next publish until ``operation_timeout``.
    """

    def __init__(self, settings: Settings, size: int = 2, backoff: float = 5.0) -> None:
        self.settings = settings
        self.size = size
        self.backoff = backoff
        self._lock = threading.Lock()
        self._idle: list[Publisher] = []
        self._count = 0
        self._retry_at = 0.0
        self._open = True

    def take(self) -> Publisher | None:
        stale = None
        with self._lock:
            if self._idle:
                pub = self._idle.pop()
                idle_for = time.monotonic() - pub.used
                if not self.settings.heartbeat or idle_for < self.settings.heartbeat:
                    return pub
                stale = pub  # replaced below, by a new connection in its place
            elif (not self._open or self._count >= self.size
                    or time.monotonic() < self._retry_at):
                return None
            else:
                self._count += 1
        if stale is not None:
            stale.close()
        pub = Publisher(self.settings)
        try:
            pub.connect()
        except Exception as exc:
            log.debug("No direct publisher (%s); publishing through the I/O thread",
                      self.settings.scrub(describe_error(exc)))
            with self._lock:
                self._count -= 1
                self._retry_at = time.monotonic() + self.backoff
            return None
        return pub

    def give(self, pub: Publisher) -> None:
        """Return ``pub`` after use; a broken one is closed and replaced later."""
        with self._lock:
            keep = self._open and not pub.broken and pub.sock is not None
            if keep:
                self._idle.append(pub)
            else:
                self._count -= 1
        if not keep:
            pub.close()

    def close(self) -> None:
        with self._lock:
            self._open = False
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for pub in idle:
            pub.close()
