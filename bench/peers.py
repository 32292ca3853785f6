"""celeriac and its six peers on Redis and RabbitMQ, behind one small interface.

Each system object is bound to one :class:`Place` (which broker, and the name prefix that
keeps this phase's queues and keys apart from everything else) and one result store. It
loads its tasks module (``tasks_<system>.py``) with ``BENCH_BROKER``, ``BENCH_BACKEND`` and
``BENCH_QUEUE`` set, and the worker it starts inherits the same variables, so both sides
use the same queue.

What "2 worker processes" and "high concurrency" mean for each system is in its
``noop_workers`` and ``sleep_modes``; bench/README.md has the table.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from servers import RabbitServer, RedisServer

__all__ = ["PEERS", "SYSTEMS", "NetSystem", "Place", "SleepMode", "celeriac_has"]

BIN = Path(sys.prefix) / "bin"
POLL = 0.001
"""Result poll interval for the peers whose result wait polls (arq, Taskiq): their best."""


@dataclass(frozen=True)
class Place:
    """Where one phase of one system runs: a broker and a name prefix of its own."""

    broker: str  # "redis" or "amqp"
    prefix: str  # e.g. "cbench.1a2b3c.celery.2.noop"
    redis: RedisServer
    rabbit: RabbitServer
    phase: str = ""  # e.g. "noop", "sleep0"

    def redis_url(self, results: bool = False, key_prefix: str = "") -> str:
        db = self.redis.results_db if results else self.redis.broker_db
        return self.redis.url(db, key_prefix)


@dataclass(frozen=True)
class SleepMode:
    """One high-concurrency way of running the sleep workload."""

    label: str  # how the table names it, e.g. "-P threads -c 100"
    task: str  # the task to send: "sleep" (blocking) or "sleep_async"
    workers: list[list[str]]  # one command per worker process to start


def celeriac_has(module: str) -> bool:
    """Whether this celeriac has ``module`` (pools and transports are still being written)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def load_module(name: str, env: dict[str, str]) -> ModuleType:
    """Import tasks module ``name`` afresh with ``env`` in the environment."""
    os.environ.update(env)
    sys.modules.pop(name, None)
    return importlib.import_module(name)


class NetSystem:
    """What the suite needs from a task queue on a network broker."""

    name = ""
    package = ""  # distribution name, for the version
    tasks_module = ""
    brokers: tuple[str, ...] = ("redis", "amqp")
    usual_log_lines: tuple[str, ...] = ()
    noop_label = ""  # how the noop drain's worker runs, for the report
    stop_timeout = 30.0  # seconds after SIGTERM before the worker tree is killed

    def __init__(self, place: Place, results: str = "redis") -> None:
        self.place = place
        self.results = results
        self.env = self.environment()
        self.tasks = load_module(self.tasks_module, self.env)
        self.sent = 0

    # -- configuration --------------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """BENCH_* variables for the tasks module (here and in the worker)."""
        return {"BENCH_BROKER": self.broker_url(), "BENCH_BACKEND": self.backend_url(),
                "BENCH_QUEUE": self.place.prefix, "BENCH_MARK_URL": self.place.redis_url(),
                "BENCH_PHASE": self.place.phase}

    def first_start(self) -> float | None:
        """When the first sleep task started (wall clock; see marks.py), if one said so."""
        client = self.place.redis.client(self.place.redis.broker_db)
        try:
            raw = client.get(f"{self.place.prefix}.first-start")
        finally:
            client.close()
        return float(raw) if raw is not None else None

    def broker_url(self) -> str:
        if self.place.broker == "redis":
            return self.place.redis_url()
        return self.place.rabbit.url

    def backend_url(self) -> str:
        return self.place.redis_url(results=True)

    @classmethod
    def latency_results(cls, broker: str) -> str:
        """The result store used for round trips on ``broker``: "redis" unless overridden."""
        return "redis"

    @classmethod
    def result_label(cls, broker: str, results: str) -> str:
        return "Redis" if results == "redis" else results

    # -- work -----------------------------------------------------------------------------------
    def send(self, task: str, count: int) -> None:
        """Send ``count`` calls of ``task``, one call at a time (each call returns first)."""
        call = self.sender(task)
        for _ in range(count):
            call()
        self.sent += count

    def sender(self, task: str) -> Callable[[], Any]:
        raise NotImplementedError

    def results_stored(self) -> int:
        return self.place.redis.results_count()

    def round_trip(self, timeout: float) -> None:
        raise NotImplementedError

    def noop_workers(self) -> list[list[str]]:
        """Commands for the noop drain: two worker processes' worth."""
        raise NotImplementedError

    def sleep_modes(self) -> list[SleepMode]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- celeriac -------------------------------------------------------------------------------------

