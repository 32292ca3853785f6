"""The worker as users run it: real processes started through the CLI, on the SQLite broker;
the tests marked ``@on_every_broker`` on Redis and RabbitMQ too."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import ResultTimeout
from celeriac.protocol import Message

from .brokers import on_every_broker
from .conftest import run_cli, wait_for


@on_every_broker
def test_round_trip_success_and_failure(project, start_worker):
    start_worker("-c", "2")
    app = project.app()
    assert app.send_task("proj.add", (2, 2)).get(timeout=20) == 4
    failed = app.send_task("proj.boom")
    with pytest.raises(ValueError, match="kaboom") as info:
        failed.get(timeout=20)
    assert "kaboom" in (failed.traceback or "")
    assert info.value.remote_traceback == failed.traceback
    assert app.send_task("proj.async_add", (1, 2)).get(timeout=20) == 3


@on_every_broker
@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_other_pools_run_tasks(project, start_worker, pool):
    start_worker("-P", pool, "-c", "3")
    app = project.app()
    results = [app.send_task("proj.add", (i, i)) for i in range(20)]
    assert [r.get(timeout=20) for r in results] == [2 * i for i in range(20)]
    assert app.send_task("proj.whoami").get(timeout=20) != os.getpid()


def broker_holds_etas(project) -> Any:
    """A client app of ``project`` that leaves every countdown to the broker's delayed path
    (``broker_eta_horizon = 0``); ``-I horizon`` makes a worker's retries go the same way."""
    (project.path / "horizon.py").write_text(
        "from proj import app\napp.conf.broker_eta_horizon = 0\n")
    app = project.app()
    app.conf.broker_eta_horizon = 0
    return app


@on_every_broker
def test_countdown_is_not_run_early(project, start_worker):
    start_worker("-c", "2")
    app, via_broker = project.app(), broker_holds_etas(project)
    sent = time.time()
    delayed = via_broker.send_task("proj.mark", ("delayed",), countdown=2)  # the broker holds it
    result = app.send_task("proj.mark", ("later",), countdown=2)  # the worker does
    with pytest.raises(ResultTimeout):  # (the first delayed message may take a while to send)
        result.get(timeout=max(0.1, sent + 1.5 - time.time()))
    assert delayed.state == states.PENDING
    assert project.ledger("mark") == []
    assert result.get(timeout=20) == "later"
    assert delayed.get(timeout=20) == "delayed"
    assert time.time() - sent >= 2.0


@on_every_broker
def test_expired_task_is_not_run(project, start_worker):
    app = project.app()
    expired = app.send_task("proj.mark", ("expired",), expires=0.5)
    fresh = app.send_task("proj.mark", ("fresh",), expires=600)
    # expires while the broker's delayed path holds it
    delayed = broker_holds_etas(project).send_task("proj.mark", ("delayed",), countdown=1,
                                                   expires=0.5)
    time.sleep(0.6)  # let the first expire before any worker sees it
    start_worker("-c", "1")
    assert fresh.get(timeout=20) == "fresh"
    # settled as REVOKED, not dropped without a result (as a broker's own TTL would)
    wait_for(lambda: expired.state == states.REVOKED, 20, "the expired task to be REVOKED")
    wait_for(lambda: delayed.state == states.REVOKED, 20, "the delayed one to be REVOKED")
    assert [row[1] for row in project.ledger("mark")] == ["'fresh'"]
    assert app.transport.queue_size("celery") == 0


def test_unserializable_result_is_a_clear_failure(project, start_worker):
    start_worker("-c", "1")
    result = project.app().send_task("proj.unserializable")
    with pytest.raises(Exception, match="could not be serialized"):
        result.get(timeout=20)
    assert result.state == states.FAILURE


@on_every_broker
def test_bound_task_retries_until_it_succeeds(project, start_worker):
    app = broker_holds_etas(project)
    start_worker("-c", "1", "-I", "horizon")  # each retry goes through the broker's delay
    result = app.send_task("proj.flaky", ("k",))
    assert result.get(timeout=20) == 2
    assert len(project.ledger("flaky")) == 3


def test_malformed_and_unknown_messages_do_not_stop_good_ones(project, start_worker):
    app = project.app()
    first = app.send_task("proj.mark", ("first",))
    app.transport.publish("celery", Message(body=b"{not json", headers={
        "id": "bad-body", "task": "proj.mark"}))
    app.transport.publish("celery", Message(body=b"[[], {}, {}]", headers={"nothing": 1}))
    app.send_task("proj.no_such_task", (1,))
    app.transport.publish("celery", Message(body=b"x", headers={"id": "p", "task": "proj.mark"},
                                            content_type="application/x-python-serialize"))
    second = app.send_task("proj.mark", ("second",))
    worker = start_worker("-c", "2")
    assert first.get(timeout=20) == "first"
    assert second.get(timeout=20) == "second"
    wait_for(lambda: len(app.transport.dead_letters()) == 4, 20, "four dead letters")
    reasons = " | ".join(d.reason for d in app.transport.dead_letters())
    assert "unknown task 'proj.no_such_task'" in reasons
    assert "no 'id' header" in reasons
    assert "Cannot decode json body" in reasons
    assert "not in accept_content" in reasons
    log = worker.log()
    assert "Rejected message bad-body" in log
    assert "{not json" not in log  # the body is never logged


