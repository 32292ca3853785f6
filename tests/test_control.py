"""Remote control from Python against real worker processes (SQLite broker)."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
import uuid

import pytest

from celeriac import states
from celeriac.canvas import Signature
from celeriac.control.mailbox import CONTROL_CHANNEL
from celeriac.exceptions import TaskRevokedError

from .brokers import project_on
from .conftest import make_project, wait_for

CUSTOM = '''
from celeriac.worker.control import Panel

@Panel.register
def increase_prefetch_count(state, n=1):
    state.consumer.qos.increment_eventually(n)
    return {'ok': 'prefetch count incremented'}
'''


@pytest.fixture(params=["sqlite", "redis", "amqp"])
def project(request, tmp_path):
    """The shared project on each broker: SQLite, Redis, RabbitMQ (``rpc://`` results)."""
    yield from project_on(request, make_project(tmp_path), f"ctl-{uuid.uuid4().hex[:10]}.")


def transport_name(project) -> str:
    url = getattr(project, "broker", "sqlite://")
    return url.split("://", 1)[0]


@pytest.fixture
def three(project, start_worker):
    (project.path / "custom.py").write_text(CUSTOM)
    workers = [start_worker("-c", "2", "-I", "custom", "--prefetch-multiplier", "1",
                            name=f"w{i}") for i in range(3)]
    return [w.log_path.stem for w in workers], workers


def node(worker_name: str) -> str:
    import socket

    return f"{worker_name}@{socket.gethostname()}"


def test_broadcast_reaches_all_three_and_destination_only_one(project, three):
    names, _ = three
    app = project.app()
    replies = app.control.broadcast("ping", reply=True, timeout=2, limit=3)
    assert sorted(next(iter(r)) for r in replies) == sorted(node(n) for n in names)
    assert all(next(iter(r.values())) == {"ok": "pong"} for r in replies)
    one = node(names[1])
    started = time.monotonic()
    assert app.control.ping(destination=[one], timeout=2) == [{one: {"ok": "pong"}}]
    assert time.monotonic() - started < 1.5  # limit = number of destinations


def test_dead_destination_returns_after_about_the_timeout(project, three):
    started = time.monotonic()
    assert project.app().control.ping(destination=["ghost@nowhere"], timeout=0.5) == []
    assert 0.45 <= time.monotonic() - started < 1.5
    assert project.app().control.inspect(destination="ghost@nowhere", timeout=0.3).ping() is None


def test_inspect_registered_stats_and_conf(project, three):
    names, _ = three
    inspector = project.app().control.inspect(timeout=2, limit=3)
    registered = inspector.registered()
    assert set(registered) == {node(n) for n in names}
    assert "proj.add" in registered[node(names[0])]
    stats = inspector.stats()[node(names[0])]
    assert {"broker", "clock", "pid", "uptime", "prefetch_count", "pool", "rusage",
            "total"} <= set(stats)
    assert {"max-concurrency", "processes", "max-tasks-per-child", "timeouts"} <= set(
        stats["pool"])
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2
    assert {"utime", "stime", "maxrss", "nvcsw"} <= set(stats["rusage"])
    assert stats["broker"]["transport"] == transport_name(project)
    assert stats["prefetch_count"] == 2
    conf = inspector.conf()[node(names[0])]
    assert conf["broker_url"].startswith(transport_name(project))


def test_secrets_are_masked_in_stats_and_conf(project, start_worker):
    (project.path / "secret.py").write_text(
        "from proj import app\napp.conf.control_signing_key = 'hunter2'\n"
        "app.conf.broker_transport_options = {'password': 'hunter2'}\n")
    start_worker("-c", "1", "-I", "secret")
    app = project.app()
    app.conf.control_signing_key = "hunter2"
    inspector = app.control.inspect(timeout=2, limit=1)
    text = json.dumps([inspector.stats(), inspector.conf()])
    assert "hunter2" not in text
    assert "********" in text


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_control_is_answered_while_every_child_is_busy(project, start_worker, pool):
    slots = 1 if pool == "solo" else 2
    worker = start_worker("-P", pool, "-c", str(slots), "--prefetch-multiplier", "1")
    app = project.app()
    for _ in range(slots):
        app.send_task("proj.sleeper", (10, "busy"))
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: len(next(iter((inspector.active() or {"": []}).values()))) == slots, 20,
             "every slot running a task")
    started = time.monotonic()
    assert len(app.control.ping(timeout=2, limit=1)) == 1
    assert time.monotonic() - started < 1.0
    active = next(iter(inspector.active().values()))
    assert {a["name"] for a in active} == {"proj.sleeper"}
    assert {"id", "args", "kwargs", "hostname", "time_start", "acknowledged",
            "delivery_info", "worker_pid"} <= set(active[0])
    if pool == "prefork":
        assert {a["worker_pid"] for a in active} == set(
            next(iter(inspector.stats().values()))["pool"]["processes"])
    worker.signal(signal.SIGQUIT)


