"""What crosses a prefork pool's sockets: Job and Outcome as plain tuples, in frames."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from celeriac.pools.prefork import _frame, _frames, _runtime_average
from celeriac.worker.execute import Job, Outcome

JOB = Job(7, "tid", "proj.add", b"[[1, 2], {}, {}]", "application/json", "utf-8",
          {"id": "tid", "retries": 1}, {"routing_key": "celery"}, "reply", 10.0, 5.0)
OUTCOME = Outcome(7, "tid", "SUCCESS", 0.25, "3", 1234, None, False,
                  ({"task_id": "tid", "status": "SUCCESS", "result": 3},))


def test_tuples_hold_every_field_in_order():
    for obj in (JOB, OUTCOME):
        fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        assert list(obj.to_tuple()) == fields, "a field is missing from to_tuple()"
        assert type(obj)(*obj.to_tuple()) == obj


def test_pickling_goes_through_the_tuple():
    for obj in (JOB, OUTCOME):
        cls, args = obj.__reduce__()
        assert cls is type(obj) and args == obj.to_tuple()
        copy = pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        assert copy == obj and type(copy) is type(obj)


def test_frames_split_anywhere_come_back_whole():
    stream = _frame([JOB.to_tuple()]) + _frame((False, [OUTCOME.to_tuple()] * 3))
    for cut in range(len(stream) + 1):
        first, rest = _frames(stream[:cut])
        second, left = _frames(rest + stream[cut:])
        assert first + second == [[JOB.to_tuple()], (False, [OUTCOME.to_tuple()] * 3)]
        assert left == b""


def test_runtime_average_takes_a_slow_run_at_once_and_forgets_it_gradually():
    averages: dict[str, float] = {}
    _runtime_average(averages, "t", 0.0001)
    assert averages["t"] == 0.0001
    _runtime_average(averages, "t", 2.0)
    assert averages["t"] == 2.0  # one slow run: no longer short
    for _ in range(40):
        _runtime_average(averages, "t", 0.0001)
    assert averages["t"] < 0.001  # short again after a run of fast ones


def test_a_reader_fed_in_pieces_gives_every_frame_once():
    from celeriac.pools.prefork import _Reader

    big = (False, [Outcome(1, "t", "SUCCESS", 0.0, "x" * 300_000).to_tuple()])
    stream = _frame([JOB.to_tuple()]) + _frame(big) + _frame([JOB.to_tuple()] * 2)
    for piece in (1, 7, 4096, 65536, len(stream)):
        reader, got = _Reader(), []
        for start in range(0, len(stream), piece):
            got += reader.feed(stream[start:start + piece])
        assert got == [[JOB.to_tuple()], big, [JOB.to_tuple()] * 2]


class _Store:
    """A result store that records batches (or fails, to test the fallback)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batches: list[tuple[list[dict], str | None]] = []

    def store_many(self, metas, reply_to=None):
        if self.fail:
            raise ConnectionError("result store is down")
        self.batches.append((list(metas), reply_to))


@pytest.fixture
def channel_pair():
    """A factory: a child's channel (with the given store), the parent's socket, a reader."""
    import socket

    from celeriac.pools.prefork import _Channel, _Reader

    made: list[socket.socket] = []

    def make(store):
        parent, child = socket.socketpair()
        made.extend((parent, child))
        return _Channel(child, store), parent, _Reader()

    yield make
    for sock in made:
        sock.close()


def _finished(channel, job_id, reply_to):
    meta = {"task_id": f"t{job_id}", "status": "SUCCESS", "result": job_id}
    job = dataclasses.replace(JOB, job_id=job_id, task_id=f"t{job_id}", reply_to=reply_to,
                              time_limit=None, soft_time_limit=None)
    outcome = Outcome(job_id, f"t{job_id}", "SUCCESS", 0.0, "", 1, results=(meta,))
    channel.finished(job, outcome, False)
    return meta


def test_a_child_with_a_store_stores_results_before_it_reports_the_outcomes(channel_pair):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    meta = _finished(channel, 1, "r1")  # nothing queued: sent at once
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert store.batches == [([meta], "r1")]
    assert [Outcome(*fields).results for fields in outcomes] == [()]  # nothing left to store


