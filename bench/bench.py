#!/usr/bin/env python3
"""Benchmark celeriac's embedded SQLite broker against Huey's SqliteHuey, side by side.

Run ``python bench/bench.py`` from anywhere: it creates bench/.venv (with the peers and an
editable install of this project) on first use and re-runs itself inside it. The table goes
to stdout, progress to stderr. See bench/README.md for what is measured and how to read it.

``python bench/bench.py --suite brokers`` runs the other suite instead: celeriac against
Celery, Dramatiq, Huey, RQ, arq and Taskiq on Redis and RabbitMQ (``brokers.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for real only inside bench/.venv, where huey is installed
    from systems import System, WorkerProcess

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = BENCH / ".venv"
REQUIREMENTS = (
    "huey",
    # The broker suite's peers, pinned so that runs compare like with like.
    "celery[redis]==5.7.0", "dramatiq[redis,rabbitmq]==2.2.1", "rq==3.0.0", "taskiq==0.13.0",
    "taskiq-redis==1.2.4", "taskiq-aio-pika==0.6.1", "redis[hiredis]==8.1.0",
)
NO_DEPS = ("arq==0.28.0",)
"""Installed without its dependencies: arq 0.28 pins redis-py < 6, Celery's Redis transport
needs >= 6.1 and taskiq-redis 8; arq runs on redis-py 8 (its only other need is click)."""
EXTRAS = "[redis,amqp,gevent]"  # celeriac's own Redis and RabbitMQ clients, and gevent
STAMP = VENV / "bench-installed.txt"


class BenchError(Exception):
    """The benchmark could not measure something; the message says what and why."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- command line -------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/bench.py",
        description="Enqueue N no-op tasks, drain them with a worker, time single-task round "
                    "trips and measure the idle worker's memory: celeriac (embedded SQLite "
                    "broker, prefork pool) and Huey (SqliteHuey, process workers), alternated "
                    "in one run. Prints a markdown table of medians to stdout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--suite", choices=("sqlite", "brokers"), default="sqlite",
                        help="sqlite: this suite; brokers: celeriac and six peers on Redis "
                             "and RabbitMQ (see 'python bench/bench.py --suite brokers --help')")
    parser.add_argument("-n", "--tasks", type=int, default=5000,
                        help="tasks per enqueue and drain measurement")
    parser.add_argument("-r", "--round-trips", type=int, default=300,
                        help="sequential round trips for the latency percentiles")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each system (alternating); the table shows medians")
    parser.add_argument("-c", "--concurrency", type=int, default=2,
                        help="worker processes of each system")
    parser.add_argument("--systems", default="celeriac,huey",
                        help="comma-separated systems to run: celeriac, huey")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds the worker idles before its memory is read")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds one round trip may take before the run fails")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="seconds without a new result before a drain is declared stuck")
    parser.add_argument("--celeriac-worker-args", default="", metavar="ARGS",
                        help="extra arguments for 'celeriac worker', given with '=', e.g. "
                             "--celeriac-worker-args='--prefetch-multiplier 8'")
    parser.add_argument("--huey-consumer-args", default="", metavar="ARGS",
                        help="extra arguments for huey_consumer, given with '=', e.g. "
                             "--huey-consumer-args='-d 0.01'")
    parser.add_argument("--workdir", default=tempfile.gettempdir(),
                        help="where the temporary databases and worker logs go")
    parser.add_argument("--keep", action="store_true",
                        help="keep the databases and worker logs instead of deleting them")
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(args.systems) - {"celeriac", "huey"}
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {sorted(unknown)}; choose from celeriac, huey")
    if min(args.tasks, args.round_trips, args.repeat, args.concurrency) < 1:
        parser.error("--tasks, --round-trips, --repeat and --concurrency must be at least 1")
    return args


# -- the benchmark's own environment ------------------------------------------------------------

def _wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{' '.join(REQUIREMENTS + NO_DEPS)} -e {ROOT}{EXTRAS} {digest}\n"


def ensure_environment(argv: Sequence[str]) -> None:
    """Create bench/.venv and install into it when needed, then run inside it."""
    if sys.version_info < (3, 11):  # noqa: UP036 - bench.py may be started by any python
        raise SystemExit("bench.py needs Python 3.11 or newer (as celeriac does).")
    python = VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wanted = _wanted_stamp()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        log(f"installing {', '.join(REQUIREMENTS)} and celeriac (editable) into {VENV}")
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS,
                        "-e", f"{ROOT}{EXTRAS}"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *NO_DEPS],
                       check=True)
        STAMP.write_text(wanted)
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(python, [str(python), str(Path(__file__).resolve()), *argv])


# -- measurements -------------------------------------------------------------------------------

@dataclass
class RunResult:
    """One run of one system; rates in tasks/s, latencies in ms, memory in MiB."""

    system: str
    enqueue_one: float
    enqueue_bulk: float
    drain: float
    p50_ms: float
    p99_ms: float
    rss_mib: float
    pss_mib: float
    startup_s: float
    stop_s: float
    notes: list[str] = field(default_factory=list)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_bulk_enqueue(kind: type[System], directory: Path, count: int) -> float:
    """Tasks/s of sending ``count`` tasks in one call, into fresh files, no worker running."""
    system = kind(directory)
    try:
        return rate(count, timed(lambda: system.send_bulk(count)))
    finally:
        system.close()


