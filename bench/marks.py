"""When the sleep workload's first task started, for every system alike.

The first sleep task in each worker process records the time it started under
``<BENCH_QUEUE>.first-start`` (``SET NX``: the earliest process wins) in the Redis database
``BENCH_MARK_URL`` names. The bench times the drain from that moment to the last stored
result, so neither a system's start-up nor the way it stores results (one by one or in
batches) counts for or against it. One Redis call per worker process, not per task.

In a sleep phase (``BENCH_PHASE``) the Redis client is imported with the tasks module, at
the worker's start: imported by the first task, its 50-100 ms (here) fell inside the timed
window of the systems that do not load redis-py themselves (RabbitMQ with rpc:// results),
and under gevent it held up every greenlet meanwhile. Other phases leave it out, so that a
worker's idle memory does not include a client it never used.
"""

import os
import time

if os.environ.get("BENCH_PHASE", "").startswith("sleep"):
    import redis  # noqa: F401

_marked = False


def first_start() -> None:
    global _marked
    if _marked:
        return
    _marked = True
    now = time.time()
    import redis  # (loaded already in a sleep phase, see above)

    client = redis.Redis.from_url(os.environ["BENCH_MARK_URL"])
    try:
        client.set(f"{os.environ['BENCH_QUEUE']}.first-start", repr(now), nx=True)
    finally:
        client.close()
