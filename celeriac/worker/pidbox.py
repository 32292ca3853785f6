"""The worker's end of the control mailbox: a thread that listens for commands.

Commands arrive on their own channel, never behind task messages, and are answered even
while every pool slot is busy: the listener hands each command to the consumer's event loop
and sends the reply itself. It holds the worker's fork guard around broker calls so that no
pool child is forked while this thread is inside a connection library.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..control.mailbox import (
    CONTROL_CHANNEL,
    ControlRequest,
    RefusedRequest,
    decode_request,
    encode_reply,
)
from .control import Command
from .forkguard import ForkGuard

if TYPE_CHECKING:
    from ..transports import Subscription, Transport

__all__ = ["Node"]

log = logging.getLogger("celeriac.worker.control")


class Node:
    """Listens on the control channel and runs the commands addressed to ``hostname``."""

    def __init__(self, transport: Transport, hostname: str, loop: asyncio.AbstractEventLoop,
                 commands: Callable[[], dict[str, Command]], state: Any,
                 clock: Any, guard: ForkGuard, signing_key: str | None) -> None:
        self.transport = transport
        self.hostname = hostname
        self.loop = loop
        self.commands = commands
        self.state = state
        self.clock = clock
        self.guard = guard
        self.signing_key = signing_key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscription: Subscription | None = None

    def start(self) -> None:
        with self.guard.shared():
            self._subscription = self.transport.subscribe(CONTROL_CHANNEL)
        self._thread = threading.Thread(target=self._listen, name="celeriac-control",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._subscription is not None:
            with self.guard.shared():
                self._subscription.close()

    def _listen(self) -> None:
        assert self._subscription is not None
        while not self._stop.is_set():
            try:
                with self.guard.shared():
                    messages = self._subscription.get(0.1)
            except Exception as exc:
                log.error("Control channel error: %r; retrying", exc)
                self._stop.wait(1.0)
                continue
            for raw in messages:
                self._on_message(raw)

    def _on_message(self, raw: bytes) -> None:
        try:
            request = decode_request(raw, self.signing_key)
        except RefusedRequest as exc:
            log.warning("Refused a control message: %s", exc)
            return
        if not request.addressed_to(self.hostname):
            return
        self.clock.adjust(request.clock)
        future = asyncio.run_coroutine_threadsafe(self.dispatch(request), self.loop)
        try:
            reply = future.result(timeout=60)
        except Exception as exc:  # the loop is gone (shutting down) or the command hung
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if request.reply_to and reply is not None:
            payload = encode_reply(request.ticket, self.hostname, reply, self.clock.value)
            try:
                with self.guard.shared():
                    self.transport.reply(request.reply_to, payload, ttl=60.0)
            except Exception as exc:
                log.error("Could not reply to %s: %r", request.method, exc)

    async def dispatch(self, request: ControlRequest) -> Any:
        """Run one command on the event loop; errors become ``{'error': ...}`` replies."""
        command = self.commands().get(request.method)
        if command is None:
            log.warning("Unknown control command %r", request.method)
            return {"error": f"unknown command {request.method!r}"}
        log.debug("Control command %s(%s)", request.method, request.arguments)
        try:
            inspect.signature(command.fun).bind(self.state, **request.arguments)
        except TypeError as exc:
            return {"error": f"bad arguments for {request.method!r}: {exc}"}
        try:
            result = command.fun(self.state, **request.arguments)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.exception("Control command %s failed", request.method)
            return {"error": f"{type(exc).__name__}: {exc}"}
        return result