def test_warm_shutdown_returns_prefetched_messages_at_once(project, start_worker):
    worker = start_worker("-c", "1", "--prefetch-multiplier", "4")
    app = project.app()
    running = app.send_task("proj.sleeper", (1.5, "running"))
    waiting = [app.send_task("proj.mark", (f"w{i}",)) for i in range(3)]
    wait_for(lambda: "proj.sleeper" in worker.log() and worker.log().count("received") >= 4,
             20, "the worker to prefetch")
    worker.signal(signal.SIGTERM)
    wait_for(lambda: app.transport.queue_size("celery") == 3, 2,
             "prefetched messages back on the queue")
    assert worker.wait() == 0
    assert running.get(timeout=5) == 1.5  # the running task finished
    assert all(r.state == states.PENDING for r in waiting)
    start_worker("-c", "2", name="w2")
    assert sorted(r.get(timeout=20) for r in waiting) == ["w0", "w1", "w2"]


def _running_a_late_task(project, start_worker):
    """A one-process worker running a 30-second ``acks_late`` task: (worker, app, result)."""
    worker = start_worker("-c", "1")
    app = project.app()
    late = app.send_task("proj.mark_late", ("late", 30))
    wait_for(lambda: "mark_late" in worker.log(), 20, "the task to start")
    time.sleep(0.3)
    return worker, app, late


@on_every_broker
def test_cold_shutdown_requeues_acks_late_task(project, start_worker):
    worker, app, late = _running_a_late_task(project, start_worker)
    started = time.monotonic()
    worker.signal(signal.SIGQUIT)
    worker.wait(10)
    assert time.monotonic() - started < 8
    assert app.transport.queue_size("celery") == 1  # redelivered, not lost
    assert late.state == states.PENDING


@on_every_broker
def test_second_sigint_turns_a_warm_shutdown_cold(project, start_worker):
    worker, app, late = _running_a_late_task(project, start_worker)
    worker.signal(signal.SIGINT)
    wait_for(lambda: "Waiting for 1 running task(s) to finish" in worker.log(), 5,
             "the warm shutdown to wait for the running task")
    time.sleep(0.3)
    assert worker.proc.poll() is None  # warm: still waiting for the task
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.wait(10) == 0
    assert time.monotonic() - started < 8
    assert "stopped (cold shutdown)" in worker.log()
    assert app.transport.queue_size("celery") == 1  # the acks_late task went back
    assert late.state == states.PENDING and project.ledger("mark_late") == []


def test_second_sigint_while_starting_is_not_forgotten(project, start_worker):
    app = project.app()
    late = app.send_task("proj.mark_late", ("late", 30))
    worker = start_worker("-c", "1", ready=False, mingle=True)  # mingle waits 1 s for replies
    wait_for(lambda: "Queued messages" in worker.log(), 20, "the worker to reach mingle")
    worker.signal(signal.SIGINT)
    wait_for(lambda: "Warm shutdown requested" in worker.log(), 5, "the first SIGINT")
    worker.signal(signal.SIGINT)
    wait_for(lambda: "Cold shutdown" in worker.log(), 5, "the second SIGINT")
    log = worker.log()
    assert " ready." not in log  # both came while the worker was starting
    assert worker.wait(10) == 0  # not after the 30 s task
    assert "stopped (cold shutdown)" in worker.log()
    assert app.transport.queue_size("celery") == 1
    assert late.state == states.PENDING and project.ledger("mark_late") == []


def test_sigkilled_worker_messages_go_to_another_after_the_lease(project, start_worker):
    (project.path / "lease.py").write_text(
        "from proj import *\napp.conf.broker_lease_seconds = 2\n")
    app = project.app()
    first = start_worker("-c", "1", "-I", "lease", "--prefetch-multiplier", "4")
    results = [app.send_task("proj.mark", (f"k{i}",)) for i in range(1)]
    results[0].get(timeout=20)
    blocker = app.send_task("proj.sleeper", (60, "blocker"))
    held = [app.send_task("proj.mark", (f"held{i}",)) for i in range(3)]
    wait_for(lambda: first.log().count("received") >= 5, 20, "the first worker to prefetch")
    first.signal(signal.SIGKILL)
    first.wait()
    killed_at = time.monotonic()
    start_worker("-c", "2", "-I", "lease", name="w2")
    assert sorted(r.get(timeout=30) for r in held) == ["held0", "held1", "held2"]
    assert time.monotonic() - killed_at >= 1.0  # not before the lease ran out
    blocker.forget()


