"""Node names and file-path variables (guide: "Starting the worker", "Variables in file paths")."""

from __future__ import annotations

from celeriac.nodenames import expand_nodename, expand_path


def test_guide_examples_for_node_names():
    host = "george.example.com"
    assert expand_nodename("worker1.%h", host) == "worker1.george.example.com"
    assert expand_nodename("worker1.%n", host) == "worker1.george"
    assert expand_nodename("worker1.%d", host) == "worker1.example.com"
    assert expand_nodename("w1@%h", host) == "w1@george.example.com"
    assert expand_nodename("w%%1@%h", host) == "w%1@george.example.com"
    assert expand_nodename(None, host) == "celery@george.example.com"


def test_file_path_variables():
    node = "worker1@example.com"
    assert [expand_path("%n-%i.log", node, i) for i in (0, 1, 2)] == [
        "worker1-0.log", "worker1-1.log", "worker1-2.log"]
    assert expand_path("%n%I.log", node, 0) == "worker1.log"
    assert expand_path("%n%I.log", node, 3) == "worker1-3.log"
    assert expand_path("/run/%p.pid", node) == "/run/worker1@example.com.pid"
    assert expand_path("%h|%d|%%", node) == "example.com|com|%"
