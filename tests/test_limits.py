"""Pools and limits (issue 5): time limits, terminate, rate limits, recycling, autoscale,
pool resizing and restarts, per-child log files — on real worker processes. The tests marked
``on_every_broker`` run on SQLite, Redis and RabbitMQ (issue 3), the others on SQLite."""

from __future__ import annotations

import os
import signal
import time

import pytest

from celeriac import states
from celeriac.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded

from .brokers import on_every_broker
from .conftest import wait_for

LIMITS = '''
import os, time
from proj import app, record
from celeriac.exceptions import SoftTimeLimitExceeded

@app.task(soft_time_limit=0.5)
def careful():
    try:
        for _ in range(100):  # (steps: a thread takes the limit's exception between them)
            time.sleep(0.1)
    except SoftTimeLimitExceeded:
        record('careful', 'cleaned')
        return 'cleaned up'
    return 'not interrupted'

@app.task
def stuck(seconds=1000):
    time.sleep(seconds)
    return 'woke'

@app.task
def pid():
    return os.getpid()

@app.task(rate_limit='2/s')
def limited(i):
    record('limited', i)
    return i

@app.task
def free(i):
    record('free', i)
    return i

@app.task
def hog(kib):
    global BALLAST
    BALLAST = bytearray(kib * 1024)
    return os.getpid()
'''


@pytest.fixture
def limits(project):
    (project.path / "limits.py").write_text(LIMITS)
    return project


def stats_of(app):
    replies = app.control.inspect(timeout=2, limit=1).stats() or {}
    return next(iter(replies.values()))


@on_every_broker
def test_soft_time_limit_is_catchable(limits, start_worker):
    start_worker("-c", "1", "-I", "limits")
    result = limits.app().send_task("limits.careful")
    assert result.get(timeout=20) == "cleaned up"
    assert [row[1] for row in limits.ledger("careful")] == ["'cleaned'"]


@on_every_broker
def test_soft_limit_from_apply_async_uncaught_is_a_failure(limits, start_worker):
    start_worker("-c", "1", "-I", "limits")
    result = limits.app().send_task("limits.stuck", (5,), soft_time_limit=0.3)
    with pytest.raises(SoftTimeLimitExceeded):
        result.get(timeout=20)


@on_every_broker
def test_hard_limit_kills_a_stuck_task_and_the_pool_refills(limits, start_worker):
    start_worker("-c", "2", "-I", "limits", "--time-limit", "1")
    app = limits.app()
    other = app.send_task("limits.stuck", (0.5,), time_limit=30)
    victim = app.send_task("limits.stuck", (1000,))
    with pytest.raises(TimeLimitExceeded, match="Time limit"):
        victim.get(timeout=20)
    assert other.get(timeout=20) == "woke"
    killed_at = time.monotonic()
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 2, 5, "a full pool")
    assert time.monotonic() - killed_at < 1.5
    assert stats_of(app)["pool"]["timeouts"] == [None, 1.0]


@on_every_broker
def test_time_limit_command_affects_only_later_tasks(limits, start_worker):
    start_worker("-c", "2", "-I", "limits")
    app = limits.app()
    before = app.send_task("limits.stuck", (2,))
    wait_for(lambda: any((app.control.inspect(timeout=1, limit=1).active() or {}).values()),
             10, "the first task to start")
    replies = app.control.time_limit("limits.stuck", soft=None, hard=1, reply=True, timeout=2,
                                     limit=1)
    assert list(replies[0].values()) == [{"ok": "time limits set successfully"}]
    after = app.send_task("limits.stuck", (5,))
    assert before.get(timeout=20) == "woke"
    with pytest.raises(TimeLimitExceeded):
        after.get(timeout=20)
    [unknown] = app.control.time_limit("limits.nope", hard=1, reply=True, timeout=2, limit=1)
    assert "error" in next(iter(unknown.values()))


@on_every_broker
def test_terminate_one_of_four_running_tasks(limits, start_worker):
    start_worker("-c", "4", "-I", "limits")
    app = limits.app()
    results = [app.send_task("limits.stuck", (2,)) for _ in range(4)]
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: len(next(iter((inspector.active() or {"": []}).values()))) == 4, 20,
             "four running tasks")
    replies = app.control.terminate(results[1].id, signal="SIGTERM", reply=True, timeout=2,
                                    limit=1)
    assert "terminate" in next(iter(replies[0].values()))["ok"]
    with pytest.raises(TaskRevokedError):
        results[1].get(timeout=20)
    assert [r.get(timeout=20) for r in (results[0], results[2], results[3])] == ["woke"] * 3


