"""Living with gevent: patching at start-up, and the threads that must stay real.

``celeriac worker -P gevent`` has the standard library monkey-patched before the app or any
of celeriac's own modules are imported (:func:`patch_for_argv`, called by the console
script). Patched, a ``threading.Thread`` is a greenlet of the one operating-system thread,
and asyncio allows one running event loop per operating-system thread: the worker's own loop
runs in the main greenlet, so every other loop (the AMQP connection's I/O loop, ``async def``
tasks run to completion by a synchronous pool) gets a real thread from :func:`os_thread`.

This module imports nothing heavy: it runs before the patching.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncio
    import socket

__all__ = ["is_patched", "native_connection", "native_rlock", "new_event_loop", "os_thread",
           "patch_for_argv", "run_coroutine", "wants_gevent"]

T = TypeVar("T")

_INSTALL = "pip install 'celeriac[gevent]'"


def wants_gevent(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (without the program name) starts a worker with ``-P gevent``."""
    args = list(argv)
    if "worker" not in args:
        return False
    for i, arg in enumerate(args):
        if arg in ("-P", "--pool") and i + 1 < len(args) and args[i + 1] == "gevent":
            return True
        if arg in ("-Pgevent", "--pool=gevent"):
            return True
    return False


def patch_for_argv(argv: Sequence[str]) -> bool:
    """Monkey-patch the standard library for gevent if ``argv`` asks for its pool."""
    if not wants_gevent(argv):
        return False
    try:
        from gevent import monkey
    except ImportError:
        sys.exit(f"Error: the 'gevent' pool needs the gevent package: {_INSTALL}")
    monkey.patch_all()
    return True


def is_patched() -> bool:
    """Whether gevent has patched ``threading`` in this process (gevent is not imported)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


class ThreadLike(Protocol):
    @property
    def ident(self) -> int | None: ...

    def start(self) -> None: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...


class _NativeThread:
    """A daemon thread of the operating system, started under gevent's patching."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        from gevent import monkey

        self._target, self.name = target, name
        self._start_new = monkey.get_original("_thread", "start_new_thread")
        self._finished = monkey.get_original("_thread", "allocate_lock")()
        self._finished.acquire()
        self._started = False
        self.ident: int | None = None

    def start(self) -> None:
        self._started = True
        self._start_new(self._run, ())

    def _run(self) -> None:
        import threading  # patched: the ident callers compare against in this thread

        self.ident = threading.get_ident()
        try:
            self._target()
        finally:
            self._finished.release()

    def is_alive(self) -> bool:
        return self._started and self._finished.locked()

    def join(self, timeout: float | None = None) -> None:
        if self._started and self._finished.acquire(timeout=-1 if timeout is None else timeout):
            self._finished.release()


def os_thread(target: Callable[[], object], name: str) -> ThreadLike:
    """A daemon thread (not yet started) that is an operating-system thread even under
    gevent: for code that runs an asyncio event loop of its own."""
    if is_patched():
        return _NativeThread(target, name)
    import threading

    return threading.Thread(target=target, name=name, daemon=True)


def native_connection(host: str, port: int, timeout: float | None) -> socket.socket:
    """A connected TCP socket whose calls block the calling thread alone, as
    ``socket.create_connection`` makes it: under gevent with the standard library's own
    socket class, for a connection read on an :func:`os_thread` and written from anywhere
    (gevent's sockets belong to one thread's hub)."""
    import socket

    if not is_patched():
        return socket.create_connection((host, port), timeout=timeout)
    from gevent import monkey

    make = monkey.get_original("socket", "socket")
    error: OSError | None = None
    for family, kind, proto, _, address in monkey.get_original("socket", "getaddrinfo")(
            host, port, 0, socket.SOCK_STREAM):
        sock = make(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError(f"no address found for {host}:{port}")


def native_rlock() -> Any:
    """A reentrant lock of the operating system, even under gevent: for a lock that threads
    of both kinds take and that is never held across a greenlet switch."""
    if is_patched():
        from gevent import monkey

        return monkey.get_original("_thread", "RLock")()
    import threading

    return threading.RLock()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for an :func:`os_thread`: under gevent on the standard library's own
    selector, which waits in that thread alone (gevent's selector belongs to greenlets)."""
    import asyncio

    if not is_patched():
        return asyncio.new_event_loop()
    from gevent import monkey

    selector = monkey.get_original("selectors", "DefaultSelector")()
    return asyncio.SelectorEventLoop(selector)


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code (``asyncio.run``); under gevent in
    a real thread that the calling greenlet waits for cooperatively."""
    import asyncio

    if not is_patched():
        return asyncio.run(coro)
    # asyncio.run would make its loop with gevent's selector: give it ours
    def run() -> T:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(coro)

    from gevent import get_hub

    result: T = get_hub().threadpool.apply(run)
    return result
