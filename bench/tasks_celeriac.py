"""The celeriac side of the benchmark: one no-op task on the embedded SQLite broker.

The broker and result files live in the directory named by ``BENCH_DIR``, so every run
starts from fresh files. The worker loads this module with ``celeriac -A tasks_celeriac``.
"""

import os

from celeriac import Celeriac

BENCH_DIR = os.environ["BENCH_DIR"]

app = Celeriac(
    "bench_tasks",
    broker=f"sqlite:///{BENCH_DIR}/broker.db",
    backend=f"sqlite:///{BENCH_DIR}/results.db",
)


@app.task
def noop():
    return None
