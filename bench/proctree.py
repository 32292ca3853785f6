"""Memory and CPU time of a process and all its descendants, read from /proc (Linux only).

RSS counts every page a process has mapped, so pages that forked children share with their
parent are counted once per process: the sum over a prefork tree overstates what it costs.
PSS splits each shared page between the processes sharing it, so the PSS sum is what the
tree really takes. Both are reported.

CPU time is user + system time of every live process in the tree plus what its exited
children used (``cutime``/``cstime``: children that were waited for), so a worker that forks
a short-lived process per task is charged for those too.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["TreeMemory", "descendants", "tree_cpu_seconds", "tree_memory"]


@dataclass(frozen=True)
class TreeMemory:
    processes: int
    rss_bytes: int
    pss_bytes: int


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 on), or None if it's gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            stat = f.read()
    except OSError:  # the process ended while we looked
        return None
    # The command name is in parentheses and may contain spaces: fields follow the last ')'.
    return stat.rsplit(")", 1)[1].split()


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def descendants(root: int) -> list[int]:
    """The pids of every live process below ``root`` (children, grandchildren ...)."""
    children: dict[int, list[int]] = defaultdict(list)
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_of(int(name))
            if parent is not None:
                children[parent].append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kib_field(path: str, field: str) -> int:
    """A ``Field:   123 kB`` line of a /proc file, in bytes; 0 if the process is gone."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_memory(root: int) -> TreeMemory:
    """RSS and PSS summed over ``root`` and its descendants."""
    pids = [root, *descendants(root)]
    rss = sum(_kib_field(f"/proc/{pid}/status", "VmRSS") for pid in pids)
    pss = sum(_kib_field(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids)
    return TreeMemory(len(pids), rss, pss)


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks; 0 if it is gone."""
    fields = _stat_fields(pid)
    return 0 if fields is None else sum(int(value) for value in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by ``root``, its descendants and their reaped
    children."""
    return sum(_cpu_ticks(pid) for pid in [root, *descendants(root)]) / _TICKS
