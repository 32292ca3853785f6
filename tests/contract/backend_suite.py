"""The result-backend contract as tests: subclass :class:`BackendContract` once per backend.

A subclass provides one fixture, ``make_backend``: a factory
``make(clock, expires=3600.0) -> ResultBackend`` on a fresh, empty store for this test, which
closes what it opened when the test ends. A backend whose store expires keys by itself (and
so returns 0 from ``cleanup``) sets ``native_expiry = True``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from celeriac import states
from celeriac.results import ResultBackend, make_meta

from .conftest_helpers import FakeClock
from .transport_suite import in_thread

__all__ = ["BackendContract"]

MakeBackend = Callable[..., ResultBackend]


class BackendContract:
    """Behaviour every :class:`~celeriac.results.ResultBackend` shows."""

    native_expiry = False

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def backend(self, make_backend: MakeBackend, clock: FakeClock) -> ResultBackend:
        return make_backend(clock=clock, expires=3600.0)

    @pytest.fixture
    def live(self, make_backend: MakeBackend) -> ResultBackend:
        """A backend on the wall clock, for tests that wait in real time."""
        return make_backend(clock=time.time, expires=3600.0)

    def test_store_and_get(self, backend: ResultBackend) -> None:
        meta = make_meta("t1", states.SUCCESS, result={"sum": [1, 2.5, "ü", None]},
                         children=[["t2", None]], name="tests.add")
        backend.store(meta)
        assert backend.get("t1") == meta
        assert backend.get("unknown") is None

    def test_failure_meta_round_trips(self, backend: ResultBackend) -> None:
        meta = make_meta("t1", states.FAILURE,
                         result={"exc_type": "ValueError", "exc_message": ["bad"],
                                 "exc_module": "builtins"},
                         traceback="Traceback (most recent call last):\n  ...\nValueError: bad")
        backend.store(meta)
        assert backend.get("t1") == meta

    def test_later_states_replace_earlier_ones(self, backend: ResultBackend) -> None:
        backend.store(make_meta("t1", states.STARTED))
        backend.store(make_meta("t1", states.RETRY, result={"exc_type": "Retry"}))
        backend.store(make_meta("t1", states.FAILURE, result={"exc_type": "E"}))
        backend.store(make_meta("t1", states.SUCCESS, result=3))
        got = backend.get("t1")
        assert got is not None and got["status"] == states.SUCCESS and got["result"] == 3

    def test_success_is_never_overwritten(self, backend: ResultBackend) -> None:
        backend.store(make_meta("t1", states.SUCCESS, result=1))
        backend.store(make_meta("t1", states.STARTED))
        backend.store(make_meta("t1", states.FAILURE, result={"exc_type": "E"}))
        backend.store(make_meta("t1", states.SUCCESS, result=2))
        got = backend.get("t1")
        assert got is not None and got["status"] == states.SUCCESS and got["result"] == 1

    def test_store_many(self, backend: ResultBackend) -> None:
        backend.store(make_meta("t0", states.SUCCESS, result="kept"))
        metas = [make_meta(f"t{i}", states.SUCCESS, result=i) for i in range(50)]
        backend.store_many(metas)
        backend.store_many([])
        for i in range(1, 50):
            assert backend.get(f"t{i}") == metas[i]
        got = backend.get("t0")
        assert got is not None and got["result"] == "kept"

    def test_wait_returns_at_once_when_ready(self, backend: ResultBackend) -> None:
        meta = make_meta("t1", states.REVOKED)
        backend.store(meta)
        assert backend.wait("t1", 0) == meta
        assert backend.wait("t1", None) == meta

    def test_wait_returns_when_another_thread_stores(self, live: ResultBackend) -> None:
        live.store(make_meta("t1", states.STARTED))
        thread, out = in_thread(lambda: live.wait("t1", 10.0))
        live.store(make_meta("t1", states.STARTED, progress=50))
        final = make_meta("t1", states.SUCCESS, result=42)
        live.store(final)
        thread.join(8.0)
        assert not thread.is_alive()
        assert out == [final]

    def test_wait_forever_returns_when_stored(self, live: ResultBackend) -> None:
        thread, out = in_thread(lambda: live.wait("t1", None))
        final = make_meta("t1", states.FAILURE, result={"exc_type": "E"})
        live.store(final)
        thread.join(8.0)
        assert not thread.is_alive()
        assert out == [final]

    def test_wait_times_out_with_none(self, live: ResultBackend) -> None:
        live.store(make_meta("t1", states.STARTED))
        started = time.monotonic()
        assert live.wait("t1", 0.2) is None
        assert live.wait("missing", 0) is None
        assert 0.1 < time.monotonic() - started < 5.0

    def test_results_expire(self, make_backend: MakeBackend, clock: FakeClock) -> None:
        backend = make_backend(clock=clock, expires=100.0)
        backend.store(make_meta("t1", states.SUCCESS, result=1))
        clock.advance(99.0)
        assert backend.get("t1") is not None
        clock.advance(2.0)
        assert backend.get("t1") is None
        assert backend.wait("t1", 0) is None
        backend.store(make_meta("t1", states.SUCCESS, result=2))  # an expired SUCCESS is gone
        got = backend.get("t1")
        assert got is not None and got["result"] == 2

    def test_no_expiry_when_expires_is_none(self, make_backend: MakeBackend,
                                            clock: FakeClock) -> None:
        backend = make_backend(clock=clock, expires=None)
        backend.store(make_meta("t1", states.SUCCESS, result=1))
        clock.advance(10 * 365 * 86400.0)
        assert backend.get("t1") is not None
        assert backend.cleanup() == 0

    def test_forget(self, backend: ResultBackend) -> None:
        backend.store(make_meta("t1", states.SUCCESS, result=1))
        backend.forget("t1")
        backend.forget("never-stored")
        assert backend.get("t1") is None
        backend.store(make_meta("t1", states.FAILURE, result={"exc_type": "E"}))
        got = backend.get("t1")
        assert got is not None and got["status"] == states.FAILURE

    def test_cleanup_deletes_expired(self, make_backend: MakeBackend, clock: FakeClock) -> None:
        backend = make_backend(clock=clock, expires=10.0)
        for i in range(3):
            backend.store(make_meta(f"old{i}", states.SUCCESS, result=i))
        clock.advance(5.0)
        backend.store(make_meta("new", states.SUCCESS, result="n"))
        clock.advance(6.0)
        removed = backend.cleanup()
        if not self.native_expiry:
            assert removed == 3
            assert backend.cleanup() == 0
        assert all(backend.get(f"old{i}") is None for i in range(3))
        assert backend.get("new") is not None
