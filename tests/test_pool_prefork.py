"""``-P prefork`` on its own: where jobs go (adaptive, fair and fast pipelining), outcomes a
child holds back, and what the parent knows about the job each child runs meanwhile.

Every assertion is about pool state or outcomes (which process ran what, what is queued
where), never about how long something took. Tasks that must stay busy wait for a file the
test creates.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from celeriac import Celeriac, states
from celeriac.pools import prefork
from celeriac.pools.base import PoolLimits
from celeriac.pools.prefork import PreforkPool
from celeriac.protocol import dumps
from celeriac.worker.execute import LOST, Job, Outcome
from celeriac.worker.worker import Worker, WorkerOptions

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count(1)


@pytest.fixture
def app(tmp_path: Path) -> Celeriac:
    app = Celeriac("pf", broker="memory://", environ={})

    @app.task(name="pf.noop")
    def noop() -> None:
        return None

    @app.task(name="pf.gate")
    def gate(name: str) -> str:
        """Busy until the test creates ``name`` (says it started by creating name.started)."""
        (tmp_path / f"{name}.started").touch()
        while not (tmp_path / name).exists():
            time.sleep(0.005)
        return name

    @app.task(name="pf.nap")
    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    return app


@pytest.fixture(autouse=True)
def short_means_short(monkeypatch: pytest.MonkeyPatch) -> None:
    # What counts as short is made generous, so a no-op that a busy test machine happens to
    # slow down still counts as short; "slow" tasks here block or sleep for longer.
    monkeypatch.setattr(prefork, "SHORT_RUNTIME", 0.25)


def job(name: str, *args: Any, **limits: Any) -> Job:
    job_id = next(_ids)
    body, content_type, encoding = dumps([list(args), {}, {}], "json")
    return Job(job_id, f"task-{job_id}", name, body, content_type, encoding,
               {"id": f"task-{job_id}", "task": name}, **limits)


def run(app: Celeriac, scenario: Callable[[PreforkPool], Awaitable[Any]], *,
        concurrency: int = 2, pipeline: int = 0) -> Any:
    async def main() -> Any:
        pool = PreforkPool(app, concurrency=concurrency, hostname="pf@test",
                           limits=PoolLimits(pipeline=pipeline))
        await pool.start()
        try:
            return await asyncio.wait_for(scenario(pool), 30)
        finally:
            await pool.stop(cold=True)

    return asyncio.run(main())


async def learn(pool: PreforkPool, name: str, *args: Any, times: int = 4) -> None:
    """Run ``name`` a few times, one at a time, so the pool knows how long it takes."""
    for _ in range(times):
        outcome = await pool.apply(job(name, *args))
        assert outcome.state == states.SUCCESS


@pytest.fixture
def hold_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children hold outcomes back for up to a minute (not 2 ms): what they hold stays held
    while a test looks."""
    monkeypatch.setattr(prefork, "_HOLD_FOR", 60.0)


async def learn_short_noop_and_gate(pool: PreforkPool, tmp_path: Path) -> None:
    """The pool learns that ``pf.noop`` and ``pf.gate`` (its gate file already there) are
    short, so it pipelines them and children hold their outcomes back."""
    await learn(pool, "pf.noop")
    (tmp_path / "warm").touch()
    await learn(pool, "pf.gate", "warm", times=1)


def queued(pool: PreforkPool) -> dict[int, int]:
    """pid -> jobs handed to that process and not reported finished."""
    return {c.pid: len(c.jobs) + len(c.finished) for c in pool._children.values()}


async def started(tmp_path: Path, name: str) -> None:
    while not (tmp_path / f"{name}.started").exists():
        await asyncio.sleep(0.005)