@on_every_broker
def test_rate_limit_holds_one_type_and_not_the_others(limits, start_worker):
    """Messages waiting for a token stay leased (renewed) however long they wait."""
    (limits.path / "shortlease.py").write_text(
        "from limits import *\napp.conf.broker_lease_seconds = 2\n")
    start_worker("-c", "2", "-I", "shortlease")
    app = limits.app()
    started = time.monotonic()
    limited = [app.send_task("limits.limited", (i,)) for i in range(20)]
    free = [app.send_task("limits.free", (i,)) for i in range(20)]
    assert [r.get(timeout=30) for r in free] == list(range(20))
    assert time.monotonic() - started < 5  # not stuck behind the rate-limited ones
    assert sorted(r.get(timeout=30) for r in limited) == list(range(20))
    assert time.monotonic() - started >= 9.0
    assert len(limits.ledger("limited")) == 20  # none lost, none run twice
    # Held for up to 10 s on a 2 s lease: had a lease run out, a second copy would be
    # waiting for its token now.
    reserved = app.control.inspect(timeout=2, limit=1).reserved()
    assert next(iter(reserved.values())) == []


@on_every_broker
def test_rate_limit_command_and_disabling(limits, start_worker):
    start_worker("-c", "2", "-I", "limits")
    app = limits.app()
    [reply] = app.control.rate_limit("limits.free", "1/s", reply=True, timeout=2, limit=1)
    assert next(iter(reply.values())) == {"ok": "new rate limit set successfully"}
    started = time.monotonic()
    assert [app.send_task("limits.free", (i,)).get(timeout=20) for i in range(3)] == [0, 1, 2]
    assert time.monotonic() - started >= 1.8
    [bad] = app.control.rate_limit("limits.free", "fast", reply=True, timeout=2, limit=1)
    assert "Bad rate limit" in next(iter(bad.values()))["error"]
    [unknown] = app.control.rate_limit("limits.missing", "1/s", reply=True, timeout=2, limit=1)
    assert next(iter(unknown.values())) == {"error": "unknown task 'limits.missing'"}
    [disabled] = app.control.rate_limit("limits.free", None, reply=True, timeout=2, limit=1)
    assert next(iter(disabled.values())) == {"ok": "rate limit disabled successfully"}
    started = time.monotonic()
    assert [app.send_task("limits.free", (i,)).get(timeout=20) for i in range(4)] == [0, 1, 2, 3]
    assert time.monotonic() - started < 2.5  # 1/s would take at least 3 s


@on_every_broker
def test_disable_rate_limits_setting(limits, start_worker):
    (limits.path / "norate.py").write_text(
        "from limits import *\napp.conf.CELERY_DISABLE_RATE_LIMITS = True\n")
    start_worker("-c", "2", "-I", "norate")
    app = limits.app()
    started = time.monotonic()
    assert sorted(app.send_task("limits.limited", (i,)).get(timeout=20)
                  for i in range(10)) == list(range(10))
    assert time.monotonic() - started < 3


@on_every_broker
def test_max_tasks_per_child_recycles_within_concurrency(limits, start_worker):
    start_worker("-c", "2", "-I", "limits", "--max-tasks-per-child", "5")
    app = limits.app()
    pids = []
    seen_at_once = 0
    for _ in range(10):
        batch = [app.send_task("limits.pid") for _ in range(5)]
        pids += [r.get(timeout=20) for r in batch]
        seen_at_once = max(seen_at_once, len(stats_of(app)["pool"]["processes"]))
    assert len(set(pids)) >= 10
    assert seen_at_once <= 2
    assert stats_of(app)["pool"]["max-tasks-per-child"] == 5


@on_every_broker
def test_max_memory_per_child_recycles(limits, start_worker):
    start_worker("-c", "1", "-I", "limits", "--max-memory-per-child", "100000")
    app = limits.app()
    first = app.send_task("limits.hog", (150_000,)).get(timeout=20)
    second = app.send_task("limits.pid").get(timeout=20)
    assert first != second