def measure_enqueue(system: System, count: int) -> float:
    """Tasks/s of sending ``count`` tasks one call at a time, no worker running."""
    def send_all() -> None:
        for _ in range(count):
            system.send_one()

    seconds = timed(send_all)
    queued = system.queue_size()
    if queued != count:
        raise BenchError(f"{system.name}: {queued} tasks queued after sending {count}")
    return rate(count, seconds)


def wait_for_results(system: System, worker: WorkerProcess, count: int, stall_timeout: float,
                     poll: float = 0.005) -> tuple[float, int, float]:
    """Poll the result store until ``count`` results are stored.

    Returns (time of the first poll that saw a result, results seen then, time all were
    seen), all ``perf_counter`` times.
    """
    first: tuple[float, int] | None = None
    seen, progress_at = 0, time.perf_counter()
    while True:
        done = system.results_stored()
        now = time.perf_counter()
        if first is None and done > 0:
            first = (now, done)
        if done >= count and first is not None:
            return first[0], first[1], now
        if done > seen:
            seen, progress_at = done, now
        elif now - progress_at > stall_timeout:
            raise BenchError(f"{system.name}: drain stuck at {done}/{count} results for "
                             f"{stall_timeout:g}s")
        if worker.exited() is not None:
            raise BenchError(f"{system.name}: worker exited with {worker.exited()} "
                             f"at {done}/{count} results")
        time.sleep(poll)


def measure_drain(system: System, worker: WorkerProcess, count: int,
                  stall_timeout: float) -> tuple[float, float]:
    """(tasks/s, start-up seconds) of a worker draining a full queue.

    The rate counts from the first stored result to the last, so the worker's start-up
    (interpreter, imports, forking the pool) is left out the same way for both systems.
    """
    first_at, first_count, last_at = wait_for_results(system, worker, count, stall_timeout)
    left = system.queue_size()
    if left:
        raise BenchError(f"{system.name}: {left} tasks still queued after the drain")
    return rate(count - first_count, last_at - first_at), first_at - worker.started


def percentile(samples: Sequence[float], pct: int) -> float:
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


def measure_latency(system: System, round_trips: int, timeout: float) -> tuple[float, float]:
    """(p50, p99) in ms of send-and-wait round trips, one after the other, idle worker.

    One round trip first, uncounted, opens the benchmark side's connections.
    """
    system.round_trip(timeout)
    samples = [timed(lambda: system.round_trip(timeout)) * 1000 for _ in range(round_trips)]
    return percentile(samples, 50), percentile(samples, 99)


# -- one run of one system ----------------------------------------------------------------------

def worker_notes(system: System, worker: WorkerProcess) -> list[str]:
    """What went wrong or looked odd in the worker, as lines for the report."""
    notes = []
    if worker.forced:
        notes.append("did not stop within 30s of SIGTERM: killed")
    if worker.leftovers:
        notes.append(f"left children running after it exited: {worker.leftovers} (killed)")
    if worker.proc.returncode not in (0, -15):
        notes.append(f"exit status {worker.proc.returncode}")
    notes += [f"log: {line}" for line in worker.log_lines()
              if not any(usual in line for usual in system.usual_log_lines)]
    return notes


