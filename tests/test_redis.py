"""The transport and result-backend contracts on Redis, plus what only the Redis broker promises.

Every test works under its own key prefix (``?key_prefix=`` in the URL) and deletes the keys
it made, so tests share the server with each other and with anything else running on it.
"""

from __future__ import annotations

import json
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import ConfigurationError, ResultBackendError, TransportError
from celeriac.protocol import Message, build_task_message
from celeriac.results import ResultBackend, make_meta, open_backend
from celeriac.transports import Delivery, Transport, open_transport
from celeriac.transports import redis_keys as K
from celeriac.transports.redis import RedisTransport
from celeriac.transports.redis_conn import redis_params
from tests.conftest import ping_and_add
from tests.contract.backend_suite import BackendContract
from tests.contract.conftest_helpers import FakeClock, eventually
from tests.contract.transport_suite import LEASE, TransportContract, in_thread, message, numbers

redis = pytest.importorskip("redis")


def _url(server: str, prefix: str, db: int = 0) -> str:
    return f"{server.rstrip('/')}/{db}?key_prefix={prefix}"


def _keys(server: str, prefix: str) -> list[bytes]:
    client = redis.Redis.from_url(server)
    try:
        return list(client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()


def _drop(server: str, prefix: str) -> None:
    client = redis.Redis.from_url(server)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def prefix(redis_server: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards, in databases 0 and
    1 (the result stores' tests use 1)."""
    name = f"celeriac-test-{uuid.uuid4().hex[:12]}:"
    yield name
    for db in (0, 1):
        _drop(f"{redis_server.rstrip('/')}/{db}", name)


@pytest.fixture
def raw(redis_server: str) -> Iterator[Any]:
    """A plain redis-py client on the test server, for looking behind the transport's back."""
    client = redis.Redis.from_url(redis_server)
    yield client
    client.close()


Factory = Callable[..., Transport]


class TestRedisTransport(TransportContract):
    @pytest.fixture
    def make_transport(self, redis_server: str, prefix: str) -> Iterator[Factory]:
        made: list[Transport] = []

        def make(clock: Callable[[], float], lease_seconds: float = LEASE,
                 **options: Any) -> Transport:
            transport = open_transport(_url(redis_server, prefix), clock=clock,
                                       lease_seconds=lease_seconds, options=options)
            made.append(transport)
            return transport

        yield make
        for transport in made:
            transport.close()


class TestRedisBackend(BackendContract):
    native_expiry = True

    @pytest.fixture
    def make_backend(self, redis_server: str, prefix: str) -> Iterator[Callable[..., Any]]:
        made: list[ResultBackend] = []

        def make(clock: Callable[[], float], expires: float | None = 3600.0,
                 **kwargs: Any) -> ResultBackend:
            backend = open_backend(_url(redis_server, prefix, db=1), clock=clock,
                                   expires=expires, **kwargs)
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()
        _drop(redis_server.rstrip("/") + "/1", prefix)


# -- what only the Redis broker promises ---------------------------------------------------------
@pytest.fixture
def url(redis_server: str, prefix: str) -> str:
    return _url(redis_server, prefix)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(url: str, clock: FakeClock) -> Iterator[RedisTransport]:
    transport = open_transport(url, clock=clock, lease_seconds=LEASE)
    assert isinstance(transport, RedisTransport)
    yield transport
    transport.close()


@pytest.fixture
def make_broker(url: str) -> Iterator[Callable[..., RedisTransport]]:
    made: list[Transport] = []

    def make(clock: Callable[[], float], lease_seconds: float = LEASE) -> RedisTransport:
        transport = open_transport(url, clock=clock, lease_seconds=lease_seconds)
        assert isinstance(transport, RedisTransport)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


@pytest.fixture
def make_backend_(redis_server: str, prefix: str) -> Iterator[Callable[..., ResultBackend]]:
    made: list[ResultBackend] = []

    def make(clock: Callable[[], float], **kwargs: Any) -> ResultBackend:
        backend = open_backend(_url(redis_server, prefix, db=1), clock=clock, **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
    _drop(f"{redis_server.rstrip('/')}/1", prefix)


def _pending(raw: Any, transport: RedisTransport, queue: str, band: int = 0) -> list[Any]:
    return list(raw.xpending_range(transport.keys.queue(queue).streams[band], K.GROUP,
                                   "-", "+", 100))


def test_priorities_go_to_four_bands_read_highest_first(broker: RedisTransport,
                                                        raw: Any) -> None:
    for priority in range(10):
        broker.publish("q", message(priority), priority=priority)
    broker.publish("q", message(99), priority=42)  # clamped to 9
    streams = broker.keys.queue("q").streams
    assert [raw.xlen(s) for s in streams] == [3, 3, 2, 3]
    assert [K.band_of(p) for p in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    got = broker.fetch("c1", ["q"], 3, 0)
    assert numbers(got) == [9, 99, 8] and [d.priority for d in got] == [9, 9, 8]
    assert numbers(broker.fetch("c1", ["q"], 20, 0)) == [7, 6, 5, 4, 3, 2, 1, 0]


def test_keys_of_a_queue_share_a_hash_tag(broker: RedisTransport, prefix: str) -> None:
    keys = broker.keys.queue("images")
    assert all(key.startswith(f"{prefix}{{celeriac:images}}:") for key in keys.all)
    assert broker.keys.reply("r").startswith(prefix)
    assert broker.keys.broadcast("c").startswith(prefix)


def test_delayed_message_moves_to_its_stream_when_due(broker: RedisTransport, raw: Any,
                                                      clock: FakeClock) -> None:
    broker.publish("q", message(1), priority=9, delay=10.0)
    keys = broker.keys.queue("q")
    assert raw.zcard(keys.delayed) == 1 and raw.xlen(keys.streams[3]) == 0
    assert broker.fetch("c1", ["q"], 5, 0) == []
    clock.advance(10.5)
    [due] = broker.fetch("c1", ["q"], 5, 0)
    assert due.priority == 9 and due.message == message(1)
    assert raw.zcard(keys.delayed) == 0 and raw.xlen(keys.streams[3]) == 1
    broker.ack([due.tag])
    assert raw.xlen(keys.streams[3]) == 0  # acked entries are deleted, not kept


def test_a_long_countdown_is_never_duplicated(make_broker: Callable[..., RedisTransport],
                                              clock: FakeClock, raw: Any) -> None:
    producer, first, second = (make_broker(clock) for _ in range(3))
    producer.publish("q", message(1), delay=5 * LEASE)
    seen: list[Delivery] = []
    for _ in range(30):  # 10 leases of time, both consumers asking all along
        clock.advance(LEASE / 3)
        for consumer, handle in (("c1", first), ("c2", second)):
            seen += handle.fetch(consumer, ["q"], 5, 0)
            handle.renew(consumer)
    assert len(seen) == 1 and seen[0].deliveries == 1
    assert raw.xlen(producer.keys.queue("q").streams[0]) == 1


def test_a_live_consumer_that_renews_is_never_overtaken(broker: RedisTransport, raw: Any,
                                                        clock: FakeClock) -> None:
    broker.publish("q", message(1))
    [held] = broker.fetch("c1", ["q"], 1, 0)
    for _ in range(10):
        clock.advance(LEASE * 0.6)
        assert broker.renew("c1") == 1
        assert broker.fetch("c2", ["q"], 1, 0) == []
    [entry] = _pending(raw, broker, "q")
    assert entry["consumer"] == b"c1" and entry["times_delivered"] == 1
    broker.ack([held.tag])


def test_a_dead_consumers_message_is_claimed_after_the_lease(broker: RedisTransport, raw: Any,
                                                             clock: FakeClock) -> None:
    broker.publish("q", message(1))
    broker.fetch("dead", ["q"], 1, 0)
    clock.advance(LEASE - 1)
    assert broker.fetch("alive", ["q"], 1, 0) == []
    clock.advance(2)
    [again] = broker.fetch("alive", ["q"], 1, 0)
    assert again.deliveries == 2 and again.redelivered
    [entry] = _pending(raw, broker, "q")
    assert entry["consumer"] == b"alive" and entry["times_delivered"] == 2


def test_a_delivery_whose_reply_was_lost_is_not_renewed(broker: RedisTransport,
                                                        clock: FakeClock) -> None:
    """A fetch the server ran but whose reply never arrived (the connection dropped)."""
    broker.publish_many([("q", message(1), 0), ("q", message(2), 0)])
    [seen] = broker.fetch("c1", ["q"], 1, 0)
    keys = broker.keys.queue("q").all
    broker._eval(K.FETCH, keys, [K.GROUP, "c1", 1, repr(clock()), repr(clock() + LEASE), "0"])
    for _ in range(3):  # c1's heartbeat goes on; what it never saw is not kept alive
        clock.advance(LEASE / 2)
        assert broker.renew("c1") == 1
    [lost] = broker.fetch("c2", ["q"], 5, 0)
    assert numbers([seen, lost]) == [1, 2] and lost.deliveries == 2


def test_a_stale_tag_leaves_the_new_owner_alone(broker: RedisTransport, raw: Any,
                                                clock: FakeClock) -> None:
    broker.publish("q", message(1))
    [old] = broker.fetch("c1", ["q"], 1, 0)
    clock.advance(LEASE + 1)
    [new] = broker.fetch("c2", ["q"], 1, 0)
    leases = broker.keys.queue("q").leases
    score = raw.zscore(leases, new.tag.split(":", 2)[0] + ":" + new.tag.split(":")[1])
    broker.requeue([old.tag])
    broker.ack([old.tag])
    broker.dead_letter(old, "late")
    [entry] = _pending(raw, broker, "q")
    assert entry["consumer"] == b"c2" and entry["times_delivered"] == 2
    assert raw.zscore(leases, f"0:{entry['message_id'].decode()}") == score
    assert raw.exists(broker.keys.queue("q").dead) == 0
    with pytest.raises(TransportError, match="Not a Redis delivery tag"):
        broker.ack(["7.3"])


def test_requeue_hands_the_message_to_anyone_at_once(broker: RedisTransport, raw: Any) -> None:
    broker.publish("q", message(1))
    [got] = broker.fetch("c1", ["q"], 1, 0)
    broker.requeue([got.tag])
    assert broker.renew("c1") == 0  # no longer ours, so a heartbeat cannot take it back
    [entry] = _pending(raw, broker, "q")
    assert entry["consumer"] == K.REQUEUED_CONSUMER.encode()
    [again] = broker.fetch("c2", ["q"], 1, 0)
    assert again.deliveries == 2


def test_dead_letter_stream_content(broker: RedisTransport, raw: Any, clock: FakeClock) -> None:
    broker.publish("q", message(1))
    broker.publish("other", message(2))
    [got] = broker.fetch("c1", ["q"], 1, 0)
    broker.dead_letter(got, "poison: it crashed the pool child")
    [(_, fields)] = raw.xrange(broker.keys.queue("q").dead)
    assert fields[b"queue"] == b"q"
    assert fields[b"reason"] == b"poison: it crashed the pool child"
    assert fields[b"deliveries"] == b"1"
    assert float(fields[b"at"]) == pytest.approx(clock())
    assert Message.from_envelope(fields[b"m"]) == message(1)
    assert raw.smembers(broker.keys.dead_queues) == {b"q"}
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 0  # taken out of the stream
    [other] = broker.fetch("c1", ["other"], 1, 0)
    broker.dead_letter(other, "second")
    assert [d.reason for d in broker.dead_letters()] == [
        "poison: it crashed the pool child", "second"]


def test_a_foreign_stream_entry_is_handed_out_to_be_dead_lettered(broker: RedisTransport,
                                                                  raw: Any) -> None:
    raw.xadd(broker.keys.queue("q").streams[0], {"m": b"\xff not json"})
    [odd] = broker.fetch("c1", ["q"], 1, 0)
    assert dict(odd.message.headers) == {} and odd.message.body == b"\xff not json"
    broker.dead_letter(odd, "Message has no 'id' header")
    [dead] = broker.dead_letters("q")
    assert dead.message.body == b"\xff not json"
    assert broker.queue_size("q") == 0


def test_wake_ends_a_blocked_fetch_promptly(url: str, raw: Any) -> None:
    transport = open_transport(url, clock=time.time)
    assert isinstance(transport, RedisTransport)

    def blocked_in_redis() -> bool:
        waiting = {int(c["id"]) for c in raw.client_list() if "b" in c["flags"]}
        return any(w.client_id in waiting for w in list(transport._blocked))

    try:
        thread, out = in_thread(lambda: transport.fetch("c1", ["q"], 5, 30.0))
        eventually(blocked_in_redis, timeout=5.0, interval=0.001)
        woken = time.monotonic()
        transport.wake()
        thread.join(5.0)
        assert out == [[]]
        assert time.monotonic() - woken < 0.09  # interrupted, not waiting out a slice
    finally:
        transport.close()


def test_publish_many_keeps_order_across_chunks_and_bands(broker: RedisTransport) -> None:
    """publish_many adds entries by script, a chunk of messages per call: more than one
    chunk, on two bands, still comes out highest band first, in publishing order."""
    items = [("q", message(n), 9 if n % 3 == 0 else 0) for n in range(2300)]
    broker.publish_many(items)
    got = broker.fetch("c1", ["q"], 3000, 0)
    assert numbers(got) == ([n for n in range(2300) if n % 3 == 0]
                            + [n for n in range(2300) if n % 3])
    assert {d.priority for d in got[:767]} == {9}
    broker.ack([d.tag for d in got])


def test_copies_made_by_the_server_are_the_messages_the_client_would_make(
        broker: RedisTransport) -> None:
    """publish_copies sends the envelope once per 1,000 ids; Redis puts each copy together.
    Every entry is byte for byte what ``with_id`` makes, in order, across chunks."""
    template = build_task_message("tasks.ping", (1, "x"), {"k": [2]}, priority=3)
    ids = [str(uuid.uuid4()) for _ in range(2500)]
    broker.publish("q", message(0), priority=3)
    broker.publish_copies("q", template, 3, ids)
    broker.publish("q", message(1), priority=3)
    got = broker.fetch("c1", ["q"], 3000, 0)
    assert len(got) == 2502 and {d.priority for d in got} == {3}
    assert numbers([got[0], got[-1]]) == [0, 1]
    for task_id, delivery in zip(ids, got[1:-1], strict=True):
        assert delivery.message.to_envelope() == template.with_id(task_id).to_envelope()
        assert delivery.message.headers["id"] == task_id
        assert delivery.message.properties["correlation_id"] == task_id
    broker.ack([d.tag for d in got])


def test_send_many_on_redis_keeps_order_and_ids(url: str) -> None:
    """A bulk send mixing long runs of identical calls (copied on the server) with other
    calls: every message in sending order, under the id its AsyncResult has."""
    from celeriac import Celeriac

    app = Celeriac("bulk", broker=url, environ={})
    try:
        ping, add = ping_and_add(app)
        sigs = [ping.s() for _ in range(1200)] + [add.s(1, 2)] + [ping.s() for _ in range(40)]
        group_result = app.send_many(sigs)
        got = app.transport.fetch("c1", [app.conf.task_default_queue], 2000, 0)
        assert [d.message.headers["id"] for d in got] == [r.id for r in group_result.results]
        assert len({r.id for r in group_result.results}) == 1241
        assert [d.message.headers["task"] for d in got] == (
            [ping.name] * 1200 + [add.name] + [ping.name] * 40)
        app.transport.ack([d.tag for d in got])
    finally:
        app.close()


def test_a_stream_whose_connection_drops_sends_everything_again_through_the_client(
        broker: RedisTransport, raw: Any, prefix: str) -> None:
    """RawStream: commands written before and after its connection died all take effect (at
    least once: they go again through the client, whose retry policy reconnects)."""
    key = f"{prefix}stream"
    stream = broker._raw.stream()
    stream.write([("RPUSH", key, "a")])
    port = stream.conn._sock.getsockname()[1]  # the server knows the connection by its port
    [client] = [c for c in raw.client_list() if c["addr"].endswith(f":{port}")]
    raw.execute_command("CLIENT", "KILL", "ID", client["id"])
    stream.write([("RPUSH", key, "b")])
    replies = stream.replies()
    assert len(replies) == 2 and not any(isinstance(r, Exception) for r in replies)
    assert raw.lrange(key, 0, -1)[-2:] == [b"a", b"b"]


def test_many_threads_store_results_on_a_small_connection_pool(make_backend_) -> None:
    """Results go over connections of the backend's own, which neither count against nor
    exhaust the client's pool (threads -c 100 stores from every thread)."""
    backend = make_backend_(time.time, options={"max_connections": 2})
    errors: list[BaseException] = []

    def store(k: int) -> None:
        try:
            for i in range(20):
                backend.store(make_meta(f"t{k}-{i}", states.SUCCESS, i))
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=store, args=(k,)) for k in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert backend.get("t39-19")["result"] == 19


def test_purge_in_chunks_and_sizes_count_requeued(broker: RedisTransport) -> None:
    broker.publish_many([("q", message(n), n % 10) for n in range(2500)])
    got = broker.fetch("c1", ["q"], 10, 0)
    broker.requeue([d.tag for d in got[:4]])
    assert broker.queue_size("q") == 2494
    assert broker.purge("q") == 2494
    assert broker.queue_size("q") == 0
    broker.ack([d.tag for d in got[4:]])


def test_acks_wait_out_a_lost_connection(broker: RedisTransport, raw: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    broker.publish("q", message(1))
    [got] = broker.fetch("c1", ["q"], 1, 0)
    real = broker._eval_many

    def unreachable(calls: Any) -> Any:
        raise redis.ConnectionError("Connection refused")

    monkeypatch.setattr(broker, "_eval_many", unreachable)
    broker.ack([got.tag])  # does not raise: kept for the next call that gets through
    monkeypatch.setattr(broker, "_eval_many", real)
    assert broker.renew("c1") == 0  # the ack went through first
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 0


def test_acks_ride_along_with_the_next_fetch(broker: RedisTransport, raw: Any,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker acks what it just started with its next fetch: one round trip for both."""
    for n in (1, 2):
        broker.publish("q", message(n))
    [first] = broker.fetch("c1", ["q"], 1, 0)
    trips: list[list[Any]] = []
    real = broker._raw.run
    monkeypatch.setattr(broker._raw, "run", lambda calls: trips.append(list(calls)) or
                        real(calls))
    [second] = broker.ack_then_fetch([first.tag], "c1", ["q"], 1, 0)
    assert numbers([second]) == [2]
    assert len(trips) == 1 and [c[1] for c in trips[0]] == [K.ACK.sha, K.FETCH.sha]
    parsed = K.parse_tag(second.tag)
    assert parsed is not None
    assert [e["message_id"] for e in _pending(raw, broker, "q")] == [parsed[1].encode()]
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 1  # the first one is gone


def _soon(broker: RedisTransport, acks: list[str], consumer: str,
          limit: int) -> list[Delivery] | None:
    """What a worker's loop does with fetch_soon: wait until the reply is readable, read it."""
    pending = broker.fetch_soon(acks, consumer, ["q"], limit)
    if pending is None:
        return None
    readable, _, _ = select.select([pending.fileno()], [], [], 5)
    assert readable, "no reply within 5 s"
    return pending.finish()


def test_while_fetches_come_back_full_the_next_one_is_sent_for_the_loop_to_read(
        broker: RedisTransport, raw: Any) -> None:
    """A worker's loop fetches in one round trip of its own (acks included) while messages
    keep coming, and leaves a fetch that may have to wait to the I/O thread."""
    for n in range(1, 6):
        broker.publish("q", message(n))
    assert broker.fetch_soon([], "c1", ["q"], 2) is None  # no fetch yet: it may wait
    first = broker.fetch("c1", ["q"], 2, 0)
    assert numbers(first) == [1, 2]  # full: more probably wait
    second = _soon(broker, [d.tag for d in first], "c1", 2)
    assert second is not None and numbers(second) == [3, 4]
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 3  # the first two were acked
    third = _soon(broker, [], "c1", 2)
    assert third is not None and numbers(third) == [5]  # not full: the next one waits
    assert broker.fetch_soon([d.tag for d in [*second, *third]], "c1", ["q"], 2) is None
    assert len(_pending(raw, broker, "q")) == 3  # nothing was done: the caller still acks
    broker.ack([d.tag for d in [*second, *third]])
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 0


def test_a_fetch_for_the_loop_keeps_its_messages_when_the_server_forgot_the_ack_script(
        broker: RedisTransport, raw: Any) -> None:
    """The ack and fetch scripts go in one round trip: a refused ack (NOSCRIPT after a
    restart or SCRIPT FLUSH) must not cost what the fetch leased a lease's wait."""
    for n in range(1, 6):
        broker.publish("q", message(n))
    first = broker.fetch("c1", ["q"], 2, 0)
    raw.script_flush()
    raw.script_load(K.FETCH.source)  # the fetch script is known, the ack script is not
    second = _soon(broker, [d.tag for d in first], "c1", 2)
    assert second is not None and numbers(second) == [3, 4]
    assert broker._ack_backlog == [d.tag for d in first]  # the acks wait on
    assert broker.fetch_soon([], "c1", ["q"], 2) is None  # the next fetch: the I/O thread's
    third = broker.ack_then_fetch([d.tag for d in second], "c1", ["q"], 2, 0)
    assert numbers(third) == [5] and broker._ack_backlog == []
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 1  # four acked: only 5 is left


def test_a_fetch_keeps_its_messages_when_an_ack_beside_it_is_refused(
        broker: RedisTransport, raw: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """On the I/O thread's path too: an ack refused (here by a script that always errs)
    leaves the fetch's messages handed out and the acks waiting for the next call."""
    for n in range(1, 5):
        broker.publish("q", message(n))
    first = broker.fetch("c1", ["q"], 2, 0)
    refusing = K.Script("refusing", "return redis.error_reply('ERR refused for the test')")
    raw.script_load(refusing.source)
    monkeypatch.setattr(K, "ACK", refusing)
    tags = [d.tag for d in first]
    second = broker.ack_then_fetch(tags, "c1", ["q"], 2, 0)
    assert numbers(second) == [3, 4] and broker._ack_backlog == tags
    assert "refused 2 ack(s)" in caplog.text
    monkeypatch.undo()
    broker.ack([d.tag for d in second])  # (the backlog goes first)
    assert broker._ack_backlog == [] and raw.xlen(broker.keys.queue("q").streams[0]) == 0


def test_a_fetch_for_the_loop_that_fails_leaves_everything_to_the_io_thread(
        broker: RedisTransport, raw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(1, 5):
        broker.publish("q", message(n))
    first = broker.fetch("c1", ["q"], 2, 0)
    broker._ack_backlog.append(first[0].tag)  # an ack waiting from before
    monkeypatch.setattr(broker._raw, "idle", [])  # no open connection to send it on
    assert broker.fetch_soon([first[1].tag], "c1", ["q"], 2) is None
    assert broker._ack_backlog == [first[0].tag]  # kept; the caller keeps its own acks
    killed = broker._raw.take()
    killed.send_command("CLIENT", "ID")
    raw.client_kill_filter(_id=killed.read_response())
    broker._raw.idle.append(killed)  # a connection the server has closed since
    broker._full["c1"] = True
    assert _soon(broker, [first[1].tag], "c1", 2) is None
    assert broker._ack_backlog == [first[0].tag] and killed not in broker._raw.idle
    rest = broker.ack_then_fetch([first[1].tag], "c1", ["q"], 2, 0)
    assert numbers(rest) == [3, 4] and broker._ack_backlog == []
    assert raw.xlen(broker.keys.queue("q").streams[0]) == 2  # both acks went through


def test_an_abandoned_fetch_closes_its_connection_and_its_messages_come_back_after_the_lease(
        make_broker: Callable[..., RedisTransport], clock: FakeClock) -> None:
    broker = make_broker(clock)
    for n in range(1, 5):
        broker.publish("q", message(n))
    first = broker.fetch("c1", ["q"], 2, 0)
    pending = broker.fetch_soon([d.tag for d in first], "c1", ["q"], 2)
    assert pending is not None
    conn = pending.conn
    pending.abandon()  # the loop was cancelled before the reply came
    assert conn._sock is None and conn not in broker._raw.idle
    assert broker.fetch("c2", ["q"], 10, 0) == []  # fetched for c1 (or not), held by its lease
    clock.advance(LEASE + 1)
    assert sorted(numbers(broker.fetch("c2", ["q"], 10, 0))) in ([1, 2, 3, 4], [3, 4])


def test_publish_survives_its_connection_being_killed(broker: RedisTransport,
                                                     raw: Any) -> None:
    """A publish goes over a connection of the transport's own; killed, the next publish
    reconnects."""
    broker.publish("q", message(1))
    [own] = broker._raw.idle  # the connection publish() keeps between calls
    own.send_command("CLIENT", "ID")
    assert raw.client_kill_filter(_id=own.read_response()) == 1
    broker.publish("q", message(2))  # the dead socket fails; the client's retry sends it
    broker.publish("q", message(3))  # and the thread's connection is live again
    got = broker.fetch("c1", ["q"], 10, 0)
    assert numbers(got) == [1, 2, 3]


def test_publish_from_many_threads(broker: RedisTransport) -> None:
    threads = [threading.Thread(target=lambda k=k: [broker.publish("q", message(k * 100 + i))
                                                    for i in range(50)]) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    got = broker.fetch("c1", ["q"], 500, 0)
    assert sorted(numbers(got)) == sorted(k * 100 + i for k in range(4) for i in range(50))


def test_publishing_threads_do_not_each_keep_a_connection(broker: RedisTransport,
                                                          raw: Any) -> None:
    """Short-lived threads (or greenlets) that publish leave at most a few connections."""
    def connections() -> int:
        return int(raw.info("clients")["connected_clients"])

    broker.publish("q", message(0))
    before = connections()
    for k in range(40):
        thread = threading.Thread(target=broker.publish, args=("q", message(k + 1)))
        thread.start()
        thread.join(10)
    assert connections() <= before + 1
    assert broker.queue_size("q") == 41


def test_idle_consumers_are_forgotten(broker: RedisTransport, raw: Any) -> None:
    broker.publish_many([("q", message(1), 0), ("q", message(2), 0)])
    [got] = broker.fetch("gone", ["q"], 1, 0)
    [held] = broker.fetch("busy", ["q"], 1, 0)
    stream = broker.keys.queue("q").streams[0]
    assert {c["name"] for c in raw.xinfo_consumers(stream, K.GROUP)} == {b"gone", b"busy"}
    broker.ack([got.tag])
    broker._eval(K.JANITOR, broker.keys.queue("q").all, [K.GROUP, -1])
    assert {c["name"] for c in raw.xinfo_consumers(stream, K.GROUP)} == {b"busy"}
    broker.ack([held.tag])


# -- replies and broadcasts ----------------------------------------------------------------------
def test_reply_keys_expire(broker: RedisTransport, raw: Any) -> None:
    broker.reply("forgotten", b"x", ttl=0.5)
    key = broker.keys.reply("forgotten")
    assert 0 < raw.pttl(key) <= 500
    eventually(lambda: not raw.exists(key), timeout=5.0)


def test_a_thousand_replies_and_broadcasts_leave_no_keys(url: str, redis_server: str,
                                                         prefix: str) -> None:
    transport = open_transport(url, clock=time.time)
    try:
        sub = transport.subscribe("control")
        for i in range(1000):
            transport.reply(f"box-{i}", b"answer")
            assert transport.get_replies(f"box-{i}", 0) == [b"answer"]
            transport.broadcast("control", b"ping")
            transport.broadcast("nobody-listens", b"ping")
        got = sub.get(2.0)
        while len(got) < 1000:
            got += sub.get(2.0)
        sub.close()
        assert len(got) == 1000
        assert _keys(redis_server, prefix) == []
    finally:
        transport.close()


# -- connections, URLs, secrets ------------------------------------------------------------------
def test_broker_down_at_start_up_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    url = "redis://user:s3cret-pw@127.0.0.1:1/0"
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="celeriac.redis"):
        with pytest.raises(TransportError) as info:
            open_transport(url, clock=time.time, options={"connection_timeout": 0.7})
    assert time.monotonic() - started < 5.0
    text = str(info.value)
    assert "redis://user:**@127.0.0.1:1/0" in text and "Is Redis running" in text
    assert "broker_connection_timeout" in text
    assert caplog.records and all("127.0.0.1:1" in r.getMessage() for r in caplog.records)
    assert "s3cret-pw" not in text + caplog.text
    with pytest.raises(TransportError, match="after 1 attempt"):
        open_transport(url, clock=time.time, options={"connection_retry": False})


def test_urls_and_describe() -> None:
    plain = redis_params("redis://u:p%40ss@example.com:6380/3?key_prefix=app1:")
    assert plain.client_kwargs["password"] == "p@ss" and plain.client_kwargs["username"] == "u"
    assert plain.facts == {"transport": "redis", "hostname": "example.com", "port": 6380,
                           "db": 3, "ssl": False, "key_prefix": "app1:"}
    assert redis_params("redis://h?db=5").facts["db"] == 5
    tls = redis_params("rediss://h:6390/0?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem")
    assert tls.facts["ssl"] and tls.client_kwargs["ssl_cert_reqs"] == "none"
    assert tls.client_kwargs["ssl_ca_certs"] == "/ca.pem"
    sock = redis_params("redis+socket:///run/redis/redis.sock?db=2")
    assert sock.client_kwargs["unix_socket_path"] == "/run/redis/redis.sock"
    assert sock.facts == {"transport": "redis", "path": "/run/redis/redis.sock", "db": 2,
                          "ssl": False, "key_prefix": ""}
    assert redis_params("redis://h/0?key_prefix=a", {"key_prefix": "b"}).key_prefix == "b"
    with pytest.raises(ConfigurationError, match="Unknown option"):
        redis_params("redis://:secret@h/0?virtualhost=1")
    with pytest.raises(ConfigurationError, match="not a whole number") as info:
        redis_params("redis://:secret@h/zero")
    assert "secret" not in str(info.value)


def test_commands_are_packed_as_the_client_packs_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    import celeriac.transports.redis_conn as module

    conn = redis.Connection()  # (never connected: packing needs no server)
    commands = [("XADD", "q", "*", "m", b"\x00{\"a\": \"\xc3\xa9\"}", "p", 0, "t", 10**18),
                ("ZADD", "d", repr(1.5), "caf\u00e9"), ("EVALSHA", "abc", 1, "k", 2.5)]
    client_packs = b"".join(conn.pack_commands(commands))
    assert b"".join(module.packed(conn, commands)) == client_packs
    assert module.packed(conn, commands[:1]) == [b"".join(conn.pack_commands(commands[:1]))]
    odd = [("SET", "k", bytearray(b"v"))]  # (hiredis takes no bytearray: the client packs it)
    assert module.packed(conn, odd) == conn.pack_commands(odd)
    monkeypatch.setattr(module, "hiredis", None)
    assert b"".join(module.packed(conn, commands)) == client_packs


def test_missing_client_library_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import celeriac.transports.redis_conn as module

    monkeypatch.setattr(module, "redis", None)
    with pytest.raises(ConfigurationError, match=r"pip install celeriac\[redis\]"):
        open_transport("redis://127.0.0.1:6379/0", clock=time.time)


@pytest.fixture
def acl_user(raw: Any, prefix: str) -> Iterator[Callable[..., tuple[str, str]]]:
    """Makes ACL users limited to this test's keys; deletes them afterwards."""
    made: list[str] = []

    def make(*rules: str) -> tuple[str, str]:
        name, password = f"{prefix.rstrip(':')}-user{len(made)}", uuid.uuid4().hex
        try:
            raw.acl_setuser(name, enabled=True, passwords=[f"+{password}"],
                            keys=[f"{prefix}*"], channels=[f"{prefix}*"],
                            commands=["+@all", *rules])
        except redis.ResponseError as exc:
            pytest.skip(f"cannot create an ACL user here: {exc}")
        made.append(name)
        return name, password

    yield make
    for name in made:
        raw.acl_deluser(name)


def test_acl_user_and_password(acl_user: Callable[..., tuple[str, str]], redis_server: str,
                               prefix: str) -> None:
    name, password = acl_user()
    url = f"redis://{name}:{password}@127.0.0.1:6379/0?key_prefix={prefix}"
    transport = open_transport(url, clock=time.time)
    try:
        transport.publish("q", message(1))
        [got] = transport.fetch("c1", ["q"], 1, 0)
        transport.ack([got.tag])
        assert password not in repr(transport.describe())
        assert transport.describe()["hostname"] == "127.0.0.1"
    finally:
        transport.close()
    with pytest.raises(TransportError, match=r"refused our credentials \(\w") as info:
        open_transport(url.replace(password, "wrong-" + password), clock=time.time)
    assert password not in str(info.value)


@pytest.mark.parametrize("refused", [False, True])
def test_result_waits_of_an_acl_user(acl_user: Callable[..., tuple[str, str]], prefix: str,
                                     refused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over RESP3 (AUTH, then HELLO 3); where HELLO is refused (as a server without RESP3
    does: asked for a protocol it does not have), through redis-py from then on."""
    import celeriac.results.redis_wait as module

    if refused:
        monkeypatch.setattr(module, "PROTOCOL", 4)
    name, password = acl_user()
    url = f"redis://{name}:{password}@127.0.0.1:6379/1?key_prefix={prefix}"
    waiter, writer = (open_backend(url, clock=time.time) for _ in range(2))
    try:
        for task_id in ("t1", "t2"):
            thread, out = in_thread(lambda task_id=task_id: waiter.wait(task_id, 10.0))
            time.sleep(0.1)
            writer.store(make_meta(task_id, states.SUCCESS, result=task_id))
            thread.join(5.0)
            assert out[0]["result"] == task_id
        assert waiter._push_waits is not refused  # type: ignore[attr-defined]
        assert len(waiter._waiters) == (0 if refused else 1)  # type: ignore[attr-defined]
    finally:
        waiter.close()
        writer.close()


def test_wake_without_permission_for_client_unblock(acl_user: Callable[..., tuple[str, str]],
                                                    prefix: str) -> None:
    name, password = acl_user("-client")
    url = f"redis://{name}:{password}@127.0.0.1:6379/0?key_prefix={prefix}"
    transport = open_transport(url, clock=time.time)
    try:
        thread, out = in_thread(lambda: transport.fetch("c1", ["q"], 5, 30.0))
        deadline = time.monotonic() + 2.0
        while thread.is_alive() and time.monotonic() < deadline:
            transport.wake()
            thread.join(0.05)
        assert out == [[]]
        transport.publish("q", message(1))
        assert numbers(transport.fetch("c1", ["q"], 5, 5.0)) == [1]
    finally:
        transport.close()


# -- results -------------------------------------------------------------------------------------
def test_result_key_name_expiry_and_channel(make_backend_: Callable[..., ResultBackend],
                                            redis_db1: Any, prefix: str) -> None:
    backend = make_backend_(time.time, expires=60.0)
    pubsub = redis_db1.pubsub()
    pubsub.subscribe(f"{prefix}celery-task-meta-t1")
    eventually(lambda: pubsub.get_message(timeout=0.1))  # the subscribe confirmation
    meta = make_meta("t1", states.SUCCESS, result=[1, 2])
    backend.store(meta)
    key = f"{prefix}celery-task-meta-t1"
    assert 0 < redis_db1.pttl(key) <= 60_000
    stored = json.loads(redis_db1.get(key))
    assert stored["status"] == "SUCCESS" and stored["result"] == [1, 2]
    note = eventually(lambda: pubsub.get_message(timeout=0.1))
    assert note["type"] == "message" and note["data"] == redis_db1.get(key)
    pubsub.close()


def test_waiting_through_redis_py_does_not_poll(make_backend_: Callable[..., ResultBackend],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """(The waits of a server without RESP3, and of TLS connections.)"""
    waiter, writer = make_backend_(time.time), make_backend_(time.time)
    waiter._push_waits = False  # type: ignore[attr-defined]
    reads: list[str] = []
    real_get = waiter._client.get  # type: ignore[attr-defined]
    monkeypatch.setattr(waiter._client, "get",  # type: ignore[attr-defined]
                        lambda key: reads.append(key) or real_get(key))
    thread, out = in_thread(lambda: waiter.wait("t1", 10.0))
    eventually(lambda: len(reads) == 1)  # subscribed, then read once (closes the race)
    time.sleep(0.5)  # a polling waiter would read again meanwhile
    writer.store(make_meta("t1", states.STARTED))
    final = make_meta("t1", states.SUCCESS, result=3)
    writer.store(final)
    thread.join(5.0)
    assert out == [final]
    assert len(reads) == 1


# -- waits over RESP3 (celeriac.results.redis_wait) ---------------------------------------------
@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every command the RESP3 waiters write, in order."""
    from celeriac.results.redis_wait import PushWaiter

    commands: list[tuple[Any, ...]] = []
    real = PushWaiter._send

    def send(self: PushWaiter, *given: tuple[Any, ...]) -> None:
        commands.extend(given)
        real(self, *given)

    monkeypatch.setattr(PushWaiter, "_send", send)
    return commands


def _waits(sent: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [c for c in sent if c[0] in ("SUBSCRIBE", "GET", "UNSUBSCRIBE")]


def test_a_resp3_wait_subscribes_and_reads_once_then_only_listens(
        make_backend_: Callable[..., ResultBackend], sent: list[tuple[Any, ...]]) -> None:
    waiter, writer = make_backend_(time.time), make_backend_(time.time)
    key = waiter.keys.result("t1")  # type: ignore[attr-defined]
    thread, out = in_thread(lambda: waiter.wait("t1", 10.0))
    eventually(lambda: ("GET", key) in sent)
    time.sleep(0.5)  # a polling waiter would read again meanwhile
    writer.store(make_meta("t1", states.STARTED))  # (published: not final, the wait goes on)
    final = make_meta("t1", states.SUCCESS, result=3)
    writer.store(final)
    thread.join(5.0)
    assert out == [final]
    assert _waits(sent) == [("SUBSCRIBE", key), ("GET", key), ("UNSUBSCRIBE", key)]
    assert waiter._push_waits  # type: ignore[attr-defined]


def test_a_resp3_waiter_is_reused_past_what_earlier_waits_left_behind(
        make_backend_: Callable[..., ResultBackend], raw: Any,
        sent: list[tuple[Any, ...]]) -> None:
    waiter, writer = make_backend_(time.time), make_backend_(time.time)
    first = make_meta("t1", states.SUCCESS, result=1)
    writer.store(first)
    assert waiter.wait("t1", 5.0) == first  # stored before: read in the same round trip
    [connection] = waiter._waiters  # type: ignore[attr-defined]
    # Pushes that nobody read wait on the connection: t1's unsubscription, and a message on
    # a channel it still listens to (as a result published twice would leave).
    connection._send(("SUBSCRIBE", "elsewhere"))
    eventually(lambda: dict(raw.pubsub_numsub("elsewhere"))[b"elsewhere"] == 1)
    assert raw.publish("elsewhere", json.dumps(make_meta("t2", states.SUCCESS, result="no")))
    assert waiter.wait("t2", 0.2) is None  # timed out: the connection stays usable
    second = make_meta("t2", states.SUCCESS, result=2)
    writer.store(second)
    assert waiter.wait("t2", 5.0) == second
    assert waiter._waiters == [connection]  # type: ignore[attr-defined]
    assert [c[0] for c in _waits(sent)].count("GET") == 3


def test_a_killed_resp3_connection_costs_no_result(make_backend_: Callable[..., ResultBackend],
                                                   raw: Any) -> None:
    waiter, writer = make_backend_(time.time), make_backend_(time.time)
    writer.store(make_meta("t1", states.SUCCESS, result=1))
    assert waiter.wait("t1", 5.0)["result"] == 1  # type: ignore[index]
    killed = [c["id"] for c in raw.client_list() if c["name"].startswith("celeriac-wait-")]
    assert killed
    for client_id in killed:
        raw.client_kill_filter(_id=client_id)
    writer.store(make_meta("t2", states.SUCCESS, result=2))
    assert waiter.wait("t2", 5.0)["result"] == 2  # type: ignore[index]
    writer.store(make_meta("t3", states.SUCCESS, result=3))
    assert waiter.wait("t3", 5.0)["result"] == 3  # type: ignore[index]


def test_without_resp3_waits_go_through_redis_py(make_backend_: Callable[..., ResultBackend],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import celeriac.results.redis_wait as module

    monkeypatch.setattr(module, "hiredis", None)
    waiter, writer = make_backend_(time.time), make_backend_(time.time)
    writer.store(make_meta("t1", states.SUCCESS, result=1))
    assert waiter.wait("t1", 5.0)["result"] == 1  # type: ignore[index]
    assert waiter._push_waits is False  # type: ignore[attr-defined]
    thread, out = in_thread(lambda: waiter.wait("t2", 10.0))
    time.sleep(0.2)
    writer.store(make_meta("t2", states.SUCCESS, result=2))
    thread.join(5.0)
    assert out[0]["result"] == 2


def test_pickle_results_keep_success_final(make_backend_: Callable[..., ResultBackend]) -> None:
    backend = make_backend_(time.time, serializer="pickle", accept=("pickle",))
    backend.store(make_meta("t1", states.SUCCESS, result={1, 2}))
    backend.store(make_meta("t1", states.FAILURE, result={"exc_type": "E"}))
    got = backend.wait("t1", 1.0)
    assert got is not None and got["status"] == states.SUCCESS and got["result"] == {1, 2}


def test_backend_down_at_start_up_is_a_clear_error() -> None:
    with pytest.raises(ResultBackendError, match="Cannot connect to the Redis result backend"):
        open_backend("redis://:pw@127.0.0.1:1/1", clock=time.time,
                     options={"connection_timeout": 0.3})
