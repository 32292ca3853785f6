"""The issue's reliability tests on the Redis broker: real worker processes, real Redis.

Each test runs the shared ``proj.py`` (see ``tests/conftest.py``) against Redis URLs with a
key prefix of its own, and counts executions in the project's SQLite ledger. ``rel.py``
adds what these tests need: a short lease, a task that kills its own pool child.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import states
from celeriac.canvas import Signature
from celeriac.protocol import Message

from .brokers import BrokerProject, children_of, drop_redis_keys, redis_project
from .conftest import PROJ, WorkerProcess, wait_for

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.timeout(150)

REL = '''
import os, signal
from proj import app, record

app.conf.broker_lease_seconds = float(os.environ.get("REL_LEASE", "60"))

@app.task(acks_late=True)
def suicide(key):
    record("suicide", key)
    os.kill(os.getpid(), signal.SIGKILL)
'''


def _make_project(path: Path, broker_server: str, backend_server: str,
                  prefix: str) -> BrokerProject:
    (path / "proj.py").write_text(textwrap.dedent(PROJ))
    (path / "rel.py").write_text(textwrap.dedent(REL))
    con = sqlite3.connect(path / "ledger.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE runs (task TEXT, value TEXT, pid INT, at REAL)")
    con.close()
    project = redis_project(path, broker_server, prefix)
    project.backend = redis_project(path, backend_server, prefix).backend
    return project


@pytest.fixture
def project(tmp_path: Path, redis_server: str) -> Iterator[BrokerProject]:
    """Overrides the conftest ``project``: the same proj.py, on Redis (start_worker uses it)."""
    prefix = f"celeriac-rel-{uuid.uuid4().hex[:12]}:"
    project = _make_project(tmp_path, redis_server, redis_server, prefix)
    yield project
    project.close()
    drop_redis_keys(f"{redis_server.rstrip('/')}/0", prefix)
    drop_redis_keys(f"{redis_server.rstrip('/')}/1", prefix)


# -- 1. SIGKILL a worker three times while 2,000 acks_late tasks run ---------------------------
def test_kill_and_restart_a_worker_three_times(project: BrokerProject,
                                               start_worker: Callable[..., WorkerProcess]
                                               ) -> None:
    project.lease = 3.0
    app = project.app()
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(2000)]
    app.send_many([Signature("proj.mark_late", (key, rng.uniform(0.005, 0.05)), app=app)
                   for key in keys])
    start_worker("-c", "2", "-I", "rel", name="steady")
    victim = start_worker("-c", "2", "-I", "rel", name="victim")
    killed: list[tuple[float, set[int]]] = []
    for threshold in (300, 700, 1100):
        wait_for(lambda t=threshold: len(project.ledger("mark_late")) >= t, 60,
                 f"{threshold} tasks to finish")
        children = children_of(victim.pid)
        victim.signal(signal.SIGKILL)
        victim.wait()
        killed.append((time.time(), children))
        victim = start_worker("-c", "2", "-I", "rel", name="victim")
    wait_for(lambda: len({r[1] for r in project.ledger("mark_late")}) >= len(keys), 90,
             "every task to run")
    rows = project.ledger("mark_late")
    assert {row[1] for row in rows} == {repr(key) for key in keys}
    runs = Counter(row[1] for row in rows)
    twice = {value for value, n in runs.items() if n > 1}
    dead_pids = set().union(*(pids for _, pids in killed))
    for value in twice:  # the first run was in a pool child of a killed worker
        pids = [row[2] for row in rows if row[1] == value]
        assert dead_pids & set(pids), f"{value} ran twice, not because of a kill: {pids}"
    assert len(twice) <= 3 * 2, twice  # at most what two pool slots held at three kills


# -- 2. A task three times longer than the lease, a countdown longer than the lease ------------
def test_long_task_and_long_countdown_run_exactly_once(project: BrokerProject,
                                                       start_worker: Callable[..., WorkerProcess]
                                                       ) -> None:
    project.lease = 2.0
    app = project.app()
    app.conf.broker_eta_horizon = 1.0  # the countdown waits in Redis first, then in a worker
    start_worker("-c", "2", "-I", "rel", name="a")
    start_worker("-c", "2", "-I", "rel", name="b")
    long = app.send_task("proj.mark_late", ("long", 6.0))
    later = app.send_task("proj.mark", ("later",), countdown=6.0)
    assert long.get(timeout=40) == "long"
    assert later.get(timeout=40) == "later"
    time.sleep(3 * project.lease)  # would a lease have run out, someone would run them again
    assert [r[1] for r in project.ledger("mark_late")] == ["'long'"]
    assert [r[1] for r in project.ledger("mark")] == ["'later'"]
    assert app.transport.queue_size("celery") == 0


# -- 3. Warm shutdown hands prefetched messages back at once -----------------------------------
def test_warm_shutdown_returns_prefetched_messages_at_once(
        project: BrokerProject, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("-c", "1", "--prefetch-multiplier", "4")  # lease: 60 s
    app = project.app()
    running = app.send_task("proj.sleeper", (1.5, "running"))
    waiting = [app.send_task("proj.mark", (f"w{i}",)) for i in range(3)]
    wait_for(lambda: "proj.sleeper" in worker.log() and worker.log().count("received") >= 4,
             20, "the worker to prefetch")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: app.transport.queue_size("celery") == 3, 2,
             "prefetched messages back on the queue")
    assert worker.wait() == 0
    assert running.get(timeout=5) == 1.5
    started = time.monotonic()
    start_worker("-c", "2", name="w2")
    assert sorted(r.get(timeout=20) for r in waiting) == ["w0", "w1", "w2"]
    assert time.monotonic() - started < 30  # far sooner than the 60 s lease
    assert len(project.ledger("mark")) == 3


# -- 4. A task that kills its pool child ends in the dead-letter stream --------------------------
def test_task_that_kills_its_child_is_dead_lettered(project: BrokerProject,
                                                    start_worker: Callable[..., WorkerProcess]
                                                    ) -> None:
    app = project.app()
    limit = int(app.conf.broker_max_deliveries)
    worker = start_worker("-c", "2", "-I", "rel")
    poison = app.send_task("rel.suicide", ("poison",))
    good = [app.send_task("proj.mark", (f"g{i}",)) for i in range(20)]
    assert sorted(r.get(timeout=30) for r in good) == sorted(f"g{i}" for i in range(20))
    wait_for(lambda: app.transport.dead_letters("celery"), 30, "the poison message")
    [dead] = app.transport.dead_letters("celery")
    assert dead.message.headers["id"] == poison.id
    assert dead.deliveries == limit + 1
    assert "broker_max_deliveries" in dead.reason
    assert len(project.ledger("suicide")) == limit  # ran (and died) once per delivery
    assert worker.log().count(f"rel.suicide[{poison.id}] received") == limit
    assert app.transport.queue_size("celery") == 0
    assert poison.state == states.PENDING or poison.state == states.FAILURE


# -- 5. The broker restarts under a running worker ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PersistentRedis:
    """A redis-server of this test's own, writing an append-only file, stopped by pid."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, 10, "the test redis-server to start")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # flushes the append-only file
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed; under CI=true that is a failure")
        pytest.skip("redis-server is not installed")
    data = tmp_path / "redis-data"
    data.mkdir()
    server = PersistentRedis(data)
    server.start()
    yield server
    server.stop()


