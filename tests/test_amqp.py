"""RabbitMQ: the transport and result-backend contracts, and what only AMQP promises.

Every test works under its own name prefix (the transport's ``name_prefix`` option), so tests
never share a queue or exchange with each other or with anybody else on the server, and what
a test declared is deleted after it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celeriac import states
from celeriac.exceptions import ConfigurationError, TransportError
from celeriac.protocol import Message
from celeriac.results import ResultBackend, make_meta, open_backend
from celeriac.transports import Transport, open_transport
from celeriac.transports.amqp import AMQPTransport
from celeriac.transports.amqp_consume import LeanChannel
from celeriac.transports.amqp_io import DELAY_LEVELS, Settings, properties
from celeriac.transports.amqp_publish import Publisher, encode_properties
from tests.contract.backend_suite import BackendContract
from tests.contract.conftest_helpers import FakeClock, eventually
from tests.contract.transport_suite import LEASE, TransportContract, in_thread, message, numbers

Factory = Callable[..., Any]

# Names the contract suites and these tests use, deleted after each test under its prefix.
_QUEUES = ("q", "a", "b", "c", "other", "xq", "fq", "empty", "never-used", "box", "elsewhere",
           "prio", "capped", "requeue", "rpcq")
_EXCHANGES = ("control", "other", "celeriac.delay.deliver")


def _sweep(url: str, prefix: str) -> None:
    """Delete every queue and exchange under ``prefix`` that the tests may have made."""
    import aiormq

    queues = [f"{prefix}{q}{suffix}" for q in _QUEUES for suffix in ("", ".dead")]
    queues += [f"{prefix}celeriac.delay.{level}" for level in range(DELAY_LEVELS)]
    exchanges = [f"{prefix}{x}" for x in _EXCHANGES]
    exchanges += [f"{prefix}celeriac.delay.{level}" for level in range(DELAY_LEVELS)]

    async def sweep() -> None:
        conn = await aiormq.connect(url)
        try:
            channel = await conn.channel()
            for name in queues:
                await channel.queue_delete(name)
            for name in exchanges:
                await channel.exchange_delete(name)
        finally:
            await conn.close()

    asyncio.run(sweep())


def broker_names(prefix: str) -> list[str]:
    """Queues and exchanges on the server whose names start with ``prefix``."""
    names = []
    for what in ("list_queues", "list_exchanges"):
        out = subprocess.run(["rabbitmqctl", "-q", what, "name", "--no-table-headers"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        names += [n for n in out.split() if n.startswith(prefix)]
    return names


@pytest.fixture
def prefix(amqp_server: str) -> Iterator[str]:
    name = f"ct-{uuid.uuid4().hex[:10]}."
    yield name
    _sweep(amqp_server, name)


@pytest.fixture
def amqp_url(amqp_server: str, prefix: str) -> str:
    return f"{amqp_server}?name_prefix={prefix}"


@pytest.fixture
def make_transport(amqp_url: str) -> Iterator[Factory]:
    made: list[Transport] = []

    def make(clock: Callable[[], float], lease_seconds: float = LEASE,
             **options: Any) -> Transport:
        transport = open_transport(amqp_url, clock=clock, lease_seconds=lease_seconds,
                                   options=options)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


class TestAMQPTransport(TransportContract):
    """The shared contract; the overrides below are where AMQP keeps it differently."""

    # -- leases are the connection, not the clock -----------------------------------------
    def test_expired_lease_is_redelivered(self, make_transport: Factory,
                                          clock: FakeClock) -> None:
        """An unacked delivery returns to the queue when its consumer's connection ends."""
        first, second = make_transport(clock=clock), make_transport(clock=clock)
        first.publish("q", message(1))
        first.fetch("c1", ["q"], 1, 0)
        clock.advance(LEASE * 10)
        assert second.fetch("c2", ["q"], 1, 0) == []
        first.close()
        [again] = eventually(lambda: second.fetch("c2", ["q"], 1, 0))
        assert numbers([again]) == [1]
        assert again.deliveries == 2 and again.redelivered
        assert second.renew("c1") == 0
        second.ack([again.tag])
        assert second.queue_size("q") == 0

    def test_a_stale_tag_never_settles_the_next_delivery(self, make_transport: Factory,
                                                         clock: FakeClock) -> None:
        """A tag from before a reconnect settles nothing once another consumer has the message."""
        first_handle, other = make_transport(clock=clock), make_transport(clock=clock)
        assert isinstance(first_handle, AMQPTransport)
        first_handle.publish("q", message(1))
        [first] = first_handle.fetch("c1", ["q"], 1, 0)
        assert other.fetch("c2", ["q"], 1, 0.2) == []  # consuming now, with room
        first_handle.drop_connection()  # the broker gives the message to ``other``
        [second] = other.fetch("c2", ["q"], 1, 10.0)
        assert numbers([second]) == [1] and second.deliveries == 2
        first_handle.requeue([first.tag])
        assert other.fetch("c3", ["q"], 1, 0) == []
        first_handle.ack([first.tag])
        first_handle.dead_letter(first, "late")
        assert first_handle.dead_letters() == []
        assert other.renew("c2") == 1
        other.ack([second.tag])
        assert other.queue_size("q") == 0

    def test_renew_keeps_the_lease(self, make_transport: Factory, clock: FakeClock) -> None:
        """Renewing counts what a consumer holds; holding does not run out with time."""
        transport, other = make_transport(clock=clock), make_transport(clock=clock)
        transport.publish("q", message(1))
        transport.publish("q", message(2))
        assert len(transport.fetch("c1", ["q"], 2, 0)) == 2
        clock.advance(LEASE * 10)
        assert transport.renew("c1") == 2
        assert transport.renew("nobody") == 0
        assert transport.fetch("c2", ["q"], 5, 0) == []
        assert other.fetch("c3", ["q"], 5, 0) == []

    # -- delays are the broker's, in real time -----------------------------------------------
    def test_delayed_message_is_invisible_until_due(self, live: Transport) -> None:
        started = time.monotonic()
        live.publish("q", message(1), delay=1.0)
        live.publish("q", message(2))
        assert numbers(live.fetch("c1", ["q"], 10, 0)) == [2]
        assert live.fetch("c1", ["q"], 10, 0.5) == []
        [due] = live.fetch("c1", ["q"], 10, 5.0)
        assert numbers([due]) == [1] and due.deliveries == 1
        assert time.monotonic() - started >= 1.0

    def test_waiting_fetch_sees_a_delayed_message_come_due(self, live: Transport) -> None:
        live.publish("q", message(1), delay=0.5)
        thread, out = in_thread(lambda: live.fetch("c1", ["q"], 1, 10.0))
        thread.join(8.0)
        assert not thread.is_alive()
        assert numbers(out[0]) == [1]

    def test_purge_counts_delayed_and_expired(self, live: Transport) -> None:
        """AMQP: a delayed message is not in its queue until due, so purge leaves it be."""
        live.publish("q", message(1))
        live.publish("q", message(2), delay=0.5)
        assert live.queue_size("q") == 1
        assert live.purge("q") == 1
        assert numbers(live.fetch("c1", ["q"], 5, 10.0)) == [2]

    # -- ordering across queues: by priority; equal priorities in no particular order -------
    def test_priority_across_queues(self, transport: Transport) -> None:
        transport.publish("a", message(1), priority=1)
        transport.publish("b", message(2), priority=7)
        transport.publish("a", message(3), priority=7)
        got = transport.fetch("c1", ["a", "b"], 2, 0)
        assert sorted(numbers(got)) == [2, 3] and [d.priority for d in got] == [7, 7]
        assert numbers(transport.fetch("c1", ["a", "b"], 2, 0)) == [1]

    # -- replies go to a queue that must exist first ----------------------------------------
    def test_replies_are_taken_once(self, transport: Transport) -> None:
        transport.prepare_replies("box")
        transport.prepare_replies("elsewhere")
        super().test_replies_are_taken_once(transport)

    def test_expired_replies_are_dropped(self, transport: Transport, clock: FakeClock) -> None:
        transport.prepare_replies("box")
        super().test_expired_replies_are_dropped(transport, clock)

    def test_get_replies_waits_for_the_first(self, live: Transport) -> None:
        live.prepare_replies("box")
        super().test_get_replies_waits_for_the_first(live)