def test_held_outcomes_are_stored_in_one_batch_per_reply_to(channel_pair):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    channel.held, channel.replies = [], []
    metas = []
    for job_id, reply_to in ((1, "a"), (2, "b"), (3, "a")):  # held: sent together
        metas.append({"task_id": f"t{job_id}", "status": "SUCCESS", "result": job_id})
        channel.held.append(Outcome(job_id, f"t{job_id}", "SUCCESS", 0.0,
                                    results=(metas[-1],)).to_tuple())
        channel.replies.append(reply_to)
    channel.send_held(False)
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert sorted(store.batches, key=lambda b: str(b[1])) == [
        ([metas[0], metas[2]], "a"), ([metas[1]], "b")]
    assert all(fields[8] == () for fields in outcomes) and len(outcomes) == 3


def test_a_child_that_cannot_store_hands_the_results_to_the_worker(channel_pair, caplog):
    channel, parent, reader = channel_pair(_Store(fail=True))
    meta = _finished(channel, 1, None)
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert Outcome(*outcomes[0]).results == (meta,)
    assert "could not store 1 result(s), the worker will" in caplog.text


def test_outcomes_sent_from_a_signal_handler_carry_their_results(channel_pair):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    meta = {"task_id": "t1", "status": "SUCCESS", "result": 1}
    channel.held = [Outcome(1, "t1", "SUCCESS", 0.0, results=(meta,)).to_tuple()]
    channel.replies = [None]
    channel.before_exit()  # (SIGTERM or the hold deadline: the store may be mid-call)
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert store.batches == [] and Outcome(*outcomes[0]).results == (meta,)


# -- the timer for held outcomes --------------------------------------------------------------
@pytest.fixture
def timer_calls(monkeypatch):
    """What the channel does with the interval timer (never really armed here)."""
    import signal

    calls: list[float] = []
    monkeypatch.setattr(signal, "setitimer", lambda which, seconds: calls.append(seconds))
    return calls


def _short_jobs(channel, count):
    """Queue ``count`` jobs of a task type this child knows as short."""
    short = dataclasses.replace(JOB, time_limit=None, soft_time_limit=None)
    channel.runtimes[short.name] = 0.0
    channel.queue.extend(short.to_tuple() for _ in range(count))


def test_one_timer_covers_a_batch_of_held_outcomes_and_goes_with_it(channel_pair, timer_calls):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    _short_jobs(channel, 5)
    for job_id in (1, 2, 3):
        channel.starting()
        _finished(channel, job_id, None)
        channel.queue.popleft()
    assert len(channel.held) == 3
    assert len(timer_calls) == 1 and 0 < timer_calls[0] <= 0.002  # armed once, not per job
    channel.queue.clear()
    _finished(channel, 4, None)  # the queue ran dry: all four go, and so does the timer
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert len(outcomes) == 4 and timer_calls[-1] == 0 and not channel.alarm


def test_held_outcomes_whose_time_ran_out_between_jobs_go_before_the_next_one(
        channel_pair, timer_calls):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    _short_jobs(channel, 5)
    channel.starting()
    meta = _finished(channel, 1, "r")
    channel.hold_expired()  # the alarm, between two jobs: nothing is sent from the handler
    assert channel.held and store.batches == []
    channel.starting()  # sent (and stored) before the next job runs
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert store.batches == [([meta], "r")] and Outcome(*outcomes[0]).results == ()
    assert not channel.held and channel.in_job


def test_held_outcomes_whose_time_ran_out_in_a_long_job_go_at_once(channel_pair, timer_calls):
    store = _Store()
    channel, parent, reader = channel_pair(store)
    _short_jobs(channel, 5)
    channel.starting()
    meta = _finished(channel, 1, "r")
    channel.starting()
    channel.hold_expired()  # the alarm, inside a job: sent now, the worker stores the result
    (_, outcomes), = reader.feed(parent.recv(1 << 16))
    assert store.batches == [] and Outcome(*outcomes[0]).results == (meta,)