class CeleriacNet(NetSystem):
    name = "celeriac"
    package = "celeriac"
    tasks_module = "tasks_celeriac_net"
    noop_label = "-P prefork -c 2"
    usual_log_lines = ("Warm shutdown requested",)

    def __init__(self, place: Place, results: str = "redis") -> None:
        super().__init__(place, results)
        self.app = self.tasks.app

    def broker_url(self) -> str:
        if self.place.broker == "redis":
            return self.place.redis_url(key_prefix=self.place.prefix + ":")
        return f"{self.place.rabbit.url}?name_prefix={self.place.prefix}."

    def backend_url(self) -> str:
        if self.results == "rpc":
            return "rpc://"
        return self.place.redis_url(results=True, key_prefix=self.place.prefix + ":")

    @classmethod
    def latency_results(cls, broker: str) -> str:
        return "rpc" if broker == "amqp" and celeriac_has("celeriac.results.rpc") else "redis"

    @classmethod
    def result_label(cls, broker: str, results: str) -> str:
        return "rpc://" if results == "rpc" else "Redis"

    def sender(self, task: str) -> Callable[[], Any]:
        return getattr(self.tasks, task).delay

    def send_group(self, count: int) -> None:
        from celeriac import group
        group(self.tasks.noop.s() for _ in range(count)).apply_async()

    def send_many(self, count: int) -> None:
        self.app.send_many([self.tasks.noop.s() for _ in range(count)])

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop.delay().get(timeout=timeout)

    def _worker(self, pool: str, concurrency: int) -> list[list[str]]:
        extra = shlex.split(os.environ.get("BENCH_CELERIAC_WORKER_ARGS", ""))
        return [[str(BIN / "celeriac"), "-A", self.tasks_module, "worker", "-P", pool,
                 "-c", str(concurrency), "-l", "warning", *extra]]

    def noop_workers(self) -> list[list[str]]:
        return self._worker("prefork", 2)

    def sleep_modes(self) -> list[SleepMode]:
        modes = [SleepMode("-P threads -c 100", "sleep", self._worker("threads", 100))]
        if celeriac_has("celeriac.pools.asyncio"):
            modes.append(SleepMode("-P asyncio -c 100", "sleep_async",
                                   self._worker("asyncio", 100)))
        if celeriac_has("celeriac.pools.gevent") and celeriac_has("gevent"):
            modes.append(SleepMode("-P gevent -c 100", "sleep",
                                   self._worker("gevent", 100)))
        return modes

    def close(self) -> None:
        self.app.close()


# -- Celery ---------------------------------------------------------------------------------------

class CelerySystem(NetSystem):
    name = "celery"
    package = "celery"
    tasks_module = "tasks_celery"
    usual_log_lines = (  # Celery's warning about running as root, as on this machine
        "SecurityWarning", "absolutely not recommended", "--uid option", "User information:",
        "_warn_or_raise_security_error", "Warm shutdown")
    noop_label = "-P prefork -c 2"

    def broker_url(self) -> str:
        if self.place.broker == "redis":
            return self.place.redis_url()
        return "py" + self.place.rabbit.url  # pyamqp://, Celery's default AMQP transport

    def backend_url(self) -> str:
        return "rpc://" if self.results == "rpc" else self.place.redis_url(results=True)

    @classmethod
    def latency_results(cls, broker: str) -> str:
        return "rpc" if broker == "amqp" else "redis"

    @classmethod
    def result_label(cls, broker: str, results: str) -> str:
        return "rpc://" if results == "rpc" else "Redis"

    def sender(self, task: str) -> Callable[[], Any]:
        return getattr(self.tasks, task).delay

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop.delay().get(timeout=timeout)

    def _worker(self, pool: str, concurrency: int) -> list[list[str]]:
        return [[str(BIN / "celery"), "-A", self.tasks_module, "--quiet", "worker", "-P", pool,
                 "-c", str(concurrency), "-l", "warning"]]

    def noop_workers(self) -> list[list[str]]:
        return self._worker("prefork", 2)

    def sleep_modes(self) -> list[SleepMode]:
        return [SleepMode("-P threads -c 100", "sleep", self._worker("threads", 100))]

    def close(self) -> None:
        self.tasks.app.close()


