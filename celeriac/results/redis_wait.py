"""Waiting for a result on Redis over RESP3: subscribe and read the key in one round trip.

Over RESP2 a subscribed connection runs nothing but (un)subscriptions, so a waiter must see
its subscription confirmed before it reads the key on a second connection (a result stored
in between would be missed otherwise): two round trips, through redis-py's pub/sub
bookkeeping. Over RESP3 (Redis 6 and later) a subscribed connection runs any command, and
the server runs one connection's commands in order: ``SUBSCRIBE`` and ``GET`` go in one
write, and the result is either in the key or published after it.

:class:`PushWaiter` is one such connection (plain TCP or a Unix socket), read with hiredis.
It leaves a subscription's end unconfirmed (``UNSUBSCRIBE`` is written, its answer skipped
by the next wait, as are messages for keys waited on before). Anything it cannot do (TLS, no
hiredis, a server without RESP3) it says with :class:`NoPushWaits`; the backend then waits
through redis-py as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..exceptions import ResultBackendError
from ..transports.redis_url import RedisParams
from ..transports.resp import open_socket

try:
    import hiredis
except ImportError:  # pragma: no cover - the redis extra installs it
    hiredis = None  # type: ignore[assignment]

__all__ = ["NoPushWaits", "PushWaiter"]

#: The protocol version asked for with ``HELLO``.
PROTOCOL = 3

#: Longest single read while waiting without a deadline (a dead peer shows up by then).
_SLICE = 30.0


class NoPushWaits(Exception):
    """This server or URL does not allow RESP3 waits (the reason is the message)."""


class PushWaiter:
    """One RESP3 connection that waits for results (one wait at a time)."""

    def __init__(self, params: RedisParams, name: str = "celeriac-wait") -> None:
        kwargs = params.client_kwargs
        if hiredis is None:
            raise NoPushWaits("hiredis is not installed")
        if kwargs.get("ssl"):
            raise NoPushWaits("TLS connections wait through redis-py")
        self.params = params
        self._reader = hiredis.Reader()
        self._sock = open_socket(params)
        self._set_up(kwargs, f"{name}-{os.getpid()}")

    def _set_up(self, kwargs: dict[str, Any], name: str) -> None:
        timeout = float(kwargs.get("socket_connect_timeout") or 4.0)
        sock = self._sock
        setup: list[tuple[Any, ...]] = []
        if kwargs.get("password"):
            user = kwargs.get("username")
            setup.append(("AUTH", user, kwargs["password"]) if user else
                         ("AUTH", kwargs["password"]))
        setup += [("HELLO", PROTOCOL), ("SELECT", int(kwargs.get("db") or 0)),
                  ("CLIENT", "SETNAME", name)]
        try:
            self._send(*setup)
            replies = [self._read(time.monotonic() + timeout) for _ in setup]
        except BaseException:
            sock.close()
            raise
        for command, reply in zip(setup, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                sock.close()
                if command[0] == "HELLO":
                    raise NoPushWaits(f"the server does not speak RESP{PROTOCOL}: {reply}")
                raise ResultBackendError(
                    f"Redis result backend {self.params.masked} refused the connection "
                    f"set-up: {self.params.scrub(reply)}")

    def wait(self, key: str, deadline: float | None,
             ready: Callable[[bytes], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The first document of ``key`` that ``ready`` accepts (as ``ready`` returns it),
        stored before or while waiting; None at ``deadline`` (monotonic time). A failed
        connection raises ``OSError`` or ``ConnectionError``: it must then be closed."""
        self._send(("SUBSCRIBE", key), ("GET", key))
        found = None
        while True:  # skip what earlier waits left (their pushes are lists, as ours is)
            reply = self._read(deadline)
            if not isinstance(reply, list):
                break
            found = found or self._message(reply, key, ready)
        if isinstance(reply, hiredis.ReplyError):
            raise ResultBackendError(f"Redis result backend {self.params.masked}: could not "
                                     f"read {key}: {self.params.scrub(reply)}")
        found = found or (ready(reply) if reply is not None else None)
        try:
            while found is None:
                found = self._message(self._read(deadline), key, ready)
        except TimeoutError:
            pass  # (the deadline)
        self._send(("UNSUBSCRIBE", key))
        return found

    @staticmethod
    def _message(push: Any, key: str, ready: Callable[[bytes], dict[str, Any] | None]
                 ) -> dict[str, Any] | None:
        if (isinstance(push, list) and len(push) == 3 and push[0] == b"message"
                and push[1] == key.encode()):
            return ready(push[2])
        return None

    def _send(self, *commands: tuple[Any, ...]) -> None:
        self._sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))

    def _read(self, deadline: float | None) -> Any:
        """The next reply or push; ``TimeoutError`` at ``deadline``."""
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                raise ConnectionError(f"not a RESP3 reply: {exc}") from None
            if reply is not False:
                return reply
            left = _SLICE if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(min(left, _SLICE))
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                continue  # (the deadline is checked above)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._reader.feed(data)

    def close(self) -> None:
        self._sock.close()