def test_revoke_before_delivery_and_of_a_scheduled_task(project, three):
    app = project.app()
    app.control.revoke("doomed-id")
    time.sleep(0.3)  # the broadcast reaches the workers before the task is sent
    doomed = app.send_task("proj.mark", ("doomed",), task_id="doomed-id")
    later = app.send_task("proj.mark", ("later",), countdown=30)
    inspector = app.control.inspect(timeout=2, limit=3)
    wait_for(lambda: any((inspector.scheduled() or {}).values()), 10, "scheduled task")
    scheduled = [s for v in inspector.scheduled().values() for s in v]
    assert scheduled[0]["request"]["id"] == later.id and scheduled[0]["eta"]
    later.revoke()
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    with pytest.raises(TaskRevokedError):
        later.get(timeout=3)  # settled at once, not at its ETA
    assert project.ledger("mark") == []
    assert "doomed-id" in next(iter(inspector.revoked().values()))


def test_revoke_with_terminate_stops_only_that_task(project, start_worker):
    start_worker("-c", "2")
    app = project.app()
    victim = app.send_task("proj.sleeper", (30, "victim"))
    other = app.send_task("proj.sleeper", (3, "other"))
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: sum(len(v) for v in (inspector.active() or {}).values()) == 2, 20,
             "both tasks running")
    pids_before = next(iter(inspector.stats().values()))["pool"]["processes"]
    victim.revoke(terminate=True, signal="SIGKILL")
    with pytest.raises(TaskRevokedError):
        victim.get(timeout=10)
    assert other.get(timeout=10) == 3
    wait_for(lambda: len(next(iter(inspector.stats().values()))["pool"]["processes"]) == 2,
             10, "the pool back to two processes")
    assert next(iter(inspector.stats().values()))["pool"]["processes"] != pids_before


def test_group_revoke_sends_one_message_for_all_ids(project, start_worker):
    app = project.app()
    group = app.send_many([Signature("proj.mark", (i,), {}, {"countdown": 30}, app=app)
                           for i in range(3)])
    start_worker("-c", "1")
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: sum(len(v) for v in (inspector.scheduled() or {}).values()) == 3, 10,
             "three scheduled tasks")
    subscription = app.transport.subscribe(CONTROL_CHANNEL)
    group.revoke()
    sent = subscription.get(1.0)
    assert len(sent) == 1 and json.loads(sent[0])["arguments"]["task_id"] == [
        r.id for r in group.results]
    subscription.close()
    wait_for(lambda: all(r.state == states.REVOKED for r in group.results), 10, "REVOKED")


def test_statedb_keeps_revokes_across_a_restart(project, start_worker):
    statedb = str(project.path / "%n.state")
    first = start_worker("-c", "1", "--statedb", statedb, "-n", "keeper@%h")
    app = project.app()
    app.control.revoke("kept-id")
    wait_for(lambda: "kept-id" in next(iter(
        (app.control.inspect(timeout=1, limit=1).revoked() or {"": []}).values())), 10,
        "revoke seen")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert (project.path / "keeper.state").exists()
    second = start_worker("-c", "1", "--statedb", statedb, "-n", "keeper@%h")
    assert "Loaded 1 revoked id(s)" in second.log()
    with pytest.raises(TaskRevokedError):
        app.send_task("proj.mark", ("kept",), task_id="kept-id").get(timeout=10)


def test_mingle_gives_a_new_worker_the_revokes_it_missed(project, start_worker):
    start_worker("-c", "1", name="old")
    app = project.app()
    app.control.revoke("missed-id")
    time.sleep(0.3)
    new = start_worker("-c", "1", name="new", mingle=True)
    assert "1 revoked id(s) merged" in new.log()
    revoked = app.control.inspect(destination=node(new.log_path.stem), timeout=2).revoked()
    assert "missed-id" in revoked[node(new.log_path.stem)]


def test_custom_command_from_the_guide_changes_prefetch(project, three):
    names, _ = three
    app = project.app()
    target = node(names[2])
    replies = app.control.broadcast("increase_prefetch_count", arguments={"n": 3},
                                    destination=[target], reply=True, timeout=2)
    assert replies == [{target: {"ok": "prefetch count incremented"}}]
    stats = app.control.inspect(timeout=2, limit=3).stats()
    assert stats[target]["prefetch_count"] == 5
    assert stats[node(names[0])]["prefetch_count"] == 2


