"""``celeriac control``, ``inspect`` and ``status`` against real workers: on SQLite, and one
test per command group (``@on_every_broker``) on Redis and RabbitMQ too."""

from __future__ import annotations

import json
import time

import pytest

from celeriac.nodenames import expand_nodename

from .brokers import on_every_broker
from .conftest import run_cli, wait_for

EX_UNAVAILABLE = 69


@pytest.fixture
def two_workers(project, start_worker):
    """Two prefork workers, ``a-0@host`` and ``b-1@host``; returns their node names."""
    workers = [start_worker("-c", "1", name="a", ready=False),
               start_worker("-c", "1", name="b", ready=False)]
    for worker in workers:
        worker.wait_ready()
    return workers, [expand_nodename("a-0@%h"), expand_nodename("b-1@%h")]


@on_every_broker
def test_status_lists_every_node(project, two_workers):
    _, (a, b) = two_workers
    out = run_cli(project, "status")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{a}: OK", f"{b}: OK", "", "2 nodes online."]


def test_inspect_registered_and_stats(project, two_workers):
    _, (a, b) = two_workers
    out = run_cli(project, "inspect", "registered")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for node in (a, b):
        at = lines.index(f"-> {node}: OK")
        assert "    * proj.add" in lines[at + 1:]
    assert "2 nodes replied." in out.stderr
    assert "nodes replied" not in out.stdout

    out = run_cli(project, "inspect", "stats", "--json", "-d", a)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert list(stats) == [a]
    assert {"pool", "total", "broker", "pid", "rusage"} <= set(stats[a])
    assert stats[a]["broker"]["transport"]
    assert "password" not in out.stdout.lower()
    assert out.stderr == ""


@on_every_broker
def test_inspect_active_shows_the_running_task(project, two_workers):
    _, (a, b) = two_workers
    result = project.app().send_task("proj.sleeper", (30,))

    def active() -> dict:
        out = run_cli(project, "inspect", "active", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    replies: dict = {}

    def running() -> bool:
        replies.update(active())
        return any(replies.values())

    wait_for(running, 20, "the sleeper task to show in inspect active")
    tasks = [task for node in (a, b) for task in replies[node]]
    assert [(t["id"], t["name"]) for t in tasks] == [(result.id, "proj.sleeper")]
    # The human form shows the task as one line under its node.
    out = run_cli(project, "inspect", "active")
    assert f'"id": "{result.id}"' in out.stdout
    assert "- empty -" in out.stdout  # the other, idle node
    out = run_cli(project, "control", "terminate", "SIGKILL", result.id)
    assert out.returncode == 0, out.stderr
    assert f"terminate: tasks {result.id} flagged as revoked" in out.stdout
    wait_for(lambda: not any(active().values()), 20, "the terminated task to go")


def test_add_consumer_to_one_node(project, two_workers):
    _, (a, b) = two_workers
    out = run_cli(project, "control", "add_consumer", "foo", "-d", a)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"-> {a}: OK", "    add consumer 'foo'"]
    assert "1 node replied." in out.stderr

    out = run_cli(project, "inspect", "active_queues", "--json")
    assert out.returncode == 0, out.stderr
    queues = {node: {q["name"] for q in reply} for node, reply in json.loads(out.stdout).items()}
    assert "foo" in queues[a]
    assert "foo" not in queues[b]


def test_error_reply_exits_1(project, two_workers):
    _, (a, b) = two_workers
    out = run_cli(project, "control", "rate_limit", "proj.unknown", "1/s")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"-> {a}: ERROR" in out.stdout
    assert f"-> {b}: ERROR" in out.stdout
    assert "unknown task 'proj.unknown'" in out.stdout

    out = run_cli(project, "control", "revoke", "id-1", "id-2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[a] == {"ok": "tasks id-1, id-2 flagged as revoked"}


def test_usage_errors_exit_2(project):
    out = run_cli(project, "control", "nosuchcommand")
    assert out.returncode == 2
    assert "Unknown control command 'nosuchcommand'" in out.stderr
    assert "add_consumer" in out.stderr and "rate_limit" in out.stderr

    out = run_cli(project, "control", "pool_grow", "many")
    assert out.returncode == 2
    assert "argument <n> must be an integer, not 'many'" in out.stderr
    assert "control pool_grow [<n>]" in out.stderr

    out = run_cli(project, "control", "rate_limit", "proj.add")
    assert out.returncode == 2
    assert "missing argument <rate_limit>" in out.stderr

    out = run_cli(project, "control", "cancel_consumer", "foo", "bar")
    assert out.returncode == 2
    assert "takes at most 1 argument" in out.stderr

    out = run_cli(project, "control", "active")
    assert out.returncode == 2
    assert "celeriac inspect active" in out.stderr


def test_no_reply_exits_69_within_the_timeout(project):
    started = time.monotonic()
    out = run_cli(project, "inspect", "ping", "-d", "nobody@nowhere", "-t", "0.5")
    assert time.monotonic() - started < 2.5
    assert out.returncode == EX_UNAVAILABLE
    assert "No nodes replied within time constraint" in out.stderr
    assert out.stdout == ""

    out = run_cli(project, "status", "-t", "0.3")
    assert out.returncode == EX_UNAVAILABLE
    assert "No nodes replied within time constraint" in out.stderr


@on_every_broker
def test_shutdown_stops_only_the_destination(project, two_workers):
    (worker_a, worker_b), (a, b) = two_workers
    out = run_cli(project, "control", "shutdown", "-d", a)
    assert b not in out.stdout
    assert worker_a.wait(20) == 0
    assert worker_b.proc.poll() is None
    status = run_cli(project, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines() == [f"{b}: OK", "", "1 node online."]
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"-> {a}: OK", "    shutdown initiated"]


def test_help_lists_commands_with_arguments(project):
    (project.path / "extra.py").write_text(
        "from proj import app\n\n"
        "@app.control_command\n"
        "def increase_prefetch_count(state, n=1):\n"
        "    '''Raise the prefetch count by n.'''\n"
        "    return {'ok': 'done'}\n")
    out = run_cli(project, "control", "--help", "-I", "extra")
    assert out.returncode == 0, out.stderr
    assert "revoke <task_id> [<task_id> ...]" in out.stdout
    assert "terminate <signal> <task_id> [<task_id> ...]" in out.stdout
    assert "increase_prefetch_count [<n>]" in out.stdout
    assert "Raise the prefetch count by n." in out.stdout
    assert "69" in out.stdout

    out = run_cli(project, "inspect", "--help")
    assert out.returncode == 0, out.stderr
    assert "active_queues" in out.stdout
    assert "query_task [<ids> ...]" in out.stdout
    assert "increase_prefetch_count" not in out.stdout