# -- Dramatiq -------------------------------------------------------------------------------------

class DramatiqSystem(NetSystem):
    name = "dramatiq"
    package = "dramatiq"
    tasks_module = "tasks_dramatiq"
    usual_log_lines = ("[INFO]",)
    noop_label = "-p 2 -t 8 (2 processes x 8 threads)"

    def broker_url(self) -> str:
        if self.place.broker == "redis":
            return self.place.redis_url()
        return self.place.rabbit.url

    def sender(self, task: str) -> Callable[[], Any]:
        return getattr(self.tasks, task).send

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop.send().get_result(block=True, timeout=int(timeout * 1000))

    def _worker(self, processes: int, threads: int) -> list[list[str]]:
        return [[str(BIN / "dramatiq"), self.tasks_module, "-p", str(processes),
                 "-t", str(threads)]]

    def noop_workers(self) -> list[list[str]]:
        return self._worker(2, 8)

    def sleep_modes(self) -> list[SleepMode]:
        return [SleepMode("1 process x 100 threads", "sleep", self._worker(1, 100))]

    def close(self) -> None:
        self.tasks.broker.close()


# -- Huey -----------------------------------------------------------------------------------------

class HueyRedis(NetSystem):
    name = "huey"
    package = "huey"
    tasks_module = "tasks_huey_redis"
    noop_label = "-w 2 -k process"
    brokers = ("redis",)

    def sender(self, task: str) -> Callable[[], Any]:
        return getattr(self.tasks, task)

    def results_stored(self) -> int:
        return int(self.tasks.huey.result_count())

    def round_trip(self, timeout: float) -> None:
        self.tasks.noop().get(blocking=True, timeout=timeout)

    def _worker(self, workers: int, kind: str) -> list[list[str]]:
        return [[str(BIN / "huey_consumer"), f"{self.tasks_module}.huey", "-w", str(workers),
                 "-k", kind, "-q"]]

    def noop_workers(self) -> list[list[str]]:
        return self._worker(2, "process")

    def sleep_modes(self) -> list[SleepMode]:
        return [SleepMode("-w 100 -k thread", "sleep", self._worker(100, "thread"))]

    def close(self) -> None:
        self.tasks.huey.storage.conn.close()


# -- RQ -------------------------------------------------------------------------------------------

class RQSystem(NetSystem):
    name = "rq"
    package = "rq"
    tasks_module = "tasks_rq"
    noop_label = "worker-pool -n 2 (a forked job process per task)"
    brokers = ("redis",)

    def __init__(self, place: Place, results: str = "redis") -> None:
        super().__init__(place, results)
        import redis
        from rq import Queue
        self.connection = redis.Redis.from_url(self.broker_url())
        self.queue = Queue(place.prefix, connection=self.connection)

    def sender(self, task: str) -> Callable[[], Any]:
        name = f"{self.tasks_module}.{task}"
        return lambda: self.queue.enqueue(name)

    def results_stored(self) -> int:
        return int(self.queue.finished_job_registry.count)

    def round_trip(self, timeout: float) -> None:
        job = self.queue.enqueue(f"{self.tasks_module}.noop")
        result = job.latest_result(timeout=max(1, round(timeout)))
        if result is None or result.type != result.Type.SUCCESSFUL:
            raise TimeoutError(f"rq: no successful result for {job.id} within {timeout}s")

    def _pool(self, workers: int) -> list[list[str]]:
        return [[str(BIN / "rq"), "worker-pool", "-u", self.broker_url(), "-n", str(workers),
                 "--quiet", self.place.prefix]]

    def noop_workers(self) -> list[list[str]]:
        return self._pool(2)

    def sleep_modes(self) -> list[SleepMode]:
        # RQ has no thread or async mode: a worker runs one job at a time in a forked process.
        return [SleepMode("worker-pool -n 2 (no thread/async mode)", "sleep", self._pool(2))]

    def close(self) -> None:
        self.connection.close()


