"""Redis connections, shared by the Redis broker and the Redis result backend.

``redis_params`` (:mod:`.redis_url`) reads the URL; ``connect_with_retry`` opens a client,
retrying with backoff at start-up and logging the URL with its password masked.
:class:`RawCalls` runs commands on connections of our own, without the client's per-command
bookkeeping, for the hot paths (publish, fetch, ack, results).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, cast

from ..exceptions import CeleriacError, ConfigurationError, TransportError
from .redis_url import RedisParams, redis_params

try:
    import redis
    from redis.exceptions import RedisError
except ImportError:  # pragma: no cover - exercised only without the extra installed
    redis = None  # type: ignore[assignment]
try:
    import hiredis
except ImportError:  # pragma: no cover - the redis extra installs it
    hiredis = None  # type: ignore[assignment]

__all__ = ["RawCalls", "RawStream", "RedisParams", "connect_with_retry", "packed",
           "read_replies", "redis_params", "require_redis"]

log = logging.getLogger("celeriac.redis")

def require_redis(what: str) -> None:
    if redis is None:
        raise ConfigurationError(
            f"The Redis {what} needs the redis client library: pip install celeriac[redis]")


class RawCalls:
    """Commands sent in one round trip on a connection of our own.

    The client's pool, retry wrapper and pipeline objects cost more per command than a
    loopback round trip; this packs the commands, writes them at once and reads the replies.
    Idle connections wait in a short list that any thread (or greenlet) takes one from; at
    most ``keep`` are kept. A connection that fails is dropped, and the commands go through
    the client instead, whose retry policy reconnects: they may then be sent twice, so only
    commands that may run twice (at least once) belong here.
    """

    def __init__(self, client: redis.Redis, keep: int = 32) -> None:
        self.client = client
        self.keep = keep
        self.idle: list[Any] = []

    def run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies in order; an error reply is returned as its exception, not raised."""
        stream = self.stream()
        stream.write(commands)
        return stream.replies()

    def stream(self) -> RawStream:
        """Commands written as they come, their replies read at the end: the server works on
        the first ones while the caller makes the next."""
        return RawStream(self)

    def take(self) -> Any:
        try:
            return self.idle.pop()
        except IndexError:  # made outside the client's pool: its count is for its own
            pool = self.client.connection_pool
            return pool.connection_class(**pool.connection_kwargs)

    def give_back(self, conn: Any) -> None:
        if len(self.idle) < self.keep:
            self.idle.append(conn)
        else:
            conn.disconnect()

    def _through_client(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if len(commands) == 1:
            try:
                return [self.client.execute_command(*commands[0])]
            except redis.ResponseError as exc:
                return [exc]
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute(raise_on_error=False))

    def send_only(self, commands: list[tuple[Any, ...]]) -> Any | None:
        """Write ``commands`` on an idle connection and hand it over, its replies unread (see
        :meth:`read_back`): for a caller that must not wait, so one try, no reconnect. None
        if no connection is idle or this one fails (it is dropped; the commands may or may
        not have run)."""
        try:
            conn = self.idle.pop()
        except IndexError:
            return None
        if getattr(conn, "_sock", None) is None:  # (sending would connect, with retries)
            self.give_back(conn)
            return None
        sent = _or_dropped(conn, lambda: conn.send_packed_command(packed(conn, commands)))
        return None if sent is _DROPPED else conn

    def read_back(self, conn: Any, count: int) -> list[Any] | None:
        """The ``count`` replies :meth:`send_only` left on ``conn`` (an error reply as its
        exception), the connection then idle again; None if it failed (it is dropped)."""
        replies = _or_dropped(conn, lambda: read_replies(conn, count))
        if replies is _DROPPED:
            return None
        self.give_back(conn)
        return cast(list[Any], replies)

    def one(self, *command: Any) -> Any:
        """One command's reply; an error reply raises."""
        reply = self.run([command])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        while self.idle:
            self.idle.pop().disconnect()


_DROPPED = object()