def measure_with_worker(system: System, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Start a worker on the full queue: drain, idle memory, round trips, stop."""
    from proctree import tree_memory
    from systems import WorkerProcess

    command = system.worker_command(args.concurrency, args.extra[system.name])
    worker = WorkerProcess(command, system.directory)
    try:
        drain, startup = measure_drain(system, worker, args.tasks, args.stall_timeout)
        log(f"{label} drain: {drain:,.0f} tasks/s (first result {startup:.2f}s after start)")
        time.sleep(args.settle)
        memory = tree_memory(worker.pid)
        log(f"{label} idle memory: {memory.processes} processes, RSS "
            f"{memory.rss_bytes / 2**20:.1f} MiB, PSS {memory.pss_bytes / 2**20:.1f} MiB")
        p50, p99 = measure_latency(system, args.round_trips, args.timeout)
        log(f"{label} round trip: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    except BaseException:
        worker.stop()
        for line in worker.log_lines()[-20:]:
            log(f"{label} worker log: {line}")
        raise
    stop = worker.stop()
    notes = worker_notes(system, worker)
    for note in notes:
        log(f"{label} worker {note}")
    return {"drain": drain, "p50_ms": p50, "p99_ms": p99, "rss_mib": memory.rss_bytes / 2**20,
            "pss_mib": memory.pss_bytes / 2**20, "startup_s": startup, "stop_s": stop,
            "notes": notes}


def run_once(kind: type[System], args: argparse.Namespace, run_dir: Path, label: str) -> RunResult:
    """One run of one system, each phase on fresh database files."""
    bulk = measure_bulk_enqueue(kind, run_dir / "bulk", args.tasks)
    log(f"{label} bulk enqueue: {bulk:,.0f} tasks/s")
    system = kind(run_dir / "main")
    try:
        one = measure_enqueue(system, args.tasks)
        log(f"{label} enqueue one at a time: {one:,.0f} tasks/s")
        with_worker = measure_with_worker(system, args, label)
    finally:
        system.close()
    return RunResult(system.name, one, bulk, **with_worker)


def run_all(args: argparse.Namespace, top: Path) -> list[RunResult]:
    """``--repeat`` rounds; each round runs every system, the order swapping each round."""
    from systems import SYSTEMS

    results = []
    for round_no in range(args.repeat):
        order = args.systems if round_no % 2 == 0 else args.systems[::-1]
        for name in order:
            label = f"[{name} {round_no + 1}/{args.repeat}]"
            run_dir = top / f"{name}-{round_no + 1}"
            results.append(run_once(SYSTEMS[name], args, run_dir, label))
    return results


# -- report -------------------------------------------------------------------------------------

COLUMNS = (  # (attribute, heading, format, higher is better)
    ("enqueue_one", "enqueue/s (one at a time)", "{:,.0f}", True),
    ("enqueue_bulk", "enqueue/s (bulk)", "{:,.0f}", True),
    ("drain", "drain/s", "{:,.0f}", True),
    ("p50_ms", "latency p50 ms", "{:.2f}", False),
    ("p99_ms", "latency p99 ms", "{:.2f}", False),
    ("rss_mib", "idle RSS MiB", "{:.1f}", False),
    ("pss_mib", "idle PSS MiB", "{:.1f}", False),
)


def medians(results: list[RunResult], system: str) -> dict[str, float]:
    mine = [r for r in results if r.system == system]
    return {attr: statistics.median(getattr(r, attr) for r in mine) for attr, *_ in COLUMNS}


def markdown_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headings) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headings) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def median_table(results: list[RunResult], versions: dict[str, str]) -> list[str]:
    rows = []
    for system, version in versions.items():
        values = medians(results, system)
        rows.append([f"{system} {version}"]
                    + [fmt.format(values[attr]) for attr, _, fmt, _ in COLUMNS])
    return markdown_table(["system", *(heading for _, heading, _, _ in COLUMNS)], rows)


def ratio_lines(results: list[RunResult]) -> list[str]:
    ours, theirs = medians(results, "celeriac"), medians(results, "huey")
    lines = ["Ratios celeriac/huey (of the medians):", ""]
    for attr, heading, _, higher_better in COLUMNS:
        better = "higher" if higher_better else "lower"
        value = ours[attr] / theirs[attr] if theirs[attr] else float("inf")
        lines.append(f"- {heading}: {value:.2f}x ({better} is better for celeriac)")
    return lines


def runs_table(results: list[RunResult]) -> list[str]:
    headings = ["run", *(heading for _, heading, _, _ in COLUMNS), "start-up s", "stop s"]
    rows, counts = [], dict.fromkeys({r.system for r in results}, 0)
    for r in results:
        counts[r.system] += 1
        rows.append([f"{r.system} #{counts[r.system]}"]
                    + [fmt.format(getattr(r, attr)) for attr, _, fmt, _ in COLUMNS]
                    + [f"{r.startup_s:.2f}", f"{r.stop_s:.2f}"])
    return markdown_table(headings, rows)


def report(args: argparse.Namespace, results: list[RunResult], versions: dict[str, str],
           started: dt.datetime) -> str:
    lines = [f"celeriac benchmark, {started:%Y-%m-%d %H:%M} UTC: {args.tasks} tasks, "
             f"{args.round_trips} round trips, concurrency {args.concurrency}, medians of "
             f"{args.repeat} run(s) per system; Python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs", ""]
    lines += median_table(results, versions)
    if set(versions) == {"celeriac", "huey"}:
        lines += ["", *ratio_lines(results)]
    lines += ["", "All runs, in the order they ran:", "", *runs_table(results)]
    notes = [f"- {r.system}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["", "Worker notes (non-empty logs, odd exits):", "", *notes]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------

def split_extra(args: argparse.Namespace) -> None:
    args.extra = {"celeriac": shlex.split(args.celeriac_worker_args),
                  "huey": shlex.split(args.huey_consumer_args)}


def versions_of(args: argparse.Namespace) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in args.systems}


def chosen_suite(argv: Sequence[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=("sqlite", "brokers"), default="sqlite")
    return str(pre.parse_known_args(argv)[0].suite)


def main(argv: Sequence[str]) -> int:
    if chosen_suite(argv) == "brokers":
        ensure_environment(argv)
        from brokers import main as brokers_main  # needs the peers, so only inside bench/.venv
        return brokers_main(argv)
    args = parse_args(argv)
    ensure_environment(argv)
    split_extra(args)
    started = dt.datetime.now(dt.UTC)
    top = Path(tempfile.mkdtemp(prefix="celeriac-bench-", dir=args.workdir))
    log(f"databases and worker logs in {top}")
    try:
        versions = versions_of(args)
        results = run_all(args, top)
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)
    print(report(args, results, versions, started))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
