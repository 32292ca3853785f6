"""``-P gevent``: greenlets in one patched process, on every broker, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from celeriac import Celeriac
from celeriac.exceptions import ConfigurationError, TaskRevokedError, TimeLimitExceeded
from celeriac.greenlets import is_patched, wants_gevent
from celeriac.pools import pool_class
from celeriac.pools.gevent import GeventPool

from .brokers import project_on
from .conftest import make_project, wait_for

pytest.importorskip("gevent", reason="the gevent extra is part of [dev]")

GEVENT_TASKS = '''

import threading as _threading
from celeriac.exceptions import SoftTimeLimitExceeded

_now = {'running': 0, 'peak': 0}
_guard = _threading.Lock()

@app.task
def together(seconds):
    """How many of these ran at once (in this process), and where."""
    with _guard:
        _now['running'] += 1
        _now['peak'] = max(_now['peak'], _now['running'])
    try:
        time.sleep(seconds)
    finally:
        with _guard:
            _now['running'] -= 1
    return _now['peak'], os.getpid(), _threading.current_thread().name

@app.task(soft_time_limit=0.5)
def careful():
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        return 'cleaned up'
    return 'not stopped'

@app.task(time_limit=1)
def stuck():
    time.sleep(1000)

@app.task
def waits(seconds, key):
    time.sleep(seconds)
    record('waits', key)
    return key

@app.task
def consuming_connection():
    """What this worker's deliveries come on (RabbitMQ)."""
    return type(app.transport._ensure().link.channels['cons']).__name__

@app.task
def break_the_connection_once():
    """Break the worker's broker connection, the first time only (the task may come
    again: its early ack can be lost with the connection)."""
    marker = os.path.join(os.path.dirname(__file__), 'broken-once')
    if not os.path.exists(marker):
        open(marker, 'w').close()
        app.transport.drop_connection()
