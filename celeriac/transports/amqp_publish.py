"""Publishing to RabbitMQ from the caller's thread: :class:`Publisher`, a small blocking
AMQP connection of our own (framing by pamqp), and :class:`PublisherPool`, which lends a
couple of them out, one thread at a time. Used by
:class:`~celeriac.transports.amqp.AMQPTransport` for publishes to queues its link has
already declared; anything unusual goes back through :class:`~celeriac.transports.amqp_io.Link`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import TransportError
from .amqp_consume import FrameReader, expect_method, handshake
from .amqp_io import Settings, describe_error, encode_table

try:
    from pamqp import commands as spec
    from pamqp import frame as pamqp_frame
    from pamqp.body import ContentBody
    from pamqp.header import ContentHeader
except ImportError:  # pragma: no cover - the amqp extra is not installed
    spec = None  # type: ignore[assignment]

__all__ = ["Batch", "Publisher", "PublisherPool", "Unroutable", "Unsure"]

log = logging.getLogger("celeriac.transports.amqp")


_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_FRAME_END = b"\xce"
_HEAD = struct.Struct(">HxxQ")  # a content header's class id, (weight,) body size
_PROPERTIES = ([(name, spec.Basic.Properties.flags[name],
                 getattr(spec.Basic.Properties, f"_{name}"))
                for name in spec.Basic.Properties.__slots__] if spec is not None else [])


def encode_properties(props: Any) -> bytes:
    """``props.marshal()``, the same bytes, in a fraction of the time.

    pamqp dispatches every property through its generic encoder, which cost as much as
    the rest of a publish; short strings and octets, all that is usually set besides the
    (already encoded) headers, are written here, anything else by pamqp as before.
    """
    flags = 0
    parts = [b""]
    for name, flag, kind in _PROPERTIES:
        value = getattr(props, name)
        if value is None or value == "":
            continue
        flags |= flag
        if kind == "shortstr" and type(value) is str and len(value) < 64:
            raw = value.encode()
            parts.append(bytes((len(raw),)) + raw)
        elif kind == "octet" and type(value) is int and 0 <= value <= 255:
            parts.append(bytes((value,)))
        else:
            parts.append(props.encode_property(name, value))
    parts[0] = struct.pack(">H", flags)
    return b"".join(parts)


class Unsure(Exception):
    """The direct publisher cannot tell whether the broker has the message: publish it again
    through :class:`Link` (at least once, as after any connection lost before a confirm)."""


class Unroutable(Unsure):
    """The broker confirmed the message but returned it: the queue is gone; declare again."""


# What became of each message of a batch (see Publisher.publish_batch)
_PENDING, _CONFIRMED, _REFUSED, _RETURNED = 0, 1, 2, 3


@dataclass(slots=True)
class Batch:
    """What became of :meth:`Publisher.publish_batch`'s items, by their index.

    ``again``: to publish through :class:`Link`, in order: those the broker returned (their
    queue is gone: ``returned`` counts them), those never written (from one that could not
    be framed on: Link reports what is wrong with it) and, when ``unsure`` says why the
    connection failed, those not confirmed yet. ``refused``: how many it nacked (not stored).
    """

    again: list[int] = field(default_factory=list)
    returned: int = 0
    refused: int = 0
    unsure: str | None = None


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
        self._reader: FrameReader | None = None
        self._tag = 0
        self._body_max = 131072 - 8
        self._methods: dict[tuple[str, bool], bytes] = {}  # Basic.Publish frame per queue: constant
        self.used = time.monotonic()

    # -- framing --------------------------------------------------------------------------
    def _send(self, channel: int, method: Any) -> None:
        assert self.sock is not None
        self.sock.sendall(pamqp_frame.marshal(method, channel))

    def _frames_in(self) -> FrameReader:
        assert self.sock is not None
        if self._reader is None or self._reader.sock is not self.sock:
            self._reader = FrameReader(self.sock)
        return self._reader

    def _read(self) -> Any:
        """The next frame from the broker (blocking, up to the socket's timeout)."""
        return pamqp_frame.unmarshal(self._frames_in().frame())[2]

    def _expect(self, kind: type) -> Any:
        return expect_method(self._frames_in(), kind)

    # -- life -----------------------------------------------------------------------------
    def connect(self) -> None:
        try:
            self.sock, frame_max, _ = handshake(self.settings, "publisher", heartbeat=0,
                                                confirms=True)
            self._body_max = frame_max - 8
            self.sock.settimeout(self.settings.operation_timeout)
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
    def _frames(self, queue: str, body: bytes, props: Any, mandatory: bool = True) -> bytes:
        method = self._methods.get((queue, mandatory))
        if method is None:
            if len(self._methods) > 1000:
                self._methods.clear()
            method = self._methods[(queue, mandatory)] = pamqp_frame.marshal(
                spec.Basic.Publish(exchange="", routing_key=queue, mandatory=mandatory), 1)
        header = _HEAD.pack(60, len(body)) + encode_properties(props)
        parts = [method, _FRAME.pack(2, 1, len(header)), header, _FRAME_END]
        step = self._body_max
        for start in range(0, len(body), step):
            piece = body[start:start + step]
            parts += (_FRAME.pack(3, 1, len(piece)), piece, _FRAME_END)
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
            else:
                self._check_closed(value)

    def _check_closed(self, value: Any) -> None:
        """Raise :class:`ConnectionError` when ``value`` closes the connection or channel."""
        if isinstance(value, spec.Connection.Close):
            with contextlib.suppress(OSError):
                self._send(0, spec.Connection.CloseOk())
            raise ConnectionError(f"the broker closed the connection: "
                                  f"{value.reply_code} {value.reply_text}")
        if isinstance(value, spec.Channel.Close):
            raise ConnectionError(f"the broker closed the channel: "
                                  f"{value.reply_code} {value.reply_text}")

    # -- publishing many ------------------------------------------------------------------
    chunk = 500
    """Messages framed into one ``sendall`` (fewer when they are large: see ``chunk_bytes``)."""
    chunk_bytes = 1 << 20
    window = 2000
    """Messages written and not yet confirmed at most: the broker works on one chunk while
    it confirms the one before, and what it sends back (acks, returned messages) stays
    small enough for the sockets' buffers."""

    def publish_batch(self, items: Sequence[tuple[str, bytes, Any]], *,
                      mandatory: bool = True) -> Batch:
        """Publish ``(queue, body, properties)`` items, pipelined; return once every one is
        settled: confirmed, refused (nack), returned, or left unsure by a failed connection.
        Without ``mandatory`` the broker drops a message for a queue that does not exist
        (and confirms it) instead of returning it.

        Chunks of frames go out in one write each, and the broker's acks (often for many
        messages at once) are read in between, so the broker is never idle waiting for us.
        What to do with the messages not stored is the caller's: see :class:`Batch`.
        """
        run = _Run(items, self._tag + 1, mandatory)
        if self.sock is None or self.broken:
            return run.outcome("the direct publisher is not connected")
        try:
            while run.writing or run.settled < run.sent:
                if run.writing and run.sent - run.settled <= self.window - self.chunk:
                    self._write_chunk(run)
                else:
                    self._settle_next(run)
        except (OSError, ConnectionError, ValueError, struct.error) as exc:
            self.broken = True
            return run.outcome(f"publishing a batch directly: {describe_error(exc)}")
        except BaseException:
            self.broken = True  # interrupted half way: the stream's state is unknown
            raise
        self.used = time.monotonic()
        return run.outcome(None)

    def _write_chunk(self, run: _Run) -> None:
        assert self.sock is not None
        parts: list[bytes] = []
        size, end = 0, min(run.sent + self.chunk, len(run.items))
        for queue, body, props in run.items[run.sent:end]:
            try:
                data = self._frames(queue, body, props, run.mandatory)
            except (TypeError, ValueError, struct.error):
                run.stopped = True  # this one and the rest go to Link, which says what is wrong
                break
            parts.append(data)
            size += len(data)
            if size >= self.chunk_bytes:
                break
        self._tag += len(parts)  # counted first: a write that fails half way is unsure
        run.sent += len(parts)
        self.sock.sendall(b"".join(parts))

    def _settle_next(self, run: _Run) -> None:
        """Read the broker's next frame and settle what it says about the batch."""
        value = self._read()
        if isinstance(value, spec.Basic.Ack | spec.Basic.Nack):
            run.settle(value.delivery_tag, value.multiple,
                       _REFUSED if isinstance(value, spec.Basic.Nack) else _CONFIRMED)
        elif isinstance(value, spec.Basic.Return):
            header = self._expect(ContentHeader)
            chunks: list[bytes] = []
            size = 0
            while size < header.body_size:
                body = self._expect(ContentBody)
                chunks.append(body.value)
                size += len(body.value)
            run.returned(value.routing_key, header.properties, b"".join(chunks))
        else:
            self._check_closed(value)


def _same_properties(sent: Any, got: Any) -> bool:
    """Whether the broker's copy ``got`` has the properties ``sent`` went with.

    Headers are compared as we encode them (pamqp would write floats as singles); if the
    copy decoded to something that encodes otherwise, the caller's fallback is safe anyway.
    """
    for name in spec.Basic.Properties.__slots__:
        if name != "headers" and (getattr(sent, name) or None) != (getattr(got, name) or None):
            return False
    encoded = getattr(sent, "encoded_headers", None)
    if encoded is None:
        encoded = encode_table(sent.headers or {})
    return bool(encode_table(got.headers or {}) == encoded)


class _Run:
    """One batch on its way: each item's fate, by delivery tag (``first`` for item 0).

    The broker confirms in any order, but each ``multiple`` ack covers every tag up to its
    own; ``low`` is the first item no such ack has covered yet. It returns a message (always
    before confirming it) in the order they were published, so a returned one is the next
    unsettled item after the last one returned that has its queue, body and properties. One
    that matches none leaves the batch unsure: sent again rather than lost.
    """

    def __init__(self, items: Sequence[tuple[str, bytes, Any]], first: int,
                 mandatory: bool = True) -> None:
        self.items = items
        self.first = first
        self.mandatory = mandatory
        self.state = bytearray(len(items))
        self.sent = 0
        self.settled = 0
        self.low = 0
        self.after_return = 0
        self.stopped = False

    @property
    def writing(self) -> bool:
        return self.sent < len(self.items) and not self.stopped

    def settle(self, tag: int, multiple: bool, fate: int) -> None:
        index = tag - self.first
        if index >= self.sent:
            raise ConnectionError(f"the broker settled delivery tag {tag}, never published")
        if multiple:
            for i in range(self.low, index + 1):
                self._mark(i, fate)
            self.low = max(self.low, index + 1)
        elif index >= 0:
            self._mark(index, fate)

    def _mark(self, i: int, fate: int) -> None:
        if self.state[i] == _PENDING:
            self.state[i] = fate
            self.settled += 1

    def returned(self, queue: str | None, props: Any, body: bytes) -> None:
        for start in (max(self.low, self.after_return), self.low):
            for i in range(start, self.sent):
                wire, sent_body, sent_props = self.items[i]
                if (self.state[i] == _PENDING and wire == queue and sent_body == body
                        and _same_properties(sent_props, props)):
                    self._mark(i, _RETURNED)
                    self.after_return = i + 1
                    return
        raise ConnectionError(f"the broker returned a message for {queue!r} that matches "
                              "none in flight")

    def outcome(self, unsure: str | None) -> Batch:
        """Those returned, those never written, and (``unsure``) those unconfirmed go again."""
        sent = 0 if unsure else self.sent
        again = [i for i, s in enumerate(self.state)
                 if s == _RETURNED or (s == _PENDING and i >= sent)]
        return Batch(again=again,
                     returned=self.state.count(_RETURNED), refused=self.state.count(_REFUSED),
                     unsure=unsure)


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