# -- where jobs go --------------------------------------------------------------------------
def test_adaptive_default_pipelines_short_tasks(app):
    async def scenario(pool: PreforkPool) -> list[Outcome]:
        assert pool.adaptive and pool.info()["pipelining"] == "adaptive"
        await learn(pool, "pf.noop")
        futures = [pool.apply(job("pf.noop")) for _ in range(16)]
        assert sorted(queued(pool).values()) == [8, 8]  # none left waiting in the pool
        assert pool.waiting == 14 and pool.free == 0
        return list(await asyncio.gather(*futures))

    outcomes = run(app, scenario)
    assert [o.state for o in outcomes] == [states.SUCCESS] * 16


def test_adaptive_default_sends_a_task_of_unknown_length_only_to_an_idle_process(app):
    async def scenario(pool: PreforkPool) -> None:
        futures = [pool.apply(job("pf.noop")) for _ in range(4)]  # never ran here yet
        assert sorted(queued(pool).values()) == [1, 1]
        assert len(pool._backlog) == 2 and pool.free == 0
        await asyncio.gather(*futures)

    run(app, scenario)


@pytest.mark.parametrize("known", [False, True], ids=["new-slow-task", "known-slow-task"])
def test_a_slow_task_gets_nothing_queued_behind_it_while_another_process_is_free(
        app, tmp_path, known):
    async def scenario(pool: PreforkPool) -> None:
        await learn(pool, "pf.noop")
        if known:
            await learn(pool, "pf.nap", 0.5, times=1)
            assert not pool._short("pf.nap")
        slow = job("pf.gate", "slow")
        slow_future = pool.apply(slow)
        slow_pid = pool.job_pid(slow.job_id)
        shorts = [job("pf.noop") for _ in range(7)]
        short_futures = [pool.apply(j) for j in shorts]
        assert queued(pool)[slow_pid] == 1
        assert all(pool.job_pid(j.job_id) not in (0, slow_pid) for j in shorts)
        assert pool.free == 1  # room for one more short task, beside the slow one
        more = pool.apply(job("pf.nap", 0.5))  # not short: waits for an idle process
        assert queued(pool)[slow_pid] == 1 and len(pool._backlog) == 1
        outcomes = await asyncio.gather(*short_futures)
        assert all(o.pid != slow_pid and o.state == states.SUCCESS for o in outcomes)
        assert not slow_future.done()  # the slow one still runs, alone in its process
        (tmp_path / "slow").touch()
        assert (await slow_future).pid == slow_pid
        await more

    run(app, scenario)


def test_fair_sends_only_to_idle_processes(app):
    async def scenario(pool: PreforkPool) -> None:
        assert pool.info()["pipelining"] == "fair"
        await learn(pool, "pf.noop")
        futures = [pool.apply(job("pf.noop")) for _ in range(4)]
        assert sorted(queued(pool).values()) == [1, 1] and len(pool._backlog) == 2
        await asyncio.gather(*futures)

    run(app, scenario, pipeline=1)


def test_fast_queues_a_fixed_number_whatever_the_tasks(app, tmp_path):
    async def scenario(pool: PreforkPool) -> None:
        assert pool.info()["pipelining"] == "fixed" and pool.depth == 4
        slow = pool.apply(job("pf.gate", "slow"))
        futures = [pool.apply(job("pf.noop")) for _ in range(7)]
        assert sorted(queued(pool).values()) == [4, 4]  # three wait behind the slow one
        (tmp_path / "slow").touch()
        await asyncio.gather(slow, *futures)

    run(app, scenario, pipeline=4)


def test_a_result_store_url_the_children_cannot_use_fails_before_any_fork():
    """Checked once at start-up (a clear error), not by every child forked (a crash loop)."""
    from celeriac.exceptions import ConfigurationError

    app = Celeriac("pf", broker="memory://", backend="redis://127.0.0.1:6379/1?bogus=1",
                   environ={})
    with pytest.raises(ConfigurationError, match=r"Unknown option\(s\) \['bogus'\]"):
        PreforkPool(app, concurrency=1, hostname="pf@test")


