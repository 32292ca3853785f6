"""The ``celeriac`` command line: app loading with -A, global options, call, result, purge.

Most tests run the CLI in-process with click's CliRunner against a ``memory://`` app defined
in a module written into a temporary directory; the ones at the end run the real command in
a subprocess against SQLite files.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner, Result

import celeriac
from celeriac import Celeriac, states
from celeriac.cli.base import CLIContext, CLIError, configured_queues, find_app
from celeriac.cli.main import main
from celeriac.protocol import decode_body
from celeriac.results import make_meta

PROJ = """
from celeriac import Celeriac

app = Celeriac("proj", broker="memory://", task_default_queue="q-proj")

@app.task
def add(x, y):
    return x + y

@app.task(queue="special")
def routed():
    return None
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A clean working directory for user modules; they are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("CELERIAC_BROKER_URL", raising=False)
    monkeypatch.delenv("CELERIAC_RESULT_BACKEND", raising=False)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def write(root: Path, relpath: str, source: str) -> None:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def load(name: str) -> ModuleType:
    """Import a module from the project directory, the way the CLI will find it."""
    sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()
    return importlib.import_module(name)


@pytest.fixture
def proj(project: Path) -> ModuleType:
    write(project, "proj.py", PROJ)
    return load("proj")


# -- global options -------------------------------------------------------------------------------
def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"celeriac {celeriac.__version__}\n"


def test_help_explains_and_lists_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "distributed task queue" in result.stdout
    for command, summary in [("call", "Send a task by name"), ("result", "Print a task's result"),
                             ("purge", "Delete all waiting messages"), ("worker", "worker")]:
        line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith(command))
        assert summary in line


def test_help_does_not_import_the_app(project: Path) -> None:
    write(project, "boom.py", "raise RuntimeError('imported')\n")
    result = run("-A", "boom", "call", "--help")
    assert result.exit_code == 0
    assert "boom" not in sys.modules


def test_broker_and_backend_options_override_the_app(proj: ModuleType) -> None:
    result = run("-A", "proj", "-b", "memory://elsewhere", "--result-backend", "memory://r",
                 "call", "proj.add")
    assert result.exit_code == 0
    assert proj.app.broker_url == "memory://elsewhere"
    assert proj.app.result_backend_url == "memory://r"


def test_celeriac_errors_become_clean_messages(proj: ModuleType) -> None:
    result = run("-A", "proj", "-b", "bogus://x", "purge", "-f")
    assert result.exit_code == 2
    assert "Unsupported broker URL 'bogus://x'" in result.stderr
    assert "Traceback" not in result.output


# -- finding the app ------------------------------------------------------------------------------
@pytest.mark.parametrize(("files", "spec", "attr"), [
    ({"proj.py": PROJ}, "proj", "proj:app"),
    ({"proj.py": PROJ.replace("app", "my_app")}, "proj:my_app", "proj:my_app"),
    ({"proj.py": PROJ.replace("app", "my_app")}, "proj.my_app", "proj:my_app"),
    ({"proj.py": PROJ.replace("app", "only")}, "proj", "proj:only"),
    ({"proj.py": "from celeriac import Celeriac\ncelery = Celeriac('p')\n"}, "proj", "proj:celery"),
    ({"proj.py": "from celeriac import Celeriac\nworker = Celeriac('w')\napp = object()\n"},
     "proj", "proj:worker"),
    ({"pkg/__init__.py": "", "pkg/celery.py": PROJ}, "pkg", "pkg.celery:app"),
    ({"pkg/__init__.py": "from .tasks import app\n", "pkg/tasks.py": PROJ}, "pkg", "pkg:app"),
    ({"pkg/__init__.py": "", "pkg/tasks.py": PROJ}, "pkg.tasks:app", "pkg.tasks:app"),
    ({"pkg/__init__.py": "", "pkg/tasks.py": PROJ}, "pkg.tasks.app", "pkg.tasks:app"),
    ({"pkg/__init__.py": "", "pkg/tasks.py": "from . import conf\n",
      "pkg/conf.py": PROJ}, "pkg.tasks:conf.app", "pkg.conf:app"),
])
def test_find_app_forms(project: Path, files: dict[str, str], spec: str, attr: str) -> None:
    for relpath, source in files.items():
        write(project, relpath, source)
    module_name, _, name = attr.partition(":")
    assert find_app(spec) is getattr(load(module_name), name)


