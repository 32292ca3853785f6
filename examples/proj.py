"""The example project from the README: ``celeriac -A proj worker -l info``."""

import time

from celeriac import Celeriac

app = Celeriac("proj")  # no broker given: an embedded SQLite file in the working directory


@app.task
def add(x, y):
    return x + y


@app.task
def slow_square(x, delay=0.05):
    time.sleep(delay)
    return x * x


@app.task
def divide(x, y):
    return x / y