def test_unknown_commands_and_bad_arguments_are_error_replies(project, three):
    app = project.app()
    replies = app.control.broadcast("no_such_command", reply=True, timeout=2, limit=3)
    assert len(replies) == 3
    assert all("unknown command" in next(iter(r.values()))["error"] for r in replies)
    [bad] = app.control.broadcast("pool_grow", {"n": 1, "bogus": 2}, reply=True,
                                  destination=[next(iter(replies[0]))], timeout=2)
    assert "bad arguments" in next(iter(bad.values()))["error"]
    assert len(app.control.ping(timeout=2, limit=3)) == 3  # nobody crashed


def test_malformed_control_messages_do_not_crash_workers(project, three):
    app = project.app()
    for raw in (b"not json", b"[]", b'{"method": 5}', b'{"method": "ping", "arguments": []}'):
        app.transport.broadcast(CONTROL_CHANNEL, raw)
    assert len(app.control.ping(timeout=2, limit=3)) == 3


def test_unimplemented_pool_commands_reply_with_an_error_not_ok(project, three):
    app = project.app()
    for command, arguments in (("autoscale", {"max": 4, "min": 1}),
                               ("pool_restart", {"modules": []})):
        replies = app.control.broadcast(command, arguments, reply=True, timeout=2, limit=3)
        assert len(replies) == 3
        assert all("error" in next(iter(r.values())) for r in replies), replies


def test_add_and_cancel_consumer_and_active_queues(project, three):
    names, _ = three
    app = project.app()
    target = node(names[0])
    [reply] = app.control.add_consumer("extra", reply=True, destination=[target], timeout=2)
    assert reply == {target: {"ok": "add consumer 'extra'"}}
    [again] = app.control.add_consumer("extra", reply=True, destination=[target], timeout=2)
    assert again == {target: {"ok": "already consuming from 'extra'"}}
    result = app.send_task("proj.mark", ("extra",), queue="extra")
    assert result.get(timeout=10) == "extra"
    queues = app.control.inspect(timeout=2, limit=3).active_queues()
    assert sorted(q["name"] for q in queues[target]) == ["celery", "extra"]
    assert [q["name"] for q in queues[node(names[1])]] == ["celery"]
    [cancelled] = app.control.cancel_consumer("extra", reply=True, destination=[target],
                                              timeout=2)
    assert cancelled == {target: {"ok": "no longer consuming from 'extra'"}}
    late = app.send_task("proj.mark", ("late",), queue="extra")
    time.sleep(0.5)
    assert late.state == states.PENDING


def test_remote_shutdown_of_one_destination(project, three):
    names, workers = three
    app = project.app()
    app.control.shutdown(destination=[node(names[1])])
    assert workers[1].wait(20) == 0
    assert workers[0].proc.poll() is None and workers[2].proc.poll() is None
    assert len(app.control.ping(timeout=1)) == 2


def test_forged_shutdown_is_refused_by_a_worker_with_a_key(project, start_worker):
    (project.path / "signed.py").write_text(
        "from proj import app\napp.conf.control_signing_key = 's3cret'\n")
    worker = start_worker("-c", "1", "-I", "signed")
    unsigned = project.app()
    unsigned.control.shutdown()
    forged = project.app()
    forged.conf.control_signing_key = "wrong"
    forged.control.shutdown()
    signed = project.app()
    signed.conf.control_signing_key = "s3cret"
    wait_for(lambda: worker.log().count("Refused a control message") >= 2, 10, "refusals")
    assert worker.proc.poll() is None
    assert "unsigned control message" in worker.log()
    assert "wrong signature" in worker.log()
    assert signed.control.ping(timeout=2) != []
    assert unsigned.control.ping(timeout=0.5) == []
    signed.control.shutdown()
    assert worker.wait(20) == 0


def test_enable_events_makes_task_events_flow(project, start_worker):
    from celeriac.events import EVENT_CHANNEL

    start_worker("-c", "1")
    app = project.app()
    events = app.transport.subscribe(EVENT_CHANNEL)
    app.send_task("proj.add", (1, 1)).get(timeout=10)
    [reply] = app.control.enable_events(reply=True, timeout=2)
    assert next(iter(reply.values())) == {"ok": "task events enabled"}
    app.send_task("proj.add", (2, 2)).get(timeout=10)
    app.control.heartbeat()
    seen: list[str] = []
    wait_for(lambda: seen.extend(json.loads(e)["type"] for e in events.get(0.2)) or
             {"task-received", "task-started", "task-succeeded", "worker-heartbeat"}
             <= set(seen), 10, "events")
    events.close()