def test_find_app_puts_the_working_directory_first(project: Path) -> None:
    write(project, "proj.py", PROJ)
    sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
    assert isinstance(find_app("proj"), Celeriac)
    assert sys.path[0] == os.getcwd()


def test_no_app_option_gives_a_default_app(project: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_app(None).broker_url == "sqlite:///celeriac-broker.db"
    monkeypatch.setenv("CELERIAC_BROKER_URL", "memory://")
    result = run("purge")
    assert result.exit_code == 0
    assert result.stdout == "No messages to purge in queue celery.\n"


def test_require_app_says_that_app_is_needed() -> None:
    with pytest.raises(CLIError, match="-A/--app is required to start a worker") as info:
        CLIContext().require_app("to start a worker")
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("files", "spec", "expected"), [
    ({}, "nope", ["no module named 'nope'", "{cwd}"]),
    ({}, "nope:app", ["no module named 'nope'", "{cwd}"]),
    ({}, "nope.tasks", ["no module named 'nope'"]),
    ({"proj.py": PROJ}, "proj:nope", ["'proj' has no attribute 'nope'"]),
    ({"proj.py": PROJ}, "proj.nope", ["'proj' has no attribute 'nope'"]),
    ({"proj.py": PROJ}, "proj:add", ["that is a Task, not a Celeriac app"]),
    ({"proj.py": PROJ}, "proj.add", ["that is a Task, not a Celeriac app"]),
    ({"proj.py": "x = 1\n"}, "proj", ["'proj' defines no Celeriac app"]),
    ({"proj.py": "1 / 0\n"}, "proj",
     ["importing 'proj' raised ZeroDivisionError: division by zero", "proj.py:1"]),
    ({"proj.py": "import not_installed_anywhere\n"}, "proj",
     ["raised ModuleNotFoundError: No module named 'not_installed_anywhere'"]),
    ({"pkg/__init__.py": "", "pkg/celery.py": "1 / 0\n"}, "pkg",
     ["importing 'pkg.celery' raised ZeroDivisionError"]),
    ({"proj.py": PROJ.replace("app", "main") + "other = Celeriac('other')\n"}, "proj",
     ["several Celeriac apps", "proj:main", "proj:other"]),
    ({}, "", ["-A/--app is empty"]),
    ({}, ":app", ["use 'module' or 'module:attribute'"]),
])
def test_app_errors_exit_2_naming_the_problem(project: Path, files: dict[str, str], spec: str,
                                              expected: list[str]) -> None:
    for relpath, source in files.items():
        write(project, relpath, source)
    result = run("-A", spec, "call", "proj.add")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment.format(cwd=os.getcwd()) in result.stderr


# -- call -----------------------------------------------------------------------------------------
def test_call_sends_by_name_and_prints_the_id(proj: ModuleType) -> None:
    transport = proj.app.transport
    result = run("-A", "proj", "call", "tasks.elsewhere", "--args", "[2, 2]",
                 "--kwargs", '{"x": 1}')
    assert result.exit_code == 0
    task_id = result.stdout.strip()
    [delivery] = transport.fetch("test", ["q-proj"], 10, 0)
    assert delivery.message.headers["id"] == task_id
    assert delivery.message.headers["task"] == "tasks.elsewhere"
    args, kwargs, _ = decode_body(delivery.message, ["json"])
    assert (args, kwargs) == ([2, 2], {"x": 1})


def test_call_options_reach_the_message(proj: ModuleType) -> None:
    transport = proj.app.transport
    eta = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)).replace(microsecond=0)
    result = run("-A", "proj", "call", "proj.add", "--queue", "other", "--priority", "7",
                 "--eta", eta.replace(tzinfo=None).isoformat(),  # no offset: UTC
                 "--expires", "2100-01-02T00:00:00+01:00")
    assert result.exit_code == 0, result.output
    assert transport.queue_size("q-proj") == 0
    [delivery] = transport.fetch("test", ["other"], 10, 0)
    assert delivery.priority == 7
    assert delivery.message.headers["eta"] == eta.isoformat()
    assert delivery.message.headers["expires"] == "2100-01-02T00:00:00+01:00"


