"""The issue's reliability tests on RabbitMQ: real worker processes through the CLI.

Each test runs the shared ``proj.py`` (see ``tests/conftest.py``) against ``amqp://`` under a
name prefix of its own (the transport's ``name_prefix``), with ``rpc://`` results, and counts
executions in the project's SQLite ledger. ``rel.py`` adds a task that kills its own pool
child and lets a test shorten the lease (on RabbitMQ only the renew interval) and the ETA
horizon. Everything under the prefix is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import random
import signal
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

from celeriac import Celeriac, states
from celeriac.canvas import Signature
from celeriac.protocol import Message

from .brokers import BrokerProject, amqp_project, children_of, sweep_amqp
from .conftest import PROJ, WorkerProcess, wait_for

aiormq = pytest.importorskip("aiormq")

pytestmark = pytest.mark.timeout(120)

REL = '''
import os, signal
from proj import app, record

app.conf.broker_lease_seconds = float(os.environ.get("REL_LEASE", "60"))
app.conf.broker_eta_horizon = float(os.environ.get("REL_ETA_HORIZON", "600"))

@app.task(acks_late=True)
def kill_own_child(key):
    record("kill_own_child", key)
    os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture
def project(tmp_path: Path, amqp_server: str) -> Iterator[BrokerProject]:
    """Overrides the conftest ``project`` (``start_worker`` uses it): proj.py on RabbitMQ."""
    (tmp_path / "proj.py").write_text(textwrap.dedent(PROJ))
    (tmp_path / "rel.py").write_text(textwrap.dedent(REL))
    con = sqlite3.connect(tmp_path / "ledger.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE runs (task TEXT, value TEXT, pid INT, at REAL)")
    con.close()
    prefix = f"rel-{uuid.uuid4().hex[:10]}."
    project = amqp_project(tmp_path, amqp_server, prefix)
    yield project
    project.close()
    sweep_amqp(amqp_server, prefix)


@pytest.fixture
def app(project: BrokerProject) -> Iterator[Celeriac]:
    client = project.app()
    yield client
    client.close()


def _done(project: BrokerProject, task: str) -> set[str]:
    return {row[1] for row in project.ledger(task)}


# -- 1. 2,000 acks_late tasks; one of two workers is SIGKILLed three times ------------------------
def test_sigkill_a_worker_three_times(project: BrokerProject, app: Celeriac,
                                      start_worker: Callable[..., WorkerProcess]) -> None:
    rng = random.Random(3)
    keys = [f"k{i}" for i in range(2000)]
    app.send_many([Signature("proj.mark_late", (key, rng.uniform(0.005, 0.05)), app=app)
                   for key in keys])
    steady = start_worker("-c", "2", "-I", "rel", name="steady")
    victim = start_worker("-c", "2", "-I", "rel", name="victim")
    dead_pids: set[int] = set()
    workers = [steady]
    for threshold in (250, 600, 950):
        wait_for(lambda t=threshold: len(project.ledger("mark_late")) >= t, 60,
                 f"{threshold} tasks to be done")
        dead_pids |= children_of(victim.pid) | {victim.pid}
        victim.signal(signal.SIGKILL)
        victim.wait()
        workers.append(victim)
        victim = start_worker("-c", "2", "-I", "rel", name="victim")
    workers.append(victim)
    wait_for(lambda: len(_done(project, "mark_late")) >= len(keys), 90, "every task to run")
    rows = project.ledger("mark_late")
    assert {row[1] for row in rows} == {repr(key) for key in keys}
    if any("Lost the connection to the broker" in w.log() for w in workers):
        pytest.skip("the shared RabbitMQ restarted meanwhile (another test run's test 5?): "
                    "every task ran, but duplicates may not be the kills' doing")
    runs = Counter(row[1] for row in rows)
    for value in [v for v, n in runs.items() if n > 1]:
        first_pid = next(row[2] for row in rows if row[1] == value)
        assert first_pid in dead_pids, f"{value} ran twice, and not because of a kill"
    assert sum(n - 1 for n in runs.values()) <= 3 * 8  # at most what a victim held unacked


# -- 2. A task three times longer than the lease; a countdown longer than the lease -------------
def test_long_task_and_long_countdown_run_once(project: BrokerProject,
                                               start_worker: Callable[..., WorkerProcess]
                                               ) -> None:
    project.lease, project.eta_horizon = 2.0, 1.0  # the countdown waits in the broker first
    app = project.app()
    try:
        start_worker("-c", "2", "-I", "rel", name="a")
        start_worker("-c", "2", "-I", "rel", name="b")
        long = app.send_task("proj.mark_late", ("long", 6.0))
        later = app.send_task("proj.mark", ("later",), countdown=6.0)
        assert long.get(timeout=30) == "long"
        assert later.get(timeout=30) == "later"
        time.sleep(3 * project.lease)  # a lost lease would show as a second run by now
        assert [r[1] for r in project.ledger("mark_late")] == ["'long'"]
        assert [r[1] for r in project.ledger("mark")] == ["'later'"]
        assert app.transport.queue_size("celery") == 0
    finally:
        app.close()


# -- 3. A warm shutdown hands prefetched messages back at once ------------------------------------
def test_warm_shutdown_returns_prefetched_messages_at_once(
        project: BrokerProject, app: Celeriac, start_worker: Callable[..., WorkerProcess]) -> None:
    worker = start_worker("-c", "1", "--prefetch-multiplier", "4")
    running = app.send_task("proj.sleeper", (1.5, "running"))
    waiting = [app.send_task("proj.mark", (f"w{i}",)) for i in range(3)]
    wait_for(lambda: "proj.sleeper" in worker.log() and worker.log().count("received") >= 4,
             20, "the worker to prefetch")
    assert app.transport.queue_size("celery") == 0
    worker.signal(signal.SIGTERM)
    wait_for(lambda: app.transport.queue_size("celery") == 3, 2,
             "the prefetched messages back on the queue")
    assert worker.wait() == 0
    assert running.get(timeout=5) == 1.5
    started = time.monotonic()
    start_worker("-c", "2", name="w2")
    assert sorted(r.get(timeout=20) for r in waiting) == ["w0", "w1", "w2"]
    assert time.monotonic() - started < 15
    assert len(project.ledger("mark")) == 3


# -- 4. A task that kills its own pool child ends up dead-lettered --------------------------------
def test_task_that_kills_its_child_is_dead_lettered(project: BrokerProject, app: Celeriac,
                                                    start_worker: Callable[..., WorkerProcess]
                                                    ) -> None:
    limit = int(app.conf.broker_max_deliveries)
    worker = start_worker("-c", "2", "-I", "rel")
    poison = app.send_task("rel.kill_own_child", ("poison",))
    good = [app.send_task("proj.mark", (f"g{i}",)) for i in range(20)]
    assert sorted(r.get(timeout=30) for r in good) == sorted(f"g{i}" for i in range(20))
    wait_for(lambda: app.transport.dead_letters("celery"), 30, "the poison message")
    [dead] = app.transport.dead_letters("celery")
    assert dead.message.headers["id"] == poison.id
    assert dead.deliveries == limit + 1
    assert "broker_max_deliveries" in dead.reason
    assert len(project.ledger("kill_own_child")) == limit  # once per delivery, then no more
    assert worker.log().count(f"rel.kill_own_child[{poison.id}] received") == limit
    assert app.transport.queue_size("celery") == 0


# -- 5. RabbitMQ stops and starts again under a running worker ------------------------------------
def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=True)


def test_worker_survives_a_broker_restart(project: BrokerProject, app: Celeriac,
                                          start_worker: Callable[..., WorkerProcess]) -> None:
    app.send_many([Signature("proj.mark_late", (f"r{i}", 0.02), app=app) for i in range(300)])
    worker = start_worker("-c", "2", "-I", "rel")
    wait_for(lambda: len(project.ledger("mark_late")) >= 60, 30, "some tasks to run")
    try:
        _rabbitmqctl("stop_app")
        time.sleep(1.0)  # the broker stays away a while: the worker must keep retrying
    finally:
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    app.send_many([Signature("proj.mark_late", (f"s{i}", 0.0), app=app) for i in range(50)])
    expected = {repr(f"r{i}") for i in range(300)} | {repr(f"s{i}") for i in range(50)}
    wait_for(lambda: _done(project, "mark_late") >= expected, 45,
             "every task published before and after the restart to run")
    assert worker.proc.poll() is None  # the same worker, reconnected
    assert "Lost the connection to the broker" in worker.log()
    runs = Counter(row[1] for row in project.ledger("mark_late"))
    assert max(runs.values()) == 1  # what it held came back to it, under the same leases
    assert app.send_task("proj.add", (2, 3)).get(timeout=20) == 5


# -- 6. Malformed and unknown-task messages between good ones -------------------------------------
def test_bad_messages_are_dead_lettered_with_a_reason(project: BrokerProject, app: Celeriac,
                                                      start_worker: Callable[..., WorkerProcess]
                                                      ) -> None:
    transport: Any = app.transport
    first = app.send_task("proj.mark", ("first",))
    transport.publish("celery", Message(body=b"{not json", headers={
        "id": "bad-body", "task": "proj.mark"}))
    transport.publish("celery", Message(body=b"[[], {}, {}]", headers={"nothing": 1}))
    app.send_task("proj.no_such_task", (1,))
    transport.publish("celery", Message(body=b"x", headers={"id": "p", "task": "proj.mark"},
                                        content_type="application/x-python-serialize"))

    async def raw() -> None:  # straight into the queue, without our properties or headers
        conn = await aiormq.connect(project.server)
        channel = await conn.channel()
        await channel.basic_publish(b"\x00 not a task", routing_key=f"{project.prefix}celery")
        await conn.close()

    asyncio.run(raw())
    second = app.send_task("proj.mark", ("second",))
    worker = start_worker("-c", "2")
    assert first.get(timeout=20) == "first"
    assert second.get(timeout=20) == "second"
    wait_for(lambda: len(transport.dead_letters()) == 5, 20, "five dead letters")
    dead = transport.dead_letters()
    reasons = " | ".join(d.reason for d in dead)
    assert "unknown task 'proj.no_such_task'" in reasons
    assert reasons.count("no 'id' header") == 2
    assert "Cannot decode json body" in reasons
    assert "not in accept_content" in reasons
    assert b"\x00 not a task" in [d.message.body for d in dead]
    assert "Rejected message bad-body" in worker.log()
    assert "{not json" not in worker.log()
    assert transport.queue_size("celery") == 0
    assert sorted(r[1] for r in project.ledger("mark")) == ["'first'", "'second'"]
    assert first.state == states.SUCCESS
