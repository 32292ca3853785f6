"""Soak: many drains on fresh workers, some with a fault on the way; what is lost or late.

Each round sends ``--tasks`` no-op tasks to a queue of its own (``send_many``), starts a
fresh worker on it (``-P prefork -c 2``, ``-P threads -c 50`` or ``-P gevent -c 50``, in
turns) and waits until every task's result is stored in Redis. A round fails when that
takes longer than ``--deadline`` seconds: well under the lease (60 s), so a delivery that
has to wait out its lease shows as a failure rather than as a slow round. Rounds take turns
through the faults of their broker, each pool through all of them:

- Redis: none; the server forgets its scripts (``SCRIPT FLUSH``: everyone's, loaded again
  when next used) before the worker starts; the same halfway through the drain; the server
  closes every connection of the worker and its pool children (``CLIENT KILL``) halfway.
- RabbitMQ (results on Redis): none; the worker's connections are closed by the broker
  (``rabbitmqctl close_connection``) halfway through the drain.
- Both: the worker is killed (SIGKILL) halfway through a drain of ``acks_late`` tasks and a
  fresh one started; every task must still end with a result (at least once). On Redis
  these rounds use an 8-second lease, the time the killed worker's messages wait before
  another worker may take them.

Progress goes to stderr, a summary to stdout; the exit status is 1 if any round failed.
``make soak`` runs it with its defaults (about five minutes here); it is not part of
``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import redis

TASKS_MODULE = textwrap.dedent("""
    import os
    from celeriac import Celeriac

    app = Celeriac("soak", broker=os.environ["SOAK_BROKER"], backend=os.environ["SOAK_BACKEND"],
                   task_default_queue=os.environ["SOAK_QUEUE"],
                   broker_lease_seconds=float(os.environ["SOAK_LEASE"]))

    @app.task
    def noop():
        return None

    @app.task(acks_late=True)
    def noop_late():
        return None
