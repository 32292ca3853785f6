"""Redis URLs and connections, shared by the Redis broker and the Redis result backend.

``redis_params`` reads a ``redis://`` / ``rediss://`` / ``redis+socket://`` URL plus options
(``key_prefix``, ``db``, TLS ``ssl_*``, timeouts, the connection retry policy) and
``connect_with_retry`` opens a client, retrying with backoff at start-up and logging the URL
with its password masked. :class:`RawCalls` runs commands on connections of our own, without
the client's per-command bookkeeping, for the hot paths (publish, fetch, ack, results).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..exceptions import CeleriacError, ConfigurationError, TransportError
from ..urls import mask_url

try:
    import redis
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
    from redis.exceptions import RedisError
    from redis.retry import Retry
except ImportError:  # pragma: no cover - exercised only without the extra installed
    redis = None  # type: ignore[assignment]

__all__ = ["RawCalls", "RedisParams", "connect_with_retry", "redis_params", "require_redis"]

log = logging.getLogger("celeriac.redis")

_URL_QUERY = {"db", "virtual_host", "key_prefix", "ssl_cert_reqs", "ssl_ca_certs",
              "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "socket_timeout",
              "socket_connect_timeout", "health_check_interval"}
_CERT_REQS = {"required": "required", "cert_required": "required", "optional": "optional",
              "cert_optional": "optional", "none": "none", "cert_none": "none"}


def require_redis(what: str) -> None:
    if redis is None:
        raise ConfigurationError(
            f"The Redis {what} needs the redis client library: pip install celeriac[redis]")


# -- URLs and connections (shared with the Redis result backend) ----------------------------------
@dataclass(frozen=True, repr=False)
class RedisParams:
    """What a Redis URL plus options say: client arguments, key prefix, retry policy."""

    url: str
    client_kwargs: dict[str, Any]
    key_prefix: str
    facts: dict[str, Any]
    password: str | None = None
    connection_timeout: float = 4.0
    connection_retry: bool = True
    connection_max_retries: int = 100
    retries: int = 6

    def __repr__(self) -> str:
        return f"RedisParams({self.masked!r})"

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    def scrub(self, text: object) -> str:
        """``text`` with the password (if any) masked: for logs and error messages."""
        out = str(text)
        return out.replace(self.password, "**") if self.password else out

    def client(self, *, retries: int | None = None, single: bool = False) -> redis.Redis:
        count = self.retries if retries is None else retries
        backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0) if count else NoBackoff()
        return redis.Redis(retry=Retry(backoff, count), single_connection_client=single,
                           **self.client_kwargs)


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
        try:
            conn = self.idle.pop()
        except IndexError:  # made outside the client's pool: its count is for its own
            pool = self.client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:  # read on: every reply must be taken
                    replies.append(exc)
            return replies
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            return self._through_client(commands)
        except BaseException:
            conn.disconnect()  # interrupted mid-call: its replies must not reach the next
            raise
        finally:
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

    def one(self, *command: Any) -> Any:
        """One command's reply; an error reply raises."""
        reply = self.run([command])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        while self.idle:
            self.idle.pop().disconnect()


def _number(value: Any, name: str, url: str, kind: Callable[[Any], Any] = float) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}={value!r} in {mask_url(url)!r} is not a "
                                 f"{'whole ' if kind is int else ''}number") from None


def _tls_kwargs(query: Mapping[str, str], url: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"ssl": True, **{name: query[name] for name in (
        "ssl_ca_certs", "ssl_certfile", "ssl_keyfile") if name in query}}
    if "ssl_cert_reqs" in query:
        kwargs["ssl_cert_reqs"] = _CERT_REQS.get(query["ssl_cert_reqs"].lower())
        if kwargs["ssl_cert_reqs"] is None:
            raise ConfigurationError(f"ssl_cert_reqs in {mask_url(url)!r} must be one of "
                                     "required, optional, none")
    if "ssl_check_hostname" in query:
        kwargs["ssl_check_hostname"] = query["ssl_check_hostname"].lower() in ("1", "true", "yes")
    return kwargs


def redis_params(url: str, options: Mapping[str, Any] | None = None) -> RedisParams:
    """Parse ``redis://[user:password@]host[:port][/db][?query]``, ``rediss://`` (TLS) and
    ``redis+socket:///path/to/socket[?db=N]``; ``options`` override the query."""
    opts = dict(options or {})
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"Malformed Redis URL {mask_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - _URL_QUERY)
    if unknown:
        raise ConfigurationError(f"Unknown option(s) {unknown} in Redis URL {mask_url(url)!r}; "
                                 f"supported: {sorted(_URL_QUERY)}")
    kwargs: dict[str, Any] = {}
    facts: dict[str, Any] = {"transport": "redis"}
    db_text = query.get("db") or query.get("virtual_host") or ""
    if scheme == "redis+socket":
        kwargs["unix_socket_path"] = facts["path"] = unquote(parts.path)
    else:
        kwargs["host"] = facts["hostname"] = parts.hostname or "localhost"
        kwargs["port"] = facts["port"] = port or 6379
        db_text = db_text or parts.path.strip("/")
    kwargs["db"] = facts["db"] = _number(db_text or 0, "db", url, int)
    facts["ssl"] = scheme == "rediss"
    if scheme == "rediss":
        kwargs.update(_tls_kwargs(query, url))
    password = unquote(parts.password) if parts.password else None
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if password:
        kwargs["password"] = password
    timeout = _number(opts.get("connection_timeout", 4.0), "connection_timeout", url)
    for name in ("socket_timeout", "socket_connect_timeout", "health_check_interval"):
        value = opts.get(name, query.get(name))
        if value is not None:
            kwargs[name] = _number(value, name, url)
    kwargs.setdefault("socket_connect_timeout", timeout)
    if "max_connections" in opts:
        kwargs["max_connections"] = _number(opts["max_connections"], "max_connections", url, int)
    prefix = str(opts.get("key_prefix", opts.get("global_keyprefix", query.get("key_prefix", ""))))
    facts["key_prefix"] = prefix
    return RedisParams(
        url=url, client_kwargs=kwargs, key_prefix=prefix, facts=facts, password=password,
        connection_timeout=timeout,
        connection_retry=bool(opts.get("connection_retry", True)),
        connection_max_retries=_number(opts.get("connection_max_retries", 100),
                                       "connection_max_retries", url, int),
        retries=_number(opts.get("retries", 6), "retries", url, int))


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
