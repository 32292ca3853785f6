"""The two systems under test, behind one small interface, and their worker processes.

Each system object is bound to one directory of fresh database files: it loads the tasks
module (``tasks_celeriac`` or ``tasks_huey``) with ``BENCH_DIR`` pointing there, so the
benchmark process and the worker it starts use the same files.
"""

from __future__ import annotations

import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from proctree import descendants

__all__ = ["SYSTEMS", "CeleriacSystem", "HueySystem", "System", "WorkerProcess"]

BENCH = Path(__file__).resolve().parent
BIN = Path(sys.prefix) / "bin"


def load_tasks(module: str, directory: Path) -> ModuleType:
    """Import ``module`` afresh, bound to the database files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["BENCH_DIR"] = str(directory)
    sys.modules.pop(module, None)
    return importlib.import_module(module)


class System:
    """What the benchmark needs from a task queue: send, count, round-trip, start a worker."""

    name = ""
    tasks_module = ""
    usual_log_lines: tuple[str, ...] = ()
    """Worker log lines that are part of a normal run (not reported as notes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tasks = load_tasks(self.tasks_module, directory)


    def send_one(self) -> None:
        raise NotImplementedError

    def send_bulk(self, count: int) -> None:
        raise NotImplementedError

    def queue_size(self) -> int:
        raise NotImplementedError

    def results_stored(self) -> int:
        raise NotImplementedError

    def round_trip(self, timeout: float) -> None:
        raise NotImplementedError

    def worker_command(self, concurrency: int, extra: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CeleriacSystem(System):
    name = "celeriac"
    tasks_module = "tasks_celeriac"
    usual_log_lines = ("Warm shutdown requested",)  # logged at WARNING, as Celery does

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.app = self.tasks.app
        self.app.backend  # noqa: B018 - opening it creates the results table
        self._results = sqlite3.connect(directory / "results.db")


    def send_one(self) -> None:
        self.tasks.noop.delay()

    def send_bulk(self, count: int) -> None:
        noop = self.tasks.noop
        self.app.send_many([noop.s() for _ in range(count)])

    def queue_size(self) -> int:
        return self.app.transport.queue_size(self.app.conf.task_default_queue)

    def results_stored(self) -> int:
        sql = "SELECT count(*) FROM results WHERE status = 'SUCCESS'"
        return int(self._results.execute(sql).fetchone()[0])

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop.delay().get(timeout=timeout)

    def worker_command(self, concurrency: int, extra: Sequence[str]) -> list[str]:
        return [str(BIN / "celeriac"), "-A", self.tasks_module, "worker", "-P", "prefork",
                "-c", str(concurrency), "-l", "warning", *extra]

    def close(self) -> None:
        self._results.close()
        self.app.close()


class HueySystem(System):
    name = "huey"
    tasks_module = "tasks_huey"

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.huey = self.tasks.huey


    def send_one(self) -> None:
        self.tasks.noop()

    def send_bulk(self, count: int) -> None:
        # Huey's own way to send many calls of one task; it enqueues them one by one.
        self.tasks.noop.map([()] * count)

    def queue_size(self) -> int:
        return int(self.huey.pending_count())

    def results_stored(self) -> int:
        return int(self.huey.result_count())

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop().get(blocking=True, timeout=timeout)

    def worker_command(self, concurrency: int, extra: Sequence[str]) -> list[str]:
        return [str(BIN / "huey_consumer"), f"{self.tasks_module}.huey", "-w", str(concurrency),
                "-k", "process", "-q", *extra]

    def close(self) -> None:
        self.huey.storage.close()


SYSTEMS: dict[str, type[System]] = {"celeriac": CeleriacSystem, "huey": HueySystem}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerProcess:
    """A worker started as a subprocess, its output in a log file; stopped with SIGTERM.

    Only the process started here is signalled (by pid); on a forced stop, and for
    children left running after it exited, the descendants it started are killed too.
    """

    def __init__(self, command: list[str], directory: Path) -> None:
        self.command = command
        self.log_path = directory / "worker.log"
        env = {**os.environ, "BENCH_DIR": str(directory),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH),
                                                           os.environ.get("PYTHONPATH")]))}
        self.started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=BENCH, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.forced = False
        self.leftovers: list[int] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM and wait; SIGKILL the tree after ``timeout``. Returns seconds taken."""
        start = time.perf_counter()
        if self.proc.poll() is None:
            tree = descendants(self.pid)
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.forced = True
                _kill([self.pid, *tree])
                self.proc.wait()
            self.leftovers = [pid for pid in tree if _alive(pid)]
            _kill(self.leftovers)
        return time.perf_counter() - start

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
