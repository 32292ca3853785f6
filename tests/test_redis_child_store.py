"""Results that prefork children store on Redis themselves, without loading redis-py:
the RESP connection (``celeriac.transports.resp``) and the writer
(``celeriac.results.redis_writer``), checked against the Redis result backend."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import ResultBackendError, TransportError
from celeriac.results import make_meta, open_backend, open_child_store
from celeriac.results.redis_writer import ResultWriter
from celeriac.transports import redis_keys as K
from celeriac.transports.redis_url import redis_params
from celeriac.transports.resp import ErrorReply, RespConnection, pack

from .brokers import drop_redis_keys

redis = pytest.importorskip("redis")


@pytest.fixture
def url(redis_server: str) -> Iterator[str]:
    """Database 1 under a key prefix of this test's own (its keys are deleted afterwards)."""
    prefix = f"celeriac-test-{uuid.uuid4().hex[:12]}:"
    yield f"{redis_server.rstrip('/')}/1?key_prefix={prefix}"
    drop_redis_keys(f"{redis_server.rstrip('/')}/1", prefix)


@pytest.fixture
def conn(url: str) -> Iterator[RespConnection]:
    connection = RespConnection(redis_params(url), "celeriac-test")
    yield connection
    connection.close()


def _prefix(url: str) -> str:
    return redis_params(url).key_prefix