@on_every_broker
def test_pool_grow_and_shrink_show_in_stats(limits, start_worker):
    start_worker("-c", "2", "-I", "limits", "--prefetch-multiplier", "1")
    app = limits.app()
    [grown] = app.control.pool_grow(2, reply=True, timeout=2, limit=1)
    assert next(iter(grown.values())) == {"ok": "pool will grow to 4"}
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 4, 10, "four processes")
    assert stats_of(app)["pool"]["max-concurrency"] == 4
    assert stats_of(app)["prefetch_count"] == 4
    # acks_late tasks keep their messages unacknowledged while they run: four at once need
    # the broker's own prefetch (RabbitMQ's QoS) to have grown with the pool.
    burst = [app.send_task("proj.mark_late", (i, 1.5)) for i in range(4)]
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: len(next(iter((inspector.active() or {"": []}).values()))) == 4, 5,
             "four tasks running at once")
    assert [r.get(timeout=20) for r in burst] == [0, 1, 2, 3]
    app.control.pool_shrink(3, reply=True, timeout=2, limit=1)
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 1, 10, "one process")
    assert stats_of(app)["pool"]["max-concurrency"] == 1
    [refused] = app.control.pool_shrink(1, reply=True, timeout=2, limit=1)
    assert "error" in next(iter(refused.values()))
    assert app.send_task("proj.add", (1, 1)).get(timeout=20) == 2


@on_every_broker
def test_autoscale_grows_under_a_burst_and_shrinks_when_idle(limits, start_worker):
    (limits.path / "fastscale.py").write_text(
        "from limits import *\napp.conf.worker_autoscale_keepalive = 1\n")
    start_worker("-I", "fastscale", "--autoscale", "4,1")
    app = limits.app()
    assert len(stats_of(app)["pool"]["processes"]) == 1
    burst = [app.send_task("limits.stuck", (3,)) for _ in range(4)]
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 4, 15, "growth to 4")
    assert [r.get(timeout=30) for r in burst] == ["woke"] * 4
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 1, 30, "shrinking to 1")
    [refused] = app.control.pool_grow(1, reply=True, timeout=2, limit=1)
    assert "autoscale is on" in next(iter(refused.values()))["error"]
    [changed] = app.control.autoscale(6, 2, reply=True, timeout=2, limit=1)
    assert next(iter(changed.values())) == {"ok": "autoscale now max=6 min=2"}
    wait_for(lambda: len(stats_of(app)["pool"]["processes"]) == 2, 10, "the new minimum")
    assert stats_of(app)["pool"]["autoscaler"]["max"] == 6


@on_every_broker
def test_pool_restart_picks_up_a_changed_module(limits, start_worker):
    (limits.path / "version.py").write_text(
        "from proj import app\n\n@app.task\ndef version():\n    return 1\n")
    (limits.path / "restarts.py").write_text(
        "from proj import app\napp.conf.worker_pool_restarts = True\nimport version\n")
    start_worker("-c", "2", "-I", "restarts")
    app = limits.app()
    assert app.send_task("version.version").get(timeout=20) == 1
    (limits.path / "version.py").write_text(
        "from proj import app\n\n@app.task\ndef version():\n    return 2\n")
    [reply] = app.control.pool_restart(modules=["version"], reload=True, reply=True,
                                       timeout=5, limit=1)
    assert "reload started" in next(iter(reply.values()))["ok"]
    wait_for(lambda: app.send_task("version.version").get(timeout=20) == 2, 20,
             "the new code")


def test_pool_restart_is_refused_unless_enabled(limits, start_worker):
    start_worker("-c", "1", "-I", "limits")
    [reply] = limits.app().control.pool_restart(reply=True, timeout=2, limit=1)
    assert "worker_pool_restarts" in next(iter(reply.values()))["error"]


def test_per_child_log_files(limits, start_worker):
    start_worker("-c", "2", "-I", "limits", "-n", "worker1@example.com",
                 "-f", "%n-%i.log", "--max-tasks-per-child", "2", ready=False)
    main_log = limits.path / "worker1-0.log"
    wait_for(lambda: main_log.exists() and "ready." in main_log.read_text(), 20, "ready")
    app = limits.app()
    for _ in range(3):
        [r.get(timeout=20) for r in [app.send_task("limits.pid") for _ in range(4)]]
    names = sorted(p.name for p in limits.path.glob("worker1-*.log"))
    assert names == ["worker1-0.log", "worker1-1.log", "worker1-2.log"]
    assert "ready." in (limits.path / "worker1-0.log").read_text()


