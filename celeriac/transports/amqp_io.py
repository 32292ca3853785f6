"""The AMQP transport's plumbing: settings, the wire format, the I/O thread and the connection.

* :class:`Settings` reads the URL and the transport options (never logging the password).
* :func:`properties` and :func:`read_message` map a :class:`~celeriac.protocol.Message` to
  AMQP properties and back, exactly: properties AMQP has no field for, or that the message
  did not set, travel in one private header that is removed again on the way in.
* :class:`IOThread` is one asyncio event loop on a daemon thread; synchronous callers hand it
  coroutines. :class:`Link` is the aiormq connection that loop owns, with five channels:
  ``pub`` (publisher confirms), ``cons`` (task consumers, ``basic_get``, acks), ``aux``
  (no-ack consumers: broadcasts, replies, results), ``ops`` (declarations) and ``probe``
  (passive declarations, which close it when the queue is missing). ``pub``, ``ops`` and
  ``probe`` are simply re-opened after an error closed them. A broken ``cons`` or ``aux``
  channel loses what the broker held for it, so it is handled like a lost connection:
  reconnect, then restore.
* The hot path's publisher, a blocking connection of its own used from the caller's
  thread, is in :mod:`celeriac.transports.amqp_publish`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import functools
import logging
import math
import os
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from ..exceptions import ConfigurationError, TransportError
from ..greenlets import new_event_loop, os_thread
from ..protocol import Message
from ..urls import mask_url

try:
    import aiormq
    from aiormq import exceptions as amqp_errors
    from pamqp import commands as spec
    from pamqp import encode as pamqp_encode
except ImportError:  # pragma: no cover - the amqp extra is not installed
    aiormq = None  # type: ignore[assignment]

__all__ = ["DELAY_LEVELS", "DELAY_UNIT", "IOThread", "Link", "Listener", "Settings",
           "describe_error", "encode_table", "properties", "read_message"]

log = logging.getLogger("celeriac.transports.amqp")
T = TypeVar("T")

# Private headers: set by us, removed before a message is handed out.
H_PREFIX = "x-celeriac-"
H_DELIVERIES = "x-celeriac-deliveries"
H_PROPERTIES = "x-celeriac-properties"
H_REASON = "x-celeriac-reason"
H_DEAD_AT = "x-celeriac-dead-at"
H_EXPIRES = "x-celeriac-expires"
# Headers RabbitMQ adds when it dead-letters (our delay queues do): not the sender's.
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")
_NATIVE = ("correlation_id", "reply_to", "expiration", "priority", "delivery_mode")

DELAY_LEVELS = 32
DELAY_UNIT = 0.1
"""Seconds per delay step: delays are rounded up to this, and span 2**32 steps (13 years)."""


class _QuietAiormq(logging.Filter):
    """Drops aiormq's own reports of a dropped or refused connection (with tracebacks).

    :class:`Link` reports each of those once, with the masked URL and what it does next.
    """

    NOISE = ("Unexpected connection close from remote", "Cancelling cause reader exited",
             "error when creating transport")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


def require_aiormq() -> None:
    """Fail clearly without the ``amqp`` extra; quiet aiormq's duplicate connection logs."""
    if aiormq is None:
        raise ConfigurationError(
            "The amqp:// transport needs the aiormq package: pip install celeriac[amqp]")
    logger = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _QuietAiormq) for f in logger.filters):
        logger.addFilter(_QuietAiormq())


# -- settings -------------------------------------------------------------------------------

def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


_OPTION_TYPES: dict[str, Callable[[Any], Any]] = {
    "heartbeat": int, "connect_timeout": float, "max_retries": int, "retry": _flag,
    "operation_timeout": float, "name_prefix": str, "max_priority": int,
}
_ALIASES = {
    "broker_connection_timeout": "connect_timeout",
    "broker_connection_max_retries": "max_retries",
    "broker_connection_retry": "retry",
    "connection_timeout": "connect_timeout",  # the names the app passes to every transport
    "connection_max_retries": "max_retries",
    "connection_retry": "retry",
}


