"""The Huey side of the broker suite: ``RedisHuey`` with the same tasks.

``store_none=True`` stores the ``None`` results (so the drain can count them) and
``notify_result=True`` lets ``get(blocking=True)`` wait with ``BLPOP`` instead of polling.
The consumer loads it with ``huey_consumer tasks_huey_redis.huey``.
"""

import os
import time

from huey import RedisHuey
from marks import first_start

huey = RedisHuey(os.environ["BENCH_QUEUE"], url=os.environ["BENCH_BROKER"], store_none=True,
                 notify_result=True)


@huey.task()
def noop():
    return None


@huey.task()
def sleep():
    first_start()
    time.sleep(0.01)
