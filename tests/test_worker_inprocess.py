"""Worker logic with an in-process worker on the memory broker (no processes involved)."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from celeriac import Celeriac, states
from celeriac.exceptions import MaxRetriesExceededError
from celeriac.results import make_meta
from celeriac.worker.worker import Worker, WorkerOptions

from .conftest import wait_for


@pytest.fixture
def app() -> Celeriac:
    return Celeriac("inproc", broker="memory://", environ={})


WORKER_DEFAULTS = {"pool": "threads", "concurrency": 2, "loglevel": "INFO"}


def test_retry_gives_up_after_max_retries(app, run_worker):
    calls = []

    @app.task(bind=True, max_retries=2)
    def stubborn(self):
        calls.append(self.request.retries)
        raise self.retry(countdown=0.01)

    run_worker()
    result = stubborn.delay()
    with pytest.raises(MaxRetriesExceededError, match="max_retries=2"):
        result.get(timeout=10)
    assert calls == [0, 1, 2]


def test_retry_with_exc_raises_it_at_the_end(app, run_worker):
    @app.task(bind=True, max_retries=1, default_retry_delay=0.01)
    def flaky(self):
        raise self.retry(exc=KeyError("gone"))

    run_worker()
    with pytest.raises(KeyError, match="gone"):
        flaky.delay().get(timeout=10)


def test_request_context_and_parent_ids(app, run_worker):
    seen = {}

    @app.task(bind=True)
    def child(self):
        seen["child"] = self.request
        return self.request.parent_id

    @app.task(bind=True)
    def parent(self):
        seen["parent"] = self.request
        return child.delay().id

    run_worker()
    child_id = parent.delay().get(timeout=10)
    parent_id = app.AsyncResult(child_id).get(timeout=10)
    assert parent_id == seen["parent"].id
    assert seen["child"].root_id == seen["parent"].id
    assert seen["parent"].hostname.startswith("celery@")
    assert seen["parent"].delivery_info["routing_key"] == "celery"
    assert seen["parent"].called_directly is False


def test_acks_late_setting_applies_to_tasks_declared_before_it(app, run_worker):
    @app.task
    def quick():
        return 1

    assert quick.acks_late is False
    app.conf.task_acks_late = True
    assert quick.acks_late is True


def test_track_started_stores_started_state(app, run_worker):
    gate = threading.Event()

    @app.task(track_started=True)
    def slow():
        gate.wait(10)
        return "done"

    run_worker()
    result = slow.delay()
    wait_for(lambda: result.state == states.STARTED, 10, "STARTED state")
    gate.set()
    assert result.get(timeout=10) == "done"


def test_higher_priority_runs_first(app, run_worker):
    order = []

    @app.task
    def record(n):
        order.append(n)

    for n in range(5):
        record.apply_async((n,), priority=0)
    record.apply_async(("urgent",), priority=9)
    run_worker(concurrency=1, prefetch_multiplier=1)
    wait_for(lambda: len(order) == 6, 10, "all tasks")
    assert order[0] == "urgent"


def test_ignore_result_stores_nothing(app, run_worker):
    done = threading.Event()

    @app.task(ignore_result=True)
    def fire_and_forget():
        done.set()
        return 42

    run_worker()
    result = fire_and_forget.delay()
    assert done.wait(10)
    time.sleep(0.1)
    assert result.state == states.PENDING


def test_expired_while_waiting_for_a_slot_is_not_run(app, run_worker):
    gate = threading.Event()
    ran = []

    @app.task
    def block():
        gate.wait(10)

    @app.task
    def later():
        ran.append(1)

    run_worker(concurrency=1)
    block.delay()
    result = later.apply_async(expires=0.2)
    time.sleep(0.4)
    gate.set()
    wait_for(lambda: result.state == states.REVOKED, 10, "REVOKED")
    assert ran == []


def test_stop_during_countdown_gives_the_message_back(app, run_worker):
    @app.task
    def eventually():
        return 1

    worker = run_worker()
    eventually.apply_async(countdown=30)
    wait_for(lambda: len(worker.state.scheduled) == 1, 10, "the task to be scheduled")
    assert app.transport.queue_size("celery") == 0  # leased to the worker
    worker.stop()
    wait_for(lambda: app.transport.queue_size("celery") == 1, 10, "the message to come back")


def test_async_bound_task_sees_its_request(app, run_worker):
    import asyncio

    @app.task(bind=True)
    async def whoami(self):
        await asyncio.sleep(0.01)
        return self.request.id

    run_worker()
    result = whoami.delay()
    assert result.get(timeout=10) == result.id


def test_worker_deletes_expired_results(tmp_path, run_worker):
    app = Celeriac("cleanup", broker="memory://", backend=f"sqlite:///{tmp_path}/r.db",
                   environ={}, result_expires=0.2, result_cleanup_interval=0.3)
    app.backend.store(make_meta("old", states.SUCCESS, 1))
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 1

    worker = Worker(app, WorkerOptions(pool="threads", concurrency=1))
    thread = threading.Thread(target=worker.run, kwargs={"install_signals": False},
                              daemon=True)
    thread.start()
    try:
        wait_for(lambda: db.execute("SELECT count(*) FROM results").fetchone()[0] == 0, 10,
                 "the expired result to be deleted")
    finally:
        worker.stop()
        thread.join(10)
        db.close()


def test_a_bad_cleanup_interval_is_a_clear_start_up_error():
    from celeriac.exceptions import ConfigurationError

    app = Celeriac("bad", broker="memory://", environ={}, result_cleanup_interval="hourly")
    with pytest.raises(ConfigurationError, match="result_cleanup_interval must be a number"):
        Worker(app, WorkerOptions(pool="solo")).run(install_signals=False)


def test_results_are_stored_while_a_fetch_is_blocked(app, run_worker, monkeypatch):
    """Settling has a thread of its own: a finished task's result (handed over by a prefork
    child, stored by the worker) does not wait for the I/O thread's fetch, even one that
    nothing wakes."""
    transport = app.transport
    fetch, wake = transport.fetch, transport.wake
    deaf = threading.Event()
    deaf.set()

    def long_fetch(consumer, queues, limit, timeout):
        return fetch(consumer, queues, limit, 60.0 if deaf.is_set() else timeout)

    def maybe_wake():
        if not deaf.is_set():
            wake()

    monkeypatch.setattr(transport, "fetch", long_fetch)
    monkeypatch.setattr(transport, "wake", maybe_wake)

    @app.task
    def add(x, y):
        return x + y

    run_worker(pool="prefork", concurrency=1)
    try:
        assert add.delay(2, 3).get(timeout=10) == 5
        assert add.delay(4, 5).get(timeout=10) == 9
    finally:
        deaf.clear()
        wake()  # let the worker's blocked fetch end so it can stop


def test_a_retired_child_is_replaced_while_the_fetch_waits(app, run_worker, monkeypatch):
    """Forks run on the I/O thread, which a fetch may hold for its whole poll: the pool
    wakes the fetch so a child retired by --max-tasks-per-child is replaced at once."""
    fetch = app.transport.fetch
    monkeypatch.setattr(app.transport, "fetch",
                        lambda consumer, queues, limit, timeout: fetch(consumer, queues,
                                                                       limit, 60.0))

    @app.task
    def pid():
        return os.getpid()

    worker = run_worker(pool="prefork", concurrency=1, max_tasks_per_child=1)
    first = pid.delay().get(timeout=10)
    wait_for(lambda: worker.pool.pids and worker.pool.pids != [first], 10,
             "a replacement for the retired child")
    assert pid.delay().get(timeout=10) != first


def test_an_early_ack_goes_out_with_the_next_fetch(app, run_worker, monkeypatch):
    """A task acked on receipt is acked by the I/O thread just before its next fetch, so
    the settle thread is free to store the task's result at once; an ``acks_late`` task is
    acked on the settle thread, after its result is stored."""
    transport = app.transport
    calls: list[tuple[str, str, tuple[str, ...]]] = []
    ack, fetch = transport.ack, transport.fetch

    def recording_ack(tags):
        calls.append(("ack", threading.current_thread().name, tuple(tags)))
        return ack(tags)

    def recording_fetch(*args):
        calls.append(("fetch", threading.current_thread().name, ()))
        return fetch(*args)

    monkeypatch.setattr(transport, "ack", recording_ack)
    monkeypatch.setattr(transport, "fetch", recording_fetch)

    @app.task
    def early():
        return "early"

    @app.task(acks_late=True)
    def late():
        return "late"

    run_worker(pool="threads", concurrency=1)
    assert early.delay().get(timeout=10) == "early"
    assert late.delay().get(timeout=10) == "late"
    wait_for(lambda: sum(1 for c in calls if c[0] == "ack") >= 2, 10, "both acks")
    acks = [(i, c) for i, c in enumerate(calls) if c[0] == "ack"]
    (first_i, first), (_, second) = acks[:2]
    fetcher = next(c[1] for c in calls if c[0] == "fetch")
    assert first[1] == fetcher and calls[first_i + 1][0] == "fetch"
    assert second[1].startswith("celeriac-settle")


def test_what_the_transport_can_do_at_once_skips_the_io_thread(app, run_worker, monkeypatch):
    """A transport that can ack and hand out deliveries without waiting (AMQP on its own
    consuming connection) is asked first, on the worker's loop, with the early acks."""
    transport = app.transport
    calls: list[tuple[int, int]] = []

    def fetch_ready(acks, consumer, queues, limit):
        transport.ack(acks)
        got = transport.fetch(consumer, queues, limit, 0)
        calls.append((len(acks), len(got)))
        return got

    monkeypatch.setattr(transport, "fetch_ready", fetch_ready)

    @app.task
    def add(x):
        return x + 1

    results = [add.delay(i) for i in range(20)]
    run_worker(pool="threads", concurrency=2)
    assert [r.get(timeout=10) for r in results] == list(range(1, 21))
    assert sum(got for _, got in calls) == 20  # every task came this way
    assert sum(acks for acks, _ in calls) > 0  # with early acks (others go when no room)


