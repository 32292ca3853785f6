"""The transport contract as tests: subclass :class:`TransportContract` once per transport.

A subclass provides one fixture, ``make_transport``: a factory
``make(clock, lease_seconds=30.0) -> Transport`` that opens a handle on a fresh, empty broker
for this test (each call a new handle on the *same* broker) and closes what it opened when
the test ends. Which tests apply is decided by ``transport.capabilities``, never by class.

Time: most tests pass a :class:`FakeClock` and move it by hand, so leases and delays are
tested without sleeping. A test that really waits (a blocked ``fetch``, ``get_replies``)
bounds the wait in real time and passes a real clock, because the contract does not say
whether ``timeout`` is measured on the injected clock or on the wall.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

from celeriac.protocol import Message
from celeriac.transports import Delivery, Transport

from .conftest_helpers import FakeClock

__all__ = ["TransportContract"]

LEASE = 30.0
MakeTransport = Callable[..., Transport]


def message(n: int, body: bytes | None = None, **headers: Any) -> Message:
    """A small task-like message numbered ``n`` (the number travels in the headers)."""
    return Message(
        body=body if body is not None else json.dumps([[n], {}, {}]).encode(),
        headers={"id": f"task-{n}", "task": "tests.add", "n": n, **headers},
        properties={"correlation_id": f"task-{n}", "delivery_mode": 2},
    )


def numbers(deliveries: list[Delivery]) -> list[int]:
    return [d.message.headers["n"] for d in deliveries]


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` in a daemon thread; its return value (or exception) lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


_CHILD = """
import json, sys, time
from celeriac.transports import open_transport
url, consumer, queue = sys.argv[1:4]
transport = open_transport(url, clock=time.time, lease_seconds=300.0)
print("ready", flush=True)
sys.stdin.readline()
got = []
while True:
    batch = transport.fetch(consumer, [queue], 7, 0)
    if not batch:
        break
    got.extend(d.message.headers["n"] for d in batch)
    transport.ack([d.tag for d in batch])
