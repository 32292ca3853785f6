"""`make demo`: start a worker on the embedded SQLite broker, send example tasks, summarize.

Everything happens in ./.demo (broker, results, worker log), so the demo leaves the
checkout clean and can be run again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKDIR = HERE.parent / ".demo"


def say(text: str) -> None:
    print(text, flush=True)


def start_worker() -> tuple[subprocess.Popen[bytes], Path]:
    log_path = WORKDIR / "worker.log"
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    env.pop("CELERIAC_BROKER_URL", None)
    env.pop("CELERIAC_RESULT_BACKEND", None)
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celeriac", "-A", "proj", "worker", "-l", "info", "-c", "2"],
            cwd=WORKDIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    return worker, log_path


def main() -> int:
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir()
    os.chdir(WORKDIR)  # the app's default SQLite files are created here
    sys.path.insert(0, str(HERE))
    from proj import add, divide, slow_square

    worker, log_path = start_worker()
    say(f"started worker (pid {worker.pid}); log: {log_path}")
    try:
        say(f"warm-up: add(2, 2) = {add.delay(2, 2).get(timeout=30)}")
        count = 500
        say(f"sending {count} add tasks, 10 slow_square tasks and one divide(1, 0)...")
        started = time.monotonic()
        adds = [add.delay(i, i) for i in range(count)]
        squares = [slow_square.delay(i) for i in range(10)]
        bad = divide.delay(1, 0)
        later = add.apply_async((40, 2), countdown=1)
        values = [r.get(timeout=60) for r in adds]
        squared = [r.get(timeout=60) for r in squares]
        failures = 0
        try:
            bad.get(timeout=30)
        except ZeroDivisionError as exc:
            failures += 1
            say(f"divide(1, 0) failed as expected: ZeroDivisionError: {exc}")
        elapsed = time.monotonic() - started
        say(f"countdown=1: add(40, 2) = {later.get(timeout=30)}")
        ok = values == [2 * i for i in range(count)] and squared == [i * i for i in range(10)]
        say("")
        say("summary")
        say(f"  tasks:     {count + 11} sent, {count + 10} succeeded, {failures} failed "
            "(expected: 1)")
        say(f"  results:   {'all correct' if ok else 'WRONG'}")
        say(f"  time:      {elapsed:.2f}s ({(count + 11) / elapsed:.0f} tasks/s round trip)")
        return 0 if ok and failures == 1 else 1
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        say(f"  worker:    stopped with exit code {code} (warm shutdown)")


if __name__ == "__main__":
    raise SystemExit(main())
