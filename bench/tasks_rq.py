"""The RQ side of the broker suite: plain functions, enqueued by name on ``BENCH_QUEUE``.

RQ's workers import them as ``tasks_rq.noop`` and ``tasks_rq.sleep``.
"""

import time

from marks import first_start


def noop():
    return None


def sleep():
    first_start()
    time.sleep(0.01)
