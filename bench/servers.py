"""The Redis and RabbitMQ servers the broker suite shares with everyone else on the machine.

What the suite creates it names and cleans up itself, so it never touches anyone else's data:

* Redis: two databases of its own (``--redis-db`` for the brokers and the next one for
  results), checked empty at the start and emptied key by key (``SCAN`` + ``UNLINK``, never
  ``FLUSHALL``) after every phase. Pub/sub channels are not per database, so systems that
  broadcast on Redis also get a key prefix (see ``peers.py``).
* RabbitMQ: every queue and exchange name contains the run's prefix (``cbench.<hex>.``);
  after every phase the names with that prefix are listed (``rabbitmqctl``) and deleted
  over AMQP. Reply and control queues of workers that are gone delete themselves
  (auto-delete, exclusive).

Also here: the bare client publishes (redis-py ``XADD``, aiormq confirmed ``basic.publish``)
that give the broker client's own limit for the enqueue ratio, and the bare client drains
(a consumer that reads in batches and acks in batches, running nothing) that show how far
the broker itself lets a drain go on this machine.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import aiormq
import redis
from pamqp.commands import Basic

__all__ = ["RAW_BODY", "RabbitServer", "RedisServer", "raw_amqp_drain", "raw_amqp_rate",
           "raw_redis_drain", "raw_redis_rate"]

RAW_BODY = b"x" * 600
"""Body of a bare publish: about the size of a celeriac no-op task message on the wire."""


@dataclass
class RedisServer:
    """One Redis server and the two databases the suite owns on it."""

    host: str
    port: int
    broker_db: int
    _counter: redis.Redis | None = field(default=None, init=False, repr=False)

    @property
    def results_db(self) -> int:
        return self.broker_db + 1

    def url(self, db: int, key_prefix: str = "") -> str:
        query = f"?key_prefix={quote(key_prefix)}" if key_prefix else ""
        return f"redis://{self.host}:{self.port}/{db}{query}"

    def client(self, db: int) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db)

    def keys_in_use(self) -> dict[int, int]:
        """Keys now in each of the suite's databases (all zero when nothing is left)."""
        counts = {}
        for db in (self.broker_db, self.results_db):
            with self.client(db) as client:
                counts[db] = int(client.dbsize())
        return counts

    def clear(self) -> int:
        """Delete every key in the suite's two databases; returns how many there were."""
        deleted = 0
        for db in (self.broker_db, self.results_db):
            with self.client(db) as client:
                for batch in _batches(client.scan_iter(count=1000), 1000):
                    deleted += int(client.unlink(*batch))
        return deleted

    def results_count(self) -> int:
        """Keys in the results database: one per stored result for the systems that use it."""
        if self._counter is None:
            self._counter = self.client(self.results_db)
        return int(self._counter.dbsize())


def _batches(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class RabbitServer:
    """One RabbitMQ virtual host, reached with one URL (``amqp://user:pw@host:port/vhost``)."""

    url: str

    def names(self, prefix: str) -> tuple[list[str], list[str]]:
        """(queues, exchanges) whose names contain ``prefix``, as ``rabbitmqctl`` lists them.

        Empty when ``rabbitmqctl`` is not on this machine (then only the names the caller
        knows can be deleted).
        """
        if shutil.which("rabbitmqctl") is None:
            return [], []
        vhost = self.vhost
        lists = []
        for what in ("list_queues", "list_exchanges"):
            out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", what, "-p", vhost,
                                  "name"], capture_output=True, text=True, timeout=120).stdout
            lists.append([n for n in out.split() if prefix in n])
        return lists[0], lists[1]

    @property
    def vhost(self) -> str:
        path = urlsplit(self.url).path
        return unquote(path[1:]) if len(path) > 1 else "/"

    def delete(self, prefix: str) -> int:
        """Delete every queue and exchange whose name contains ``prefix``; returns how many."""
        queues, exchanges = self.names(prefix)
        if queues or exchanges:
            asyncio.run(self._delete(queues, exchanges))
        return len(queues) + len(exchanges)

    async def _delete(self, queues: list[str], exchanges: list[str]) -> None:
        connection = await aiormq.connect(self.url)
        try:
            channel = await connection.channel()
            for queue in queues:
                await channel.queue_delete(queue)
            for exchange in exchanges:
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()


# -- the broker client alone ----------------------------------------------------------------------

