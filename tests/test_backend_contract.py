"""The result-backend contract, run against every backend, plus what only SQLite promises."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celeriac import sqlite_util, states
from celeriac.exceptions import ResultBackendError
from celeriac.results import ResultBackend, make_meta, open_backend
from tests.contract.backend_suite import BackendContract
from tests.contract.conftest_helpers import FakeClock

Factory = Callable[..., ResultBackend]


def _factory(url: str) -> Iterator[Factory]:
    made: list[ResultBackend] = []

    def make(clock: Callable[[], float], expires: float | None = 3600.0) -> ResultBackend:
        backend = open_backend(url, clock=clock, expires=expires)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def make_backend(self) -> Iterator[Factory]:
        yield from _factory("memory://")


class TestSQLiteBackend(BackendContract):
    @pytest.fixture
    def make_backend(self, tmp_path: Path) -> Iterator[Factory]:
        yield from _factory(f"sqlite:///{tmp_path / 'results.db'}")

    def test_two_handles_share_the_file(self, make_backend: Factory, clock: FakeClock) -> None:
        writer, reader = make_backend(clock=clock), make_backend(clock=clock)
        meta = make_meta("t1", states.SUCCESS, result=[1, 2])
        writer.store(meta)
        assert reader.get("t1") == meta
        assert reader.wait("t1", 0) == meta

    def test_missing_directory_is_a_clear_error(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope" / "results.db"
        with pytest.raises(ResultBackendError, match="does not exist") as info:
            open_backend(f"sqlite:///{missing}", clock=time.time)
        assert str(missing) in str(info.value)

    def test_unwritable_directory_is_a_clear_error(self, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        # Permission bits do not stop root, so pretend the check failed.
        monkeypatch.setattr(sqlite_util.os, "access", lambda *args, **kwargs: False)
        with pytest.raises(ResultBackendError, match="not writable"):
            open_backend(f"sqlite:///{tmp_path / 'results.db'}", clock=time.time)
