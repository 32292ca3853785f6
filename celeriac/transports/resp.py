"""A small RESP2 connection of our own, for processes that must not load redis-py.

Prefork children store their results on Redis themselves; redis-py would cost each child
about 11 MiB. This speaks what they need on one socket: commands written in one go, replies
read in order (simple strings, errors, integers, bulk strings, arrays), ``AUTH``, ``SELECT``
and ``CLIENT SETNAME`` (``CLIENT LIST`` shows whose connection it is) on connect. It does
not retry: any failure closes the socket and raises
:class:`~celeriac.exceptions.TransportError`; the next call connects again.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..exceptions import TransportError
from .redis_url import RedisParams

try:
    import hiredis
except ImportError:  # pragma: no cover - the redis extra installs it
    hiredis = None  # type: ignore[assignment]

__all__ = ["ErrorReply", "RespConnection", "open_socket"]

#: Seconds a reply may take when the URL sets no ``socket_timeout``.
_DEFAULT_TIMEOUT = 30.0


class ErrorReply(str):
    """An error reply (``-ERR ...``), returned in place of the command's reply."""


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """Commands in RESP, ready to write in one go: by hiredis where it is installed (a
    command in one C call, a fifth of the time; it formats numbers as ``str`` does), or
    argument by argument here."""
    if hiredis is not None:
        try:
            return b"".join([hiredis.pack_command(tuple(command)) for command in commands])
        except TypeError:  # (an argument it does not take: packed below, as ``str`` says)
            pass
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = (bytes(arg) if isinstance(arg, (bytes, bytearray, memoryview))
                    else str(arg).encode("utf-8"))
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def open_socket(params: RedisParams) -> socket.socket:
    """A socket connected to the server of ``params`` (TCP, with no Nagle delay, or a Unix
    socket; not TLS), within the URL's ``socket_connect_timeout`` (default 4 s)."""
    kwargs = params.client_kwargs
    timeout = float(kwargs.get("socket_connect_timeout") or 4.0)
    if "unix_socket_path" not in kwargs:
        sock = socket.create_connection((kwargs["host"], kwargs["port"]), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(kwargs["unix_socket_path"])
    except OSError:
        sock.close()
        raise
    return sock


class RespConnection:
    """One connection to the server of ``params`` (TCP or a Unix socket; not TLS), named
    ``name`` followed by the process id."""

    def __init__(self, params: RedisParams, name: str = "celeriac") -> None:
        kwargs = params.client_kwargs
        if kwargs.get("ssl"):
            raise TransportError("RespConnection speaks plain TCP or Unix sockets, not TLS")
        self.params = params
        self.name = name
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None

    def _connect(self) -> BinaryIO:
        kwargs = self.params.client_kwargs
        sock = open_socket(self.params)
        sock.settimeout(float(kwargs.get("socket_timeout") or _DEFAULT_TIMEOUT))
        self._sock, self._file = sock, sock.makefile("rb")
        hello: list[tuple[Any, ...]] = []
        if kwargs.get("password"):
            user = kwargs.get("username")
            hello.append(("AUTH", user, kwargs["password"]) if user else
                         ("AUTH", kwargs["password"]))
        if kwargs.get("db"):
            hello.append(("SELECT", kwargs["db"]))
        hello.append(("CLIENT", "SETNAME", f"{self.name}-{os.getpid()}"))
        for reply in self._exchange(hello):
            if isinstance(reply, ErrorReply):
                raise TransportError(f"Redis at {self.params.masked} refused the connection "
                                     f"set-up: {self.params.scrub(reply)}")
        return self._file

    def call(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The replies to ``commands`` (sent in one write), in order."""
        try:
            if self._file is None:
                self._connect()
            return self._exchange(commands)
        except (OSError, ValueError, TransportError) as exc:
            self.close()
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"Redis at {self.params.masked}: "
                                 f"{type(exc).__name__}: {self.params.scrub(exc)}") from exc

    def _exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        assert self._sock is not None
        self._sock.sendall(pack(commands))
        return [self._reply() for _ in commands]

    def _reply(self) -> Any:
        assert self._file is not None
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the server closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ErrorReply(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._file.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("the server closed the connection")
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise ValueError(f"not a RESP2 reply: {line[:40]!r}")

    def close(self) -> None:
        sock, file, self._sock, self._file = self._sock, self._file, None, None
        if file is not None:
            file.close()
        if sock is not None:
            sock.close()