# -- the asyncio-native peers: their clients run on a loop of the benchmark's own --------------

class AsyncClient(NetSystem):
    """A peer whose client API is coroutines: one loop, sends awaited one after the other."""

    def __init__(self, place: Place, results: str = "redis") -> None:
        super().__init__(place, results)
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def send(self, task: str, count: int) -> None:
        self.run(self._send(task, count))
        self.sent += count

    async def _send(self, task: str, count: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.loop.close()


class ArqSystem(AsyncClient):
    name = "arq"
    package = "arq"
    tasks_module = "tasks_arq"
    usual_log_lines = ("Starting worker for", "redis_version=")
    stop_timeout = 5.0  # on redis-py 8 a SIGTERM sometimes leaves it waiting on its loop
    noop_label = "2 worker processes, max_jobs=10 each"
    brokers = ("redis",)

    def __init__(self, place: Place, results: str = "redis") -> None:
        super().__init__(place, results)
        from arq import create_pool
        self.pool = self.run(create_pool(self.tasks.REDIS, default_queue_name=place.prefix))

    async def _send(self, task: str, count: int) -> None:
        for _ in range(count):
            await self.pool.enqueue_job(task)

    def results_stored(self) -> int:
        # arq removes a job from its queue (a sorted set) in the transaction that stores its
        # result, so the jobs no longer queued are the results stored.
        return self.sent - int(self.run(self.pool.zcard(self.place.prefix)))

    def round_trip(self, timeout: float) -> None:
        async def once() -> None:
            job = await self.pool.enqueue_job("noop")
            await job.result(timeout=timeout, poll_delay=POLL)
        self.run(once())

    def _workers(self, count: int, max_jobs: int) -> list[list[str]]:
        # env(1) execs arq in the same process, with max_jobs for tasks_arq to read
        return [["env", f"BENCH_CONCURRENCY={max_jobs}", str(BIN / "arq"),
                 f"{self.tasks_module}.WorkerSettings"]] * count

    def noop_workers(self) -> list[list[str]]:
        return self._workers(2, 10)

    def sleep_modes(self) -> list[SleepMode]:
        return [SleepMode("1 worker, max_jobs=100", "sleep", self._workers(1, 100))]

    def close(self) -> None:
        self.run(self.pool.aclose())
        super().close()


class TaskiqSystem(AsyncClient):
    name = "taskiq"
    package = "taskiq"
    tasks_module = "tasks_taskiq"
    noop_label = "--workers 2"

    def __init__(self, place: Place, results: str = "redis") -> None:
        super().__init__(place, results)
        self.run(self.tasks.broker.startup())

    def broker_url(self) -> str:
        if self.place.broker == "redis":
            return self.place.redis_url()
        return self.place.rabbit.url

    async def _send(self, task: str, count: int) -> None:
        kicker = getattr(self.tasks, task)
        for _ in range(count):
            await kicker.kiq()

    def round_trip(self, timeout: float) -> None:
        async def once() -> None:
            task = await self.tasks.noop.kiq()
            await task.wait_result(check_interval=POLL, timeout=timeout)
        self.run(once())

    def _workers(self, processes: int, max_async: int) -> list[list[str]]:
        return [[str(BIN / "taskiq"), "worker", f"{self.tasks_module}:broker", "--workers",
                 str(processes), "--max-async-tasks", str(max_async), "--log-level",
                 "WARNING"]]

    def noop_workers(self) -> list[list[str]]:
        return self._workers(2, 100)

    def sleep_modes(self) -> list[SleepMode]:
        return [SleepMode("1 worker, --max-async-tasks 100", "sleep", self._workers(1, 100))]

    def close(self) -> None:
        self.run(self.tasks.broker.shutdown())
        super().close()


SYSTEMS: dict[str, type[NetSystem]] = {cls.name: cls for cls in (
    CeleriacNet, CelerySystem, DramatiqSystem, HueyRedis, RQSystem, ArqSystem, TaskiqSystem)}
PEERS = [name for name in SYSTEMS if name != "celeriac"]