class _Events:
    """The events a test hears on the event channel, gathered as it waits."""

    def __init__(self, app) -> None:
        from celeriac.events import EVENT_CHANNEL

        self.subscription = app.transport.subscribe(EVENT_CHANNEL)
        self.seen: list[dict] = []

    def until(self, done, what: str) -> None:
        def gathered() -> bool:
            self.seen.extend(json.loads(e) for e in self.subscription.get(0.2))
            return done()

        wait_for(gathered, 10, what)

    def of_task(self, uuid: str) -> set[str]:
        return {e["type"] for e in self.seen if e.get("uuid") == uuid}

    def beats(self, hostname: str | None = None) -> list[dict]:
        return [e for e in self.seen if e["type"] == "worker-heartbeat"
                and hostname in (None, e["hostname"])]


def test_task_events_flag_and_disable_events(project, start_worker):
    """``-E`` sends task events from the start; after ``disable_events`` a task sends none
    (checked up to a heartbeat asked for after the task's end: one publisher, in order)."""
    app = project.app()
    events = _Events(app)
    try:
        start_worker("-c", "1", "-E")
        first = app.send_task("proj.add", (1, 1))
        assert first.get(timeout=10) == 2
        events.until(lambda: {"task-received", "task-started", "task-succeeded"}
                     <= events.of_task(first.id), "the task events of a -E worker")
        [reply] = app.control.disable_events(reply=True, timeout=2)
        assert next(iter(reply.values())) == {"ok": "task events disabled"}
        second = app.send_task("proj.add", (2, 2))
        assert second.get(timeout=10) == 4
        ended = time.time()  # (the task has ended: its result is in)
        app.control.heartbeat()
        events.until(lambda: any(b["timestamp"] > ended for b in events.beats()),
                     "a heartbeat sent after the task's end")
        assert events.of_task(second.id) == set()
    finally:
        events.subscription.close()


@pytest.mark.parametrize("project", ["sqlite"], indirect=True)
def test_heartbeats_come_unasked_unless_turned_off(project, start_worker):
    """``worker-heartbeat`` every ``worker_heartbeat_interval`` (2 s), and ``worker-online``
    first; a ``--without-heartbeat`` worker sends neither."""
    app = project.app()
    events = _Events(app)
    try:
        start_worker("-c", "1", "--without-heartbeat", name="quiet")
        start_worker("-c", "1", name="beating")
        names = {next(iter(reply)) for reply in app.control.ping(timeout=2)}
        [quiet] = [n for n in names if n.startswith("quiet-")]
        [beating] = [n for n in names if n.startswith("beating-")]
        events.until(lambda: len(events.beats(beating)) >= 2, "two heartbeats")
        first, second = events.beats(beating)[:2]
        assert first["freq"] == 2.0 and second["timestamp"] - first["timestamp"] >= 1.5
        assert "worker-online" in {e["type"] for e in events.seen if e["hostname"] == beating}
        assert [e for e in events.seen if e["hostname"] == quiet] == []
    finally:
        events.subscription.close()


@pytest.mark.parametrize("project", ["sqlite"], indirect=True)
def test_replies_do_not_accumulate(project, start_worker):
    start_worker("-c", "1")
    app = project.app()
    for _ in range(1000):
        assert len(app.control.ping(timeout=2, limit=1)) == 1
    db = sqlite3.connect(project.path / "broker.db")
    leftover = db.execute("SELECT count(*) FROM replies").fetchone()[0]
    db.close()
    assert leftover == 0


def test_query_task_clock_reserved_and_disable_events(project, start_worker):
    start_worker("-c", "1", "--prefetch-multiplier", "4")
    app = project.app()
    running = app.send_task("proj.sleeper", (3, "q"))
    waiting = app.send_task("proj.add", (1, 2))
    inspector = app.control.inspect(timeout=2, limit=1)
    wait_for(lambda: len(next(iter((inspector.reserved() or {"": []}).values()))) == 1, 20,
             "one reserved task")
    [reserved] = next(iter(inspector.reserved().values()))
    assert reserved["id"] == waiting.id and reserved["name"] == "proj.add"
    found = next(iter(inspector.query_task(running.id, waiting.id).values()))
    assert found[running.id][0] == "active" and found[waiting.id][0] == "reserved"
    first = next(iter(inspector.clock().values()))["clock"]
    second = next(iter(inspector.clock().values()))["clock"]
    assert second > first > 0
    [enabled] = app.control.enable_events(reply=True, timeout=2)
    [disabled] = app.control.disable_events(reply=True, timeout=2)
    assert next(iter(enabled.values())) == {"ok": "task events enabled"}
    assert next(iter(disabled.values())) == {"ok": "task events disabled"}
    assert waiting.get(timeout=20) == 3