@dataclass(frozen=True)
class Settings:
    """Where and how to connect, from the URL (and its query) and the transport options.

    ``max_retries`` of ``None`` retries for ever at start-up; a connection lost while running
    is always retried, in the background.
    """

    url: str = field(repr=False)
    hostname: str
    port: int
    userid: str
    password: str = field(repr=False)
    virtual_host: str
    ssl: bool
    heartbeat: int = 30
    connect_timeout: float = 4.0
    max_retries: int | None = 100
    retry: bool = True
    operation_timeout: float = 30.0
    name_prefix: str = ""
    max_priority: int = 10
    passthrough: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str, options: Mapping[str, Any]) -> Settings:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"Malformed broker URL {mask_url(url)!r}: {exc}") from exc
        ssl = parts.scheme.lower() == "amqps"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        given: dict[str, Any] = {}
        passthrough = []
        for key, value in [*parse_qsl(parts.query), *dict(options).items()]:
            key = _ALIASES.get(key, key)
            if key in _OPTION_TYPES:
                given[key] = value
            elif isinstance(value, str):
                passthrough.append((key, value))  # TLS files, connection name: aiormq's
        try:
            typed: dict[str, Any] = {k: None if v is None else _OPTION_TYPES[k](v)
                                     for k, v in given.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"Bad AMQP transport option: {exc}") from exc
        return cls(url=url, hostname=parts.hostname or "localhost",
                   port=port or (5671 if ssl else 5672), userid=unquote(parts.username or "guest"),
                   password=unquote(parts.password or "guest"),
                   virtual_host=unquote(path) or "/", ssl=ssl, passthrough=tuple(passthrough),
                   **typed)

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    def describe(self) -> dict[str, Any]:
        """Connection facts for ``stats()``; never the password."""
        info: dict[str, Any] = {
            "transport": "amqp", "hostname": self.hostname, "port": self.port,
            "userid": self.userid, "virtual_host": self.virtual_host, "ssl": self.ssl,
            "heartbeat": self.heartbeat, "connect_timeout": self.connect_timeout}
        if self.name_prefix:
            info["name_prefix"] = self.name_prefix
        return info

    def connection_url(self) -> str:
        """The URL handed to aiormq. It holds the password: never log it."""
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in
                         [("heartbeat", str(self.heartbeat)), *self.passthrough])
        return (f"{'amqps' if self.ssl else 'amqp'}://{quote(self.userid, safe='')}:"
                f"{quote(self.password, safe='')}@{self.hostname}:{self.port}/"
                f"{quote(self.virtual_host, safe='')}?{query}")

    def scrub(self, text: str) -> str:
        """``text`` with the password masked, for error messages built from library errors."""
        return text.replace(self.password, "**") if len(self.password) > 2 else text


# -- the wire format ------------------------------------------------------------------------

_KEYS: dict[str, bytes] = {}  # header names, encoded: the same few on every message
_NULL = b"V"


def _key(key: Any) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        encoded = pamqp_encode.short_string(str(key))
        if len(_KEYS) < 4096 and isinstance(key, str):
            _KEYS[key] = encoded
    return encoded


def encode_table(value: Mapping[str, Any]) -> bytes:
    """An AMQP field table, as our messages' headers are encoded (see :func:`_value`)."""
    out = []
    for key, item in value.items():
        out.append(_key(key))
        out.append(_value(item))
    data = b"".join(out)
    return struct.pack(">I", len(data)) + data


def _value(item: Any) -> bytes:
    """One header value: like pamqp's, except that floats are doubles, as in py-amqp."""
    if item is None:
        return _NULL
    if type(item) is str:  # the usual case first, without pamqp's checks
        data = item.encode()
        return b"S" + struct.pack(">I", len(data)) + data
    if isinstance(item, bool):
        return b"t" + pamqp_encode.boolean(item)
    if isinstance(item, int):
        return pamqp_encode.table_integer(item)
    if isinstance(item, float):
        return b"d" + struct.pack(">d", item)
    if isinstance(item, str):
        return b"S" + pamqp_encode.long_string(item)
    if item is None:
        return b"V"
    if isinstance(item, Mapping):
        return b"F" + encode_table(item)
    if isinstance(item, list | tuple):
        data = b"".join(_value(x) for x in item)
        return b"A" + struct.pack(">I", len(data)) + data
    if isinstance(item, decimal.Decimal):
        return b"D" + pamqp_encode.decimal(item)
    if isinstance(item, dt.datetime):
        return b"T" + pamqp_encode.timestamp(item)
    raise TypeError(f"an AMQP header cannot hold {type(item).__name__} ({item!r}); use text, "
                    "numbers, booleans, None, lists and dicts")