def test_commands_are_packed_as_arrays_of_bulk_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    """By hiredis where it is installed, by our own code otherwise (or for an argument
    hiredis does not take): the same bytes, numbers written as ``str`` writes them."""
    import celeriac.transports.resp as module

    commands = [("SET", "k", b"a\r\nb", 5), ("PING",)]
    wire = b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$4\r\na\r\nb\r\n$1\r\n5\r\n*1\r\n$4\r\nPING\r\n"
    assert module.hiredis is not None  # (the redis extra installs it)
    assert pack(commands) == wire
    store = [["EVALSHA", "f" * 40, 1, "k\u00e9", b"{}", 86400, repr(1795356042.8523858), 2.5]]
    by_hiredis = pack(store)
    assert pack([("SET", "k", bytearray(b"v"))]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    monkeypatch.setattr(module, "hiredis", None)
    assert pack(commands) == wire
    assert pack(store) == by_hiredis


def test_every_kind_of_reply_comes_back_in_order(conn: RespConnection, url: str) -> None:
    key, other = _prefix(url) + "a", _prefix(url) + "list"
    replies = conn.call([("SET", key, "1"), ("INCR", key), ("GET", key),
                         ("GET", _prefix(url) + "missing"), ("RPUSH", other, "x", "y"),
                         ("LRANGE", other, 0, -1), ("INCR", other), ("PING",)])
    assert replies[:6] == [b"OK", 2, b"2", None, 2, [b"x", b"y"]]
    assert isinstance(replies[6], ErrorReply) and replies[6].startswith("WRONGTYPE")
    assert replies[7] == b"PONG"  # an error reply does not upset the replies after it


def test_the_connection_selects_the_database_and_names_itself(conn: RespConnection, url: str,
                                                              redis_db1: Any) -> None:
    conn.call([("SET", _prefix(url) + "here", "yes")])
    assert redis_db1.get(_prefix(url) + "here") == b"yes"  # database 1, as the URL says
    names = [c["name"] for c in redis_db1.client_list()]
    assert any(name.startswith("celeriac-test-") for name in names)


def test_a_dropped_connection_raises_once_and_the_next_call_reconnects(
        conn: RespConnection, redis_db1: Any) -> None:
    conn.call([("PING",)])
    mine = [c for c in redis_db1.client_list() if c["name"].startswith("celeriac-test-")]
    redis_db1.execute_command("CLIENT", "KILL", "ID", mine[0]["id"])
    with pytest.raises(TransportError, match="Redis at"):
        conn.call([("PING",)])
    assert conn.call([("PING",)]) == [b"PONG"]


def test_no_server_is_a_transport_error_naming_the_url() -> None:
    params = redis_params("redis://:secret@127.0.0.1:1/0", {"connection_timeout": 1})
    with pytest.raises(TransportError, match=r"redis://:\*\*@127.0.0.1:1/0") as caught:
        RespConnection(params).call([("PING",)])
    assert "secret" not in str(caught.value)


def test_credentials_the_server_refuses_are_an_error_without_the_password(
        redis_server: str) -> None:
    url = redis_server.replace("redis://", "redis://nobody:hunter2@").rstrip("/") + "/0"
    connection = RespConnection(redis_params(url))
    with pytest.raises(TransportError, match="refused the connection set-up") as caught:
        connection.call([("PING",)])
    assert "hunter2" not in str(caught.value)


def _writer(url: str, clock: Any = time.time, expires: float | None = 60.0) -> ResultWriter:
    return ResultWriter(url, clock=clock, expires=expires)


def test_the_writer_stores_what_the_result_backend_stores(url: str, redis_db1: Any) -> None:
    now = 1_800_000_000.0
    backend = open_backend(url, clock=lambda: now, expires=60.0)
    writer = _writer(url, clock=lambda: now)
    try:
        backend.store(make_meta("by-backend", states.SUCCESS, {"n": [1, "ü"]}))
        writer.store_many([make_meta("by-writer", states.SUCCESS, {"n": [1, "ü"]})])
        ours = json.loads(redis_db1.get(K.KeySpace(_prefix(url)).result("by-writer")))
        theirs = json.loads(redis_db1.get(K.KeySpace(_prefix(url)).result("by-backend")))
        assert {**ours, "task_id": "x", "date_done": None} == {
            **theirs, "task_id": "x", "date_done": None}
        assert 59_000 < redis_db1.pttl(K.KeySpace(_prefix(url)).result("by-writer")) <= 60_000
        assert backend.get("by-writer")["result"] == {"n": [1, "ü"]}
    finally:
        writer.close()
        backend.close()


def test_the_writer_never_replaces_a_success(url: str) -> None:
    backend = open_backend(url, clock=time.time)
    writer = _writer(url)
    try:
        backend.store(make_meta("t", states.SUCCESS, 1))
        writer.store_many([make_meta("t", states.FAILURE, {"exc_type": "X"})])
        assert backend.get("t")["status"] == states.SUCCESS
    finally:
        writer.close()
        backend.close()


def test_the_writer_loads_the_script_again_after_a_server_forgot_it(url: str,
                                                                    redis_db1: Any) -> None:
    backend = open_backend(url, clock=time.time)
    writer = _writer(url)
    try:
        writer.store_many([make_meta("first", states.SUCCESS, 1)])
        redis_db1.script_flush()
        writer.store_many([make_meta("second", states.SUCCESS, 2),
                           make_meta("third", states.SUCCESS, 3)])
        assert [backend.get(i)["result"] for i in ("first", "second", "third")] == [1, 2, 3]
    finally:
        writer.close()
        backend.close()


def test_a_writer_that_cannot_reach_redis_raises_a_result_backend_error() -> None:
    writer = ResultWriter("redis://127.0.0.1:1/0", clock=time.time, expires=None,
                          options={"connection_timeout": 1})
    with pytest.raises(ResultBackendError, match="Could not store 1 result"):
        writer.store_many([make_meta("t", states.SUCCESS, 1)])


@pytest.mark.parametrize(("url", "serializer", "writes"), [
    ("redis://127.0.0.1:6379/1", "json", True),
    ("redis+socket:///run/redis.sock", "json", True),
    ("redis://127.0.0.1:6379/1", "pickle", False),  # the store script reads JSON only
    ("rediss://127.0.0.1:6379/1", "json", False),  # no TLS in the small connection
    ("sqlite:///results.db", "json", False),
    ("rpc://", "json", False),
    ("memory://", "json", False),
])
def test_children_store_their_own_results_only_on_plain_redis_with_json(
        url: str, serializer: str, writes: bool) -> None:
    store = open_child_store(url, clock=time.time, expires=None, serializer=serializer)
    assert isinstance(store, ResultWriter) is writes


def test_a_user_and_password_in_the_url_log_the_connection_in(redis_server: str,
                                                              redis_db1: Any) -> None:
    user, password = f"celeriac-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_db1.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*",
                              "+@all")
    try:
        url = redis_server.replace("redis://", f"redis://{user}:{password}@").rstrip("/")
        connection = RespConnection(redis_params(f"{url}/1"))
        try:
            assert connection.call([("ACL", "WHOAMI")]) == [user.encode()]
        finally:
            connection.close()
    finally:
        redis_db1.execute_command("ACL", "DELUSER", user)


def test_a_unix_socket_url_connects_through_the_socket(tmp_path: Any) -> None:
    import shutil
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed; under CI=true that is a failure")
        pytest.skip("redis-server is not installed")
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen([server, "--port", "0", "--unixsocket", str(path), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        writer = ResultWriter(f"redis+socket://{path}?db=2", clock=time.time, expires=None)
        try:
            writer.store_many([make_meta("t", states.SUCCESS, 1)])
        finally:
            writer.close()
        client = redis.Redis(unix_socket_path=str(path), db=2)
        try:
            assert json.loads(client.get("celery-task-meta-t"))["result"] == 1
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
