"""``app.control``: send commands to workers and collect their replies; ``inspect()``."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .mailbox import CONTROL_CHANNEL, ControlRequest, decode_reply, encode_request

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["Control", "Inspect"]

Replies = list[dict[str, Any]]


def _destinations(destination: str | Sequence[str] | None) -> list[str] | None:
    if destination is None:
        return None
    if isinstance(destination, str):
        return [destination]
    return list(destination)


def _ids(task_id: str | Sequence[str]) -> list[str]:
    return [task_id] if isinstance(task_id, str) else list(task_id)


class Control:
    """Remote control of workers: ``app.control.broadcast(...)`` and its shortcuts."""

    def __init__(self, app: Celeriac) -> None:
        self.app = app
        self._clock = itertools.count(1)

    # -- the primitive --------------------------------------------------------------------------
    def broadcast(self, command: str, arguments: Mapping[str, Any] | None = None,
                  destination: str | Sequence[str] | None = None, reply: bool = False,
                  timeout: float = 1.0, limit: int | None = None,
                  callback: Callable[[dict[str, Any]], None] | None = None) -> Replies | None:
        """Send ``command`` to every worker (or to ``destination``).

        Without ``reply`` it returns ``None`` at once. With ``reply`` it returns a list of
        ``{nodename: reply}`` collected until ``timeout`` seconds pass or ``limit`` replies
        arrived (``limit`` defaults to the number of destinations).
        """
        transport = self.app.transport
        nodes = _destinations(destination)
        ticket = str(uuid.uuid4()) if reply else None
        reply_to = f"celeriac.pidbox.reply.{ticket}" if reply else None
        if reply_to is not None:
            transport.prepare_replies(reply_to)
        request = ControlRequest(
            method=command, arguments=dict(arguments or {}), destination=nodes, ticket=ticket,
            reply_to=reply_to, clock=next(self._clock), expires=time.time() + max(timeout, 30))
        transport.broadcast(CONTROL_CHANNEL, encode_request(request,
                                                            self.app.conf.control_signing_key))
        if reply_to is None:
            return None
        if limit is None and nodes:
            limit = len(nodes)
        return self._collect(reply_to, ticket, timeout, limit, callback)

    def _collect(self, reply_to: str, ticket: str | None, timeout: float, limit: int | None,
                 callback: Callable[[dict[str, Any]], None] | None) -> Replies:
        transport = self.app.transport
        deadline = time.monotonic() + timeout
        replies: Replies = []
        while limit is None or len(replies) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for raw in transport.get_replies(reply_to, left):
                doc = decode_reply(raw)
                if doc is None or doc.get("ticket") != ticket:
                    continue
                entry = {doc["hostname"]: doc["reply"]}
                replies.append(entry)
                if callback is not None:
                    callback(entry)
        return replies

    def inspect(self, destination: str | Sequence[str] | None = None, timeout: float = 1.0,
                limit: int | None = None) -> Inspect:
        """Read-only commands: ``app.control.inspect().active()`` and friends."""
        return Inspect(self, destination, timeout, limit)

    # -- shortcuts ------------------------------------------------------------------------------
    def _send(self, command: str, arguments: Mapping[str, Any], *, reply: bool = False,
              destination: str | Sequence[str] | None = None, timeout: float = 1.0,
              limit: int | None = None) -> Replies | None:
        return self.broadcast(command, arguments, destination=destination, reply=reply,
                              timeout=timeout, limit=limit)

    def ping(self, destination: str | Sequence[str] | None = None, timeout: float = 1.0,
             **kw: Any) -> Replies:
        """Ask workers to answer ``{'ok': 'pong'}``."""
        return self._send("ping", {}, destination=destination, timeout=timeout, reply=True,
                          **kw) or []

    def rate_limit(self, task_name: str, rate_limit: str | float | None,
                   **kw: Any) -> Replies | None:
        """Change a task's rate limit on the workers (``'200/m'``, ``'10/s'``, ``None``)."""
        return self._send("rate_limit", {"task_name": task_name, "rate_limit": rate_limit},
                          **kw)

    def time_limit(self, task_name: str, soft: float | None = None, hard: float | None = None,
                   **kw: Any) -> Replies | None:
        """Change a task's time limits for runs that start from now on."""
        return self._send("time_limit", {"task_name": task_name, "soft": soft, "hard": hard},
                          **kw)

    def revoke(self, task_id: str | Sequence[str], terminate: bool = False,
               signal: str = "SIGTERM", **kw: Any) -> Replies | None:
        """Revoke one task id or a list of them (one message for all)."""
        return self._send("revoke", {"task_id": _ids(task_id), "terminate": terminate,
                                     "signal": signal}, **kw)

    def terminate(self, task_id: str | Sequence[str], signal: str = "SIGTERM",
                  **kw: Any) -> Replies | None:
        """Revoke and stop the running task(s) with ``signal``."""
        return self.revoke(task_id, terminate=True, signal=signal, **kw)

    def add_consumer(self, queue: str, exchange: str | None = None,
                     exchange_type: str | None = None, routing_key: str | None = None,
                     options: Mapping[str, Any] | None = None, **kw: Any) -> Replies | None:
        """Start consuming from ``queue`` (idempotent)."""
        return self._send("add_consumer", {
            "queue": queue, "exchange": exchange, "exchange_type": exchange_type,
            "routing_key": routing_key, "options": dict(options or {})}, **kw)

    def cancel_consumer(self, queue: str, **kw: Any) -> Replies | None:
        """Stop consuming from ``queue``."""
        return self._send("cancel_consumer", {"queue": queue}, **kw)

    def pool_restart(self, modules: Sequence[str] | None = None, reload: bool = False,
                     reloader: str | None = None, **kw: Any) -> Replies | None:
        """Replace pool processes, importing (or reloading) ``modules`` first."""
        return self._send("pool_restart", {"modules": list(modules or []), "reload": reload,
                                           "reloader": reloader}, **kw)

    def pool_grow(self, n: int = 1, **kw: Any) -> Replies | None:
        return self._send("pool_grow", {"n": n}, **kw)

    def pool_shrink(self, n: int = 1, **kw: Any) -> Replies | None:
        return self._send("pool_shrink", {"n": n}, **kw)

    def autoscale(self, max: int, min: int, **kw: Any) -> Replies | None:
        return self._send("autoscale", {"max": max, "min": min}, **kw)

    def enable_events(self, **kw: Any) -> Replies | None:
        return self._send("enable_events", {}, **kw)

    def disable_events(self, **kw: Any) -> Replies | None:
        return self._send("disable_events", {}, **kw)

    def heartbeat(self, **kw: Any) -> Replies | None:
        return self._send("heartbeat", {}, **kw)

    def shutdown(self, **kw: Any) -> Replies | None:
        """Warm-shut-down the workers (or the ``destination`` ones)."""
        return self._send("shutdown", {}, **kw)


