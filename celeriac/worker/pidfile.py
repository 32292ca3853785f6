"""The worker's pidfile: refuses a second worker, replaces a stale file."""

from __future__ import annotations

import contextlib
import os

from ..exceptions import PidfileError

__all__ = ["Pidfile"]


class Pidfile:
    """A file holding the worker's pid while it runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _read(self) -> int | None:
        try:
            with open(self.path) as fh:
                return int(fh.read().strip() or 0) or None
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> None:
        """Write our pid; raises :class:`PidfileError` if a live process holds the file."""
        pid = self._read()
        if pid is not None and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                pass  # stale: its process is gone
            except PermissionError:
                raise PidfileError(self._busy(pid)) from None
            else:
                raise PidfileError(self._busy(pid))
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        os.replace(tmp, self.path)

    def _busy(self, pid: int) -> str:
        return (f"Pidfile {self.path} names process {pid}, which is running: another worker "
                "is already using it. Stop that worker or choose another --pidfile.")

    def release(self) -> None:
        if self._read() == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