if aiormq is not None:
    class _Properties(spec.Basic.Properties):
        """Basic.Properties with the headers table encoded up front, floats as doubles.

        Encoding in the caller's thread reports a header AMQP cannot carry at once, and
        spares the I/O thread, which every publish goes through.
        """

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.encoded_headers = encode_table(self.headers or {})

        def encode_property(self, name: str, value: Any) -> bytes:
            if name == "headers":
                return self.encoded_headers
            return super().encode_property(name, value)


def properties(message: Message, priority: int, *, persistent: bool = True,
               headers: Mapping[str, Any] | None = None,
               expiration: str | None = None) -> Any:
    """The AMQP properties for ``message``, plus private ``headers`` of ours."""
    src = message.properties
    amqp_priority = min(max(int(priority or src.get("priority") or 0), 0), 255)
    mode = src.get("delivery_mode") or (2 if persistent else 1)
    table = dict(message.headers)
    if headers:
        table.update(headers)
    kept = {k: v for k, v in src.items() if k not in _NATIVE}
    unset = []
    for name, sent in (("priority", amqp_priority), ("delivery_mode", mode)):
        if name not in src:
            unset.append(name)
        elif src[name] != sent:
            kept[name] = src[name]
    if kept or unset:
        table[H_PROPERTIES] = {"set": kept, "unset": unset}
    correlation_id = src.get("correlation_id")
    reply_to = src.get("reply_to")
    expiry = expiration if expiration is not None else src.get("expiration")
    try:
        return _Properties(
            content_type=message.content_type, content_encoding=message.content_encoding,
            headers=table, delivery_mode=mode, priority=amqp_priority,
            correlation_id=None if correlation_id is None else str(correlation_id),
            reply_to=None if reply_to is None else str(reply_to),
            expiration=None if expiry is None else str(expiry))
    except (TypeError, ValueError, struct.error) as exc:
        raise TransportError(f"Cannot send this message over AMQP: {exc}") from exc


def read_message(props: Any, body: bytes) -> tuple[Message, dict[str, Any]]:
    """The message as it was sent, and our private headers (``x-celeriac-*``) apart."""
    headers = dict(props.headers or {})
    private: dict[str, Any] = {}
    for key in [k for k in headers if k.startswith(H_PREFIX) or k.startswith(_BROKER_HEADERS)]:
        value = headers.pop(key)
        if key.startswith(H_PREFIX):
            private[key] = value
    found: dict[str, Any] = {}
    for name in ("correlation_id", "reply_to", "expiration", "delivery_mode", "priority"):
        value = getattr(props, name)
        if value is not None:
            found[name] = value
    marker = private.get(H_PROPERTIES)
    if isinstance(marker, dict):
        for name in marker.get("unset") or ():
            found.pop(name, None)
        found.update(marker.get("set") or {})
    message = Message(body=body, headers=headers,
                      content_type=props.content_type or "application/octet-stream",
                      content_encoding=props.content_encoding or "binary", properties=found)
    return message, private


# -- the I/O thread -------------------------------------------------------------------------