transport.close()
print(json.dumps(got), flush=True)
"""


class TransportContract:
    """Behaviour every :class:`~celeriac.transports.Transport` shows."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def transport(self, make_transport: MakeTransport, clock: FakeClock) -> Transport:
        return make_transport(clock=clock, lease_seconds=LEASE)

    @pytest.fixture
    def live(self, make_transport: MakeTransport) -> Transport:
        """A handle on the wall clock, for tests that wait in real time."""
        return make_transport(clock=time.time, lease_seconds=LEASE)

    def require(self, transport: Transport, capability: str) -> None:
        if not getattr(transport.capabilities, capability):
            pytest.skip(f"transport lacks capability {capability!r}")

    def url_for_other_process(self, transport: Transport) -> str:
        """The URL another process opens to reach the same broker."""
        return transport.url

    # -- publish, fetch, ack ------------------------------------------------------------------
    def test_publish_fetch_ack(self, transport: Transport, clock: FakeClock) -> None:
        sent = message(1, unicode="ünï 😀", nested={"a": [1, None, True]})
        transport.publish("q", sent)
        assert transport.queue_size("q") == 1
        [got] = transport.fetch("c1", ["q"], 10, 0)
        assert got.queue == "q"
        assert got.message == sent
        assert got.deliveries == 1 and not got.redelivered
        transport.ack([got.tag])
        transport.ack([got.tag])  # acking twice is harmless
        clock.advance(LEASE * 3)
        assert transport.fetch("c1", ["q"], 10, 0) == []
        assert transport.queue_size("q") == 0

    def test_binary_body_and_content_type_survive(self, transport: Transport) -> None:
        sent = Message(body=bytes(range(256)), headers={"n": 0},
                       content_type="application/x-python-serialize",
                       content_encoding="binary", properties={"priority": 3})
        transport.publish("q", sent)
        [got] = transport.fetch("c1", ["q"], 1, 0)
        assert got.message == sent

    def test_fetch_timeout_zero_never_waits(self, live: Transport) -> None:
        started = time.monotonic()
        assert live.fetch("c1", ["empty"], 5, 0) == []
        assert time.monotonic() - started < 0.5

    def test_fetch_limit_zero_or_no_queues(self, transport: Transport) -> None:
        transport.publish("q", message(1))
        assert transport.fetch("c1", ["q"], 0, 0) == []
        assert transport.fetch("c1", [], 5, 0) == []
        assert transport.queue_size("q") == 1

    def test_fetch_only_from_named_queues(self, transport: Transport) -> None:
        transport.publish("a", message(1))
        transport.publish("b", message(2))
        transport.publish("c", message(3))
        got = transport.fetch("c1", ["a", "b"], 10, 0)
        assert sorted(numbers(got)) == [1, 2]
        assert {d.queue for d in got} == {"a", "b"}
        assert transport.queue_size("c") == 1

    # -- leases -------------------------------------------------------------------------------
    def test_leased_message_is_not_given_to_another_consumer(self, transport: Transport) -> None:
        transport.publish("q", message(1))
        assert len(transport.fetch("c1", ["q"], 10, 0)) == 1
        assert transport.fetch("c2", ["q"], 10, 0) == []
        assert transport.fetch("c1", ["q"], 10, 0) == []
        assert transport.queue_size("q") == 0

    def test_concurrent_fetchers_never_share_a_message(self, live: Transport) -> None:
        live.publish_many([("q", message(n), 0) for n in range(300)])
        results: list[list[int]] = [[] for _ in range(6)]

        def consume(slot: int) -> None:
            while batch := live.fetch(f"c{slot}", ["q"], 5, 0):
                results[slot].extend(numbers(batch))
                live.ack([d.tag for d in batch])

        threads = [threading.Thread(target=consume, args=(i,), daemon=True) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads)
        everything = [n for got in results for n in got]
        assert sorted(everything) == list(range(300))

    def test_expired_lease_is_redelivered(self, transport: Transport, clock: FakeClock) -> None:
        self.require(transport, "leases")
        transport.publish("q", message(1))
        transport.fetch("c1", ["q"], 1, 0)
        clock.advance(LEASE - 1)
        assert transport.fetch("c2", ["q"], 1, 0) == []
        clock.advance(2)
        assert transport.queue_size("q") == 1
        [again] = transport.fetch("c2", ["q"], 1, 0)
        assert numbers([again]) == [1]
        assert again.deliveries == 2 and again.redelivered
        assert transport.renew("c1") == 0
        transport.ack([again.tag])
        assert transport.queue_size("q") == 0

    def test_a_stale_tag_never_settles_the_next_delivery(self, transport: Transport,
                                                         clock: FakeClock) -> None:
        self.require(transport, "leases")
        transport.publish("q", message(1))
        [first] = transport.fetch("c1", ["q"], 1, 0)
        clock.advance(LEASE + 1)
        [second] = transport.fetch("c2", ["q"], 1, 0)
        transport.requeue([first.tag])  # c1 wakes up late: must not free c2's lease
        assert transport.fetch("c3", ["q"], 1, 0) == []
        transport.ack([first.tag])
        transport.dead_letter(first, "late")
        assert transport.dead_letters() == []
        assert transport.renew("c2") == 1  # still there, still c2's
        transport.ack([second.tag])
        assert transport.queue_size("q") == 0

    def test_dead_letter_records_an_already_acked_delivery(self, transport: Transport) -> None:
        transport.publish("q", message(1))
        [got] = transport.fetch("c1", ["q"], 1, 0)
        transport.ack([got.tag])
        transport.dead_letter(got, "body did not decode")
        [dead] = transport.dead_letters("q")
        assert dead.reason == "body did not decode" and dead.message == got.message

    def test_renew_keeps_the_lease(self, transport: Transport, clock: FakeClock) -> None:
        self.require(transport, "leases")
        transport.publish("q", message(1))
        transport.publish("q", message(2))
        assert len(transport.fetch("c1", ["q"], 2, 0)) == 2
        clock.advance(LEASE * 2 / 3)
        assert transport.renew("c1") == 2
        assert transport.renew("nobody") == 0
        clock.advance(LEASE * 2 / 3)
        assert transport.fetch("c2", ["q"], 5, 0) == []
        clock.advance(LEASE / 2)
        assert sorted(numbers(transport.fetch("c2", ["q"], 5, 0))) == [1, 2]

    def test_requeue_makes_it_visible_at_once(self, transport: Transport) -> None:
        transport.publish("q", message(1))
        [first] = transport.fetch("c1", ["q"], 1, 0)
        transport.requeue([first.tag])
        assert transport.queue_size("q") == 1
        [again] = transport.fetch("c2", ["q"], 1, 0)
        assert numbers([again]) == [1]
        assert again.deliveries == 2
        assert transport.renew("c1") == 0

    # -- ordering -----------------------------------------------------------------------------
    def test_priority_then_fifo(self, transport: Transport) -> None:
        self.require(transport, "priorities")
        for n, priority in [(1, 0), (2, 5), (3, 0), (4, 9), (5, 5), (6, 0)]:
            transport.publish("q", message(n), priority=priority)
        got = transport.fetch("c1", ["q"], 10, 0)
        assert numbers(got) == [4, 2, 5, 1, 3, 6]
        assert [d.priority for d in got] == [9, 5, 5, 0, 0, 0]

    def test_priority_across_queues(self, transport: Transport) -> None:
        self.require(transport, "priorities")
        transport.publish("a", message(1), priority=1)
        transport.publish("b", message(2), priority=7)
        transport.publish("a", message(3), priority=7)
        assert numbers(transport.fetch("c1", ["a", "b"], 2, 0)) == [2, 3]

    def test_limit_is_honoured_and_order_is_fifo(self, transport: Transport) -> None:
        for n in range(10):
            transport.publish("q", message(n))
        assert numbers(transport.fetch("c1", ["q"], 3, 0)) == [0, 1, 2]
        assert numbers(transport.fetch("c1", ["q"], 3, 0)) == [3, 4, 5]
        assert numbers(transport.fetch("c2", ["q"], 100, 0)) == [6, 7, 8, 9]

    def test_publish_many(self, transport: Transport) -> None:
        transport.publish_many([("a", message(1), 0), ("b", message(2), 3),
                                ("a", message(3), 5), ("a", message(4), 0)])
        transport.publish_many([])
        assert transport.queue_size("a") == 3 and transport.queue_size("b") == 1
        got = transport.fetch("c1", ["a"], 10, 0)
        if transport.capabilities.priorities:
            assert numbers(got) == [3, 1, 4]
        else:
            assert sorted(numbers(got)) == [1, 3, 4]
        assert got[0].message == message(got[0].message.headers["n"])
        assert numbers(transport.fetch("c1", ["b"], 10, 0)) == [2]

    # -- delays -------------------------------------------------------------------------------
    def test_delayed_message_is_invisible_until_due(self, transport: Transport,
                                                    clock: FakeClock) -> None:
        self.require(transport, "delayed_delivery")
        transport.publish("q", message(1), delay=10.0)
        transport.publish("q", message(2))
        assert transport.queue_size("q") == 2
        assert numbers(transport.fetch("c1", ["q"], 10, 0)) == [2]
        clock.advance(9.5)
        assert transport.fetch("c1", ["q"], 10, 0) == []
        clock.advance(1.0)
        [due] = transport.fetch("c1", ["q"], 10, 0)
        assert numbers([due]) == [1] and due.deliveries == 1

    def test_waiting_fetch_sees_a_delayed_message_come_due(self, make_transport: MakeTransport,
                                                          clock: FakeClock) -> None:
        transport = make_transport(clock=clock, lease_seconds=LEASE)
        self.require(transport, "delayed_delivery")
        transport.publish("q", message(1), delay=5.0)
        thread, out = in_thread(lambda: transport.fetch("c1", ["q"], 1, 10.0))
        clock.advance(6.0)
        thread.join(8.0)
        assert not thread.is_alive()
        assert numbers(out[0]) == [1]

    # -- waiting ------------------------------------------------------------------------------
    def test_waiting_fetch_gets_a_message_published_meanwhile(self, live: Transport) -> None:
        thread, out = in_thread(lambda: live.fetch("c1", ["q"], 5, 10.0))
        live.publish("q", message(1))
        thread.join(8.0)
        assert not thread.is_alive()
        assert numbers(out[0]) == [1]

    def test_wake_ends_a_waiting_fetch_early(self, live: Transport) -> None:
        started = time.monotonic()
        thread, out = in_thread(lambda: live.fetch("c1", ["q"], 5, 30.0))
        deadline = time.monotonic() + 2.0
        while thread.is_alive() and time.monotonic() < deadline:
            live.wake()
            thread.join(0.05)
        assert not thread.is_alive(), "wake() did not end the waiting fetch"
        assert out == [[]]
        assert time.monotonic() - started < 2.5

    # -- dead letters, purge, sizes -----------------------------------------------------------
    def test_dead_letter_keeps_reason(self, transport: Transport, clock: FakeClock) -> None:
        transport.publish("q", message(1))
        transport.publish("other", message(2))
        [got] = transport.fetch("c1", ["q"], 1, 0)
        transport.dead_letter(got, "poison: cannot decode")
        [dead] = transport.dead_letters("q")
        assert dead.queue == "q"
        assert dead.reason == "poison: cannot decode"
        assert dead.message == message(1)
        assert dead.deliveries == 1
        assert dead.at == pytest.approx(clock())
        assert transport.dead_letters("other") == []
        assert transport.dead_letters() == [dead]
        clock.advance(LEASE * 2)
        assert transport.fetch("c2", ["q"], 5, 0) == []
        assert transport.queue_size("q") == 0

    def test_purge_and_queue_size(self, transport: Transport, clock: FakeClock) -> None:
        for n in range(5):
            transport.publish("q", message(n))
        transport.publish("other", message(99))
        held = transport.fetch("c1", ["q"], 2, 0)
        assert transport.queue_size("q") == 3
        assert transport.purge("q") == 3
        assert transport.queue_size("q") == 0
        assert transport.purge("q") == 0
        assert transport.queue_size("other") == 1
        assert transport.queue_size("never-used") == 0
        transport.ack([d.tag for d in held])
        clock.advance(LEASE * 2)
        assert transport.fetch("c1", ["q"], 10, 0) == []

    def test_purge_counts_delayed_and_expired(self, transport: Transport,
                                              clock: FakeClock) -> None:
        self.require(transport, "delayed_delivery")
        transport.publish("q", message(1))
        transport.publish("q", message(2), delay=100.0)
        transport.fetch("c1", ["q"], 5, 0)
        assert transport.queue_size("q") == 1
        clock.advance(LEASE + 1)
        assert transport.queue_size("q") == 2
        assert transport.purge("q") == 2
        clock.advance(200)
        assert transport.fetch("c1", ["q"], 5, 0) == []

    # -- broadcast ----------------------------------------------------------------------------
    def test_broadcast_reaches_every_open_subscription(self, transport: Transport) -> None:
        first = transport.subscribe("control")
        second = transport.subscribe("control")
        elsewhere = transport.subscribe("other")
        transport.broadcast("control", b"ping")
        transport.broadcast("control", b"pong")
        late = transport.subscribe("control")
        assert first.get(2.0) == [b"ping", b"pong"]
        assert second.get(2.0) == [b"ping", b"pong"]
        assert late.get(0) == []
        assert elsewhere.get(0) == []
        transport.broadcast("control", b"again")
        assert first.get(2.0) == [b"again"]
        assert late.get(2.0) == [b"again"]
        for sub in (first, second, elsewhere, late):
            sub.close()
        assert first.closed

    def test_subscription_waits_for_a_broadcast(self, live: Transport) -> None:
        sub = live.subscribe("control")
        thread, out = in_thread(lambda: sub.get(10.0))
        live.broadcast("control", b"hello")
        thread.join(8.0)
        assert not thread.is_alive()
        assert out == [[b"hello"]]
        sub.close()

    # -- replies ------------------------------------------------------------------------------
    def test_replies_are_taken_once(self, transport: Transport) -> None:
        transport.reply("box", b"one")
        transport.reply("box", b"two")
        transport.reply("elsewhere", b"x")
        assert transport.get_replies("box", 2.0) == [b"one", b"two"]
        assert transport.get_replies("box", 0) == []
        assert transport.get_replies("elsewhere", 0) == [b"x"]

    def test_expired_replies_are_dropped(self, transport: Transport, clock: FakeClock) -> None:
        transport.reply("box", b"old", ttl=5.0)
        clock.advance(6.0)
        assert transport.get_replies("box", 0) == []
        transport.reply("box", b"stale", ttl=5.0)
        clock.advance(6.0)
        transport.reply("box", b"fresh", ttl=5.0)
        assert transport.get_replies("box", 0) == [b"fresh"]

    def test_get_replies_waits_for_the_first(self, live: Transport) -> None:
        thread, out = in_thread(lambda: live.get_replies("box", 10.0))
        live.reply("box", b"answer")
        thread.join(8.0)
        assert not thread.is_alive()
        assert out == [[b"answer"]]

    def test_get_replies_times_out(self, live: Transport) -> None:
        started = time.monotonic()
        assert live.get_replies("box", 0.2) == []
        assert 0.1 < time.monotonic() - started < 5.0

    # -- processes ----------------------------------------------------------------------------
    def test_second_handle_sees_persisted_messages(self, make_transport: MakeTransport,
                                                   clock: FakeClock) -> None:
        first = make_transport(clock=clock, lease_seconds=LEASE)
        self.require(first, "persistent")
        first.publish("q", message(1))
        first.close()
        second = make_transport(clock=clock, lease_seconds=LEASE)
        assert numbers(second.fetch("c1", ["q"], 5, 0)) == [1]

    def test_two_processes_split_one_queue(self, make_transport: MakeTransport) -> None:
        transport = make_transport(clock=time.time, lease_seconds=300.0)
        self.require(transport, "cross_process")
        transport.publish_many([("xq", message(n), 0) for n in range(500)])
        url = self.url_for_other_process(transport)
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, url, f"proc{i}", "xq"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    for i in range(2)]
        try:
            for child in children:  # both connected before either starts: they really race
                assert child.stdout is not None and child.stdout.readline().strip() == "ready"
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            outputs = [child.communicate(timeout=60)[0] for child in children]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.communicate()
        assert [child.returncode for child in children] == [0, 0]
        got = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == list(range(500))
        assert transport.queue_size("xq") == 0

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    def test_forked_child_reconnects(self, make_transport: MakeTransport) -> None:
        transport = make_transport(clock=time.time, lease_seconds=LEASE)
        self.require(transport, "cross_process")
        transport.publish("fq", message(1))
        assert transport.queue_size("fq") == 1  # the parent's connection is open now
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                transport.after_fork()
                got = transport.fetch("child", ["fq"], 5, 0)
                transport.ack([d.tag for d in got])
                code = 0 if numbers(got) == [1] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert transport.queue_size("fq") == 0
        transport.publish("fq", message(2))
        assert numbers(transport.fetch("parent", ["fq"], 5, 0)) == [2]