def raw_redis_rate(server: RedisServer, key: str, count: int) -> float:
    """Publishes/s of ``count`` one-at-a-time ``XADD`` calls with redis-py (hiredis parser)."""
    with server.client(server.broker_db) as client:
        client.ping()
        start = time.perf_counter()
        for _ in range(count):
            client.xadd(key, {"m": RAW_BODY})
        seconds = time.perf_counter() - start
        if client.xlen(key) != count:
            raise RuntimeError(f"raw XADD: {client.xlen(key)} entries after {count} publishes")
        client.unlink(key)
    return count / seconds


#: Messages a bare drain reads (Redis: per XREADGROUP; RabbitMQ: the prefetch) and acks at once.
RAW_BATCH = 100


def raw_redis_drain(server: RedisServer, key: str, count: int) -> float:
    """Messages/s of a bare Streams consumer: ``count`` entries (added beforehand, pipelined)
    read with ``XREADGROUP COUNT`` in a consumer group, each batch acked (``XACK`` + ``XDEL``,
    as a queue consumes) in the round trip of the next read; from the first read to the
    last ack."""
    with server.client(server.broker_db) as client:
        pipe = client.pipeline(transaction=False)
        for n in range(count):
            pipe.xadd(key, {"m": RAW_BODY})
            if n % 1000 == 999:
                pipe.execute()
        pipe.execute()
        client.xgroup_create(key, "g", id="0")
        done, acks = 0, []
        start = time.perf_counter()
        while True:
            pipe = client.pipeline(transaction=False)
            if acks:
                pipe.xack(key, "g", *acks)
                pipe.xdel(key, *acks)
            pipe.xreadgroup("g", "c", {key: ">"}, count=RAW_BATCH)
            reply = pipe.execute()[-1]
            acks = [entry_id for _, entries in reply for entry_id, _ in entries]
            done += len(acks)
            if not acks:
                break
        seconds = time.perf_counter() - start
        if done != count or client.xlen(key):
            raise RuntimeError(f"raw drain: read {done} of {count}, {client.xlen(key)} left")
        client.unlink(key)
    return count / seconds


def raw_amqp_drain(server: RabbitServer, queue: str, count: int) -> float:
    """Messages/s of a bare aiormq consumer: ``count`` persistent messages (published
    beforehand, confirmed) consumed from a durable queue with a prefetch of ``RAW_BATCH``,
    acked ``multiple`` every half of that; from the first delivery to the last."""
    return asyncio.run(_raw_amqp_drain(server.url, queue, count))


async def _raw_amqp_drain(url: str, queue: str, count: int) -> float:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True)
        props = Basic.Properties(delivery_mode=2, content_type="application/json")
        for start in range(0, count, 1000):
            await asyncio.gather(*(channel.basic_publish(RAW_BODY, routing_key=queue,
                                                         properties=props)
                                   for _ in range(min(1000, count - start))))
        await channel.basic_qos(prefetch_count=RAW_BATCH)
        loop = asyncio.get_running_loop()
        finished: asyncio.Future[float] = loop.create_future()
        first: list[float] = []  # (when the first delivery came)
        got = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal got
            if not first:
                first.append(time.perf_counter())
            got += 1
            if got % (RAW_BATCH // 2) == 0 or got == count:
                await channel.basic_ack(message.delivery.delivery_tag, multiple=True)
            if got == count and not finished.done():
                finished.set_result(time.perf_counter())

        await channel.basic_consume(queue, on_message)
        ended = await asyncio.wait_for(finished, 600)
        left = await channel.queue_delete(queue)
    finally:
        await connection.close()
    if left.message_count:
        raise RuntimeError(f"raw drain: {left.message_count} of {count} messages left")
    return count / (ended - first[0])


def raw_amqp_rate(server: RabbitServer, queue: str, count: int) -> float:
    """Publishes/s of ``count`` persistent messages to a durable queue with aiormq, each
    publish waiting for the broker's confirm before the next."""
    return asyncio.run(_raw_amqp(server.url, queue, count))


async def _raw_amqp(url: str, queue: str, count: int) -> float:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()  # publisher confirms are on by default
        await channel.queue_declare(queue, durable=True)
        props = Basic.Properties(delivery_mode=2, content_type="application/json")
        start = time.perf_counter()
        for _ in range(count):
            await channel.basic_publish(RAW_BODY, routing_key=queue, properties=props)
        seconds = time.perf_counter() - start
        declared = await channel.queue_declare(queue, passive=True)
        await channel.queue_delete(queue)
    finally:
        await connection.close()
    if declared.message_count != count:
        raise RuntimeError(f"raw publish: {declared.message_count} messages after {count}")
    return count / seconds
