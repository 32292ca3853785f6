"""Test helpers the contract suites share: a clock tests move by hand, and polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["FakeClock", "eventually"]

T = TypeVar("T")


class FakeClock:
    """A clock that stands still until a test calls :meth:`advance` (safe across threads)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now


def eventually(probe: Callable[[], T | None], timeout: float = 5.0,
               interval: float = 0.005) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {probe!r}")
        time.sleep(interval)
