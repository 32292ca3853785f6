"""Rate limits: ``'200/m'`` parsed, and a token bucket per task name per worker."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..exceptions import ConfigurationError

__all__ = ["TokenBucket", "parse_rate"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(value: str | float | None) -> float:
    """Tasks per second for ``'10/s'``, ``'200/m'``, ``'5/h'`` or a number; 0 means no limit."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    elif isinstance(value, str):
        number, _, unit = value.strip().partition("/")
        try:
            rate = float(number) / _UNITS[unit or "s"]
        except (ValueError, KeyError):
            raise ConfigurationError(
                f"Bad rate limit {value!r}: use 'N/s', 'N/m', 'N/h' or a number per second"
            ) from None
    else:
        raise ConfigurationError(f"Bad rate limit {value!r}: use e.g. '10/s' or '200/m'")
    if rate < 0:
        raise ConfigurationError(f"Bad rate limit {value!r}: it cannot be negative")
    return rate


class TokenBucket:
    """``rate`` tokens a second, holding at most ``capacity``; one token per task."""

    def __init__(self, rate: float, capacity: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> bool:
        """Use a token if there is one."""
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)