def test_call_countdown_and_expires_in_seconds(proj: ModuleType) -> None:
    transport = proj.app.transport
    result = run("-A", "proj", "call", "proj.add", "--countdown", "0", "--expires", "60")
    assert result.exit_code == 0, result.output
    [delivery] = transport.fetch("test", ["q-proj"], 10, 0)
    assert delivery.message.headers["eta"] is not None
    assert delivery.message.headers["expires"] is not None


def test_call_uses_the_queue_of_a_registered_task(proj: ModuleType) -> None:
    transport = proj.app.transport
    assert run("-A", "proj", "call", "proj.routed").exit_code == 0
    assert transport.queue_size("special") == 1


@pytest.mark.parametrize(("args", "expected"), [
    (["--args", "[2, 2"], ["'-a' / '--args'", "not valid JSON", "JSON list"]),
    (["--args", '{"x": 1}'], ["'--args'", "is a JSON object, not a JSON list"]),
    (["--kwargs", "[1]"], ["'--kwargs'", "is a JSON list, not a JSON object"]),
    (["--kwargs", "x=1"], ["'--kwargs'", "not valid JSON"]),
    (["--eta", "tomorrow"], ["'--eta'", "not an ISO 8601 time"]),
    (["--expires", "-5"], ["'--expires'", "negative"]),
    (["--countdown", "1", "--eta", "2100-01-01T00:00"], ["give only one"]),
])
def test_call_rejects_bad_options(proj: ModuleType, args: list[str],
                                  expected: list[str]) -> None:
    result = run("-A", "proj", "call", "proj.add", *args)
    assert result.exit_code == 2
    for fragment in expected:
        assert fragment in result.stderr
    assert proj.app.transport.queue_size("q-proj") == 0


# -- result ---------------------------------------------------------------------------------------
def failure_meta(task_id: str) -> dict[str, Any]:
    tb = ("Traceback (most recent call last):\n  File \"proj.py\", line 7, in div\n"
          "ZeroDivisionError: division by zero\n")
    return make_meta(task_id, states.FAILURE,
                     {"exc_type": "ZeroDivisionError", "exc_module": "builtins",
                      "exc_message": ["division by zero"]}, tb)


def test_result_success_prints_the_value_as_json(proj: ModuleType) -> None:
    proj.app.backend.store(make_meta("t1", states.SUCCESS, {"sum": [4, "four"]}))
    result = run("-A", "proj", "result", "t1")
    assert result.exit_code == 0
    assert result.stdout == '{"sum": [4, "four"]}\n'


def test_result_failure_prints_the_error_and_exits_1(proj: ModuleType) -> None:
    proj.app.backend.store(failure_meta("t2"))
    result = run("-A", "proj", "result", "t2")
    assert result.exit_code == 1
    assert result.stdout == "FAILURE\n"
    assert result.stderr == "ZeroDivisionError: division by zero\n"

    result = run("-A", "proj", "result", "t2", "--traceback")
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):\n")
    assert result.stderr.count("ZeroDivisionError: division by zero") == 1


def test_result_failure_of_an_unknown_exception_class(proj: ModuleType) -> None:
    proj.app.backend.store(make_meta("t3", states.FAILURE, {
        "exc_type": "QuotaError", "exc_module": "billing.errors", "exc_message": ["over"]}))
    result = run("-A", "proj", "result", "t3", "--traceback")
    assert result.exit_code == 1
    assert result.stderr == "QuotaError: over\n"


def test_result_revoked(proj: ModuleType) -> None:
    proj.app.backend.store(make_meta("t4", states.REVOKED, "revoked"))
    result = run("-A", "proj", "result", "t4")
    assert result.exit_code == 1
    assert result.stdout == "REVOKED\n"
    assert "Task t4 was revoked" in result.stderr


