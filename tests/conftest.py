"""Shared fixtures: a project directory with task modules, and real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CELERIAC = [sys.executable, "-m", "celeriac"]

#: The task module most process tests use; it appends every run to a ledger (SQLite file)
#: so tests can count executions from outside the worker.
PROJ = '''
import os, sqlite3, time
from celeriac import Celeriac

app = Celeriac('proj')
LEDGER = os.environ.get('LEDGER', 'ledger.db')

def record(name, value=None):
    con = sqlite3.connect(LEDGER, timeout=60, isolation_level=None)
    con.execute('INSERT INTO runs VALUES (?, ?, ?, ?)',
                (name, repr(value), os.getpid(), time.time()))
    con.close()

@app.task
def add(x, y):
    return x + y

@app.task
def mark(key):
    record('mark', key)
    return key

@app.task(acks_late=True)
def mark_late(key, sleep=0.0):
    time.sleep(sleep)
    record('mark_late', key)
    return key

@app.task
def sleeper(seconds, key=None):
    time.sleep(seconds)
    record('sleeper', key)
    return seconds

@app.task
def unserializable():
    return object()

@app.task
def boom():
    raise ValueError('kaboom')

@app.task(bind=True, max_retries=2, default_retry_delay=0.1)
def flaky(self, key):
    record('flaky', key)
    if self.request.retries < 2:
        raise self.retry(exc=RuntimeError('not yet'))
    return self.request.retries

@app.task
async def async_add(x, y):
    return x + y

@app.task
def whoami():
    return os.getpid()
'''


@dataclass
class Project:
    """A directory with ``proj.py``, its own broker/result files and a ledger."""

    path: Path
    apps: list[Any] = field(default_factory=list, repr=False)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CELERIAC_BROKER_URL=f"sqlite:///{self.path}/broker.db",
            CELERIAC_RESULT_BACKEND=f"sqlite:///{self.path}/results.db",
            LEDGER=str(self.path / "ledger.db"),
            PYTHONPATH=str(self.path),
        )
        return env

    def app(self):  # type: ignore[no-untyped-def]
        """A fresh client-side app on this project's broker (same settings as proj.app)."""
        from celeriac import Celeriac

        return self.keep(Celeriac("proj", broker=f"sqlite:///{self.path}/broker.db",
                                  backend=f"sqlite:///{self.path}/results.db", environ={}))

    def keep(self, app):  # type: ignore[no-untyped-def]
        """Remember ``app`` so that :meth:`close` closes its connections after the test."""
        self.apps.append(app)
        return app

    def close(self) -> None:
        """Close every app :meth:`app` handed out (no reconnect loops outlive the test)."""
        while self.apps:
            self.apps.pop().close()

    def ledger(self, task: str | None = None) -> list[tuple[str, str, int]]:
        import sqlite3

        db = self.path / "ledger.db"
        if not db.exists():
            return []
        con = sqlite3.connect(db, timeout=30)
        try:
            rows = con.execute("SELECT task, value, pid FROM runs").fetchall()
        except sqlite3.OperationalError:
            rows = []
        con.close()
        return [r for r in rows if task is None or r[0] == task]


def make_project(path: Path) -> Project:
    """Write ``proj.py`` and an empty ledger into ``path``."""
    import sqlite3

    (path / "proj.py").write_text(textwrap.dedent(PROJ))
    con = sqlite3.connect(path / "ledger.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE runs (task TEXT, value TEXT, pid INT, at REAL)")
    con.close()
    return Project(path)


@pytest.fixture
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The shared project on SQLite; a test marked ``@on_every_broker`` (tests/brokers.py)
    gets it once on each broker: SQLite, Redis, RabbitMQ (``rpc://`` results)."""
    import uuid

    from .brokers import project_on

    yield from project_on(request, make_project(tmp_path), f"t-{uuid.uuid4().hex[:10]}.")


class WorkerProcess:
    """A worker started through the real CLI; logs go to a file the test can read."""

    def __init__(self, project: Project, args: list[str], name: str) -> None:
        self.project = project
        self.log_path = project.path / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*CELERIAC, "-A", "proj", "worker", "-l", "info", "-n", f"{name}@%h", *args],
            cwd=project.path, env=project.env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 20.0) -> WorkerProcess:
        wait_for(lambda: " ready." in self.log() or self.proc.poll() is not None, timeout,
                 "worker to start")
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
        return self

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


@pytest.fixture
def start_worker(project: Project) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str, name: str = "w1", ready: bool = True,
              mingle: bool = False) -> WorkerProcess:
        extra = [] if mingle else ["--without-mingle"]
        worker = WorkerProcess(project, [*args, *extra], f"{name}-{len(started)}")
        started.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def run_worker(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """Start in-process workers (in threads, no signal handlers) for the test's ``app``
    fixture; each module may set ``WORKER_DEFAULTS`` (pool, concurrency, loglevel)."""
    from celeriac.worker.worker import Worker, WorkerOptions

    app = request.getfixturevalue("app")
    defaults = getattr(request.module, "WORKER_DEFAULTS",
                       {"pool": "threads", "concurrency": 2, "loglevel": "INFO"})
    started: list[tuple[Any, threading.Thread]] = []

    def start(**options: Any) -> Any:
        worker = Worker(app, WorkerOptions(**{**defaults, **options}))
        thread = threading.Thread(target=worker.run, kwargs={"install_signals": False},
                                  daemon=True)
        thread.start()
        assert worker.ready.wait(10), "worker did not start"
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(10)
        assert not thread.is_alive(), f"worker did not stop; where its threads are:\n{_stacks()}"


def _stacks() -> str:
    """Every thread's stack (for a worker that hangs: which call holds it up)."""
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
                     for ident, frame in sys._current_frames().items())


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_cli(project: Project, *args: str, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``celeriac -A proj <args>`` in the project directory."""
    return subprocess.run([*CELERIAC, "-A", "proj", *args], cwd=project.path, env=project.env,
                          capture_output=True, text=True, input=input, timeout=timeout)


# -- real servers -------------------------------------------------------------------------------
REDIS_URL = os.environ.get("CELERIAC_TEST_REDIS", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("CELERIAC_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")


def require_server(name: str, host: str, port: int) -> None:
    """Skip (locally) or fail (under CI=true) when a server the test needs is not listening."""
    import socket

    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        message = f"{name} is not reachable at {host}:{port} ({exc})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; under CI=true a missing server is a failure")
        pytest.skip(message)


@pytest.fixture
def redis_server() -> str:
    """The URL of the test Redis server (without a database number)."""
    require_server("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def redis_db1(redis_server: str) -> Iterator[Any]:
    """A plain redis-py client on database 1, where result tests keep their keys."""
    import redis

    client = redis.Redis.from_url(f"{redis_server.rstrip('/')}/1")
    yield client
    client.close()


@pytest.fixture
def amqp_server() -> str:
    """The URL of the test RabbitMQ server."""
    require_server("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


def ping_and_add(app: Any) -> tuple[Any, Any]:
    """Two small tasks on ``app``: ``ping()`` returns "pong", ``add(x, y)`` the sum."""
    @app.task
    def ping():
        return "pong"

    @app.task
    def add(x, y):
        return x + y

    return ping, add