def test_worker_survives_a_broker_restart(tmp_path: Path, redis_server: str,
                                          persistent_redis: PersistentRedis) -> None:
    prefix = f"celeriac-rel-{uuid.uuid4().hex[:12]}:"
    project = _make_project(tmp_path, persistent_redis.url, redis_server, prefix)
    project.lease = 5.0
    app = project.app()
    workers: list[WorkerProcess] = []
    try:
        app.send_many([Signature("proj.mark_late", (f"r{i}", 0.02), app=app)
                       for i in range(300)])
        workers.append(WorkerProcess(project, ["-c", "2", "-I", "rel"], "w").wait_ready())
        wait_for(lambda: len(project.ledger("mark_late")) >= 60, 30, "some tasks to run")
        persistent_redis.stop()
        time.sleep(4.0)  # away for longer than the client library's own reconnect attempts
        persistent_redis.start()
        app.send_many([Signature("proj.mark_late", (f"s{i}", 0.0), app=app)
                       for i in range(50)])
        expected = {repr(f"r{i}") for i in range(300)} | {repr(f"s{i}") for i in range(50)}
        wait_for(lambda: {r[1] for r in project.ledger("mark_late")} >= expected, 60,
                 "every task published before and after the restart to run")
        assert workers[0].proc.poll() is None  # the same worker, reconnected
    finally:
        for worker in workers:
            worker.stop()
        app.close()
        drop_redis_keys(f"{redis_server.rstrip('/')}/1", prefix)