def test_result_pending_prints_the_state(proj: ModuleType) -> None:
    result = run("-A", "proj", "result", "unknown-id")
    assert result.exit_code == 0
    assert result.stdout == "PENDING\n"
    proj.app.backend.store(make_meta("t5", states.STARTED))
    assert run("-A", "proj", "result", "t5").stdout == "STARTED\n"


def test_result_timeout_waits_then_fails(proj: ModuleType) -> None:
    proj.app.backend.store(make_meta("t6", states.STARTED))
    result = run("-A", "proj", "result", "t6", "--timeout", "0.05")
    assert result.exit_code == 1
    assert result.stdout == "STARTED\n"
    assert "did not finish within 0.05s (state STARTED)" in result.stderr


def test_result_timeout_returns_a_finished_result(proj: ModuleType) -> None:
    proj.app.backend.store(make_meta("t7", states.SUCCESS, 4))
    result = run("-A", "proj", "result", "t7", "--timeout", "5")
    assert (result.exit_code, result.stdout) == (0, "4\n")


# -- purge ----------------------------------------------------------------------------------------
def fill(app: Celeriac, **counts: int) -> None:
    for queue, n in counts.items():
        for _ in range(n):
            app.send_task("proj.add", [1, 1], queue=queue)


def test_purge_force_reports_and_empties(proj: ModuleType) -> None:
    transport = proj.app.transport
    fill(proj.app, **{"q-proj": 3, "other": 1})
    result = run("-A", "proj", "purge", "-f")
    assert result.exit_code == 0
    assert result.stdout == "q-proj: 3 messages deleted\nPurged 3 messages from 1 queue.\n"
    assert transport.queue_size("q-proj") == 0
    assert transport.queue_size("other") == 1


def test_purge_several_queues(proj: ModuleType) -> None:
    transport = proj.app.transport
    fill(proj.app, a=2, b=1)
    result = run("-A", "proj", "purge", "-Q", "a,b", "-Q", "c", "--force")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "a: 2 messages deleted", "b: 1 message deleted", "c: 0 messages deleted",
        "Purged 3 messages from 3 queues."]
    assert transport.queue_size("a") == transport.queue_size("b") == 0


def test_purge_asks_first_and_deletes_nothing_on_no(proj: ModuleType) -> None:
    transport = proj.app.transport
    fill(proj.app, **{"q-proj": 2})
    result = run("-A", "proj", "purge", input="n\n")
    assert result.exit_code == 1
    assert ("This will permanently delete 2 messages from queue q-proj. Continue? [y/N]"
            in result.stderr)
    assert "no messages were deleted" in result.stderr
    assert transport.queue_size("q-proj") == 2


def test_purge_without_an_answer_deletes_nothing(proj: ModuleType) -> None:
    fill(proj.app, **{"q-proj": 1})
    result = run("-A", "proj", "purge")
    assert result.exit_code == 1
    assert proj.app.transport.queue_size("q-proj") == 1


def test_purge_on_yes(proj: ModuleType) -> None:
    fill(proj.app, **{"q-proj": 1})
    result = run("-A", "proj", "purge", input="y\n")
    assert result.exit_code == 0
    assert "Purged 1 message from 1 queue." in result.stdout
    assert proj.app.transport.queue_size("q-proj") == 0


def test_purge_nothing_to_do_does_not_ask(proj: ModuleType) -> None:
    result = run("-A", "proj", "purge", "-Q", "x,y")
    assert result.exit_code == 0
    assert result.stdout == "No messages to purge in queues x, y.\n"


@pytest.mark.parametrize(("task_queues", "expected"), [
    (None, ["celery"]),
    ([], ["celery"]),
    (["a", "b"], ["a", "b"]),
    (("a",), ["a"]),
    ({"a": {}, "b": {"routing_key": "b"}}, ["a", "b"]),
    ("a, b", ["a", "b"]),
])
def test_configured_queues(task_queues: Any, expected: list[str]) -> None:
    assert configured_queues(Celeriac(broker="memory://", task_queues=task_queues)) == expected