def test_the_worker_default_is_adaptive(app):
    assert app.conf.worker_pool_pipeline == 0
    assert Worker(app, WorkerOptions(pool="prefork")).pool_limits().pipeline == 0
    assert Worker(app, WorkerOptions(pipeline=1)).pool_limits().pipeline == 1


# -- outcomes held back ---------------------------------------------------------------------
def test_held_back_outcomes_come_together_and_the_parent_knows_the_running_job(
        app, tmp_path, hold_long):  # only a queue down to its last job sends what is held

    async def scenario(pool: PreforkPool) -> None:
        await learn(pool, "pf.noop")
        (tmp_path / "warm").touch()
        await learn(pool, "pf.gate", "warm", times=1)  # the gate task is known as short now
        [child] = pool._children.values()
        shorts = [job("pf.noop") for _ in range(3)]
        futures = [pool.apply(j) for j in shorts]
        gate = job("pf.gate", "held")
        gate_future = pool.apply(gate)
        last = pool.apply(job("pf.noop"))  # (with one job left queued, it would send them)
        await started(tmp_path, "held")
        assert not any(f.done() for f in futures)  # finished, but held back in the child
        pool._sync(child)
        assert child.job == gate  # jobs[0] is the running job
        assert [j for j, _ in child.finished] == shorts
        assert pool.waiting == 1
        assert not pool.terminate_job(shorts[0].job_id, signal.SIGTERM)  # finished already
        assert pool.job_pid(gate.job_id) == child.pid
        (tmp_path / "held").touch()
        outcomes = await asyncio.gather(*futures, gate_future, last)
        assert [o.state for o in outcomes] == [states.SUCCESS] * 5
        assert {o.pid for o in outcomes} == {child.pid}

    run(app, scenario, concurrency=1)


def test_a_long_running_short_task_does_not_keep_outcomes_back(app, tmp_path):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        futures = [pool.apply(job("pf.noop")) for _ in range(3)]
        gate_future = pool.apply(job("pf.gate", "stuck"))
        await asyncio.gather(*futures)  # sent while the gate task is still busy
        assert not gate_future.done()
        (tmp_path / "stuck").touch()
        assert (await gate_future).state == states.SUCCESS

    run(app, scenario, concurrency=1)


