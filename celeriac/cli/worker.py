"""``celeriac worker``: start a worker node."""

from __future__ import annotations

import click

from ..exceptions import CeleriacError, ConfigurationError
from ..worker.worker import Worker, WorkerOptions, parse_autoscale
from .base import CLIContext, die, pass_cli

__all__ = ["worker"]

POOL_CHOICES = ["prefork", "threads", "solo", "asyncio", "gevent", "eventlet"]


def _split(values: tuple[str, ...]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@click.command("worker")
@click.option("-l", "--loglevel", default="WARNING", show_default=True,
              help="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
              help="Number of pool processes/threads. Default: the number of CPUs.")
@click.option("-P", "--pool", type=click.Choice(POOL_CHOICES), default=None,
              help="Execution pool. Default: prefork (worker_pool setting). gevent needs "
                   "pip install 'celeriac[gevent]'.")
@click.option("-n", "--hostname", default=None,
              help="Node name, e.g. 'worker1@%h'. %h: host with domain, %n: host, "
                   "%d: domain, %%: a literal %. Default: celery@%h.")
@click.option("-Q", "--queues", multiple=True,
              help="Comma-separated queues to consume from. Default: all in task_queues, "
                   "or 'celery'.")
@click.option("-X", "--exclude-queues", multiple=True,
              help="Comma-separated queues not to consume from.")
@click.option("-I", "--include", multiple=True,
              help="Comma-separated modules to import (task modules, control commands).")
@click.option("--prefetch-multiplier", type=click.IntRange(min=1), default=None,
              help="Messages reserved per pool slot. Default: 4.")
@click.option("--purge", "--discard", "purge", is_flag=True,
              help="Delete every waiting message of the worker's queues before starting.")
@click.option("-f", "--logfile", default=None,
              help="Log to this file instead of stderr. Variables: %p node name, %n name "
                   "part, %h host, %d domain, %i pool index, %I '-index'.")
@click.option("--pidfile", default=None,
              help="Write the worker's pid here; refuse to start if a live worker holds it.")
@click.option("-S", "--statedb", default=None,
              help="Keep revoked task ids (and the logical clock) in this file across "
                   "restarts. Same variables as --logfile.")
@click.option("-E", "--task-events", "task_events", is_flag=True,
              help="Send task events (task-received, task-succeeded, ...) for monitors.")
@click.option("--without-mingle", is_flag=True,
              help="Don't ask running workers for revoked task ids at start-up.")
@click.option("--without-heartbeat", is_flag=True,
              help="Don't send worker-online/heartbeat/offline events.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Hard time limit in seconds: the process running a task past it is "
                   "killed and replaced; the task fails with TimeLimitExceeded.")
@click.option("--soft-time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Soft time limit in seconds: SoftTimeLimitExceeded is raised inside the "
                   "task, which can catch it to clean up.")
@click.option("--max-tasks-per-child", "--maxtasksperchild", "max_tasks_per_child",
              type=click.IntRange(min=1), default=None,
              help="Replace a pool process after it has run this many tasks.")
@click.option("--max-memory-per-child", type=click.IntRange(min=1), default=None,
              help="Replace a pool process after a task leaves it using more than this many "
                   "KiB of resident memory.")
@click.option("-O", "optimization", type=click.Choice(["fair", "fast"]), default=None,
              help="How many tasks a prefork process may hold. Default (adaptive): one, "
                   "plus up to 7 queued behind it only while all of them are of task types "
                   "whose recent runs took under 1 ms, so floods of tiny tasks are "
                   "pipelined and a task of a slow type never has others waiting behind "
                   "it. fair: a process gets a task only when idle. fast: up to 4 tasks are "
                   "sent ahead to each process whatever they are - a task can wait behind a "
                   "long one. Tasks sent ahead are acknowledged, so a warm shutdown runs "
                   "them instead of returning them to the queue.")
@click.option("--autoscale", default=None, metavar="MAX,MIN",
              help="Grow the pool up to MAX processes while tasks wait; shrink to MIN when "
                   "idle. Example: --autoscale=10,3")
@pass_cli
def worker(cli: CLIContext, loglevel: str, concurrency: int | None, pool: str | None,
           hostname: str | None, queues: tuple[str, ...], exclude_queues: tuple[str, ...],
           include: tuple[str, ...], prefetch_multiplier: int | None, purge: bool,
           logfile: str | None, pidfile: str | None, statedb: str | None, task_events: bool,
           without_mingle: bool, without_heartbeat: bool, time_limit: float | None,
           soft_time_limit: float | None, max_tasks_per_child: int | None,
           max_memory_per_child: int | None, autoscale: str | None,
           optimization: str | None) -> None:
    """Start a worker that consumes tasks and executes them.

    \b
    Examples:
      celeriac -A proj worker -l info
      celeriac -A proj worker -l info -c 4 -n worker1@%h -Q default,images

    TERM or INT: warm shutdown (running tasks finish, unstarted ones go back to the
    queue). QUIT or a second INT: cold shutdown.
    """
    app = cli.require_app("to start a worker")
    options = WorkerOptions(
        hostname=hostname, concurrency=concurrency, pool=pool, queues=_split(queues),
        exclude_queues=_split(exclude_queues), include=_split(include),
        prefetch_multiplier=prefetch_multiplier, purge=purge, loglevel=loglevel,
        logfile=logfile, pidfile=pidfile, statedb=statedb, task_events=task_events,
        without_mingle=without_mingle, without_heartbeat=without_heartbeat,
        time_limit=time_limit, soft_time_limit=soft_time_limit,
        max_tasks_per_child=max_tasks_per_child, max_memory_per_child=max_memory_per_child,
        pipeline={"fair": 1, "fast": 4}.get(optimization or ""))
    try:
        options.autoscale = parse_autoscale(autoscale)
        code = Worker(app, options).run()
    except ConfigurationError as exc:
        die(str(exc))
    except ModuleNotFoundError as exc:
        die(f"Cannot import {exc.name!r} (from -I/--include or the imports setting): {exc}")
    except CeleriacError as exc:
        die(str(exc), code=1)
    raise SystemExit(code)
