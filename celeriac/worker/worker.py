"""The worker's composition root: what starts, in what order, and what stops in reverse.

Start: logging → task modules → queues → pidfile → event loop → signal handlers → I/O thread
→ broker check (and ``--purge``) → state db → mingle → pool → consumer → control node →
heartbeat. Stop (warm on TERM/INT, cold on QUIT or a second INT): heartbeat → control node →
consumer (gives back unstarted messages, waits for or abandons running tasks) → pool →
worker-offline → state db → I/O thread → pidfile. The app's connections belong to whoever
made the app (the CLI closes them).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..events import EVENT_CHANNEL, EventDispatcher
from ..exceptions import ConfigurationError, TransportError
from ..nodenames import expand_nodename, expand_path
from ..pools import Pool, pool_class
from ..pools.base import PoolLimits
from ..urls import mask_url
from .autoscale import Autoscaler
from .consumer import Consumer
from .control import Command, ControlState, Panel
from .forkguard import ForkGuard
from .pidbox import Node
from .pidfile import Pidfile
from .state import LamportClock, RevokedSet, WorkerState
from .statedb import StateDB

if TYPE_CHECKING:
    from ..app import Celeriac

__all__ = ["Worker", "WorkerOptions"]

log = logging.getLogger("celeriac.worker")

LOG_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(nodename)s: %(message)s"


@dataclass
class WorkerOptions:
    """Everything ``celeriac worker`` can be told; ``None`` means: from the settings."""

    hostname: str | None = None
    concurrency: int | None = None
    pool: str | None = None
    queues: Sequence[str] = ()
    exclude_queues: Sequence[str] = ()
    include: Sequence[str] = ()
    prefetch_multiplier: int | None = None
    purge: bool = False
    loglevel: str = "WARNING"
    logfile: str | None = None
    pidfile: str | None = None
    statedb: str | None = None
    task_events: bool = False
    without_mingle: bool = False
    without_heartbeat: bool = False
    time_limit: float | None = None
    soft_time_limit: float | None = None
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    autoscale: tuple[int, int] | None = None  # (max, min)
    pipeline: int | None = None  # prefork jobs per process: 1 with -O fair, 4 with -O fast


def parse_autoscale(value: Any) -> tuple[int, int] | None:
    """``'10,3'`` (max, min) → ``(10, 3)``; a single number ``'10'`` means min 1."""
    if not value:
        return None
    try:
        parts = [int(p) for p in str(value).split(",")]
    except ValueError:
        raise ConfigurationError(f"Bad autoscale value {value!r}: use MAX,MIN such as "
                                 "'10,3'") from None
    maximum, minimum = (parts[0], 1) if len(parts) == 1 else (parts[0], parts[1])
    if not 1 <= minimum <= maximum:
        raise ConfigurationError(f"Bad autoscale value {value!r}: need 1 <= MIN <= MAX")
    return maximum, minimum


def _import_object(path: str) -> Any:
    """``'module:attr'`` (or ``'module.attr'``) → the object; used for settings that name
    classes or functions, never for message contents."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"Cannot import {path!r}: {exc}") from exc


class _NodeFilter(logging.Filter):
    def __init__(self, nodename: str) -> None:
        super().__init__()
        self.nodename = nodename

    def filter(self, record: logging.LogRecord) -> bool:
        record.nodename = self.nodename
        return True