def test_a_result_is_not_held_for_the_batch_window_when_work_runs_out(app, run_worker,
                                                                      monkeypatch):
    """Results are batched while every slot is busy; when the last queued task ends the
    batch goes out at once instead of waiting for the window (60 s here)."""
    from celeriac.worker import consumer

    monkeypatch.setattr(consumer, "_FLUSH_WAIT", 60.0)

    @app.task
    def double(x):
        return 2 * x

    first, second = double.delay(1), double.delay(2)  # fetched together, run one by one
    run_worker(pool="prefork", concurrency=1)  # (its children hand results to the worker)
    assert first.get(timeout=10) == 2
    assert second.get(timeout=10) == 4


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_pools_hand_results_to_the_worker_to_store_in_batches(app, run_worker, monkeypatch,
                                                              pool):
    """Results of every pool reach the store from the worker's settle thread (in batches,
    with the acks), not one store call per task from the thread that ran it."""
    backend = app.backend
    where: list[str] = []
    store, store_many = backend.store, backend.store_many

    def recording_store(meta, reply_to=None):
        where.append(threading.current_thread().name)
        return store(meta, reply_to)

    def recording_store_many(metas, reply_to=None):
        where.append(threading.current_thread().name)
        return store_many(metas, reply_to)

    monkeypatch.setattr(backend, "store", recording_store)
    monkeypatch.setattr(backend, "store_many", recording_store_many)

    @app.task
    def double(x):
        return 2 * x

    @app.task
    async def triple(x):
        return 3 * x

    run_worker(pool=pool, concurrency=4)
    results = [double.delay(n) for n in range(10)] + [triple.delay(n) for n in range(10)]
    assert [r.get(timeout=10) for r in results] == ([2 * n for n in range(10)]
                                                    + [3 * n for n in range(10)])
    assert where and all(name.startswith("celeriac-settle") for name in where), where
