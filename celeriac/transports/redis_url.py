"""Redis URLs: ``redis://``, ``rediss://`` (TLS) and ``redis+socket://`` plus options.

``redis_params`` reads a URL plus options (``key_prefix``, ``db``, TLS ``ssl_*``, timeouts,
the connection retry policy) into :class:`RedisParams`. Nothing here loads redis-py until a
client is made, so prefork children can read a URL without the client library's memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ..exceptions import ConfigurationError
from ..urls import mask_url

if TYPE_CHECKING:
    import redis

__all__ = ["RedisParams", "redis_params"]

_URL_QUERY = {"db", "virtual_host", "key_prefix", "ssl_cert_reqs", "ssl_ca_certs",
              "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "socket_timeout",
              "socket_connect_timeout", "health_check_interval"}
_CERT_REQS = {"required": "required", "cert_required": "required", "optional": "optional",
              "cert_optional": "optional", "none": "none", "cert_none": "none"}



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
        import redis  # (here: pool children parse URLs without loading the client library)
        from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
        from redis.retry import Retry

        count = self.retries if retries is None else retries
        backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0) if count else NoBackoff()
        return redis.Redis(retry=Retry(backoff, count), single_connection_client=single,
                           **self.client_kwargs)


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


