"""What crosses a prefork pool's sockets: Job and Outcome as plain tuples, in frames."""

from __future__ import annotations

import dataclasses
import pickle

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
