"""The broker suite: celeriac against Celery, Dramatiq, Huey, RQ, arq and Taskiq on the same
Redis and RabbitMQ (``python bench/bench.py --suite brokers``).

For each broker, ``--repeat`` rounds; each round runs every system that supports the broker
(the order reversing every round) and the bare broker client. One run of one system is a
few phases, each on fresh queue names, cleaned up after itself:

* noop: N tasks sent one at a time (timed, no worker running), then drained by the system's
  two-process worker (tasks/s from the first stored result to the last, and the CPU time of
  the worker's process tree over the same window, per task); one second later the idle
  tree's memory; then sequential round trips on that idle worker (systems whose round trips
  use another result store than the drain get a fresh worker for them).
* sleep: S tasks of a 10 ms sleep queued, then drained by each of the system's
  high-concurrency modes: seconds from the moment the first task started (each worker
  process's first sleep task records it, bench/marks.py) to the last stored result.
* bulk (celeriac only): N tasks in one ``group(...).apply_async()`` and in one
  ``app.send_many(...)``.
* raw: N bare publishes with the broker client library alone, then a bare drain of N
  messages (batched reads and acks, nothing run): the broker's own pace on this machine.

A phase that fails (a transport not there yet, a worker that dies, a stuck drain) is
recorded as a note and its cells show "failed"; the run goes on. The report is one table per
broker, then the issue's targets with PASS/FAIL, then every run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import secrets
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from peers import PEERS, SYSTEMS, NetSystem, Place
from proctree import TreeMemory, tree_cpu_seconds, tree_memory
from servers import (
    RabbitServer,
    RedisServer,
    raw_amqp_drain,
    raw_amqp_rate,
    raw_redis_drain,
    raw_redis_rate,
)
from systems import WorkerProcess

from bench import BenchError, log, markdown_table, measure_latency, rate, timed

__all__ = ["main"]

BROKERS = ("redis", "amqp")
BROKER_TITLES = {"redis": "Redis", "amqp": "RabbitMQ"}
RAW = "raw client"
#: What the raw client's runs measure: bare publishes, and a bare drain (nothing run).
RAW_COLUMNS = ("enqueue", "drain")
SLEEP_SECONDS = 0.01
SLEEP_CONCURRENCY = 100


# -- command line ---------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench.py --suite brokers",
        description="celeriac against Celery, Dramatiq, Huey, RQ, arq and Taskiq on the same "
                    "Redis and RabbitMQ: enqueue, noop drain and worker CPU, sleep drain, "
                    "round-trip latency, idle memory, and the bare client's publish rate. "
                    "Prints a markdown table per broker and the targets to stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", choices=("sqlite", "brokers"), default="brokers",
                        help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2000 tasks, 400 sleeps, 100 round trips, 1 repeat "
                             "(unless those are given too)")
    parser.add_argument("-n", "--tasks", type=int, help="no-op tasks (default 20000)")
    parser.add_argument("--sleeps", type=int, help="sleep tasks (default 2000)")
    parser.add_argument("-r", "--round-trips", type=int, help="round trips (default 500)")
    parser.add_argument("--repeat", type=int, help="runs of each system (default 3)")
    parser.add_argument("--brokers", default="redis,amqp", help="comma-separated: redis, amqp")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated systems to run")
    parser.add_argument("--redis", default="127.0.0.1:6379", help="Redis host:port")
    parser.add_argument("--redis-db", type=int, default=10,
                        help="the suite's broker database; results go to the next one. Both "
                             "must be empty: the suite deletes every key in them")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F",
                        help="RabbitMQ URL (virtual host %%2F is '/')")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds the worker idles before its memory is read")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds one round trip may take")
    parser.add_argument("--startup-timeout", type=float, default=60.0,
                        help="seconds a fresh worker may take to answer its first round trip")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds without a new result before a drain is declared stuck")
    parser.add_argument("--workdir", default="/tmp", help="where worker logs go")
    args = parser.parse_args(argv)
    _defaults(args)
    _check(parser, args)
    return args


def _defaults(args: argparse.Namespace) -> None:
    quick = {"tasks": 2000, "sleeps": 400, "round_trips": 100, "repeat": 1}
    full = {"tasks": 20000, "sleeps": 2000, "round_trips": 500, "repeat": 3}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if set(args.brokers) - set(BROKERS) or not args.brokers:
        parser.error(f"--brokers: choose from {', '.join(BROKERS)}")
    if set(args.systems) - set(SYSTEMS) or not args.systems:
        parser.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    if min(args.tasks, args.sleeps, args.round_trips, args.repeat) < 1:
        parser.error("--tasks, --sleeps, --round-trips and --repeat must be at least 1")


# -- results --------------------------------------------------------------------------------------

@dataclass
class NetRun:
    """One run of one system on one broker; None where not measured (n/a or failed)."""

    system: str
    broker: str
    enqueue: float | None = None
    bulk_group: float | None = None
    bulk_many: float | None = None
    drain: float | None = None
    cpu_us: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    sleep_s: dict[str, float] = field(default_factory=dict)
    modes: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    latency_store: str = ""


# -- workers --------------------------------------------------------------------------------------

class WorkerSet:
    """The worker processes of one phase (most systems: one, with its own children)."""

    def __init__(self, commands: list[list[str]], directory: Path, stop_timeout: float) -> None:
        self.stop_timeout = stop_timeout
        self.workers = []
        for index, command in enumerate(commands):
            where = directory / f"worker-{index}"
            where.mkdir(parents=True, exist_ok=True)
            self.workers.append(WorkerProcess(command, where))
        self.started = min(w.started for w in self.workers)

    def exited(self) -> int | None:
        codes = [w.exited() for w in self.workers]
        return next((code for code in codes if code is not None), None)

    def cpu_seconds(self) -> float:
        return sum(tree_cpu_seconds(w.pid) for w in self.workers)

    def memory(self) -> TreeMemory:
        trees = [tree_memory(w.pid) for w in self.workers]
        return TreeMemory(sum(t.processes for t in trees), sum(t.rss_bytes for t in trees),
                          sum(t.pss_bytes for t in trees))

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop(self.stop_timeout)

    def notes(self, usual: Sequence[str], limit: int = 5) -> list[str]:
        notes = []
        for worker in self.workers:
            if worker.forced:
                notes.append(f"did not stop within {self.stop_timeout:g}s of SIGTERM: killed")
            if worker.leftovers:
                notes.append(f"left children running: {worker.leftovers} (killed)")
            if worker.proc.returncode not in (0, -15, None):
                notes.append(f"exit status {worker.proc.returncode}")
            lines = [line for line in worker.log_lines()
                     if line.strip() and not any(u in line for u in usual)]
            notes += [f"log: {line[:200]}" for line in lines[:limit]]
            if len(lines) > limit:
                notes.append(f"log: ... {len(lines) - limit} more lines")
        return notes


# -- measurements ---------------------------------------------------------------------------------

@dataclass
class Drain:
    rate: float
    #: from the first stored result to the last (the sleep phase times from the first task's
    #: start instead, see Phases.sleep)
    seconds: float
    cpu_us: float
    startup: float
    finished_wall: float  # time.time() when the last result was seen


def wait_drained(system: NetSystem, workers: WorkerSet, count: int,
                 stall_timeout: float, poll: float = 0.005) -> Drain:
    """Poll the result store until ``count`` results are stored; time and CPU from the first
    result seen to the last (the worker's start-up is left out the same way for every system).
    """
    first: tuple[float, int, float] | None = None  # (time, results, worker CPU seconds)
    seen, progress_at = 0, time.perf_counter()
    while True:
        done = system.results_stored()
        now = time.perf_counter()
        if first is None and done > 0:
            first = (now, done, workers.cpu_seconds())
        if done >= count and first is not None:
            return _drain(first, count, now, workers)
        if done > seen:
            seen, progress_at = done, now
        elif now - progress_at > stall_timeout:
            raise BenchError(f"drain stuck at {done}/{count} results for {stall_timeout:g}s")
        if workers.exited() is not None:
            raise BenchError(f"worker exited with {workers.exited()} at {done}/{count}")
        time.sleep(poll)


def _drain(first: tuple[float, int, float], count: int, last_at: float,
           workers: WorkerSet) -> Drain:
    first_at, first_count, first_cpu = first
    cpu = workers.cpu_seconds() - first_cpu
    counted = count - first_count
    tasks_per_s = rate(counted, last_at - first_at)
    return Drain(tasks_per_s, last_at - first_at, cpu / max(counted, 1) * 1e6,
                 first_at - workers.started, time.time() - (time.perf_counter() - last_at))


def enqueue_rate(system: NetSystem, task: str, count: int) -> float:
    return rate(count, timed(lambda: system.send(task, count)))


class Phases:
    """The phases of one run of one system on one broker, each on names of its own."""

    def __init__(self, kind: type[NetSystem], broker: str, args: argparse.Namespace,
                 ctx: Context, run_no: int) -> None:
        self.kind, self.broker, self.args, self.ctx = kind, broker, args, ctx
        self.base = f"{ctx.token}.{kind.name}.{run_no}"
        self.run = NetRun(kind.name, broker)
        self.label = f"[{BROKER_TITLES[broker]} {kind.name} {run_no}/{args.repeat}]"
        self.logs = ctx.top / f"{broker}-{kind.name}-{run_no}"

    def place(self, phase: str) -> Place:
        return Place(self.broker, f"{self.base}.{phase}", self.ctx.redis, self.ctx.rabbit, phase)

    def guarded(self, phase: str, action: Callable[[], None]) -> None:
        """Run one phase; a failure becomes a note, and the broker is cleaned up either way."""
        try:
            action()
        except Exception as exc:
            self.run.failed.add(phase)
            message = f"{phase} failed: {type(exc).__name__}: {exc}"
            self.run.notes.append(message)
            log(f"{self.label} {message}")
            log("".join(traceback.format_exception(exc, limit=-3)).rstrip())
        finally:
            self.ctx.clean(f"{self.base}.{phase}")

    def start(self, commands: list[list[str]], phase: str) -> WorkerSet:
        return WorkerSet(commands, self.logs / phase, self.kind.stop_timeout)

    def stop(self, system: NetSystem, workers: WorkerSet) -> None:
        workers.stop()
        for note in workers.notes(system.usual_log_lines):
            self.run.notes.append(note)
            log(f"{self.label} worker {note}")

    # -- noop: enqueue, drain, CPU, memory, latency ------------------------------------------
    def noop(self) -> None:
        system = self.kind(self.place("noop"))
        try:
            self.run.enqueue = enqueue_rate(system, "noop", self.args.tasks)
            log(f"{self.label} enqueue one at a time: {self.run.enqueue:,.0f} tasks/s")
            workers = self.start(system.noop_workers(), "noop")
            try:
                self._drain_and_idle(system, workers)
                if self.kind.latency_results(self.broker) == "redis":
                    self._latency(system)
            finally:
                self.stop(system, workers)
        finally:
            system.close()

    def _drain_and_idle(self, system: NetSystem, workers: WorkerSet) -> None:
        drain = wait_drained(system, workers, self.args.tasks, self.args.stall_timeout)
        self.run.drain, self.run.cpu_us = drain.rate, drain.cpu_us
        log(f"{self.label} drain: {drain.rate:,.0f} tasks/s, {drain.cpu_us:,.0f} us CPU/task "
            f"(first result {drain.startup:.2f}s after start)")
        time.sleep(self.args.settle)
        memory = workers.memory()
        self.run.rss_mib, self.run.pss_mib = memory.rss_bytes / 2**20, memory.pss_bytes / 2**20
        log(f"{self.label} idle memory: {memory.processes} processes, RSS "
            f"{self.run.rss_mib:.1f} MiB, PSS {self.run.pss_mib:.1f} MiB")

    def _latency(self, system: NetSystem) -> None:
        self.run.latency_store = system.result_label(self.broker, system.results)
        p50, p99 = measure_latency(system, self.args.round_trips, self.args.timeout)
        self.run.p50_ms, self.run.p99_ms = p50, p99
        log(f"{self.label} round trip ({self.run.latency_store}): p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms")

    def latency_apart(self) -> None:
        """Round trips on a fresh worker, for systems whose round trips use another store."""
        system = self.kind(self.place("latency"), results=self.kind.latency_results(self.broker))
        try:
            workers = self.start(system.noop_workers(), "latency")
            try:
                system.round_trip(self.args.startup_timeout)  # waits out the start-up
                self._latency(system)
            finally:
                self.stop(system, workers)
        finally:
            system.close()

    # -- sleep --------------------------------------------------------------------------------
    def sleep(self, index: int) -> None:
        phase = f"sleep{index}"
        system = self.kind(self.place(phase))
        try:
            mode = system.sleep_modes()[index]  # its commands name this phase's queue
            system.send(mode.task, self.args.sleeps)
            workers = self.start(mode.workers, phase)
            try:
                drain = wait_drained(system, workers, self.args.sleeps, self.args.stall_timeout)
            finally:
                self.stop(system, workers)
            # From the first task's start to the last result: neither start-up nor storing
            # results in batches (which makes the first-to-last-result window short) counts.
            started = system.first_start()
        finally:
            system.close()
        if started is None:
            raise BenchError("no sleep task recorded its start (bench/marks.py)")
        seconds = drain.finished_wall - started
        self.run.sleep_s[mode.label] = seconds
        log(f"{self.label} sleep ({mode.label}): {seconds:.2f} s")

    def sleep_modes(self) -> list[str]:
        system = self.kind(self.place("modes"))
        try:
            return [mode.label for mode in system.sleep_modes()]
        finally:
            system.close()

    # -- bulk (celeriac) ----------------------------------------------------------------------
    def bulk(self, how: str) -> None:
        system = self.kind(self.place(f"bulk-{how}"))
        try:
            send = getattr(system, f"send_{how}")
            value = rate(self.args.tasks, timed(lambda: send(self.args.tasks)))
        finally:
            system.close()
        setattr(self.run, f"bulk_{how}", value)
        log(f"{self.label} bulk enqueue ({how}): {value:,.0f} tasks/s")


@dataclass
class Context:
    """What every run shares: the servers, this benchmark's name token, the log directory."""

    redis: RedisServer
    rabbit: RabbitServer
    token: str
    top: Path

    def clean(self, prefix: str) -> None:
        self.redis.clear()
        try:
            self.rabbit.delete(prefix)
        except Exception as exc:
            log(f"could not clean RabbitMQ names {prefix}*: {exc}")


def run_system(kind: type[NetSystem], broker: str, args: argparse.Namespace, ctx: Context,
               run_no: int) -> NetRun:
    phases = Phases(kind, broker, args, ctx, run_no)
    phases.guarded("noop", phases.noop)
    if kind.latency_results(broker) != "redis":
        phases.guarded("latency", phases.latency_apart)
    modes = phases.run.modes
    phases.guarded("modes", lambda: modes.extend(phases.sleep_modes()))
    for index in range(len(modes)):
        phases.guarded(f"sleep{index}", lambda i=index: phases.sleep(i))
    if hasattr(kind, "send_group"):
        phases.guarded("bulk-group", lambda: phases.bulk("group"))
        phases.guarded("bulk-many", lambda: phases.bulk("many"))
    return phases.run


def run_raw(broker: str, args: argparse.Namespace, ctx: Context, run_no: int) -> NetRun:
    run = NetRun(RAW, broker)
    key = f"{ctx.token}.raw.{run_no}"
    try:
        if broker == "redis":
            run.enqueue = raw_redis_rate(ctx.redis, key, args.tasks)
            run.drain = raw_redis_drain(ctx.redis, key, args.tasks)
        else:
            run.enqueue = raw_amqp_rate(ctx.rabbit, key, args.tasks)
            run.drain = raw_amqp_drain(ctx.rabbit, key, args.tasks)
        log(f"[{BROKER_TITLES[broker]} {RAW} {run_no}/{args.repeat}] publish one at a time: "
            f"{run.enqueue:,.0f}/s; bare drain: {run.drain:,.0f}/s")
    except Exception as exc:
        run.failed.add("noop")
        run.notes.append(f"raw client failed: {type(exc).__name__}: {exc}")
        log(f"[{BROKER_TITLES[broker]} {RAW}] failed: {exc}")
    finally:
        ctx.clean(key)
    return run


def run_broker(broker: str, args: argparse.Namespace, ctx: Context) -> list[NetRun]:
    """``--repeat`` rounds on one broker, every system once a round, the order alternating."""
    names = [n for n in args.systems if broker in SYSTEMS[n].brokers] + [RAW]
    results = []
    for round_no in range(args.repeat):
        order = names if round_no % 2 == 0 else names[::-1]
        for name in order:
            if name == RAW:
                results.append(run_raw(broker, args, ctx, round_no + 1))
            else:
                results.append(run_system(SYSTEMS[name], broker, args, ctx, round_no + 1))
    return results


# -- report ---------------------------------------------------------------------------------------

COLUMNS = (  # (attribute, heading, format)
    ("enqueue", "enqueue/s one at a time", "{:,.0f}"),
    ("bulk_group", "bulk group/s", "{:,.0f}"),
    ("bulk_many", "bulk send_many/s", "{:,.0f}"),
    ("drain", "noop drain/s", "{:,.0f}"),
    ("cpu_us", "worker CPU µs/task", "{:,.0f}"),
    ("sleep", "sleep drain s", "{:.2f}"),
    ("p50_ms", "latency p50 ms", "{:.2f}"),
    ("p99_ms", "latency p99 ms", "{:.2f}"),
    ("rss_mib", "idle RSS MiB", "{:.1f}"),
    ("pss_mib", "idle PSS MiB", "{:.1f}"),
)
PHASE_OF = {"enqueue": "noop", "drain": "noop", "cpu_us": "noop", "rss_mib": "noop",
            "pss_mib": "noop", "p50_ms": "latency", "p99_ms": "latency",
            "bulk_group": "bulk-group", "bulk_many": "bulk-many", "sleep": "sleep"}


def runs_of(results: list[NetRun], system: str, broker: str) -> list[NetRun]:
    return [r for r in results if r.system == system and r.broker == broker]


def median_of(runs: list[NetRun], attr: str) -> float | None:
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(values) if values else None


def sleep_medians(runs: list[NetRun]) -> dict[str, float]:
    labels = dict.fromkeys(label for r in runs for label in r.sleep_s)
    return {label: statistics.median(r.sleep_s[label] for r in runs if label in r.sleep_s)
            for label in labels}


def _failed(runs: list[NetRun], attr: str) -> bool:
    phase = PHASE_OF[attr]
    return any(p.startswith(phase) for r in runs for p in r.failed)


def cell(runs: list[NetRun], attr: str, fmt: str) -> str:
    if attr == "sleep":
        values = sleep_medians(runs)
        if len(values) > 1:
            return ", ".join(f"{v:.2f} ({_short(label)})" for label, v in values.items())
        return next((fmt.format(v) for v in values.values()), "failed" if _failed(
            runs, attr) else "-")
    value = median_of(runs, attr)
    if value is not None:
        return fmt.format(value)
    return "failed" if _failed(runs, attr) else "-"


def _short(label: str) -> str:
    """'-P asyncio -c 100' -> 'asyncio'."""
    words = label.split()
    return words[1] if len(words) > 1 and words[0] == "-P" else label


def broker_table(results: list[NetRun], broker: str, names: list[str],
                 versions: dict[str, str]) -> list[str]:
    rows = []
    for name in names:
        runs = runs_of(results, name, broker)
        title = f"{name} {versions.get(name, '')}".strip()
        if name != RAW and broker not in SYSTEMS[name].brokers:
            rows.append([title] + ["n/a"] * len(COLUMNS))
        elif runs:
            rows.append([title] + [cell(runs, attr, fmt) if name != RAW or attr in RAW_COLUMNS
                                   else "-" for attr, _, fmt in COLUMNS])
    return markdown_table(["system", *(heading for _, heading, _ in COLUMNS)], rows)


# -- targets --------------------------------------------------------------------------------------

@dataclass
class Target:
    what: str
    value: float | None  # the measured ratio or figure
    goal: float
    higher_is_better: bool
    unit: str = "x"
    strict: bool = False  # the value must beat the goal, not just reach it

    def passed(self, value: float) -> bool:
        if self.higher_is_better:
            return value > self.goal if self.strict else value >= self.goal
        return value < self.goal if self.strict else value <= self.goal

    def line(self) -> str:
        sign = {(True, False): "≥", (True, True): ">", (False, False): "≤",
                (False, True): "<"}[(self.higher_is_better, self.strict)]
        goal = f"{sign} {self.goal:g}{self.unit}"
        if self.value is None:
            return f"- {self.what}: not measured (target {goal}) -- NOT MEASURED"
        ok = self.passed(self.value)
        if self.higher_is_better:
            gap = f"{self.value / self.goal:.2f}x of the target"
        else:
            gap = f"{self.goal / self.value:.2f}x margin" if self.value else "inf margin"
            gap = gap if ok else f"{self.value / self.goal:.2f}x over the limit"
        shown = f"{self.value:,.0f}" if self.unit == " µs" else f"{self.value:.2f}"
        return (f"- {self.what}: {shown}{self.unit} (target {goal}) -- "
                f"{'PASS' if ok else 'FAIL'} ({gap})")


def _best_peer(results: list[NetRun], broker: str, attr: str,
               highest: bool) -> tuple[str, float] | None:
    found = [(name, median_of(runs_of(results, name, broker), attr)) for name in PEERS]
    found = [(name, value) for name, value in found if value is not None]
    if not found:
        return None
    pick = max if highest else min
    return pick(found, key=lambda item: item[1])  # type: ignore[return-value]


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def targets(results: list[NetRun], broker: str, args: argparse.Namespace) -> list[str]:
    ours = runs_of(results, "celeriac", broker)
    if not ours:
        return ["- celeriac did not run on this broker"]
    med = {attr: median_of(ours, attr) for attr, _, _ in COLUMNS if attr != "sleep"}
    lines: list[Target | str] = []
    fastest_drain = _best_peer(results, broker, "drain", True)
    fastest_enqueue = _best_peer(results, broker, "enqueue", True)
    raw = median_of(runs_of(results, RAW, broker), "enqueue")
    lowest_p50 = _best_peer(results, broker, "p50_ms", False)
    dramatiq_rss = median_of(runs_of(results, "dramatiq", broker), "rss_mib")
    lines.append(Target(f"noop drain ÷ fastest peer's ({_name(fastest_drain)})",
                        _ratio(med["drain"], _value(fastest_drain)), 4, True))
    lines.append(Target(f"enqueue one at a time ÷ fastest peer's ({_name(fastest_enqueue)})",
                        _ratio(med["enqueue"], _value(fastest_enqueue)), 1, True))
    lines.append(Target(f"enqueue one at a time ÷ raw client's ({_fmt(raw)}/s)",
                        _ratio(med["enqueue"], raw), 0.7, True))
    for attr, how in (("bulk_group", "group().apply_async()"), ("bulk_many", "send_many()")):
        lines.append(Target(f"bulk {how} ÷ fastest peer's one-at-a-time enqueue",
                            _ratio(med[attr], _value(fastest_enqueue)), 10, True))
    lines.append(Target("worker CPU per noop task", med["cpu_us"], 150, False, " µs"))
    lines.append(Target(f"latency p50 ÷ lowest peer's ({_name(lowest_p50)} ms)",
                        _ratio(med["p50_ms"], _value(lowest_p50)), 1, False, strict=True))
    ideal = args.sleeps * SLEEP_SECONDS / SLEEP_CONCURRENCY
    for label, seconds in sleep_medians(ours).items():
        lines.append(Target(f"sleep drain ({label}) ÷ ideal {ideal:g} s", seconds / ideal,
                            2.5, False))
    lines.append(Target("idle RSS ÷ Dramatiq's", _ratio(med["rss_mib"], dramatiq_rss), 1,
                        False))
    bare = median_of(runs_of(results, RAW, broker), "drain")
    if bare and med["drain"] and fastest_drain is not None:
        lines.append(f"- for scale, not a target: the bare client drains {_fmt(bare)}/s "
                     f"(batched reads and acks, nothing run); celeriac's drain is "
                     f"{med['drain'] / bare:.2f}x of that, and 4x the fastest peer's would "
                     f"be {4 * fastest_drain[1] / bare:.2f}x")
    return [item.line() if isinstance(item, Target) else item for item in lines]


def _name(best: tuple[str, float] | None) -> str:
    return "none measured" if best is None else f"{best[0]} {_fmt(best[1])}"


def _value(best: tuple[str, float] | None) -> float | None:
    return None if best is None else best[1]


def _fmt(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


# -- how each system ran, every run, notes --------------------------------------------------------

def setup_table(results: list[NetRun], brokers: list[str], names: list[str]) -> list[str]:
    rows = []
    for name in names:
        kind = SYSTEMS[name]
        mine = [r for r in results if r.system == name]
        modes = "; ".join(dict.fromkeys(label for r in mine for label in r.modes)) or "-"
        stores = ", ".join(f"{BROKER_TITLES[b]}: {kind.result_label(b, kind.latency_results(b))}"
                           for b in brokers if b in kind.brokers)
        rows.append([name, ", ".join(BROKER_TITLES[b] for b in kind.brokers), kind.noop_label,
                     modes, stores])
    return markdown_table(["system", "brokers", "noop workers", "sleep mode(s)",
                           "round-trip result store"], rows)


RUN_COLUMNS = ("enqueue", "drain", "cpu_us", "p50_ms", "p99_ms", "rss_mib")


def runs_table(results: list[NetRun]) -> list[str]:
    headings = ["broker", "run", *(h for a, h, _ in COLUMNS if a in RUN_COLUMNS),
                "sleep drain s"]
    rows, counts = [], {}
    for r in results:
        key = (r.broker, r.system)
        counts[key] = counts.get(key, 0) + 1
        values = [("failed" if _failed([r], a) else "-") if getattr(r, a) is None
                  else fmt.format(getattr(r, a)) for a, _, fmt in COLUMNS if a in RUN_COLUMNS]
        sleeps = ", ".join(f"{v:.2f}" for v in r.sleep_s.values()) or "-"
        rows.append([BROKER_TITLES[r.broker], f"{r.system} #{counts[key]}", *values, sleeps])
    return markdown_table(headings, rows)


def report(args: argparse.Namespace, results: list[NetRun], versions: dict[str, str],
           started: dt.datetime) -> str:
    names = [*args.systems, RAW]
    lines = [f"celeriac broker benchmark, {started:%Y-%m-%d %H:%M} UTC: {args.tasks} no-op "
             f"tasks, {args.sleeps} sleep tasks, {args.round_trips} round trips, medians of "
             f"{args.repeat} run(s) per system; Python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs; raw clients: redis-py {versions.get('redis', '?')}, "
             f"aiormq {versions.get('aiormq', '?')}"]
    for broker in args.brokers:
        lines += ["", f"### {BROKER_TITLES[broker]}", "",
                  *broker_table(results, broker, names, versions),
                  "", f"Targets on {BROKER_TITLES[broker]} (celeriac, ratios of the medians):",
                  "", *targets(results, broker, args)]
    lines += ["", "How each system ran:", "", *setup_table(results, args.brokers, args.systems)]
    lines += ["", "All runs, in the order they ran:", "", *runs_table(results)]
    notes = [f"- {BROKER_TITLES[r.broker]} {r.system}: {note}" for r in results
             for note in r.notes]
    if notes:
        lines += ["", "Notes (failures, worker logs, odd exits):", "", *notes]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------

def versions_of(systems: Sequence[str]) -> dict[str, str]:
    packages = {name: SYSTEMS[name].package for name in systems}
    packages.update(redis="redis", aiormq="aiormq")
    return {name: importlib.metadata.version(package) for name, package in packages.items()}


def make_context(args: argparse.Namespace, top: Path) -> Context:
    host, _, port = args.redis.partition(":")
    redis = RedisServer(host, int(port or 6379), args.redis_db)
    if "redis" in args.brokers:
        busy = {db: n for db, n in redis.keys_in_use().items() if n}
        if busy:
            raise BenchError(f"Redis databases {sorted(busy)} are not empty ({busy} keys): "
                             "the suite deletes every key in its databases, so pick free ones "
                             "with --redis-db")
    return Context(redis, RabbitServer(args.amqp_url), f"cbench.{secrets.token_hex(3)}", top)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    top = Path(args.workdir) / f"celeriac-brokers-{started:%Y%m%d-%H%M%S}"
    top.mkdir(parents=True, exist_ok=True)
    log(f"worker logs in {top}")
    try:
        ctx = make_context(args, top)
        results = [run for broker in args.brokers for run in run_broker(broker, args, ctx)]
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print(report(args, results, versions_of(args.systems), started))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