def test_pool_children_die_with_the_worker(project, start_worker):
    worker = start_worker("-c", "2")
    pids = {project.app().send_task("proj.whoami").get(timeout=20) for _ in range(6)}
    worker.signal(signal.SIGKILL)
    worker.wait()

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(gone, 5, "pool children to exit after their parent was killed")


def test_two_workers_on_one_file_never_run_a_message_twice(project, start_worker):
    app = project.app()
    from celeriac.canvas import Signature

    group = app.send_many([Signature("proj.mark", (f"t{i}",), app=app) for i in range(1000)])
    start_worker("-c", "2", name="a")
    start_worker("-c", "2", name="b")
    values = group.get(timeout=120)
    assert len(values) == 1000
    rows = project.ledger("mark")
    keys = [row[1] for row in rows]
    assert len(keys) == 1000 and len(set(keys)) == 1000
    assert len({row[2] for row in rows}) >= 2  # both workers took part


@on_every_broker
def test_purge_option_empties_queue_before_start(project, start_worker):
    app = project.app()
    for i in range(5):
        app.send_task("proj.mark", (i,))
    worker = start_worker("-c", "1", "--purge")
    assert "Purged 5 message(s)" in worker.log()
    assert app.transport.queue_size("celery") == 0


@on_every_broker
def test_queues_option_consumes_only_named_queues(project, start_worker):
    app = project.app()
    other = app.send_task("proj.mark", ("other",), queue="other")
    mine = app.send_task("proj.mark", ("mine",), queue="images")
    start_worker("-c", "1", "-Q", "images")
    assert mine.get(timeout=20) == "mine"
    assert other.state == states.PENDING
    assert app.transport.queue_size("other") == 1


def test_node_name_expansion_and_logs(project, start_worker):
    worker = start_worker("-c", "1", "-n", "alpha@%n", ready=True, name="ignored")
    host = os.uname().nodename.split(".")[0]
    assert f"alpha@{host} ready." in worker.log()
    assert "INFO/MainProcess" in worker.log()


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrency", "zero"], "'zero' is not a valid integer"),
    (["-P", "fastest"], "'fastest' is not one of"),
    (["--no-such-option"], "--no-such-option"),
    (["-l", "chatty"], "Unknown log level 'chatty'"),
    (["-P", "eventlet"], "not available"),
])
def test_bad_worker_options_exit_nonzero_naming_the_problem(project, args, message):
    done = run_cli(project, "worker", *args, timeout=30)
    assert done.returncode != 0
    assert message in done.stderr


def test_pidfile_refuses_a_second_worker(project, start_worker):
    pidfile = str(project.path / "w.pid")
    first = start_worker("-c", "1", "--pidfile", pidfile)
    assert int(Path(pidfile).read_text()) == first.pid
    second = run_cli(project, "worker", "--pidfile", pidfile, timeout=30)
    assert second.returncode != 0
    assert "already using it" in second.stderr
    first.stop()
    assert not os.path.exists(pidfile)


def test_early_acked_task_is_lost_on_kill_but_acks_late_is_redelivered(project, start_worker):
    (project.path / "lease.py").write_text(
        "from proj import *\napp.conf.broker_lease_seconds = 1\n")
    app = project.app()
    worker = start_worker("-c", "2", "-I", "lease")
    early = app.send_task("proj.sleeper", (30, "early"))
    late = app.send_task("proj.mark_late", ("late", 30))
    wait_for(lambda: worker.log().count("received") == 2, 20, "both tasks to start")
    wait_for(lambda: app.transport.queue_size("celery") == 0, 5, "the early ack")
    time.sleep(0.3)
    worker.signal(signal.SIGKILL)
    worker.wait()
    wait_for(lambda: app.transport.queue_size("celery") == 1, 10,
             "the acks_late message to come back after its lease")
    assert early.state == states.PENDING and late.state == states.PENDING


def test_sigterm_to_the_process_group_is_still_a_warm_shutdown(project):
    import subprocess

    from .conftest import CELERIAC

    log = open(project.path / "group.log", "w")
    proc = subprocess.Popen([*CELERIAC, "-A", "proj", "worker", "-l", "info", "-c", "2",
                             "--without-mingle"], cwd=project.path, env=project.env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: " ready." in (project.path / "group.log").read_text(), 20, "ready")
        app = project.app()
        running = app.send_task("proj.sleeper", (1.0, "group"))
        wait_for(lambda: "proj.sleeper" in (project.path / "group.log").read_text(), 20,
                 "the task to start")
        time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        assert running.get(timeout=5) == 1.0
        assert "exited; starting a replacement" not in (project.path / "group.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