@on_every_broker
@pytest.mark.parametrize("pool", ["threads"])
def test_thread_pool_soft_and_hard_limits(limits, start_worker, pool):
    start_worker("-P", pool, "-c", "2", "-I", "limits")
    app = limits.app()
    assert app.send_task("limits.careful").get(timeout=20) == "cleaned up"
    stuck = app.send_task("limits.stuck", (3,), time_limit=0.5)
    with pytest.raises(TimeLimitExceeded):
        stuck.get(timeout=20)
    assert [app.send_task("proj.add", (i, i)).get(timeout=20) for i in range(3)] == [0, 2, 4]


@on_every_broker
def test_cold_terminate_signal_names(limits, start_worker):
    worker = start_worker("-c", "1", "-I", "limits")
    app = limits.app()
    result = app.send_task("limits.stuck", (30,))
    wait_for(lambda: any((app.control.inspect(timeout=1, limit=1).active() or {}).values()),
             10, "the task to start")
    [reply] = app.control.terminate(result.id, signal="KILL", reply=True, timeout=2, limit=1)
    assert "terminate" in next(iter(reply.values()))["ok"]
    with pytest.raises(TaskRevokedError):
        result.get(timeout=20)
    assert result.state == states.REVOKED
    [bad] = app.control.terminate("x", signal="SIGNOPE", reply=True, timeout=2, limit=1)
    assert "unknown signal" in next(iter(bad.values()))["error"]
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    assert os.path.exists(limits.path / "ledger.db")


FAST = '''
import os, signal, time
from proj import app, record

@app.task
def suicide():
    os.kill(os.getpid(), signal.SIGKILL)

@app.task
def nap(key, seconds=0.0):
    time.sleep(seconds)
    record('nap', key)
    return key
'''


def test_fast_mode_runs_every_task_once(project, start_worker):
    (project.path / "fast.py").write_text(FAST)
    start_worker("-c", "2", "-O", "fast", "-I", "fast")
    app = project.app()
    from celeriac.canvas import Signature

    group = app.send_many([Signature("fast.nap", (i,), app=app) for i in range(300)])
    assert group.get(timeout=60) == list(range(300))
    assert len(project.ledger("nap")) == 300
    stats = stats_of(app)
    assert stats["pool"]["jobs-per-process"] == 4


def test_fast_mode_jobs_queued_behind_a_dying_process_run_elsewhere(project, start_worker):
    (project.path / "fast.py").write_text(FAST)
    start_worker("-c", "1", "-O", "fast", "-I", "fast")
    app = project.app()
    blocker = app.send_task("fast.nap", ("first", 0.5))
    doomed = app.send_task("fast.suicide")
    after = [app.send_task("fast.nap", (f"after{i}",)) for i in range(3)]
    assert blocker.get(timeout=20) == "first"
    with pytest.raises(Exception, match="exited while running"):
        doomed.get(timeout=20)
    assert [r.get(timeout=20) for r in after] == ["after0", "after1", "after2"]


def test_fast_mode_terminating_a_queued_task_means_it_never_starts(project, start_worker):
    (project.path / "fast.py").write_text(FAST)
    start_worker("-c", "1", "-O", "fast", "-I", "fast")
    app = project.app()
    running = app.send_task("fast.nap", ("running", 1.5))
    queued = app.send_task("fast.nap", ("queued",))
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: len(next(iter((inspector.active() or {"": []}).values()))) == 2, 10,
             "both tasks handed to the process")
    queued.revoke(terminate=True)
    assert running.get(timeout=20) == "running"
    with pytest.raises(TaskRevokedError):
        queued.get(timeout=20)
    assert [row[1] for row in project.ledger("nap")] == ["'running'"]


def test_fast_mode_respects_max_tasks_per_child(project, start_worker):
    (project.path / "limits.py").write_text(LIMITS)
    start_worker("-c", "2", "-O", "fast", "-I", "limits", "--max-tasks-per-child", "3")
    app = project.app()
    pids = [app.send_task("limits.pid").get(timeout=20) for _ in range(12)]
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert max(counts.values()) <= 3 and len(counts) >= 4