def _merge(replies: Replies | None) -> dict[str, Any] | None:
    if not replies:
        return None
    merged: dict[str, Any] = {}
    for entry in replies:
        merged.update(entry)
    return merged


class Inspect:
    """Read-only commands; each returns ``{nodename: reply}``, or ``None`` if none replied."""

    def __init__(self, control: Control, destination: str | Sequence[str] | None,
                 timeout: float, limit: int | None) -> None:
        self.control = control
        self.destination = destination
        self.timeout = timeout
        self.limit = limit

    def _request(self, command: str, **arguments: Any) -> dict[str, Any] | None:
        return _merge(self.control.broadcast(command, arguments, destination=self.destination,
                                             reply=True, timeout=self.timeout,
                                             limit=self.limit))

    def ping(self) -> dict[str, Any] | None:
        return self._request("ping")

    def registered(self, *taskinfoitems: str) -> dict[str, Any] | None:
        return self._request("registered", taskinfoitems=list(taskinfoitems))

    registered_tasks = registered

    def active(self) -> dict[str, Any] | None:
        return self._request("active")

    def scheduled(self) -> dict[str, Any] | None:
        return self._request("scheduled")

    def reserved(self) -> dict[str, Any] | None:
        return self._request("reserved")

    def revoked(self) -> dict[str, Any] | None:
        return self._request("revoked")

    def active_queues(self) -> dict[str, Any] | None:
        return self._request("active_queues")

    def stats(self) -> dict[str, Any] | None:
        return self._request("stats")

    def conf(self, with_defaults: bool = False) -> dict[str, Any] | None:
        return self._request("conf", with_defaults=with_defaults)

    def query_task(self, *ids: str | Sequence[str]) -> dict[str, Any] | None:
        flat: list[str] = []
        for item in ids:
            flat.extend(_ids(item))
        return self._request("query_task", ids=flat)

    def clock(self) -> dict[str, Any] | None:
        return self._request("clock")
