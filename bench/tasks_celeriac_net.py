"""The celeriac side of the broker suite: a no-op task and two sleep tasks.

``BENCH_BROKER`` and ``BENCH_BACKEND`` are the URLs (Redis or RabbitMQ, with the run's own
key or name prefix), ``BENCH_QUEUE`` the queue of this run. The worker loads this module with
``celeriac -A tasks_celeriac_net``.
"""

import asyncio
import os
import time

from marks import first_start

from celeriac import Celeriac

app = Celeriac(
    "bench_tasks",
    broker=os.environ["BENCH_BROKER"],
    backend=os.environ["BENCH_BACKEND"],
    task_default_queue=os.environ["BENCH_QUEUE"],
)


@app.task
def noop():
    return None


@app.task
def sleep():
    first_start()
    time.sleep(0.01)


@app.task
async def sleep_async():
    first_start()
    await asyncio.sleep(0.01)