def test_purge_defaults_to_the_declared_queues(project: Path) -> None:
    write(project, "proj.py", PROJ.replace('task_default_queue="q-proj"',
                                           'task_queues={"a": {}, "b": {}}'))
    app = load("proj").app
    fill(app, a=1, b=2, celery=4)
    result = run("-A", "proj", "purge", "-f")
    assert result.stdout.splitlines()[-1] == "Purged 3 messages from 2 queues."
    assert app.transport.queue_size("celery") == 4


# -- the real command, in a subprocess, with SQLite -----------------------------------------------
SQLITE_PROJ = """
from celeriac import Celeriac

app = Celeriac("proj")

@app.task
def add(x, y):
    return x + y
"""


@pytest.fixture
def sqlite_env(project: Path) -> dict[str, str]:
    pytest.importorskip("celeriac.transports.sqlite")
    write(project, "proj.py", SQLITE_PROJ)
    env = dict(os.environ)
    env["CELERIAC_BROKER_URL"] = f"sqlite:///{project}/b.db"
    env["CELERIAC_RESULT_BACKEND"] = f"sqlite:///{project}/r.db"
    return env


def celeriac_cmd(env: dict[str, str], *args: str,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "celeriac", *args], cwd=os.getcwd(), env=env,
                          input=input, capture_output=True, text=True, timeout=60, check=False)


def sqlite_app(env: dict[str, str]) -> Celeriac:
    return Celeriac(environ=env)


def test_subprocess_version_and_help(project: Path) -> None:
    done = celeriac_cmd(dict(os.environ), "--version")
    assert (done.returncode, done.stdout) == (0, f"celeriac {celeriac.__version__}\n")
    done = celeriac_cmd(dict(os.environ), "--help")
    assert done.returncode == 0
    assert "purge" in done.stdout


def test_subprocess_finds_proj_in_the_working_directory(sqlite_env: dict[str, str]) -> None:
    done = celeriac_cmd(sqlite_env, "-A", "missing", "purge", "-f")
    assert done.returncode == 2
    assert "no module named 'missing'" in done.stderr
    done = celeriac_cmd(sqlite_env, "-A", "proj", "purge", "-f")
    assert (done.returncode, done.stdout) == (0, "No messages to purge in queue celery.\n")


def test_subprocess_call_result_purge(sqlite_env: dict[str, str]) -> None:
    app = sqlite_app(sqlite_env)
    try:
        done = celeriac_cmd(sqlite_env, "-A", "proj", "call", "proj.add", "--args", "[2, 2]")
        assert done.returncode == 0, done.stderr
        task_id = done.stdout.strip()
        [delivery] = app.transport.fetch("test", ["celery"], 10, 0)
        assert delivery.message.headers["id"] == task_id
        app.transport.requeue([delivery.tag])

        done = celeriac_cmd(sqlite_env, "-A", "proj", "result", task_id)
        assert (done.returncode, done.stdout) == (0, "PENDING\n")
        app.backend.store(make_meta(task_id, states.SUCCESS, 4))
        done = celeriac_cmd(sqlite_env, "-A", "proj", "result", task_id, "--timeout", "5")
        assert (done.returncode, done.stdout) == (0, "4\n")
        app.backend.store(failure_meta("failed-id"))
        done = celeriac_cmd(sqlite_env, "-A", "proj", "result", "failed-id")
        assert (done.returncode, done.stderr) == (1, "ZeroDivisionError: division by zero\n")

        done = celeriac_cmd(sqlite_env, "-A", "proj", "purge", input="")
        assert done.returncode == 1
        assert app.transport.queue_size("celery") == 1
        done = celeriac_cmd(sqlite_env, "-A", "proj", "purge", "-f")
        assert done.returncode == 0
        assert done.stdout.splitlines()[-1] == "Purged 1 message from 1 queue."
        assert app.transport.queue_size("celery") == 0
    finally:
        app.close()


def test_subprocess_broker_option_wins_over_the_environment(sqlite_env: dict[str, str],
                                                             project: Path) -> None:
    other = f"sqlite:///{project}/other.db"
    done = celeriac_cmd(sqlite_env, "-A", "proj", "-b", other, "call", "proj.add")
    assert done.returncode == 0, done.stderr
    app = Celeriac(broker=other)
    try:
        assert app.transport.queue_size("celery") == 1
    finally:
        app.close()
