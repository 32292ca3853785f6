"""Node names (``worker1@%h``) and the ``%`` variables of node names and file paths."""

from __future__ import annotations

import socket

__all__ = ["DEFAULT_NODENAME", "default_nodename", "expand_nodename", "expand_path", "host_parts"]

DEFAULT_NODENAME = "celery@%h"


def host_parts(hostname: str | None = None) -> tuple[str, str, str]:
    """``(full, short, domain)`` of the host name, e.g. ``('george.example.com', 'george',
    'example.com')``."""
    full = hostname or socket.gethostname()
    short, _, domain = full.partition(".")
    return full, short, domain


def _expand(template: str, table: dict[str, str]) -> str:
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "%" and i + 1 < len(template):
            key = template[i + 1]
            if key == "%":
                out.append("%")
                i += 2
                continue
            if key in table:
                out.append(table[key])
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def expand_nodename(template: str | None, hostname: str | None = None) -> str:
    """Expand ``%h`` (host with domain), ``%n`` (host), ``%d`` (domain) and ``%%``.

    The result is used as given: ``worker1@%h`` and the guide's ``worker1.%h`` both work.
    """
    full, short, domain = host_parts(hostname)
    return _expand(template or DEFAULT_NODENAME, {"h": full, "n": short, "d": domain})


def default_nodename(hostname: str | None = None) -> str:
    return expand_nodename(DEFAULT_NODENAME, hostname)


def expand_path(template: str, nodename: str, index: int | None = None) -> str:
    """Expand a ``--logfile``/``--pidfile``/``--statedb`` template for ``nodename``.

    ``%p`` full node name, ``%n`` the part before ``@``, ``%h`` the node name's host part,
    ``%d`` its domain, ``%i`` the pool process index (0 in the main process), ``%I`` the
    index with a ``-`` before it (empty in the main process), ``%%`` a literal ``%``.
    """
    name, _, host = nodename.partition("@")
    if not host:
        name, host = nodename, host_parts()[0]
    domain = host.partition(".")[2]
    table = {"p": nodename, "n": name, "h": host, "d": domain,
             "i": str(index or 0), "I": f"-{index}" if index else ""}
    return _expand(template, table)