class Worker:
    """One worker node: ``Worker(app, WorkerOptions(...)).run()`` returns the exit code."""

    def __init__(self, app: Celeriac, options: WorkerOptions | None = None) -> None:
        self.app = app
        self.options = options or WorkerOptions()
        conf = app.conf
        opts = self.options
        self.hostname = expand_nodename(opts.hostname)
        self._apply_option_settings()
        self.autoscale = opts.autoscale or parse_autoscale(conf.worker_autoscale)
        self.concurrency = int(opts.concurrency or conf.worker_concurrency or os.cpu_count() or 1)
        if self.autoscale is not None:
            self.concurrency = self.autoscale[1]
        if self.concurrency < 1:
            raise ConfigurationError(f"Concurrency must be at least 1, not {self.concurrency}")
        self.pool_name = opts.pool or conf.worker_pool
        self.pool_cls = pool_class(self.pool_name)
        self.multiplier = int(opts.prefetch_multiplier or conf.worker_prefetch_multiplier)
        self.prefetch_count = max(1, self.concurrency * self.multiplier)
        self.autoscaler: Any = None
        self.state = WorkerState(RevokedSet(app.clock))
        self.clock = LamportClock()
        self.started_at = time.monotonic()
        self.fork_guard = ForkGuard()
        self.events = EventDispatcher(self.hostname, self._broadcast_event, self.clock.forward,
                                      enabled=opts.task_events or conf.worker_send_task_events)
        statedb = opts.statedb or conf.worker_state_db
        self.statedb = StateDB(expand_path(statedb, self.hostname)) if statedb else None
        self.node: Node | None = None
        self.queues: list[str] = []
        self.pool: Pool | None = None
        self.consumer: Consumer | None = None
        self._stop: asyncio.Future[bool] | None = None
        self._cold = False  # a cold shutdown was asked for (first, or during a warm one)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self._handler: logging.Handler | None = None

    def _apply_option_settings(self) -> None:
        """Command-line limits become this worker's settings (so ``conf``/``stats`` show them)."""
        opts, conf = self.options, self.app.conf
        for option, setting in (("time_limit", "task_time_limit"),
                                ("soft_time_limit", "task_soft_time_limit"),
                                ("max_tasks_per_child", "worker_max_tasks_per_child"),
                                ("max_memory_per_child", "worker_max_memory_per_child")):
            value = getattr(opts, option)
            if value is not None:
                conf[setting] = value

    def pool_limits(self) -> PoolLimits:
        conf = self.app.conf
        child_setup = None
        if self.options.logfile and ("%i" in self.options.logfile
                                     or "%I" in self.options.logfile):
            child_setup = self._child_logging
        return PoolLimits(max_tasks_per_child=conf.worker_max_tasks_per_child,
                          max_memory_per_child=conf.worker_max_memory_per_child,
                          child_setup=child_setup,
                          pipeline=int(self.options.pipeline or conf.worker_pool_pipeline))

    def _child_logging(self, index: int) -> None:
        """In a new pool child: log to the child's own file (``%i``/``%I`` in --logfile)."""
        assert self.options.logfile is not None
        root = logging.getLogger()
        if self._handler is not None:
            root.removeHandler(self._handler)
        handler = logging.FileHandler(expand_path(self.options.logfile, self.hostname, index))
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_NodeFilter(self.hostname))
        root.addHandler(handler)
        self._handler = handler

    # -- start-up steps -----------------------------------------------------------------------
    def setup_logging(self) -> None:
        level = self.options.loglevel.upper()
        if level not in logging.getLevelNamesMapping():
            raise ConfigurationError(
                f"Unknown log level {self.options.loglevel!r}: use DEBUG, INFO, WARNING, "
                "ERROR or CRITICAL.")
        if self.options.logfile:
            path = expand_path(self.options.logfile, self.hostname)
            handler: logging.Handler = logging.FileHandler(path)
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(_NodeFilter(self.hostname))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(level)
        self._handler = handler

    def resolve_queues(self) -> list[str]:
        conf = self.app.conf
        defined = conf.task_queues
        names = list(defined) if defined else [conf.task_default_queue]
        if self.options.queues:
            wanted = list(dict.fromkeys(self.options.queues))
            missing = [q for q in wanted if defined and q not in defined]
            if missing and not conf.task_create_missing_queues:
                raise ConfigurationError(
                    f"Queue(s) {missing} are not defined in task_queues and "
                    "task_create_missing_queues is off: define them or turn it on.")
            names = wanted
        names = [q for q in names if q not in set(self.options.exclude_queues)]
        if not names:
            raise ConfigurationError("No queues left to consume from after -X/--exclude-queues.")
        return names

    def banner(self) -> str:
        return "\n".join([
            f"celeriac {__version__} worker {self.hostname} (pid {os.getpid()})",
            f"  app:         {self.app.main or '__main__'}",
            f"  broker:      {mask_url(self.app.broker_url)}",
            f"  results:     {mask_url(self.app.result_backend_url)}",
            f"  concurrency: {self.concurrency} ({self.pool_name})",
            f"  queues:      {', '.join(self.queues)}",
            f"  tasks:       {', '.join(sorted(self.app.tasks)) or '(none registered)'}",
        ])

    # -- running ------------------------------------------------------------------------------
    def run(self, *, install_signals: bool = True) -> int:
        """Start, serve until told to stop, stop; returns the process exit code.

        ``install_signals=False`` embeds the worker in another program's thread; stop it
        with :meth:`stop`.
        """
        self.setup_logging()
        pidfile = None
        try:
            self.app.import_task_modules()
            for module in self.options.include:
                __import__(module)
            self.queues = self.resolve_queues()
            if self.options.pidfile:
                pidfile = Pidfile(expand_path(self.options.pidfile, self.hostname))
                pidfile.acquire()
            log.info("%s", self.banner())
            asyncio.run(self._main(install_signals))
            return 0
        finally:
            if pidfile is not None:
                pidfile.release()
            if self._handler is not None:
                logging.getLogger().removeHandler(self._handler)
                self._handler.close()

    def request_stop(self, cold: bool = False) -> None:
        """Begin a warm (or cold) shutdown; a cold request during a warm one escalates, also
        while the worker is still starting (before it has a consumer to abort)."""
        if self._stop is None:
            return
        if not self._stop.done():
            log.warning("%s shutdown requested", "Cold" if cold else "Warm")
            self._stop.set_result(cold)
        elif cold and not self._cold:
            log.warning("Cold shutdown: abandoning running tasks")
            if self.consumer is not None:
                self.consumer.abort()
        self._cold = self._cold or cold

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        interrupts = {"n": 0}

        def on_int() -> None:
            interrupts["n"] += 1
            self.request_stop(interrupts["n"] > 1)

        loop.add_signal_handler(signal.SIGTERM, self.request_stop, False)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGQUIT, self.request_stop, True)

    def stop(self, cold: bool = False) -> None:
        """Ask the worker to shut down; safe to call from any thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.request_stop, cold)

    async def _main(self, install_signals: bool) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        if install_signals:
            self._install_signals(loop)
        io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celeriac-io")
        try:
            await self._serve(loop, io)
        finally:
            io.shutdown(wait=True)

    async def _serve(self, loop: asyncio.AbstractEventLoop, io: ThreadPoolExecutor) -> None:
        # The pool starts first: prefork children forked before the broker's client library
        # is loaded and connected stay smaller (they hand results to this process).
        self.pool = self.pool_cls(self.app, concurrency=self.concurrency,
                                  hostname=self.hostname, io=io, fork_guard=self.fork_guard,
                                  limits=self.pool_limits())
        await self.pool.start()
        try:
            await self._check_broker(loop, io)
            if self.statedb is not None:
                await loop.run_in_executor(io, self._load_statedb)
            if not self.options.without_mingle:
                await loop.run_in_executor(io, self._mingle)
        except BaseException:
            await self.pool.stop(cold=True)
            raise
        self.consumer = Consumer(self.app, self.pool, hostname=self.hostname,
                                 queues=self.queues, prefetch_count=self.prefetch_count,
                                 io=io, state=self.state, events=self.events,
                                 fork_guard=self.fork_guard)
        self.consumer.start()
        self.node = Node(self.app.transport, self.hostname, loop, self.commands,
                         ControlState(self, self.consumer), self.clock, self.fork_guard,
                         self.app.conf.control_signing_key)
        self.node.start()
        heartbeat = (None if self.options.without_heartbeat
                     else asyncio.ensure_future(self._heartbeat()))
        autoscaling = None
        if self.autoscale is not None:
            self.autoscaler = self._make_autoscaler(*self.autoscale)
            autoscaling = asyncio.ensure_future(self._autoscale())
        log.info("%s ready.", self.hostname)
        self.ready.set()
        assert self._stop is not None
        await self._stop
        for background in (heartbeat, autoscaling):
            if background is not None:
                background.cancel()
        await asyncio.to_thread(self.node.stop)  # it may be waiting for this loop
        await self.consumer.stop(cold=self._cold)
        if not self.options.without_heartbeat:
            self.events.send("worker-offline")
        await self.consumer.close()
        await loop.run_in_executor(io, self._close_statedb)
        log.info("%s stopped (%s shutdown).", self.hostname, "cold" if self._cold else "warm")

    async def _check_broker(self, loop: asyncio.AbstractEventLoop,
                            io: ThreadPoolExecutor) -> None:
        transport = self.app.transport
        try:
            sizes = await loop.run_in_executor(io, lambda: [transport.queue_size(q)
                                                            for q in self.queues])
        except Exception as exc:
            raise TransportError(
                f"Cannot reach the broker at {mask_url(self.app.broker_url)}: {exc}") from exc
        if self.options.purge:
            removed = await loop.run_in_executor(
                io, lambda: sum(transport.purge(q) for q in self.queues))
            log.warning("Purged %d message(s) from %s", removed, ", ".join(self.queues))
        else:
            log.info("Queued messages: %s", ", ".join(
                f"{q}={n}" for q, n in zip(self.queues, sizes, strict=True)))

    # -- what control commands use --------------------------------------------------------------
    def commands(self) -> dict[str, Command]:
        """Built-in and ``@Panel.register`` commands, then this app's own."""
        return {**Panel.data, **self.app.control_commands}

    def remember_revoked(self, ids: list[str]) -> None:
        """Add ids to the revoked set (and the state db)."""
        self.state.revoked.update(ids)
        if self.statedb is not None and self.consumer is not None:
            self.consumer.io_soon("save revoked ids", self.statedb.add_revoked, ids,
                                  self.app.clock())

    def pool_info(self) -> dict[str, Any]:
        info = self.pool.info() if self.pool is not None else {}
        conf = self.app.conf
        info.setdefault("max-concurrency", self.concurrency)
        info.setdefault("max-tasks-per-child", conf.worker_max_tasks_per_child)
        info["timeouts"] = [conf.task_soft_time_limit, conf.task_time_limit]
        if self.autoscaler is not None:
            info["autoscaler"] = self.autoscaler.info()
        return info

    def backlog(self) -> int:
        """Tasks received and not started: waiting for a pool slot or queued in a process."""
        waiting = self.pool.waiting if self.pool is not None else 0
        return len(self.state.reserved) + waiting

    async def set_pool_size(self, size: int) -> None:
        """Resize the pool and keep the prefetch count in proportion."""
        assert self.pool is not None and self.consumer is not None
        await self.pool.resize(size)
        self.consumer.qos.set(size * self.multiplier)
        self.consumer.kick()

    async def resize_pool(self, n: int) -> dict[str, str]:
        """``pool_grow``/``pool_shrink``."""
        if self.autoscaler is not None:
            return {"error": "autoscale is on: change its limits with the autoscale command"}
        assert self.pool is not None
        size = self.pool.size + n
        if size < 1:
            return {"error": f"cannot shrink the pool below 1 (it has {self.pool.size})"}
        try:
            await self.set_pool_size(size)
        except NotImplementedError as exc:
            return {"error": str(exc)}
        return {"ok": f"pool will {'grow' if n > 0 else 'shrink'} to {size}"}

    def set_autoscale(self, maximum: int, minimum: int) -> dict[str, str]:
        if self.autoscaler is None:
            return {"error": "autoscale is not enabled on this worker (start it with "
                             "--autoscale=MAX,MIN)"}
        try:
            self.autoscaler.update(maximum, minimum)
        except ValueError as exc:
            return {"error": str(exc)}
        return {"ok": f"autoscale now max={maximum} min={minimum}"}

    async def restart_pool(self, modules: list[str], reload: bool,
                           reloader: str | None) -> dict[str, str]:
        if not self.app.conf.worker_pool_restarts:
            return {"error": "pool restarts are disabled: set worker_pool_restarts "
                             "(CELERYD_POOL_RESTARTS) to allow them"}
        assert self.pool is not None
        names = modules or sorted({t.__module__ for t in self.app.tasks.values()})
        reload_fn = _import_object(reloader) if reloader else importlib.reload
        for name in names:
            if reload and name in sys.modules:
                reload_fn(sys.modules[name])
            else:
                importlib.import_module(name)
        try:
            await self.pool.restart()
        except NotImplementedError as exc:
            return {"error": str(exc)}
        return {"ok": f"reload started ({', '.join(names)})"}

    def _make_autoscaler(self, maximum: int, minimum: int) -> Any:
        name = self.app.conf.worker_autoscaler
        if name:
            return _import_object(name)(self, maximum, minimum)
        return Autoscaler(self, maximum, minimum,
                          keepalive=float(self.app.conf.worker_autoscale_keepalive))

    async def _autoscale(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.autoscaler.tick()
            except Exception:
                log.exception("Autoscaler failed")

    def send_heartbeat(self) -> None:
        load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
        self.events.send("worker-heartbeat", freq=self.app.conf.worker_heartbeat_interval,
                         active=len(self.state.active), processed=self.state.processed,
                         loadavg=[round(x, 2) for x in load], sw_ident="py-celeriac",
                         sw_ver=__version__, sw_sys=platform.system())

    async def _heartbeat(self) -> None:
        self.events.send("worker-online", sw_ident="py-celeriac", sw_ver=__version__,
                         sw_sys=platform.system())
        while True:
            await asyncio.sleep(float(self.app.conf.worker_heartbeat_interval))
            self.send_heartbeat()

    def _broadcast_event(self, payload: bytes) -> None:
        if self.consumer is not None:
            self.consumer.io_soon("send an event", self.app.transport.broadcast,
                                  EVENT_CHANNEL, payload)

    # -- revokes at start-up (I/O thread) ------------------------------------------------------
    def _load_statedb(self) -> None:
        assert self.statedb is not None
        revoked = self.state.revoked
        ids, clock = self.statedb.load(not_before=self.app.clock() - revoked.expires)
        for task_id, at in ids:
            revoked.add(task_id, at)
        self.clock.adjust(clock)
        log.info("Loaded %d revoked id(s) from %s", len(ids), self.statedb.path)

    def _close_statedb(self) -> None:
        if self.statedb is not None:
            self.statedb.save_clock(self.clock.value)
            self.statedb.close()

    def _mingle(self) -> None:
        """Ask running workers for the ids they know are revoked, and merge them."""
        replies = self.app.control.broadcast(
            "hello", {"from_node": self.hostname, "revoked": list(self.state.revoked),
                      "clock": self.clock.value}, reply=True, timeout=1.0) or []
        merged = 0
        for entry in replies:
            for node, reply in entry.items():
                if node == self.hostname or not isinstance(reply, dict):
                    continue
                ids = [str(t) for t in reply.get("revoked") or []]
                self.state.revoked.update(ids)
                merged += len(ids)
                self.clock.adjust(int(reply.get("clock") or 0))
        if self.statedb is not None and merged:
            self.statedb.add_revoked(list(self.state.revoked), self.app.clock())
        log.info("mingle: %d node(s) replied, %d revoked id(s) merged", len(replies), merged)