""")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rabbit_close_connections_of(pid: int) -> int:
    """Close the broker connections of process ``pid`` (their names say ``pid <pid>``)."""
    out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", "list_connections",
                          "pid", "client_properties"], capture_output=True, text=True,
                         timeout=60).stdout
    closed = 0
    for line in out.splitlines():
        if f"celeriac pid {pid} " in line:
            subprocess.run(["rabbitmqctl", "-q", "close_connection", line.split()[0],
                            "soak: closed on purpose"], capture_output=True, timeout=60)
            closed += 1
    return closed


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: /proc/<pid>/task/<tid>/children)."""
    tree, todo = [], [pid]
    while todo:
        one = todo.pop()
        tree.append(one)
        for task in Path(f"/proc/{one}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return tree


def local_tcp_ports(pids: list[int]) -> set[int]:
    """The local ports of the TCP sockets these processes hold (IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def redis_kill_connections_of(client: redis.Redis, pid: int) -> int:
    """Close (``CLIENT KILL``) the Redis connections of process ``pid`` and its children."""
    ports = local_tcp_ports(process_tree(pid))
    killed = 0
    for one in client.client_list():
        if int(one["addr"].rsplit(":", 1)[1]) in ports:
            killed += client.client_kill_filter(_id=one["id"])
    return killed


class Round:
    def __init__(self, args: argparse.Namespace, broker: str, fault: str, pool: str,
                 workdir: Path) -> None:
        self.args, self.broker, self.fault, self.pool = args, broker, fault, pool
        self.queue = f"soak-{uuid.uuid4().hex[:10]}"
        self.results_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
        self.results = redis.Redis.from_url(self.results_url)  # (the soak's database alone)
        broker_url = (f"{args.redis.rstrip('/')}/{args.redis_db - 1}?key_prefix={self.queue}:"
                      if broker == "redis" else f"{args.amqp}?name_prefix={self.queue}.")
        self.killing = fault == "kill-worker-halfway"
        self.env = dict(os.environ, SOAK_BROKER=broker_url, SOAK_QUEUE=self.queue,
                        SOAK_LEASE=str(KILL_LEASE if self.killing else 60.0),
                        SOAK_BACKEND=f"{self.results_url}?key_prefix={self.queue}:",
                        PYTHONPATH=os.pathsep.join(
                            p for p in (os.environ.get("PYTHONPATH"), str(workdir)) if p))
        self.workdir = workdir

    def stored(self) -> int:
        return int(self.results.dbsize())  # (the database is the soak's alone)

    def run(self) -> tuple[bool, float, int]:
        """(passed, seconds, results stored)."""
        task = "noop_late" if self.killing else "noop"
        send = subprocess.run(
            [sys.executable, "-c", "import tasks_soak as t; "
             f"t.app.send_many([t.{task}.s() for _ in range({self.args.tasks})])"],
            env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=120)
        if send.returncode:
            raise RuntimeError(f"sending failed: {send.stderr.strip()[-500:]}")
        if self.fault == "script-flush-before":
            self.results.script_flush()
        self.worker = self.start_worker()
        started, faulted, done = time.monotonic(), False, 0
        try:
            while done < self.args.tasks:
                if time.monotonic() - started > self.args.deadline:
                    return False, time.monotonic() - started, done
                done = self.stored()
                if not faulted and done >= self.args.tasks // 2:
                    faulted = True
                    self.fault_halfway()
                time.sleep(0.05)
            return True, time.monotonic() - started, done
        finally:
            self.worker.terminate()
            self.worker.wait(60)
            self.clean()

    def start_worker(self) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{self.queue}.log", "a") as worker_log:
            return subprocess.Popen(
                [sys.executable, "-m", "celeriac", "-A", "tasks_soak", "worker", "-P", self.pool,
                 "-c", str(CONCURRENCY[self.pool]), "-l", "warning"], env=self.env,
                cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=worker_log)

    def fault_halfway(self) -> None:
        if self.fault == "script-flush-halfway":
            self.results.script_flush()
        elif self.fault == "close-connections-halfway" and self.broker == "amqp":
            log(f"  closed {rabbit_close_connections_of(self.worker.pid)} connection(s) of "
                "the worker")
        elif self.fault == "close-connections-halfway":
            log(f"  closed {redis_kill_connections_of(self.results, self.worker.pid)} "
                "connection(s) of the worker")
        elif self.killing:
            self.worker.kill()  # (its pool children die with it)
            self.worker.wait(60)
            log(f"  killed the worker at {self.stored()} results; starting another")
            self.worker = self.start_worker()

    def clean(self) -> None:
        for db in (self.args.redis_db - 1, self.args.redis_db):
            redis.Redis.from_url(f"{self.args.redis.rstrip('/')}/{db}").flushdb()
        if self.broker == "amqp":
            asyncio.run(self._delete_amqp_names())

    async def _delete_amqp_names(self) -> None:
        """The round's queues and exchanges (their names start with its prefix)."""
        import aiormq

        names = {}
        for what in ("queues", "exchanges"):
            out = subprocess.run(["rabbitmqctl", "-q", "--no-table-headers", f"list_{what}",
                                  "name"], capture_output=True, text=True, timeout=60).stdout
            names[what] = [n for n in out.split() if n.startswith(self.queue)]
        connection = await aiormq.connect(self.args.amqp)
        try:
            channel = await connection.channel()
            for queue in names["queues"]:
                await channel.queue_delete(queue)
            for exchange in names["exchanges"]:
                await channel.exchange_delete(exchange)
        finally:
            await connection.close()


CONCURRENCY = {"prefork": 2, "threads": 50, "gevent": 50}
#: The Redis lease (seconds) in rounds that kill the worker: what its messages wait out.
KILL_LEASE = 8.0

FAULTS: dict[str, list[str]] = {
    "redis": ["none", "script-flush-before", "script-flush-halfway",
              "close-connections-halfway", "kill-worker-halfway"],
    "amqp": ["none", "close-connections-halfway", "kill-worker-halfway"],
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="rounds per broker")
    parser.add_argument("--tasks", type=int, default=10000, help="tasks per round")
    parser.add_argument("--deadline", type=float, default=30.0,
                        help="seconds a round may take (keep it under the 60 s lease)")
    parser.add_argument("--brokers", default="redis,amqp",
                        help="comma-separated: redis, amqp")
    parser.add_argument("--pools", default="prefork,threads,gevent",
                        help="comma-separated; each takes a turn through the faults")
    every = sorted({fault for faults in FAULTS.values() for fault in faults})
    parser.add_argument("--faults", default="",
                        help="comma-separated faults to take turns through (default: all of "
                             f"each broker's: {', '.join(every)})")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379",
                        help="Redis server (results, and the broker in Redis rounds)")
    parser.add_argument("--redis-db", type=int, default=9,
                        help="results database; the broker's is the one before it")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args(argv)
    unknown = set(args.brokers.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"unknown broker(s) {sorted(unknown)}: use redis, amqp or both")
    if args.redis_db < 1:
        parser.error("--redis-db must be 1 or more: the broker's database is the one before")
    pools = args.pools.split(",")
    if set(pools) - set(CONCURRENCY):
        parser.error(f"unknown pool(s) {sorted(set(pools) - set(CONCURRENCY))}: use "
                     f"{', '.join(CONCURRENCY)}")
    chosen = [f for f in args.faults.split(",") if f]
    for broker in args.brokers.split(","):
        wrong = [f for f in chosen if f not in FAULTS[broker]]
        if wrong:
            parser.error(f"fault(s) {wrong} not for {broker}: use {', '.join(FAULTS[broker])}")
    for db in (args.redis_db - 1, args.redis_db):
        if redis.Redis.from_url(f"{args.redis.rstrip('/')}/{db}").dbsize():
            parser.error(f"Redis database {db} is not empty: the soak empties its two "
                         "databases after each round, so pick free ones with --redis-db")
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="celeriac-soak-") as tmp:
        workdir = Path(tmp)
        (workdir / "tasks_soak.py").write_text(TASKS_MODULE)
        for broker in args.brokers.split(","):
            for n in range(args.rounds):
                faults = chosen or FAULTS[broker]
                fault = faults[n % len(faults)]
                pool = pools[n // len(faults) % len(pools)]
                one = Round(args, broker, fault, pool, workdir)
                passed, seconds, done = one.run()
                what = f"{broker} round {n + 1}/{args.rounds} (-P {pool}, {fault})"
                log(f"{what}: {done}/{args.tasks} results in {seconds:.1f} s"
                    f"{'' if passed else ' -- FAILED'}")
                if not passed:
                    tail = (workdir / f"{one.queue}.log").read_text()[-2000:]
                    failures.append(f"{what}: {done}/{args.tasks} "
                                    f"results after {seconds:.1f} s; the worker's log ends:\n"
                                    f"{textwrap.indent(tail, '    ')}")
    total = args.rounds * len(args.brokers.split(","))
    print(f"soak: {total - len(failures)} of {total} rounds passed ({args.tasks} tasks each, "
          f"deadline {args.deadline:g} s)")
    for line in failures:
        print(f"- {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