def _or_dropped(conn: Any, step: Callable[[], Any]) -> Any:
    """``step()``, or ``_DROPPED`` if ``conn`` failed in it; on a failure, or any exception
    (interrupted half-way, nothing more may go on it), ``conn`` is disconnected."""
    try:
        return step()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
        return _DROPPED
    except BaseException:
        conn.disconnect()
        raise


def packed(conn: Any, commands: list[tuple[Any, ...]]) -> Any:
    """``commands`` in the wire format, to send on ``conn``: hiredis packs a command in one
    call, where the client's own packer goes over it argument by argument in Python (a few
    microseconds a command). A command hiredis cannot pack (an argument that is not str,
    bytes, int or float) goes to the client's packer."""
    if hiredis is not None:
        try:
            chunks = [hiredis.pack_command(command) for command in commands]
            return chunks if len(chunks) == 1 else [b"".join(chunks)]  # one write
        except TypeError:
            pass
    return conn.pack_commands(commands)


def read_replies(conn: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``conn``; an error reply is returned as its exception
    (and reading goes on: every reply must be taken before the connection is used again)."""
    replies = []
    for _ in range(count):
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


class RawStream:
    """One :meth:`RawCalls.stream`: ``write`` sends at once, ``replies`` reads them all.

    If the connection fails on the way, every command written so far goes through the client
    again when the replies are asked for (at least once, as with :meth:`RawCalls.run`).
    """

    def __init__(self, calls: RawCalls) -> None:
        self.calls = calls
        self.commands: list[tuple[Any, ...]] = []
        self.conn: Any = None
        self.broken = False

    def write(self, commands: list[tuple[Any, ...]]) -> None:
        self.commands += commands
        if self.broken:
            return
        conn, self.conn = self.conn or self.calls.take(), None  # (kept only if this works)
        sent = _or_dropped(conn, lambda: conn.send_packed_command(packed(conn, commands)))
        if sent is _DROPPED:
            self.broken = True
        else:
            self.conn = conn

    def replies(self) -> list[Any]:
        """The replies in order; an error reply is returned as its exception, not raised."""
        conn, self.conn = self.conn, None
        if self.broken or conn is None:
            return self.calls._through_client(self.commands) if self.commands else []
        replies = _or_dropped(conn, lambda: read_replies(conn, len(self.commands)))
        if replies is _DROPPED:
            return self.calls._through_client(self.commands)
        self.calls.give_back(conn)
        return cast(list[Any], replies)


def connect_with_retry(params: RedisParams, what: str,
                       error: type[CeleriacError] = TransportError) -> None:
    """PING the server until it answers, with backoff, logging each failed attempt.

    Gives up after ``connection_timeout`` seconds or ``connection_max_retries`` retries
    (one attempt without ``connection_retry``) with an ``error`` that says what to check.
    """
    probe = params.client(retries=0)
    started = time.monotonic()
    attempts, pause = 0, 0.1
    try:
        while True:
            attempts += 1
            try:
                probe.ping()
                return
            except redis.AuthenticationError as exc:
                raise error(f"The Redis {what} at {params.masked} refused our credentials "
                            f"({params.scrub(exc).rstrip('.')}). Check the user and password "
                            "in the URL.") from None
            except RedisError as exc:
                elapsed = time.monotonic() - started
                out_of_time = elapsed + pause > params.connection_timeout
                if (not params.connection_retry or attempts > params.connection_max_retries
                        or out_of_time):
                    raise error(
                        f"Cannot connect to the Redis {what} at {params.masked} "
                        f"({type(exc).__name__}: {params.scrub(exc)}) after {attempts} "
                        f"attempt(s) in {elapsed:.1f}s. Is Redis running and reachable there? "
                        "Check the URL, or allow more time with broker_connection_timeout / "
                        "broker_connection_max_retries.") from None
                log.warning("Cannot connect to the Redis %s at %s (%s); retrying in %.1fs",
                            what, params.masked, params.scrub(exc), pause)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
    finally:
        probe.close()
