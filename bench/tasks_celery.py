"""The Celery side of the broker suite: the same tasks as ``tasks_celeriac_net``.

Every name Celery creates on the broker (queue, exchange, control and event exchanges) is
the run's ``BENCH_QUEUE`` or starts with it. The worker loads it with ``celery -A tasks_celery``.
"""

import os
import time

from celery import Celery
from marks import first_start

QUEUE = os.environ["BENCH_QUEUE"]

app = Celery("bench_tasks", broker=os.environ["BENCH_BROKER"],
             backend=os.environ["BENCH_BACKEND"])
app.conf.update(
    task_default_queue=QUEUE,
    control_exchange=f"{QUEUE}.control",
    event_exchange=f"{QUEUE}.events",
    broker_connection_retry_on_startup=True,
)


@app.task
def noop():
    return None


@app.task
def sleep():
    first_start()
    time.sleep(0.01)
