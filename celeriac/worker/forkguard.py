"""The fork guard: prefork children are forked only while no other thread of the worker is
inside a connection library.

A forked child inherits every lock as it was at the fork, and one held by another thread
then stays held in the child for ever: a task in the child that publishes with the inherited
client would hang. Threads that talk to the broker (settling, the control listener) enter
the guard *shared*, so they never wait for each other; the fork enters it *exclusively*
(``with guard:``), waiting for those inside to leave and holding new ones back until the
child exists.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ForkGuard"]


class ForkGuard:
    """Shared for broker calls (:meth:`shared`), exclusive for a fork (``with guard:``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forks = 0  # forks waiting or under way: new shared entries wait for them
        self._exclusive = threading.Lock()

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._forks:
                self._cond.wait()
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                if not self._inside:
                    self._cond.notify_all()

    def __enter__(self) -> ForkGuard:
        self._exclusive.acquire()
        with self._cond:
            self._forks += 1
            while self._inside:
                self._cond.wait()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._forks -= 1
            self._cond.notify_all()
        self._exclusive.release()