class IOThread:
    """An asyncio event loop on a daemon thread, for this process's AMQP connection."""

    def __init__(self, name: str = "celeriac-amqp") -> None:
        self.loop = new_event_loop()
        self._thread = os_thread(self._main, name)  # a real thread, even under gevent
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here).

        A plain lock carries the wake-up back: cheaper than a concurrent future, and every
        publish, ack and settle pays it.
        """
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise RuntimeError("a blocking AMQP call from the transport's own I/O thread")
        done = threading.Lock()
        done.acquire()
        holder: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            holder.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            self.loop.call_soon_threadsafe(start)
        except RuntimeError as exc:  # the loop is closed
            coro.close()
            raise TransportError("The AMQP connection of this handle is closed") from exc
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.acquire(timeout=0.5 if deadline is None else
                               max(0.0, min(0.5, deadline - time.monotonic()))):
            if not self.alive:
                raise TransportError("The AMQP connection of this handle is closed")
            if deadline is not None and time.monotonic() >= deadline:
                self.loop.call_soon_threadsafe(lambda: holder and holder[0].cancel())
                raise TransportError(f"The broker did not answer within {timeout}s")
        try:
            return holder[0].result()
        except asyncio.CancelledError:
            raise TransportError("An AMQP operation was cancelled (the handle is closing)"
                                 ) from None

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)


# -- the connection -------------------------------------------------------------------------

@dataclass(eq=False)
class Listener:
    """A no-ack consumer on an exclusive, auto-delete queue of ours; restored after reconnects.

    An empty ``queue`` lets the broker name it; with ``exchange`` it is bound to that fanout
    exchange. A plain queue is consumed on the link's own consuming connection when it has
    one (see :attr:`Link.lean_consumer`), so ``on_message`` runs on that connection's reader
    thread; otherwise (and for exchanges) on the I/O thread. It gets a delivered message in
    aiormq's shape (``header.properties``, ``body``) either way.
    """

    queue: str
    on_message: Callable[[Any], None]
    expires: float | None = None
    exchange: str | None = None
    ctag: str | None = None
    channel: Any = None  #: the channel consuming it, once started


def describe_error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


class Link:
    """One connection with its channels, re-opened in the background whenever it drops.

    ``on_ready`` runs after every (re)connection, before anyone may use it (declare,
    consume again); ``on_lost`` runs as soon as a drop is noticed (forget what the broker
    has handed back by now: unacked deliveries, consumers, exclusive queues).
    """

    CHANNELS = ("pub", "cons", "aux", "ops", "probe")
    REOPEN = ("pub", "ops", "probe")

    def __init__(self, settings: Settings, *, on_ready: Callable[[], Awaitable[None]],
                 on_lost: Callable[[], None]) -> None:
        self.settings = settings
        self.on_ready = on_ready
        self.on_lost = on_lost
        self.connection: Any = None
        self.channels: dict[str, Any] = {}
        self.generation = 0
        self.losses = 0
        self._up = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._restorer: asyncio.Task[Any] | None = None
        self._closer: asyncio.Future[Any] | None = None
        self.declared: set[str] = set()
        self.exchanges: set[str] = set()
        self.delay_bound: set[str] = set()
        self.delay_ready = False
        self.listeners: set[Listener] = set()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def _usable(self) -> bool:
        """Connected, or this is ``on_ready`` restoring things before anyone else may go."""
        return self._up.is_set() or (self._restorer is not None
                                     and asyncio.current_task() is self._restorer)

    async def open(self) -> None:
        """Connect, retrying as the settings allow; a :class:`TransportError` when they run out."""
        retries = self.settings.max_retries if self.settings.retry else 0
        await self._connect(retries)
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def _connect(self, retries: int | None) -> None:
        settings = self.settings
        started, attempt, delay = time.monotonic(), 0, 0.2
        while True:
            attempt += 1
            try:
                await self._attempt()
                if attempt > 1:
                    log.info("Connected to the broker at %s", settings.masked)
                return
            except Exception as exc:
                if self._closing:
                    raise TransportError("The AMQP connection was closed") from None
                reason = settings.scrub(describe_error(exc))
                if retries is not None and (  # at start-up; once running, never give up
                        attempt > retries or isinstance(exc, amqp_errors.AuthenticationError)):
                    raise TransportError(
                        f"Cannot connect to the broker at {settings.masked}: {reason} "
                        f"(tried {attempt} time(s) over {time.monotonic() - started:.1f}s). "
                        "Check that RabbitMQ is running and reachable there and that the URL's "
                        "host, port, user, password and virtual host are right; to wait longer "
                        "at start-up raise broker_connection_timeout and "
                        "broker_connection_max_retries (broker_transport_options).") from None
                log.warning("Cannot reach the broker at %s (%s); retrying in %.1fs",
                            settings.masked, reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _attempt(self) -> None:
        conn = aiormq.Connection(
            self.settings.connection_url(),
            client_properties={"connection_name": f"celeriac pid {os.getpid()}"})
        try:
            await asyncio.wait_for(conn.connect(), self.settings.connect_timeout)
            channels = {}
            for name in self.CHANNELS:
                if name == "cons" and self.lean_consumer:
                    channels[name] = await self._lean_channel()
                else:
                    channels[name] = await conn.channel(publisher_confirms=name == "pub")
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            self._close_lean(channels.get("cons"))
            raise
        self._close_lean(self.channels.get("cons"))
        self.connection, self.channels = conn, channels
        self.generation += 1
        self.forget_declared()  # a restarted broker has lost what was not durable
        for name in ("cons", "aux"):
            channels[name].closing.add_done_callback(
                functools.partial(self._channel_lost, conn, name))
        self._restorer = asyncio.current_task()
        try:
            for listener in list(self.listeners):
                await self._start(listener)
            await self.on_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        finally:
            self._restorer = None
        self._up.set()

    @property
    def lean_consumer(self) -> bool:
        """Whether ``cons`` is our own connection: not for TLS."""
        return not self.settings.ssl

    async def _lean_channel(self) -> Any:
        """Our own consuming connection (see :mod:`.amqp_consume`), opened off the loop."""
        from .amqp_consume import LeanChannel
        lean = LeanChannel(self.settings, asyncio.get_running_loop())
        try:
            await asyncio.get_running_loop().run_in_executor(None, lean.connect)
        except BaseException:
            lean.close()
            raise
        return lean

    @staticmethod
    def _close_lean(channel: Any) -> None:
        """Close our consuming connection, if ``channel`` is one: it lives as long as the
        link's connection, so the broker takes back its deliveries when the link drops."""
        from .amqp_consume import LeanChannel
        if isinstance(channel, LeanChannel):
            channel.close()

    def _channel_lost(self, conn: Any, name: str, closed: asyncio.Future[Any]) -> None:
        reason = None if closed.cancelled() else closed.exception()
        if self._closing or conn is not self.connection or conn.is_closed:
            return
        log.warning("The broker closed the %s channel (%s); reconnecting", name,
                    describe_error(reason) if reason else "no reason given")
        self._up.clear()
        self._closer = asyncio.ensure_future(conn.close(reason))

    async def _supervise(self) -> None:
        while not self._closing:
            conn = self.connection
            try:
                await conn.closing
                reason = "closed"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = self.settings.scrub(describe_error(exc))
            if self._closing:
                return
            self._up.clear()
            self._close_lean(self.channels.get("cons"))
            log.warning("Lost the connection to the broker at %s (%s); reconnecting",
                        self.settings.masked, reason)
            self.on_lost()
            self.losses += 1
            try:
                await self._connect(None)
            except TransportError:
                return

    async def ready(self) -> None:
        """Return once connected; :class:`TransportError` after ``operation_timeout``."""
        if self._usable():
            return
        if self._closing:
            raise TransportError("The AMQP connection of this handle is closed")
        try:
            await asyncio.wait_for(self._up.wait(), self.settings.operation_timeout)
        except TimeoutError:
            raise TransportError(
                f"The broker at {self.settings.masked} has been unreachable for "
                f"{self.settings.operation_timeout:g}s (reconnecting in the background); "
                "the operation was not done") from None

    async def channel(self, name: str) -> Any:
        """A channel of the live connection; those in ``REOPEN`` are re-opened when closed."""
        while True:
            ch = self.channels.get(name)
            if ch is not None and not ch.is_closed and self._usable():
                return ch
            await self.ready()
            ch = self.channels.get(name)
            if ch is not None and not ch.is_closed:
                return ch
            if name in self.REOPEN and not self.connection.is_closed:
                ch = await self.connection.channel(publisher_confirms=name == "pub")
                self.channels[name] = ch
                return ch
            self._up.clear()  # cons/aux lost: the watcher is reconnecting
            await asyncio.sleep(0)

    # -- topology: declared once per connection ----------------------------------------------
    def name(self, queue: str) -> str:
        """The broker's name for one of ours: with the ``name_prefix``."""
        return self.settings.name_prefix + queue

    def forget_declared(self) -> None:
        """Something declared is gone (deleted, or the broker restarted): declare again."""
        self.declared.clear()
        self.exchanges.clear()
        self.delay_bound.clear()
        self.delay_ready = False

    async def declare_queue(self, wire: str, *, priorities: bool = True) -> None:
        """A durable queue; task queues get ``x-max-priority``, the same everywhere."""
        if wire in self.declared:
            return
        ch = await self.channel("ops")
        priority = self.settings.max_priority if priorities else 0
        args = {"x-max-priority": priority} if priority > 0 else None
        try:
            await ch.queue_declare(wire, durable=True, arguments=args)
        except amqp_errors.ChannelPreconditionFailed as exc:
            log.warning("Queue %r already exists with other arguments (%s); using it as it is, "
                        "so message priorities may not apply", wire, exc)
            ch = await self.channel("probe")
            await ch.queue_declare(wire, passive=True)
        self.declared.add(wire)

    async def declare_exchange(self, name: str, kind: str) -> None:
        if name not in self.exchanges:
            ch = await self.channel("ops")
            await ch.exchange_declare(name, exchange_type=kind)
            self.exchanges.add(name)

    async def passive(self, wire: str) -> Any:
        """The queue's DeclareOk, or ``None`` when there is no such queue."""
        ch = await self.channel("probe")
        try:
            return await ch.queue_declare(wire, passive=True)
        except amqp_errors.ChannelNotFoundEntity:
            return None

    # -- listening ----------------------------------------------------------------------------
    async def listen(self, listener: Listener) -> None:
        self.listeners.add(listener)
        await self._start(listener)

    async def _start(self, listener: Listener) -> None:
        ch = await self.channel("aux" if listener.exchange or not self.lean_consumer
                                else "cons")
        if listener.exchange:
            await self.declare_exchange(listener.exchange, "fanout")
        args = ({"x-expires": max(1, round(listener.expires * 1000))}
                if listener.expires else None)
        ok = await ch.queue_declare(listener.queue, exclusive=True, auto_delete=True,
                                    arguments=args)
        if listener.exchange:
            await ch.queue_bind(ok.queue, listener.exchange)
        listener.ctag = f"celeriac.{uuid.uuid4().hex}"
        listener.channel = ch
        await ch.basic_consume(ok.queue, listener.on_message, no_ack=True,
                               consumer_tag=listener.ctag)

    async def unlisten(self, listener: Listener) -> None:
        """Stop consuming; the broker deletes the (auto-delete) queue."""
        self.listeners.discard(listener)
        ch = listener.channel
        if listener.ctag and ch is not None and not ch.is_closed and self.up:
            with contextlib.suppress(amqp_errors.AMQPError, RuntimeError):
                await ch.basic_cancel(listener.ctag)

    async def sync(self) -> None:
        """Round trips on the channels listeners use: what the broker sent to them before
        has arrived."""
        ch = await self.channel("aux")
        await ch.basic_qos(prefetch_count=0)
        cons = self.channels.get("cons")
        if self.lean_consumer and any(li.channel is cons for li in self.listeners):
            await (await self.channel("cons")).ping()

    # -- publishing ---------------------------------------------------------------------------
    async def publish(self, key: str, body: bytes, props: Any, *, exchange: str = "",
                      prepare: Callable[[], Awaitable[None]] | None = None,
                      mandatory: bool = True) -> None:
        """Publish and wait for the broker's confirm; ``prepare`` declares what it needs.

        A message the broker could not route, or a missing exchange, makes it declare again
        and publish once more; so does a connection lost before the confirm (the message may
        then be stored twice: at least once, and never lost without an error).
        """
        for attempt in (1, 2):
            if prepare is not None:
                await prepare()
            ch = await self.channel("pub")
            try:
                confirm = await ch.basic_publish(body, exchange=exchange, routing_key=key,
                                                 properties=props, mandatory=mandatory,
                                                 wait=False)
            except (amqp_errors.PublishError, amqp_errors.ChannelNotFoundEntity) as exc:
                self.forget_declared()
                if attempt == 1 and prepare is not None:
                    continue
                raise TransportError(f"The broker could not route a message to "
                                     f"{exchange or key!r} ({exc}); it was not stored") from None
            except amqp_errors.DeliveryError as exc:
                raise TransportError(f"The broker refused a message for {exchange or key!r}: "
                                     f"{exc}") from None
            except (amqp_errors.AMQPError, ConnectionError, RuntimeError) as exc:
                if attempt == 1:
                    continue  # lost connection or channel: wait for it, publish again
                raise TransportError(f"Publishing to {exchange or key!r} was not confirmed: "
                                     f"{self.settings.scrub(repr(exc))}") from exc
            if not isinstance(confirm, spec.Basic.Ack):
                raise TransportError(f"The broker did not confirm a message for {key!r}")
            return

    async def publish_to_queue(self, wire: str, body: bytes, props: Any, *,
                               priorities: bool = True) -> None:
        await self.publish(wire, body, props,
                           prepare=lambda: self.declare_queue(wire, priorities=priorities))

    async def publish_batch(self, batch: Sequence[tuple[str, bytes, Any]]) -> None:
        """Send them all, then wait for all the confirms."""
        for start in range(0, len(batch), 1000):
            await asyncio.gather(*(self.publish_to_queue(wire, body, props)
                                   for wire, body, props in batch[start:start + 1000]))

    # -- delays -------------------------------------------------------------------------------
    def _delay_name(self, level: int) -> str:
        return self.name(f"celeriac.delay.{level}" if level >= 0 else "celeriac.delay.deliver")

    async def _delay_setup(self) -> None:
        """The chain of delay levels: level k holds a message 2**k steps, then passes it on."""
        if self.delay_ready:
            return
        ch = await self.channel("ops")
        await ch.exchange_declare(self._delay_name(-1), exchange_type="topic", durable=True)
        for level in range(DELAY_LEVELS):
            name, below = self._delay_name(level), self._delay_name(level - 1)
            skip = "*." * (DELAY_LEVELS - 1 - level)  # the bit of this level is word ``skip+1``
            await ch.exchange_declare(name, exchange_type="topic", durable=True)
            await ch.queue_declare(name, durable=True, arguments={
                "x-message-ttl": round(DELAY_UNIT * 1000) << level,
                "x-dead-letter-exchange": below})
            await ch.queue_bind(name, name, routing_key=f"{skip}1.#")
            await ch.exchange_bind(below, name, routing_key=f"{skip}0.#")
        self.delay_ready = True

    async def publish_delayed(self, wire: str, body: bytes, props: Any, delay: float) -> None:
        """Publish into the delay chain; the message reaches ``wire`` after ``delay`` seconds.

        The routing key spells the delay in binary steps, highest level first, then the
        queue's name: each level's exchange reads its bit and either holds the message in its
        queue (whose TTL dead-letters it to the next level) or passes it straight on.
        """
        steps = math.ceil(round(delay / DELAY_UNIT, 6))
        if steps >= 1 << DELAY_LEVELS:
            raise TransportError(f"A delay of {delay}s is too long for the broker (at most "
                                 f"{(1 << DELAY_LEVELS) * DELAY_UNIT:.0f}s)")
        bits = format(steps, f"0{DELAY_LEVELS}b")
        key = f"{'.'.join(bits)}.{wire}"
        if len(key.encode()) > 255 or any(w in ("*", "#") for w in wire.split(".")):
            raise TransportError(f"Queue name {wire!r} cannot take delayed messages: it is too "
                                 "long, or has '*' or '#' words")

        async def prepare() -> None:
            await self._delay_setup()
            await self.declare_queue(wire)
            if wire not in self.delay_bound:
                ch = await self.channel("ops")
                await ch.queue_bind(wire, self._delay_name(-1),
                                    routing_key="*." * DELAY_LEVELS + wire)
                self.delay_bound.add(wire)

        top = DELAY_LEVELS - 1 - bits.index("1")
        await self.publish(key, body, props, exchange=self._delay_name(top), prepare=prepare)

    async def close(self) -> None:
        self._closing = True
        self._up.clear()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._close_lean(self.channels.get("cons"))
        if self.connection is not None and not self.connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.connection.close(), 5.0)

    async def drop(self) -> None:
        """Close the connection as if the network failed (tests use it): it reconnects.

        Returns once the loss has been handled (``on_lost`` ran).
        """
        losses = self.losses
        await self.connection.close(ConnectionError("dropped on purpose"))
        while self.losses == losses:
            await asyncio.sleep(0.001)