class TestRPCBackend(BackendContract):
    @pytest.fixture
    def make_backend(self, make_transport: Factory) -> Iterator[Factory]:
        made: list[ResultBackend] = []

        def make(clock: Callable[[], float], expires: float | None = 3600.0) -> ResultBackend:
            transport = make_transport(clock=clock)
            backend = open_backend("rpc://", clock=clock, expires=expires,
                                   broker=lambda: transport)
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()

    def test_results_travel_to_the_callers_queue(self, make_backend: Factory) -> None:
        client, worker = make_backend(clock=time.time), make_backend(clock=time.time)
        reply_to = client.reply_to
        assert reply_to and reply_to == client.reply_to
        thread, out = in_thread(lambda: client.wait("t1", 10.0))
        worker.store(make_meta("t1", states.STARTED), reply_to)
        worker.store(make_meta("t1", states.SUCCESS, result=7), reply_to)
        thread.join(8.0)
        assert out and out[0]["result"] == 7
        worker.store(make_meta("t2", states.SUCCESS, result=8), reply_to)
        got = eventually(lambda: client.get("t2"))
        assert got["result"] == 8
        assert worker.get("t1") is None  # results reach only the caller

    def test_rpc_needs_an_amqp_broker(self) -> None:
        memory = open_transport("memory://", clock=time.time)
        with pytest.raises(ConfigurationError, match="amqp://"):
            assert open_backend("rpc://", clock=time.time, broker=lambda: memory).reply_to

    def test_results_arrive_on_the_consuming_connection_also_after_a_reconnect(
            self, make_backend: Factory) -> None:
        """The reply queue is consumed on the link's own connection (no aiormq, no I/O
        thread between a result and its waiter), and again on the next one after a drop."""
        client, worker = make_backend(clock=time.time), make_backend(clock=time.time)
        reply_to = client.reply_to
        transport = client._transport()
        link = transport._ensure().link
        first = link.channels["cons"]
        assert isinstance(first, LeanChannel)
        assert [li.channel for li in link.listeners] == [first]
        worker.store(make_meta("t1", states.SUCCESS, result=1), reply_to)
        assert client.get("t1")["result"] == 1  # a round trip on that connection first
        transport.drop_connection()
        eventually(lambda: link.up and link.channels["cons"] is not first)
        assert first.is_closed
        assert [li.channel for li in link.listeners] == [link.channels["cons"]]
        worker.store(make_meta("t2", states.SUCCESS, result=2), reply_to)
        assert client.wait("t2", 10.0)["result"] == 2