def test_a_full_child_sends_what_it_holds_when_down_to_its_last_queued_job(app, tmp_path,
                                                                           hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        [child] = pool._children.values()
        futures = [pool.apply(job("pf.noop")) for _ in range(pool.depth - 1)]
        gate_future = pool.apply(job("pf.gate", "busy"))  # the last job: short, but stuck
        assert pool.free == 0  # the parent waits for outcomes before it sends more
        await asyncio.wait_for(asyncio.gather(*futures), 10)  # while it runs, not after
        pool._sync(child)
        assert not gate_future.done() and not child.finished
        (tmp_path / "busy").touch()
        assert (await gate_future).state == states.SUCCESS

    run(app, scenario, concurrency=1)


def test_a_child_that_was_never_full_holds_its_outcomes_until_its_queue_is_empty(
        app, tmp_path, hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        [child] = pool._children.values()
        futures = [pool.apply(job("pf.noop")) for _ in range(2)]
        gate_future = pool.apply(job("pf.gate", "idle"))  # the last job: short, but stuck
        assert pool.free > 0  # the parent can send more without these outcomes
        await started(tmp_path, "idle")
        pool._sync(child)
        assert len(child.finished) == 2 and not any(f.done() for f in futures)
        (tmp_path / "idle").touch()  # its queue runs empty: all three outcomes go
        outcomes = await asyncio.wait_for(asyncio.gather(*futures, gate_future), 10)
        assert [o.state for o in outcomes] == [states.SUCCESS] * 3

    run(app, scenario, concurrency=1)


def test_terminating_the_running_job_keeps_the_outcomes_held_before_it(
        app, tmp_path, hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        [child] = pool._children.values()
        futures = [pool.apply(job("pf.noop")) for _ in range(2)]
        gate = job("pf.gate", "never")
        gate_future = pool.apply(gate)
        after = pool.apply(job("pf.noop"))  # keeps the outcomes held while the gate runs
        await started(tmp_path, "never")
        pool._sync(child)
        assert len(child.finished) == 2  # held back in the child when it is terminated
        assert pool.terminate_job(gate.job_id, signal.SIGTERM)
        outcomes = await asyncio.gather(*futures)
        assert [o.state for o in outcomes] == [states.SUCCESS] * 2
        lost = await gate_future
        assert lost.state == LOST and "SIGTERM" in lost.summary and lost.pid == child.pid
        assert (await after).state == states.SUCCESS  # never started: ran in the new child

    run(app, scenario, concurrency=1)


# -- hard time limits with outcomes held back -----------------------------------------------
def test_a_job_with_a_hard_limit_starts_only_after_held_outcomes_are_sent(app, tmp_path,
                                                                          hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        futures = [pool.apply(job("pf.noop")) for _ in range(2)]
        gate_future = pool.apply(job("pf.gate", "stuck", time_limit=0.5))
        outcomes = await asyncio.gather(*futures)  # before the limit kills the gate task
        assert [o.state for o in outcomes] == [states.SUCCESS] * 2
        killed = await gate_future
        assert killed.state == LOST and killed.timed_out

    run(app, scenario, concurrency=1)


def test_the_hard_limit_of_a_finished_job_whose_outcome_is_held_kills_nothing(
        app, tmp_path, hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        [child] = pool._children.values()
        first = pool.apply(job("pf.noop", time_limit=0.2))
        second = pool.apply(job("pf.noop"))
        gate_future = pool.apply(job("pf.gate", "after"))
        last = pool.apply(job("pf.noop"))  # keeps the outcomes held while the gate runs
        await started(tmp_path, "after")
        assert child.hard_timer is not None  # armed for the first job, which has finished
        while child.hard_timer is not None:  # until it fires
            await asyncio.sleep(0.01)
        assert pool.pids == [child.pid] and not gate_future.done()
        (tmp_path / "after").touch()
        outcomes = await asyncio.gather(first, second, gate_future, last)
        assert [o.state for o in outcomes] == [states.SUCCESS] * 4
        assert {o.pid for o in outcomes} == {child.pid}

    run(app, scenario, concurrency=1)


def test_a_child_dying_with_held_outcomes_reports_them_lost_and_runs_nothing_twice(
        app, tmp_path, hold_long):
    async def scenario(pool: PreforkPool) -> None:
        await learn_short_noop_and_gate(pool, tmp_path)
        [child] = pool._children.values()
        futures = [pool.apply(job("pf.noop")) for _ in range(2)]
        gate_future = pool.apply(job("pf.gate", "never"))
        after = pool.apply(job("pf.noop"))
        await started(tmp_path, "never")
        os.kill(child.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*futures, gate_future)
        assert [o.state for o in outcomes] == [LOST] * 3
        assert all("before reporting" in o.summary for o in outcomes[:2])
        assert "while running" in outcomes[2].summary
        assert (await after).state == states.SUCCESS  # never started: ran in the new child

    run(app, scenario, concurrency=1)


def test_a_replacement_child_tells_the_pool_owner_there_is_room(app):
    """With every child dead nothing else would end and free a slot: the consumer learns
    from the pool that the replacements have started, and hands them what waits."""
    async def scenario(pool: PreforkPool) -> None:
        room = asyncio.Event()
        pool.on_room = room.set
        dead = [child.pid for child in pool._children.values()]
        for pid in dead:
            os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(room.wait(), 10)
        assert pool.free > 0 and not set(pool.pids) & set(dead)

    run(app, scenario, concurrency=2)