'''


# A patched interpreter of its own (this test process is never patched): fifty greenlets
# that end together, counting how often they wake the pool's loop.
WAVE = """
from gevent import monkey; monkey.patch_all()
import asyncio, json, time
from celeriac import Celeriac
from celeriac.pools.gevent import GeventPool
from celeriac.protocol import dumps
from celeriac.worker.execute import Job

app = Celeriac("wave", broker="memory://", backend="memory://", environ={})

@app.task
def nap():
    time.sleep(0.05)
    return 1

async def main():
    pool = GeventPool(app, concurrency=50, hostname="h")
    await pool.start()
    loop = asyncio.get_running_loop()
    wakes, real = [], loop.call_soon_threadsafe
    def counted(callback, *args, **kw):
        wakes.append(callback)
        return real(callback, *args, **kw)
    loop.call_soon_threadsafe = counted
    body, content_type, encoding = dumps([[], {}, {}])
    outcomes = await asyncio.gather(*[
        pool.apply(Job(i, f"t{i}", nap.name, body, content_type, encoding, {}))
        for i in range(1, 51)])
    print(json.dumps({"states": sorted({o.state for o in outcomes}), "wakes": len(wakes),
                      "free": pool.free}))

asyncio.run(main())
"""


def test_greenlets_that_end_together_wake_the_loop_once(tmp_path):
    script = tmp_path / "wave.py"
    script.write_text(WAVE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["states"] == ["SUCCESS"] and report["free"] == 50
    # One wake per wave; on a busy machine the fifty endings spread over a few waves (6
    # seen under load). One wake per ending would be 50.
    assert 1 <= report["wakes"] <= 15


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def project(request, tmp_path):
    """Overrides the conftest ``project`` (``start_worker`` uses it): proj.py plus the tasks
    above, on each broker."""
    base = make_project(tmp_path)
    with open(tmp_path / "proj.py", "a") as module:
        module.write(GEVENT_TASKS)
    yield from project_on(request, base, f"gev-{uuid.uuid4().hex[:10]}.")


@pytest.fixture
def gevent_worker(start_worker):
    def start(*args: str):
        return start_worker("-P", "gevent", *args)
    return start


def test_fifty_blocking_tasks_run_at_once_in_one_process(project, gevent_worker):
    worker = gevent_worker("-c", "50")
    app = project.app()
    results = [app.send_task("proj.together", (1.0,)) for _ in range(50)]
    outcomes = [r.get(timeout=60) for r in results]
    assert {pid for _, pid, _ in outcomes} == {worker.pid}  # no child processes
    assert max(peak for peak, _, _ in outcomes) >= 40  # time.sleep yielded to the others
    assert app.send_task("proj.async_add", (2, 3)).get(timeout=20) == 5
    [stats] = app.control.inspect(timeout=2).stats().values()
    assert stats["pool"]["implementation"] == "gevent"
    assert stats["pool"]["max-concurrency"] == 50
    assert "monkey-patched" not in worker.log()


def test_soft_limit_is_caught_and_hard_limit_frees_the_slot(project, gevent_worker):
    gevent_worker("-c", "4")
    app = project.app()
    assert app.send_task("proj.careful").get(timeout=20) == "cleaned up"
    stuck = app.send_task("proj.stuck")
    with pytest.raises(TimeLimitExceeded):
        stuck.get(timeout=20)
    assert app.send_task("proj.add", (2, 2)).get(timeout=20) == 4


def test_terminate_one_of_four_leaves_the_others_to_finish(project, gevent_worker):
    gevent_worker("-c", "4")
    app = project.app()
    victim, *others = [app.send_task("proj.waits", (3.0, key)) for key in "vabc"]
    wait_for(lambda: sum(len(a or []) for a in
                         (app.control.inspect(timeout=1).active() or {}).values()) == 4,
             20, "four tasks running")
    app.control.revoke(victim.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        victim.get(timeout=20)
    assert [r.get(timeout=20) for r in others] == ["a", "b", "c"]
    assert sorted(row[1] for row in project.ledger("waits")) == ["'a'", "'b'", "'c'"]


@pytest.mark.parametrize("project", ["amqp"], indirect=True)
def test_on_rabbitmq_deliveries_come_on_our_own_connection_also_after_a_reconnect(
        project, gevent_worker):
    """Our own consuming connection (blocking reads on a thread of the operating system)
    serves a gevent worker too: deliveries, acks, and a reconnect."""
    gevent_worker("-c", "20")
    app = project.app()
    assert app.send_task("proj.consuming_connection").get(timeout=20) == "LeanChannel"
    app.send_task("proj.break_the_connection_once").get(timeout=30)
    results = [app.send_task("proj.waits", (0.2, str(i))) for i in range(40)]
    assert [r.get(timeout=30) for r in results] == [str(i) for i in range(40)]
    assert app.send_task("proj.consuming_connection").get(timeout=20) == "LeanChannel"
    assert sorted(int(row[1].strip("'")) for row in project.ledger("waits")) == list(range(40))


@pytest.mark.parametrize(("argv", "wanted"), [
    (["-A", "proj", "worker", "-P", "gevent", "-c", "100"], True),
    (["-A", "proj", "worker", "--pool=gevent"], True),
    (["-A", "proj", "worker", "-Pgevent"], True),
    (["-A", "proj", "worker", "--pool", "gevent"], True),
    (["-A", "proj", "worker", "-P", "threads"], False),
    (["-A", "proj", "inspect", "active"], False),
])
def test_the_command_line_decides_the_patching(argv, wanted):
    assert wants_gevent(argv) is wanted


def test_unpatched_process_is_told_how_to_choose_gevent():
    assert not is_patched()  # the test process itself is never patched
    assert pool_class("gevent") is GeventPool
    with pytest.raises(ConfigurationError, match="-P gevent"):
        GeventPool(Celeriac("t", broker="memory://", environ={}), concurrency=2,
                   hostname="h")
