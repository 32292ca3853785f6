"""The arq side of the broker suite: coroutine tasks and the worker settings.

``BENCH_CONCURRENCY`` sets ``max_jobs`` (arq's jobs at once per worker process). arq's worker
looks for queued jobs every ``poll_delay`` seconds (0.5 by default); 0.01 here, so that its
round trip is not mostly that wait. It logs every job at INFO; the start-up hook lowers that
to WARNING, as every other worker in the suite runs. The worker loads this module with
``arq tasks_arq.WorkerSettings``.
"""

import asyncio
import logging
import os

from arq.connections import RedisSettings
from marks import first_start

REDIS = RedisSettings.from_dsn(os.environ["BENCH_BROKER"])
QUEUE = os.environ["BENCH_QUEUE"]


async def noop(ctx):
    return None


async def sleep(ctx):
    first_start()
    await asyncio.sleep(0.01)


async def quiet(ctx):
    logging.getLogger("arq").setLevel(logging.WARNING)


class WorkerSettings:
    functions = [noop, sleep]
    on_startup = quiet
    poll_delay = 0.01
    redis_settings = REDIS
    queue_name = QUEUE
    max_jobs = int(os.environ.get("BENCH_CONCURRENCY", "10"))
