"""``-P asyncio``: coroutines on the pool's own loop, sync tasks in threads, limits, terminate.

Logic runs on an in-process worker (memory broker) and on the pool directly; what users see
(wall time of 200 concurrent coroutines, control answers under load, limits, terminate, the
eventlet message) runs on real workers through the CLI, those with a broker on SQLite, Redis
and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from celeriac import Celeriac, states
from celeriac.canvas import Signature
from celeriac.exceptions import (
    ConfigurationError,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRevokedError,
    TimeLimitExceeded,
)
from celeriac.pools import pool_class
from celeriac.pools.asyncio import AsyncioPool
from celeriac.protocol import dumps
from celeriac.worker.execute import LOST, Job, Outcome
from celeriac.worker.worker import Worker

from .brokers import on_every_broker
from .conftest import run_cli, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app() -> Celeriac:
    return Celeriac("aio", broker="memory://", environ={})


WORKER_DEFAULTS = {"pool": "asyncio", "concurrency": 4, "loglevel": "WARNING"}


def running(worker: Worker) -> int:
    return int(worker.pool_info()["running"])


# -- in-process worker ----------------------------------------------------------------------
def test_two_hundred_coroutines_at_once(app, run_worker):
    loop_threads = set()

    @app.task
    async def nap(seconds, value):
        loop_threads.add(threading.get_ident())
        await asyncio.sleep(seconds)
        return value

    run_worker(concurrency=200)
    nap.delay(0, "warm-up").get(timeout=10)
    started = time.monotonic()
    group = app.send_many([nap.s(0.1, i) for i in range(200)])
    assert group.get(timeout=10) == list(range(200))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"200 x 0.1s took {elapsed:.2f}s"
    assert len(loop_threads) == 1, "coroutines ran on more than one thread"
    assert threading.get_ident() not in loop_threads


def test_sync_tasks_run_in_threads_beside_the_loop(app, run_worker):
    gate = threading.Event()
    seen = []

    @app.task
    def blocking(key):
        seen.append(threading.get_ident())
        assert gate.wait(10)
        return key

    @app.task
    async def quick():
        return "quick"

    worker = run_worker(concurrency=3)
    slow = [blocking.delay(i) for i in range(2)]
    wait_for(lambda: len(seen) == 2, 10, "two sync tasks running")
    try:
        assert quick.delay().get(timeout=10) == "quick"  # the loop is not blocked by them
        assert len(set(seen)) == 2
        wait_for(lambda: running(worker) == 2, 5, "the quick task's slot to be free")
    finally:
        gate.set()
    assert [r.get(timeout=10) for r in slow] == [0, 1]


def test_request_context_in_coroutines(app, run_worker):
    @app.task(bind=True)
    async def child(self):
        return [self.request.id, self.request.parent_id, self.request.root_id]

    @app.task(bind=True)
    async def parent(self, pause):
        before = self.request.id
        await asyncio.sleep(pause)  # other runs interleave here
        assert app.current_task_request is not None
        return [before, self.request.id, child.delay().id, self.request.called_directly]

    run_worker(concurrency=10)
    results = [parent.delay(0.05 * (i % 3)) for i in range(10)]
    for result in results:
        before, after, child_id, direct = result.get(timeout=10)
        assert before == after == result.id and direct is False
        assert app.AsyncResult(child_id).get(timeout=10) == [child_id, result.id, result.id]
    assert child.request.called_directly  # nothing leaked out of the runs


def test_failures_retries_and_sys_exit(app, run_worker):
    attempts = []

    @app.task
    async def boom():
        await asyncio.sleep(0)
        raise ValueError("kaboom")

    @app.task(bind=True, max_retries=2, default_retry_delay=0.01)
    async def flaky(self):
        attempts.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(exc=RuntimeError("not yet"))
        return "third time"

    @app.task
    async def quitter():
        raise SystemExit(3)

    @app.task
    def sync_quitter():
        raise SystemExit(4)

    @app.task
    async def value():
        return object()

    run_worker()
    failed = boom.delay()
    with pytest.raises(ValueError, match="kaboom"):
        failed.get(timeout=10)
    assert "kaboom" in (failed.traceback or "") and "boom" in (failed.traceback or "")
    assert flaky.delay().get(timeout=10) == "third time" and attempts == [0, 1, 2]
    with pytest.raises(TaskError, match=r"sys.exit\(3\)"):
        quitter.delay().get(timeout=10)
    with pytest.raises(TaskError, match=r"sys.exit\(4\)"):
        sync_quitter.delay().get(timeout=10)
    with pytest.raises(Exception, match="could not be serialized"):
        value.delay().get(timeout=10)
    assert flaky.delay().get(timeout=10) == "third time"  # the pool survived all of it


def test_soft_limit_is_raised_at_the_await(app, run_worker):
    @app.task(soft_time_limit=0.2)
    async def careful():
        try:
            await asyncio.sleep(30)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.01)  # cleaning up may await too
            return "cleaned up"
        return "finished"

    @app.task(soft_time_limit=0.2)
    async def careless():
        await asyncio.sleep(30)

    @app.task(soft_time_limit=0.2)
    async def in_a_subtask():
        try:
            await asyncio.ensure_future(asyncio.sleep(30))
        except SoftTimeLimitExceeded:
            return "caught"

    run_worker()
    started = time.monotonic()
    assert careful.delay().get(timeout=10) == "cleaned up"
    assert time.monotonic() - started < 5
    result = careless.delay()
    with pytest.raises(SoftTimeLimitExceeded, match=r"soft time limit of 0\.2s"):
        result.get(timeout=10)
    assert result.state == states.FAILURE
    assert in_a_subtask.delay().get(timeout=10) == "caught"


def test_soft_limit_while_awaiting_a_thread(app, run_worker, caplog):
    @app.task(soft_time_limit=0.2)
    async def waits_on_a_thread():
        try:
            await asyncio.to_thread(time.sleep, 0.4)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0.5)  # the thread's result arrives meanwhile and is dropped
            return "caught"

    run_worker()
    assert waits_on_a_thread.delay().get(timeout=10) == "caught"
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


def test_soft_limit_between_awaits_falls_back_to_cancelling(app, run_worker):
    @app.task(soft_time_limit=0.1)
    async def spinner():
        while True:  # never suspended on a future: only cancellation reaches it
            await asyncio.sleep(0)

    run_worker()
    with pytest.raises(SoftTimeLimitExceeded):
        spinner.delay().get(timeout=10)


def test_soft_limit_in_a_sync_task(app, run_worker):
    @app.task
    def busy():
        try:
            while True:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "cleaned up"

    run_worker()
    assert app.send_task(busy.name, soft_time_limit=0.2).get(timeout=10) == "cleaned up"


def test_hard_limit_fails_the_task_and_frees_the_slot(app, run_worker):
    @app.task(time_limit=0.3)
    async def stuck():
        await asyncio.sleep(30)

    @app.task(time_limit=0.3)
    async def stubborn():
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                continue  # a misbehaving task: it still frees its slot

    @app.task(time_limit=0.3)
    def stuck_in_c():
        time.sleep(30)  # its thread runs on; the slot does not wait for it

    @app.task
    async def after():
        return "slot free"

    @app.task
    def sync_after():
        return "a thread free"

    worker = run_worker(concurrency=1)
    for task in (stuck, stubborn, stuck_in_c):
        result = task.delay()
        with pytest.raises(TimeLimitExceeded, match=r"hard time limit of 0\.3s"):
            result.get(timeout=10)
        assert result.state == states.FAILURE
        assert after.delay().get(timeout=10) == "slot free"
        assert sync_after.delay().get(timeout=10) == "a thread free"
    wait_for(lambda: running(worker) == 0, 5, "no job running")


def test_terminate_one_of_several(app, run_worker):
    @app.task
    async def nap(seconds, key):
        await asyncio.sleep(seconds)
        return key

    @app.task
    def sync_nap(key):
        for _ in range(3000):
            time.sleep(0.01)
        return key

    worker = run_worker(concurrency=5)
    victim, sync_victim = nap.delay(30, "victim"), sync_nap.delay("sync victim")
    others = [nap.delay(1.0, i) for i in range(3)]
    wait_for(lambda: running(worker) == 5, 10, "five tasks running")
    app.control.revoke(victim.id, terminate=True)
    app.control.revoke(sync_victim.id, terminate=True)
    for result in (victim, sync_victim):
        with pytest.raises(TaskRevokedError):
            result.get(timeout=10)
        assert result.state == states.REVOKED
    assert [r.get(timeout=10) for r in others] == [0, 1, 2]


def test_pool_info_and_stats(app, run_worker):
    @app.task
    async def nap(seconds):
        await asyncio.sleep(seconds)

    worker = run_worker(concurrency=7)
    results = [nap.delay(0.5) for _ in range(3)]
    wait_for(lambda: running(worker) == 3, 10, "three running")
    info = worker.pool_info()
    assert info["implementation"] == "asyncio" and info["max-concurrency"] == 7
    assert info["processes"] == [os.getpid()]
    for result in results:
        result.get(timeout=10)
    wait_for(lambda: running(worker) == 0, 5, "none running")


def test_pool_grow_and_shrink(app, run_worker):
    @app.task
    async def nap(seconds):
        await asyncio.sleep(seconds)

    worker = run_worker(concurrency=2)
    assert app.control.pool_grow(3, reply=True, timeout=2)
    assert worker.pool_info()["max-concurrency"] == 5
    results = [nap.delay(0.5) for _ in range(5)]
    wait_for(lambda: running(worker) == 5, 10, "five running after growing")
    app.control.pool_shrink(4, reply=True, timeout=2)
    assert worker.pool_info()["max-concurrency"] == 1
    for result in results:
        result.get(timeout=10)
    more = [nap.delay(0.2) for _ in range(3)]
    deadline = time.monotonic() + 10
    while not all(r.ready() for r in more):
        assert running(worker) <= 1
        assert time.monotonic() < deadline, "the tasks did not finish"
        time.sleep(0.02)


# -- the pool on its own ------------------------------------------------------------------
def _job(app: Celeriac, job_id: int, name: str, args: tuple[Any, ...] = (),
         **limits: float) -> Job:
    body, content_type, encoding = dumps([list(args), {}, {}], "json")
    return Job(job_id, f"task-{job_id}", name, body, content_type, encoding,
               {"id": f"task-{job_id}", "task": name}, **limits)


def test_cold_stop_abandons_running_tasks_as_lost(app):
    @app.task
    async def forever():
        await asyncio.sleep(60)

    @app.task
    def sync_forever():
        time.sleep(60)

    async def scenario() -> list[Outcome]:
        pool = AsyncioPool(app, concurrency=2, hostname="test@host")
        await pool.start()
        futures = [pool.apply(_job(app, 1, forever.name)),
                   pool.apply(_job(app, 2, sync_forever.name))]
        assert pool.free == 0
        started = time.monotonic()
        await pool.stop(cold=True)
        assert time.monotonic() - started < 5
        return [f.result() for f in futures]

    outcomes = asyncio.run(scenario())
    assert [o.state for o in outcomes] == [LOST, LOST]
    assert app.AsyncResult("task-1").state == states.PENDING  # a lost run stores nothing


def test_warm_stop_waits_for_running_tasks(app):
    @app.task
    async def nap():
        await asyncio.sleep(0.2)
        return "done"

    async def scenario() -> Outcome:
        pool = AsyncioPool(app, concurrency=1, hostname="test@host")
        await pool.start()
        future = pool.apply(_job(app, 1, nap.name))
        await pool.stop(cold=False)
        assert future.done()
        return future.result()

    outcome = asyncio.run(scenario())
    assert outcome.state == states.SUCCESS
    # handed to the worker, which stores it in a batch with others
    [meta] = outcome.results
    assert (meta["task_id"], meta["status"], meta["result"]) == ("task-1", states.SUCCESS, "done")


def test_undecodable_body_is_rejected(app):
    @app.task
    async def fine():
        return 1

    async def scenario() -> Outcome:
        pool = AsyncioPool(app, concurrency=1, hostname="test@host")
        await pool.start()
        job = Job(1, "task-1", fine.name, b"not json", "application/json", "utf-8", {})
        outcome = await pool.apply(job)
        await pool.stop(cold=False)
        return outcome

    assert asyncio.run(scenario()).state == states.REJECTED


def test_unavailable_pools_say_what_to_use():
    with pytest.raises(ConfigurationError, match="eventlet") as info:
        pool_class("eventlet")
    assert "asyncio" in str(info.value)
    assert "-P gevent" in str(info.value)
    assert pool_class("asyncio") is AsyncioPool


# -- real workers -------------------------------------------------------------------------
ASYNC_TASKS = '''

import asyncio
from celeriac.exceptions import SoftTimeLimitExceeded

@app.task
async def nap(seconds, value=None):
    await asyncio.sleep(seconds)
    return value

@app.task(bind=True)
async def my_id(self):
    await asyncio.sleep(0.01)
    return self.request.id

@app.task
async def careful(seconds):
    try:
        await asyncio.sleep(seconds)
    except SoftTimeLimitExceeded:
        return 'cleaned up'
    return 'finished'
'''


@pytest.fixture
def aio_project(project):
    with open(project.path / "proj.py", "a") as module:
        module.write(ASYNC_TASKS)
    return project


@on_every_broker
def test_real_worker_two_hundred_coroutines_in_well_under_two_seconds(aio_project,
                                                                      start_worker):
    start_worker("-P", "asyncio", "-c", "200")
    app = aio_project.app()
    assert app.send_task("proj.nap", (0, "warm")).get(timeout=20) == "warm"
    started = time.monotonic()
    group = app.send_many([Signature("proj.nap", (0.1, i), app=app) for i in range(200)])
    assert group.get(timeout=20) == list(range(200))
    elapsed = time.monotonic() - started
    print(f"200 x asyncio.sleep(0.1) on -P asyncio -c 200: {elapsed:.3f}s")
    assert elapsed < 2.0, f"200 x 0.1s took {elapsed:.2f}s"


@on_every_broker
def test_real_worker_answers_control_while_two_hundred_coroutines_run(aio_project,
                                                                      start_worker):
    start_worker("-P", "asyncio", "-c", "200")
    app = aio_project.app()
    group = app.send_many([Signature("proj.nap", (3, i), app=app) for i in range(200)])
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: next(iter((inspector.stats() or {"": {"pool": {}}}).values()))["pool"]
             .get("running") == 200, 10, "200 coroutines running")
    asked = time.monotonic()
    assert len(app.control.ping(timeout=2, limit=1)) == 1
    assert time.monotonic() - asked < 1.0
    assert group.get(timeout=20) == list(range(200))


@on_every_broker
def test_real_worker_sync_bound_and_limits(aio_project, start_worker):
    start_worker("-P", "asyncio", "-c", "2")
    app = aio_project.app()
    assert app.send_task("proj.add", (2, 3)).get(timeout=20) == 5
    assert app.send_task("proj.async_add", (2, 3)).get(timeout=20) == 5
    bound = app.send_task("proj.my_id")
    assert bound.get(timeout=20) == bound.id
    assert app.send_task("proj.careful", (30,), soft_time_limit=0.2,
                         time_limit=5).get(timeout=20) == "cleaned up"
    stuck = app.send_task("proj.nap", (30,), time_limit=0.5)
    blocked = app.send_task("proj.sleeper", (30,), time_limit=0.5)
    for result in (stuck, blocked):
        with pytest.raises(TimeLimitExceeded):
            result.get(timeout=20)
    assert app.send_task("proj.nap", (0.01, "again")).get(timeout=20) == "again"


@on_every_broker
def test_real_worker_terminate_leaves_the_others_running(aio_project, start_worker):
    start_worker("-P", "asyncio", "-c", "4")
    app = aio_project.app()
    victim = app.send_task("proj.nap", (30, "victim"))
    others = [app.send_task("proj.nap", (2, i)) for i in range(3)]
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: sum(len(v) for v in (inspector.active() or {}).values()) == 4, 20,
             "four tasks running")
    aio_project.app().control.revoke(victim.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        victim.get(timeout=10)
    assert [r.get(timeout=20) for r in others] == [0, 1, 2]


@pytest.mark.parametrize("pool", ["eventlet"])
def test_real_worker_unavailable_pool_exits_with_a_clear_message(project, pool):
    done = run_cli(project, "worker", "-P", pool, timeout=30)
    assert done.returncode != 0
    assert f"{pool!r} pool is not available" in done.stderr
    assert "asyncio" in done.stderr
