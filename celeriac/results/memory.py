"""``memory://`` results: in-process, for tests and single-process use."""

from __future__ import annotations

import threading
from typing import Any

from .. import states
from .base import ResultBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(ResultBackend):
    """Results in a dict on the instance; waiters are woken by a condition variable."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._cond = threading.Condition()
        self._docs: dict[str, tuple[float | None, bytes]] = {}

    def store(self, meta: dict[str, Any], reply_to: str | None = None) -> None:
        task_id = meta["task_id"]
        with self._cond:
            current = self._load(task_id)
            if current is not None and current["status"] == states.SUCCESS:
                return
            expires = self.clock() + self.expires if self.expires else None
            self._docs[task_id] = (expires, self.encode(meta))
            self._cond.notify_all()

    def _load(self, task_id: str) -> dict[str, Any] | None:
        doc = self._docs.get(task_id)
        if doc is None:
            return None
        expires, raw = doc
        if expires is not None and expires <= self.clock():
            del self._docs[task_id]
            return None
        return self.decode(raw)

    def get(self, task_id: str) -> dict[str, Any] | None:
        with self._cond:
            return self._load(task_id)

    def wait(self, task_id: str, timeout: float | None) -> dict[str, Any] | None:
        with self._cond:
            ready = self._cond.wait_for(
                lambda: (m := self._load(task_id)) is not None
                and m["status"] in states.READY_STATES,
                timeout,
            )
            return self._load(task_id) if ready else None

    def forget(self, task_id: str) -> None:
        with self._cond:
            self._docs.pop(task_id, None)

    def cleanup(self) -> int:
        with self._cond:
            now = self.clock()
            gone = [k for k, (exp, _) in self._docs.items() if exp is not None and exp <= now]
            for key in gone:
                del self._docs[key]
            return len(gone)