# -- 6. Malformed and unknown-task messages between good ones -----------------------------------
def test_bad_messages_are_dead_lettered_with_a_reason(project: BrokerProject,
                                                      start_worker: Callable[..., WorkerProcess]
                                                      ) -> None:
    app = project.app()
    transport: Any = app.transport
    first = app.send_task("proj.mark", ("first",))
    transport.publish("celery", Message(body=b"{not json", headers={
        "id": "bad-body", "task": "proj.mark"}))
    transport.publish("celery", Message(body=b"[[], {}, {}]", headers={"nothing": 1}))
    app.send_task("proj.no_such_task", (1,))
    stream = transport.keys.queue("celery").streams[0]
    raw = redis.Redis.from_url(project.broker.split("?")[0])
    try:
        raw.xadd(stream, {"m": b"\x00 not an envelope"})  # straight into the stream
        raw.xadd(stream, {"junk": b"no message field at all"})
    finally:
        raw.close()
    second = app.send_task("proj.mark", ("second",))
    worker = start_worker("-c", "2")
    assert first.get(timeout=20) == "first"
    assert second.get(timeout=20) == "second"
    wait_for(lambda: len(app.transport.dead_letters()) == 5, 20, "five dead letters")
    reasons = " | ".join(d.reason for d in app.transport.dead_letters())
    assert "unknown task 'proj.no_such_task'" in reasons
    assert reasons.count("no 'id' header") == 3
    assert "Cannot decode json body" in reasons
    assert "Rejected message bad-body" in worker.log()
    assert "{not json" not in worker.log()
    assert app.transport.queue_size("celery") == 0
    assert sorted(r[1] for r in project.ledger("mark")) == ["'first'", "'second'"]


# -- Footprint: pool children are forked before the broker's client library is loaded ----------
def test_prefork_children_never_load_the_broker_client_and_store_results_themselves(
        project: BrokerProject, start_worker: Callable[..., WorkerProcess]) -> None:
    with open(project.path / "proj.py", "a") as module:
        module.write("\n@app.task\ndef loaded(name):\n    import sys\n"
                     "    return name in sys.modules, os.getpid()\n")
    worker = start_worker("-c", "1")
    app = project.app()
    runs = [app.send_task("proj.loaded", ("redis",)).get(timeout=20) for _ in range(3)]
    assert len({pid for _, pid in runs}) == 1 and runs[0][1] != worker.pid  # one pool child
    # ...which never loads redis-py, though it stores the results itself on a connection of
    # its own (named after it)
    assert [in_child for in_child, _ in runs] == [False, False, False]
    raw = redis.Redis.from_url(project.backend.split("?")[0])
    try:
        names = {client["name"] for client in raw.client_list()}
    finally:
        raw.close()
    assert f"celeriac-pool-child-{runs[0][1]}" in names