class TestRPCBackendOnAiormq(TestRPCBackend):
    """The same with the reply queue consumed through aiormq on the I/O thread, as for
    ``amqps://``."""

    @pytest.fixture(autouse=True)
    def _through_aiormq(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from celeriac.transports.amqp_io import Link

        monkeypatch.setattr(Link, "lean_consumer", property(lambda self: False))

    def test_results_arrive_on_the_consuming_connection_also_after_a_reconnect(
            self, make_backend: Factory) -> None:
        client = make_backend(clock=time.time)
        client.reply_to  # noqa: B018 - listening starts here
        link = client._transport()._ensure().link
        assert [li.channel for li in link.listeners] == [link.channels["aux"]]


# -- what only the AMQP transport promises ---------------------------------------------------
def _on_a_channel(url: str, action: Callable[[Any], Any]) -> None:
    """Run ``await action(channel)`` on a connection of its own (behind the transport's back)."""
    import aiormq

    async def run() -> None:
        conn = await aiormq.connect(url)
        await action(await conn.channel())
        await conn.close()

    asyncio.run(run())


def _declare_capped(url: str, name: str, length: int) -> None:
    """A queue that refuses publishes once it holds ``length`` messages (the broker nacks)."""
    _on_a_channel(url, lambda channel: channel.queue_declare(name, durable=True, arguments={
        "x-max-length": length, "x-overflow": "reject-publish"}))


@pytest.fixture
def amqp(make_transport: Factory) -> AMQPTransport:
    transport = make_transport(clock=time.time)
    assert isinstance(transport, AMQPTransport)
    return transport


def test_a_confirmed_publish_is_in_the_queue(amqp: AMQPTransport, make_transport: Factory
                                             ) -> None:
    amqp.publish("q", message(1))
    amqp.publish_many([("q", message(n), 0) for n in range(2, 50)])
    reader = make_transport(clock=time.time)
    assert reader.queue_size("q") == 49


def test_a_publish_the_broker_refuses_raises(amqp: AMQPTransport, amqp_server: str,
                                             prefix: str) -> None:
    _declare_capped(amqp_server, f"{prefix}capped", 1)
    amqp.publish("capped", message(1))
    with pytest.raises(TransportError, match="capped"):
        amqp.publish("capped", message(2))
    assert amqp.queue_size("capped") == 1


def test_queues_are_declared_with_max_priority(amqp: AMQPTransport, amqp_server: str,
                                               prefix: str) -> None:
    import aiormq

    amqp.publish("prio", message(1), priority=3)

    async def redeclare() -> None:  # the same arguments again: no 406 PRECONDITION_FAILED
        conn = await aiormq.connect(amqp_server)
        channel = await conn.channel()
        await channel.queue_declare(f"{prefix}prio", durable=True,
                                    arguments={"x-max-priority": 10})
        await conn.close()

    asyncio.run(redeclare())
    for n, priority in [(2, 9), (3, 0), (4, 5)]:
        amqp.publish("prio", message(n), priority=priority)
    assert numbers(amqp.fetch("c1", ["prio"], 10, 0)) == [2, 4, 1, 3]


def test_delayed_message_arrives_after_its_delay(amqp: AMQPTransport) -> None:
    sent = time.monotonic()
    amqp.publish("q", message(1), delay=1.5)
    assert amqp.queue_size("q") == 0
    assert amqp.fetch("c1", ["q"], 5, 1.0) == []
    [due] = amqp.fetch("c1", ["q"], 5, 5.0)
    elapsed = time.monotonic() - sent
    assert numbers([due]) == [1] and due.message == message(1)
    assert 1.5 <= elapsed < 2.5


def test_requeue_and_redelivery_count_deliveries(amqp: AMQPTransport,
                                                 make_transport: Factory) -> None:
    amqp.publish("requeue", message(1), priority=4)
    seen = []
    for _ in range(3):
        [got] = amqp.fetch("c1", ["requeue"], 1, 5.0)
        seen.append(got.deliveries)
        amqp.requeue([got.tag])
    assert seen == [1, 2, 3]
    [got] = amqp.fetch("c1", ["requeue"], 1, 0)
    assert got.priority == 4 and got.message == message(1)
    amqp.close()  # the broker hands it back, flagged as redelivered: one more delivery
    other = make_transport(clock=time.time)
    [again] = eventually(lambda: other.fetch("c1", ["requeue"], 1, 0))
    assert again.deliveries == 5 and again.message == message(1)
    other.ack([again.tag])


def test_acks_from_two_threads_at_once_keep_the_channel(amqp: AMQPTransport,
                                                       make_transport: Factory) -> None:
    """A worker acks on its I/O thread and its settle thread at the same time: an ack that
    covers several tags at once must never take in a tag the other thread is acking (the
    broker would close the channel: PRECONDITION_FAILED - unknown delivery tag)."""
    def ack(part: list[str]) -> None:
        for i in range(0, len(part), 2):
            amqp.ack(part[i:i + 2])

    for _ in range(4):
        amqp.publish_many([("q", message(n), 0) for n in range(300)])
        held: list[Any] = []
        while len(held) < 300:
            got = amqp.fetch("c1", ["q"], 300 - len(held), 5.0)
            assert got, "the messages did not arrive"
            held += got
        epoch = amqp._state.epoch  # type: ignore[union-attr]
        tags = [d.tag for d in held]
        threads = [threading.Thread(target=ack, args=(tags[k::2],)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert amqp._state.epoch == epoch  # type: ignore[union-attr]  (no reconnect)
    amqp.close()
    assert make_transport(clock=time.time).queue_size("q") == 0


def test_a_reconnect_keeps_what_the_consumer_holds(amqp: AMQPTransport,
                                                   make_transport: Factory) -> None:
    """Redelivered to us after a reconnect, a message we hold keeps its old tag: not run twice."""
    amqp.publish_many([("q", message(n), 0) for n in range(3)])
    held = amqp.fetch("c1", ["q"], 3, 5.0)
    assert len(held) == 3
    amqp.ack([held[0].tag])
    amqp.drop_connection()
    amqp.ack([held[1].tag])  # finished while the connection was down
    assert amqp.renew("c1") == 1
    assert amqp.fetch("c1", ["q"], 3, 1.0) == []  # the redeliveries are the held ones
    amqp.ack([held[2].tag])
    assert amqp.renew("c1") == 0
    amqp.close()
    assert make_transport(clock=time.time).queue_size("q") == 0

def test_an_ack_lost_with_the_connection_does_not_run_the_task_again(
        amqp: AMQPTransport, make_transport: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack written just before the connection drops may never reach the broker.

    The broker then redelivers a message whose task has finished; it is settled on arrival.
    """
    amqp.publish_many([("q", message(n), 0) for n in range(2)])
    held = amqp.fetch("c1", ["q"], 2, 5.0)
    assert len(held) == 2
    channel = amqp._state.link.channels["cons"]  # type: ignore[union-attr]

    async def lost_in_flight(*args: Any, **kwargs: Any) -> None:
        return None

    if isinstance(channel, LeanChannel):  # acks are written from the caller's thread
        monkeypatch.setattr(channel, "settle", lambda *args, **kwargs: None)
    else:
        monkeypatch.setattr(channel, "basic_ack", lost_in_flight)
    amqp.ack([held[0].tag])
    monkeypatch.undo()
    amqp.drop_connection()
    assert amqp.fetch("c1", ["q"], 2, 1.5) == []  # neither comes out a second time
    amqp.ack([held[1].tag])
    amqp.close()
    eventually(lambda: make_transport(clock=time.time).queue_size("q") == 0)


def test_dead_letters_keep_reason_count_and_survive_the_handle(
        amqp: AMQPTransport, make_transport: Factory) -> None:
    amqp.publish("q", message(1))
    [got] = amqp.fetch("c1", ["q"], 1, 0)
    amqp.requeue([got.tag])
    [got] = amqp.fetch("c1", ["q"], 1, 0)
    amqp.dead_letter(got, "poison: delivered too often")
    amqp.close()
    other = make_transport(clock=time.time)
    [dead] = other.dead_letters("q")
    assert dead.reason == "poison: delivered too often" and dead.deliveries == 2
    assert dead.message == message(1)
    assert other.dead_letters("q") == [dead]  # reading them does not take them
    assert other.queue_size("q") == 0


def test_reconnect_resumes_consuming_and_loses_nothing(amqp: AMQPTransport) -> None:
    amqp.publish_many([("q", message(n), 0) for n in range(10)])
    first = amqp.fetch("c1", ["q"], 4, 5.0)
    amqp.ack([first[0].tag])
    amqp.drop_connection()
    amqp.ack([d.tag for d in first[1:]])  # settled by their redeliveries
    amqp.publish_many([("q", message(n), 0) for n in range(10, 20)])
    got: list[int] = numbers(first)
    deadline = time.monotonic() + 20
    while len(got) < 20 and time.monotonic() < deadline:
        batch = amqp.fetch("c1", ["q"], 8, 1.0)
        got += numbers(batch)
        amqp.ack([d.tag for d in batch])
    assert sorted(got) == list(range(20))
    assert amqp.queue_size("q") == 0 and amqp.renew("c1") == 0

def test_wake_ends_a_waiting_fetch_within_100ms(amqp: AMQPTransport) -> None:
    amqp.fetch("c1", ["q"], 1, 0.01)  # consuming already, as a worker would be
    thread, out = in_thread(lambda: amqp.fetch("c1", ["q"], 1, 30.0))
    time.sleep(0.2)  # let it start waiting; what is measured is the time after wake()
    woken = time.monotonic()
    amqp.wake()
    thread.join(5.0)
    assert out == [[]] and time.monotonic() - woken < 0.1


def test_broker_down_at_start_up_is_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        open_transport("amqp://celeriac:s3cr3t-pw@127.0.0.1:1//", clock=time.time,
                       options={"broker_connection_timeout": 0.5,
                                "broker_connection_max_retries": 2})
    text = str(info.value)
    assert "127.0.0.1:1" in text and "celeriac:**@" in text and "tried 3 time(s)" in text
    assert "broker_connection_max_retries" in text
    assert "s3cr3t-pw" not in text and "s3cr3t-pw" not in caplog.text
    assert caplog.text.count("retrying in") == 2
    assert time.monotonic() - started < 10


def test_describe_never_shows_the_password() -> None:
    pytest.importorskip("aiormq")
    settings = Settings.parse("amqps://user:pa55word@rabbit.example:5671/prod",
                              {"heartbeat": 45})
    info = settings.describe()
    assert info == {"transport": "amqp", "hostname": "rabbit.example", "port": 5671,
                    "userid": "user", "virtual_host": "prod", "ssl": True, "heartbeat": 45,
                    "connect_timeout": 4.0}
    assert "pa55word" not in repr(info) and "pa55word" not in repr(settings)
    assert settings.masked == "amqps://user:**@rabbit.example:5671/prod"
    assert Settings.parse("amqp://h//", {}).virtual_host == "/"
    assert Settings.parse("amqp://h/%2Fv", {}).virtual_host == "/v"
    assert Settings.parse("amqp://", {}).hostname == "localhost"


def test_describe_of_a_live_handle(amqp: AMQPTransport, prefix: str) -> None:
    info = amqp.describe()
    assert info["hostname"] == "127.0.0.1" and info["virtual_host"] == "/"
    assert info["name_prefix"] == prefix and info["userid"] == "guest"
    assert not any("password" in key for key in info)


def test_headers_keep_their_types(amqp: AMQPTransport) -> None:
    sent = Message(body=b"{}", headers={"f": 0.1, "big": 2**40, "neg": -3, "t": True,
                                        "none": None, "list": [1.5, "x", [2]],
                                        "d": {"k": {"j": "ü"}}},
                   properties={"correlation_id": "c", "reply_to": "r", "custom": "kept",
                               "delivery_mode": 1, "priority": 0})
    amqp.publish("q", sent, priority=2)
    [got] = amqp.fetch("c1", ["q"], 1, 0)
    assert got.message == sent and got.priority == 2


def test_a_thousand_reply_round_trips_leave_no_queues(make_transport: Factory,
                                                      prefix: str) -> None:
    client, server = make_transport(clock=time.time), make_transport(clock=time.time)
    for n in range(1000):
        box = f"reply.{n}"
        client.prepare_replies(box)
        server.reply(box, b"pong %d" % n, ttl=60.0)
        assert client.get_replies(box, 5.0) == [b"pong %d" % n]
    assert len(broker_names(prefix)) <= AMQPTransport.reply_boxes
    sub = client.subscribe("control")
    server.broadcast("control", b"hello")
    assert sub.get(5.0) == [b"hello"]
    sub.close()
    client.close()
    server.close()
    leftover = [n for n in broker_names(prefix) if n != f"{prefix}control"]
    assert leftover == []


def test_replies_go_direct_and_one_to_a_queue_that_is_gone_is_dropped(
        make_transport: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    client, server = make_transport(clock=time.time), make_transport(clock=time.time)
    server.send("nobody.listens", message(0))  # connects the server's link
    link = server._ensure().link

    def through_the_io_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("sent through the I/O thread")

    monkeypatch.setattr(link, "publish", through_the_io_thread)
    client.prepare_replies("box")
    server.send_many([("box", message(n)) for n in range(1, 301)]
                     + [("gone", message(999))], ttl=60.0)
    server.reply("box", b"last", ttl=60.0)
    got: list[bytes] = []
    while len(got) < 301:
        batch = client.get_replies("box", 5.0)
        assert batch, f"only {len(got)} replies arrived"
        got += batch
    assert got == [message(n).body for n in range(1, 301)] + [b"last"]
    assert server._ensure().publishers._idle  # the direct publisher is sound after "gone"
    client.close()
    server.close()


def test_after_fork_abandons_the_parents_connection(amqp: AMQPTransport) -> None:
    amqp.publish("q", message(1))
    parent_io = amqp._ensure().io
    amqp.after_fork()  # as a forked child would: the old loop thread is not touched
    assert parent_io.alive
    assert numbers(amqp.fetch("c1", ["q"], 1, 0)) == [1]
    assert amqp._ensure().io is not parent_io
    [parent] = amqp._abandoned  # in a real child it is simply gone; here, close it
    parent.publishers.close()
    parent.io.call(parent.link.close())
    parent.io.stop()


# -- publishing from the caller's thread (amqp_publish.Publisher) -------------------------------
def _no_io_thread_publish(amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on a publish through the I/O thread fails the test."""
    def through_the_io_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("published through the I/O thread")

    monkeypatch.setattr(amqp._ensure().link, "publish_to_queue", through_the_io_thread)


def test_publishes_to_a_declared_queue_go_direct_and_arrive_intact(
        amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    amqp.publish("q", message(1))  # declares the queue, through the I/O thread
    _no_io_thread_publish(amqp, monkeypatch)
    sent = Message(body=b"[[], {}, {}]", headers={
        "id": "t-2", "task": "x.y", "n": 2, "f": 0.1, "big": 2**40, "neg": -3, "t": True,
        "none": None, "timelimit": [None, 2.5], "d": {"k": {"j": "\u00fc"}}},
        properties={"correlation_id": "t-2", "reply_to": "r", "custom": "kept",
                    "delivery_mode": 2})
    amqp.publish("q", sent, priority=7)
    amqp.publish("q", message(3, body=b"x" * 300_000))  # more than one body frame
    got = amqp.fetch("c1", ["q"], 3, 0)
    assert [d.message for d in got] == [sent, message(1), message(3, body=b"x" * 300_000)]
    assert got[0].priority == 7
    amqp.ack([d.tag for d in got])


def test_a_queue_deleted_behind_the_direct_publisher_is_declared_again(
        amqp: AMQPTransport, amqp_server: str, prefix: str) -> None:
    amqp.publish("q", message(1))
    amqp.publish("q", message(2))  # direct: the publisher now knows the queue

    _on_a_channel(amqp_server, lambda channel: channel.queue_delete(f"{prefix}q"))
    amqp.publish("q", message(3))  # returned unroutable, then declared and sent again
    assert numbers(amqp.fetch("c1", ["q"], 5, 0)) == [3]


def _close_from_the_broker(pub: Publisher | LeanChannel) -> None:
    """Have the broker close ``pub``'s connection."""
    assert pub.sock is not None
    port = pub.sock.getsockname()[1]
    listed = subprocess.run(["rabbitmqctl", "-q", "list_connections", "pid", "peer_port",
                             "--no-table-headers"], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    [pid] = [line.split()[0] for line in listed.splitlines() if line.split()[1:] == [str(port)]]
    subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test"], check=True,
                   capture_output=True, timeout=60)


def test_a_direct_publisher_the_broker_closed_hands_over_to_the_io_thread(
        amqp: AMQPTransport) -> None:
    amqp.publish("q", message(1))
    amqp.publish("q", message(2))
    pool = amqp._ensure().publishers
    [pub] = pool._idle
    _close_from_the_broker(pub)
    amqp.publish("q", message(3))  # unsure on that connection: sent through the I/O thread
    amqp.publish("q", message(4))  # and direct again, on a new connection
    assert pool._idle and pool._idle[0] is not pub
    assert sorted(numbers(amqp.fetch("c1", ["q"], 10, 0))) == [1, 2, 3, 4]


def test_an_idle_direct_publisher_is_replaced_after_a_heartbeat_interval(
        make_transport: Factory) -> None:
    amqp = make_transport(clock=time.time, heartbeat=1)
    assert isinstance(amqp, AMQPTransport)
    amqp.publish("q", message(1))
    amqp.publish("q", message(2))
    pool = amqp._ensure().publishers
    [first] = pool._idle
    time.sleep(1.1)
    amqp.publish("q", message(3))
    assert pool._idle[0] is not first and first.sock is None
    assert numbers(amqp.fetch("c1", ["q"], 10, 0)) == [1, 2, 3]


# -- consuming on a connection of our own (amqp_consume.LeanChannel) --------------------------
def _lean(amqp: AMQPTransport) -> LeanChannel:
    channel = amqp._ensure().link.channels["cons"]
    assert isinstance(channel, LeanChannel)
    return channel


def test_the_consuming_connection_acks_only_what_it_delivered_and_nothing_twice() -> None:
    """An ack that covers (``multiple``) a delivery someone else is still settling, or a
    tag settled already, makes the broker close the channel: the connection refuses both."""
    from pamqp import frame as pamqp_frame

    ours, broker = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        lean = LeanChannel(Settings.parse("amqp://", {}), loop)
        lean.sock = ours
        for tag in range(1, 6):
            lean._track(tag)
        lean.settle([3])  # 1 and 2 are still out: 3 alone
        lean.settle([2, 1, 1])  # nothing older is out: one ack covers both
        lean.settle([2, 99])  # settled already, never delivered: nothing written
        lean.settle([5])  # 4 is still out
        lean.settle([4], requeue=True)
        ours.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: broker.recv(4096), b""))
        written = []
        while data:
            used, _, method = pamqp_frame.unmarshal(data)
            written.append((type(method).__name__, method.delivery_tag, method.multiple))
            data = data[used:]
        assert written == [("Ack", 3, False), ("Ack", 2, True), ("Ack", 5, False),
                           ("Nack", 4, False)]
        assert not lean._unsettled
    finally:
        ours.close()
        broker.close()
        loop.close()


def test_a_delivery_to_a_no_ack_consumer_is_handed_over_and_never_acked() -> None:
    """Reply queues are consumed without acks: the broker settled those deliveries as it
    sent them, and an ack naming one would make it close the channel."""
    from pamqp import body as pamqp_body
    from pamqp import commands as spec
    from pamqp import frame as pamqp_frame
    from pamqp import header as pamqp_header

    from celeriac.transports.amqp_consume import FrameReader

    ours, broker = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        lean = LeanChannel(Settings.parse("amqp://", {}), loop)
        lean.sock = ours
        got: list[Any] = []
        lean._consumers["replies"] = got.append
        lean._no_ack.add("replies")
        frames = [spec.Basic.Deliver(consumer_tag="replies", delivery_tag=7,
                                     routing_key="box"),
                  pamqp_header.ContentHeader(0, 5, spec.Basic.Properties(correlation_id="t1")),
                  pamqp_body.ContentBody(b"hello")]
        broker.sendall(b"".join(pamqp_frame.marshal(f, 1) for f in frames))
        reader = FrameReader(ours)
        lean._dispatch(reader, reader.frame())
        [message] = got
        assert message.body == b"hello"
        assert message.header.properties.correlation_id == "t1"
        assert not lean._unsettled
        lean.settle([7])  # not ours to ack: nothing is written
        ours.shutdown(socket.SHUT_WR)
        assert broker.recv(4096) == b""
    finally:
        ours.close()
        broker.close()
        loop.close()


def test_deliveries_and_acks_use_a_connection_of_our_own(amqp: AMQPTransport,
                                                          make_transport: Factory) -> None:
    amqp.publish_many([("q", message(n), 0) for n in range(300)])
    lean = _lean(amqp)
    got = _drain(amqp, "q", 300)
    assert [m.headers["n"] for m in got] == list(range(300))
    assert _lean(amqp) is lean and not lean.is_closed
    amqp.close()
    assert lean.is_closed
    assert make_transport(clock=time.time).queue_size("q") == 0  # every ack arrived


def test_the_broker_closing_the_consuming_connection_loses_and_repeats_nothing(
        amqp: AMQPTransport) -> None:
    amqp.publish_many([("q", message(n), 0) for n in range(10)])
    held = amqp.fetch("c1", ["q"], 4, 5.0)
    assert len(held) == 4
    lean = _lean(amqp)
    _close_from_the_broker(lean)
    eventually(lambda: lean.is_closed)
    amqp.ack([d.tag for d in held])  # settled by their redeliveries
    got = numbers(held)
    deadline = time.monotonic() + 20
    while len(got) < 10 and time.monotonic() < deadline:
        batch = amqp.fetch("c1", ["q"], 8, 1.0)
        got += numbers(batch)
        amqp.ack([d.tag for d in batch])
    assert sorted(got) == list(range(10))  # each once
    new = _lean(amqp)
    assert new is not lean
    eventually(lambda: amqp.queue_size("q") == 0 and amqp.renew("c1") == 0)
    # the redeliveries of the acked four are settled by the I/O thread, maybe after the
    # others: no ack of one may cover another (the broker closes the channel for a tag
    # acked twice)
    eventually(lambda: not amqp._ensure().tasks)
    assert amqp.fetch("c1", ["q"], 1, 0) == []  # a round trip on the consuming connection
    assert _lean(amqp) is new and not new.is_closed


def test_an_idle_consuming_connection_keeps_its_heartbeat(make_transport: Factory) -> None:
    amqp = make_transport(clock=time.time, heartbeat=1)
    assert isinstance(amqp, AMQPTransport)
    assert amqp.fetch("c1", ["q"], 1, 0.1) == []  # consuming, nothing there
    lean = _lean(amqp)
    assert lean.heartbeat == 1
    time.sleep(3.5)  # the broker closes a connection that misses two heartbeats
    assert not lean.is_closed and _lean(amqp) is lean
    amqp.publish("q", message(1))
    [got] = amqp.fetch("c1", ["q"], 1, 5.0)
    amqp.ack([got.tag])
    assert numbers([got]) == [1]


def test_fetch_ready_acks_and_takes_the_buffer_without_the_io_thread(
        amqp: AMQPTransport, make_transport: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    assert amqp.fetch_ready([], "c1", ["q"], 5) is None  # not consuming yet: fetch() starts
    assert amqp.fetch("c1", ["q"], 6, 0.2) == []  # consuming now, with a prefetch of 6
    amqp.publish_many([("q", message(n), 0) for n in range(6)])
    st = amqp._ensure()
    eventually(lambda: len(st.buffer) == 6)

    def through_the_io_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("went through the I/O thread")

    monkeypatch.setattr(st.io, "call", through_the_io_thread)
    first = amqp.fetch_ready([], "c1", ["q"], 4)
    assert numbers(first or []) == [0, 1, 2, 3] and amqp.renew("c1") == 4
    assert amqp.fetch_ready([], "c1", ["q", "other"], 4) is None  # other queues: fetch()
    rest = amqp.fetch_ready([d.tag for d in first or []], "c1", ["q"], 10)
    assert numbers(rest or []) == [4, 5] and amqp.renew("c1") == 2
    assert amqp.fetch_ready([d.tag for d in rest or []], "c1", ["q"], 10) == []
    assert amqp.renew("c1") == 0
    monkeypatch.undo()
    amqp.close()
    eventually(lambda: make_transport(clock=time.time).queue_size("q") == 0)


# -- publish_many on a direct publisher (Publisher.publish_batch) ------------------------------
def _link_batches(amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch, *,
                  allowed: bool) -> list[list[str]]:
    """Record what ``publish_many`` hands to the I/O thread (correlation ids, per call);
    unless ``allowed``, doing so fails the test."""
    link = amqp._ensure().link
    calls: list[list[str]] = []
    original = link.publish_batch

    def publish_batch(batch: list[tuple[str, bytes, Any]]) -> Any:
        calls.append([props.correlation_id for _, _, props in batch])
        if not allowed:
            raise AssertionError("published through the I/O thread")
        return original(batch)

    monkeypatch.setattr(link, "publish_batch", publish_batch)
    return calls


def _drain(amqp: AMQPTransport, queue: str, count: int) -> list[Message]:
    """Fetch (and ack) messages from ``queue`` until ``count`` came, or none for a second."""
    got: list[Message] = []
    while len(got) < count:
        batch = amqp.fetch("c1", [queue], count - len(got), 1.0)
        if not batch:
            break
        amqp.ack([d.tag for d in batch])
        got += [d.message for d in batch]
    return got


def test_publish_many_to_declared_queues_goes_direct_in_order_and_intact(
        amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    amqp.publish("q", message(0))  # declares the queue, through the I/O thread
    _no_io_thread_publish(amqp, monkeypatch)
    _link_batches(amqp, monkeypatch, allowed=False)
    sent = [message(n, f=n / 3, d={"k": [n, None]}) for n in range(1, 5001)]
    sent[100] = message(101, body=b"x" * 300_000)  # more than one body frame
    sent[200] = Message(body=b"", headers={"n": 201}, properties={"reply_to": "r"})
    amqp.publish_many([("q", m, 0) for m in sent])
    assert _drain(amqp, "q", 5001) == [message(0), *sent]


def test_publish_many_hands_what_a_deleted_queue_returned_to_the_io_thread(
        amqp: AMQPTransport, amqp_server: str, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for queue in ("q", "other"):
        amqp.publish(queue, message(0))  # declared
        amqp.publish(queue, message(0))  # direct: the publisher now knows the queue

    _on_a_channel(amqp_server, lambda channel: channel.queue_delete(f"{prefix}q"))
    calls = _link_batches(amqp, monkeypatch, allowed=True)
    amqp.publish_many([("q" if n % 3 else "other", message(n), 0) for n in range(1, 1201)])
    to_q = [n for n in range(1, 1201) if n % 3]
    assert calls == [[f"task-{n}" for n in to_q]]  # exactly the returned ones, declared again
    assert sorted(m.headers["n"] for m in _drain(amqp, "q", 2000)) == to_q
    assert [m.headers["n"] for m in _drain(amqp, "other", 2000)] == [
        0, 0, *(n for n in range(1, 1201) if not n % 3)]


def test_publish_many_on_a_connection_the_broker_closes_loses_nothing(
        amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    amqp.publish("q", message(0))
    amqp.publish("q", message(0))
    [pub] = amqp._ensure().publishers._idle
    calls = _link_batches(amqp, monkeypatch, allowed=True)
    runs: list[Any] = []
    settle_next = Publisher._settle_next

    def closing(self: Publisher, run: Any) -> None:
        if run.settled >= 1000 and not runs:  # mid-batch, chunks still unconfirmed
            runs.append(run)
            _close_from_the_broker(self)
        settle_next(self, run)

    monkeypatch.setattr(Publisher, "_settle_next", closing)
    amqp.publish_many([("q", message(n), 0) for n in range(1, 5001)])
    assert pub.broken and len(runs) == 1
    # confirmed ones (those acked before the broker closed) are not sent again; the rest are
    unconfirmed = [f"task-{i + 1}" for i, fate in enumerate(runs[0].state) if fate != 1]
    assert calls == [unconfirmed] and 0 < len(unconfirmed) <= 4000
    got = [m.headers["n"] for m in _drain(amqp, "q", 10_000)]
    assert set(got) == set(range(5001))  # some of the unconfirmed may be there twice


def test_publish_many_says_how_many_the_broker_refused(
        amqp: AMQPTransport, amqp_server: str, prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _declare_capped(amqp_server, f"{prefix}capped", 2)
    amqp.publish("capped", message(1))
    _link_batches(amqp, monkeypatch, allowed=False)
    with pytest.raises(TransportError, match="refused 4 of 5 messages"):
        amqp.publish_many([("capped", message(n), 0) for n in range(2, 7)])
    assert amqp.queue_size("capped") == 2


def test_publish_many_leaves_a_message_amqp_cannot_carry_to_the_io_thread(
        amqp: AMQPTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    amqp.publish("q", message(0))
    calls = _link_batches(amqp, monkeypatch, allowed=True)
    bad = message(2)
    bad.properties["correlation_id"] = "c" * 300  # more than a short string holds
    with pytest.raises(TransportError):
        amqp.publish_many([("q", message(1), 0), ("q", bad, 0), ("q", message(3), 0)])
    assert calls == [["c" * 300, "task-3"]]
    assert [m.headers["n"] for m in _drain(amqp, "q", 3)][:2] == [0, 1]


def test_a_returned_message_is_told_from_its_twin_by_its_headers() -> None:
    from pamqp import frame
    from pamqp.header import ContentHeader

    from celeriac.transports.amqp_publish import _Run

    def as_returned(props: Any) -> Any:  # what the broker's copy decodes to
        return frame.unmarshal(frame.marshal(ContentHeader(0, 1, props), 1))[2].properties

    twins = [("q", b"x", properties(message(1, f=0.1, l=(1, None), ok=bool(k)), 0))
             for k in range(2)]
    run = _Run(twins, first=7)
    run.sent = 2
    run.returned("q", as_returned(twins[1][2]), b"x")  # the second one, though the first
    assert list(run.state) == [0, 3]                    # is not confirmed yet either
    run.settle(8, True, 1)
    assert run.outcome(None).again == [1]


def test_content_headers_are_framed_as_pamqp_frames_them() -> None:
    from pamqp import commands as spec

    cases = [
        properties(message(1), 7),
        properties(Message(body=b"", headers={"l": [1, None], "d": {"x": 0.5}}, properties={
            "correlation_id": "c" * 100, "reply_to": "r\u00fc", "priority": 3,
            "custom": "kept"}), 0, persistent=False, expiration="100"),
        spec.Basic.Properties(message_id="m", timestamp=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                              message_type="t", user_id="guest", app_id="a", headers={},
                              content_type=""),
        spec.Basic.Properties(),
    ]
    for props in cases:
        assert encode_properties(props) == props.marshal()


def test_without_aiormq_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from celeriac.transports import amqp_io

    monkeypatch.setattr(amqp_io, "aiormq", None)
    with pytest.raises(ConfigurationError, match=r"pip install celeriac\[amqp\]"):
        open_transport("amqp://guest:guest@127.0.0.1:1//", clock=time.time)


class TestAMQPTransportOnAiormq(TestAMQPTransport):
    """The same contract with deliveries consumed through aiormq on the I/O thread, as for
    ``amqps://`` (our own consuming connection is not used there)."""

    @pytest.fixture(autouse=True)
    def _through_aiormq(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from celeriac.transports.amqp_io import Link

        monkeypatch.setattr(Link, "lean_consumer", property(lambda self: False))

    def test_the_consuming_channel_is_aiormq_s(self, make_transport: Factory,
                                               clock: FakeClock) -> None:
        transport = make_transport(clock=clock)
        assert isinstance(transport, AMQPTransport)
        transport.publish("q", message(1))
        [got] = transport.fetch("c1", ["q"], 1, 5.0)
        assert not isinstance(transport._ensure().link.channels["cons"], LeanChannel)
        transport.ack([got.tag])
        assert transport.fetch("c1", ["q"], 1, 0) == []
