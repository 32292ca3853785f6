"""The Huey side of the benchmark: the same no-op task on ``huey.SqliteHuey``.

``store_none=True`` makes Huey store the ``None`` result as celeriac does, so the drain
can be timed by counting stored results on both sides. The consumer loads this module with
``huey_consumer tasks_huey.huey``.
"""

import os

from huey import SqliteHuey

BENCH_DIR = os.environ["BENCH_DIR"]

huey = SqliteHuey("bench_tasks", filename=f"{BENCH_DIR}/huey.db", store_none=True)


@huey.task()
def noop():
    return None
