"""The transport contract, run against every transport, plus what only SQLite promises."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celeriac import sqlite_util
from celeriac.exceptions import ConfigurationError, TransportError
from celeriac.transports import Transport, open_transport
from celeriac.transports.sqlite import SQLiteTransport
from tests.contract.conftest_helpers import FakeClock
from tests.contract.transport_suite import LEASE, TransportContract, message, numbers

Factory = Callable[..., Transport]


def _factory(url: str) -> Iterator[Factory]:
    made: list[Transport] = []

    def make(clock: Callable[[], float], lease_seconds: float = LEASE) -> Transport:
        transport = open_transport(url, clock=clock, lease_seconds=lease_seconds)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


class TestMemoryTransport(TransportContract):
    @pytest.fixture
    def make_transport(self) -> Iterator[Factory]:
        yield from _factory("memory://")


class TestSQLiteTransport(TransportContract):
    @pytest.fixture
    def make_transport(self, tmp_path: Path) -> Iterator[Factory]:
        yield from _factory(f"sqlite:///{tmp_path / 'broker.db'}")

    # -- what only the SQLite broker promises -----------------------------------------------
    def rows(self, transport: Transport, table: str) -> int:
        assert isinstance(transport, SQLiteTransport)
        with sqlite3.connect(transport.path) as conn:
            count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        conn.close()
        return count

    def test_describe_and_wal(self, transport: Transport, tmp_path: Path) -> None:
        assert transport.describe() == {"transport": "sqlite", "hostname": "localhost",
                                        "path": str(tmp_path / "broker.db")}
        conn = sqlite3.connect(tmp_path / "broker.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()

    def test_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        transport = open_transport("sqlite:///rel.db", clock=time.time)
        transport.publish("q", message(1))
        transport.close()
        assert (tmp_path / "rel.db").exists()

    def test_missing_directory_is_a_clear_error(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope" / "broker.db"
        with pytest.raises(TransportError, match="does not exist") as info:
            open_transport(f"sqlite:///{missing}", clock=time.time)
        assert str(missing) in str(info.value)

    def test_unwritable_directory_is_a_clear_error(self, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        # Permission bits do not stop root, so pretend the check failed.
        monkeypatch.setattr(sqlite_util.os, "access", lambda *args, **kwargs: False)
        with pytest.raises(TransportError, match="not writable") as info:
            open_transport(f"sqlite:///{tmp_path / 'broker.db'}", clock=time.time)
        assert "permissions" in str(info.value)

    def test_memory_url_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match="memory://"):
            open_transport("sqlite:///:memory:", clock=time.time)

    def test_old_broadcasts_are_pruned(self, transport: Transport, clock: FakeClock) -> None:
        transport.broadcast("control", b"one")
        transport.broadcast("control", b"two")
        clock.advance(SQLiteTransport.broadcast_retention + 1)
        transport.broadcast("control", b"three")
        assert self.rows(transport, "broadcasts") == 1

    def test_expired_replies_are_pruned(self, transport: Transport, clock: FakeClock) -> None:
        transport.reply("forgotten", b"x", ttl=5.0)
        clock.advance(6.0)
        transport.reply("other", b"y", ttl=5.0)
        assert self.rows(transport, "replies") == 1
        assert transport.get_replies("other", 0) == [b"y"]
        assert self.rows(transport, "replies") == 0

    def test_connections_are_per_thread(self, transport: Transport) -> None:
        assert isinstance(transport, SQLiteTransport)
        seen: list[Any] = []
        thread = threading.Thread(target=lambda: seen.append(transport._conn()))
        thread.start()
        thread.join()
        assert seen[0] is not transport._conn()
        transport.close()  # closes ours and the ended thread's
        with pytest.raises(sqlite3.ProgrammingError):
            seen[0].execute("SELECT 1")

    def test_fetch_stays_fast_behind_many_delayed_messages(self, transport: Transport) -> None:
        transport.publish_many([("q", message(n), 0) for n in range(5)])
        for n in range(2000):
            transport.publish("q", message(n), delay=3600.0)
        transport.publish("q", message(-1))
        started = time.monotonic()
        for _ in range(50):
            got = transport.fetch("c1", ["q"], 1, 0)
            transport.requeue([d.tag for d in got])
        assert time.monotonic() - started < 2.0
        assert numbers(transport.fetch("c1", ["q"], 10, 0)) == [0, 1, 2, 3, 4, -1]
