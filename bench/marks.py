"""When the sleep workload's first task started, for every system alike.

The first sleep task in each worker process records the time it started under
``<BENCH_QUEUE>.first-start`` (``SET NX``: the earliest process wins) in the Redis database
``BENCH_MARK_URL`` names. The bench times the drain from that moment to the last stored
result, so neither a system's start-up nor the way it stores results (one by one or in
batches) counts for or against it. One Redis call per worker process, not per task.
"""

import os
import time

_marked = False


def first_start() -> None:
    global _marked
    if _marked:
        return
    _marked = True
    now = time.time()
    import redis  # here, not at the top: the tasks modules import this one, and a worker's
    # idle memory (measured after the noop phase) must not include a client it never used

    client = redis.Redis.from_url(os.environ["BENCH_MARK_URL"])
    try:
        client.set(f"{os.environ['BENCH_QUEUE']}.first-start", repr(now), nx=True)
    finally:
        client.close()
