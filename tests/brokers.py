"""Test projects on Redis and RabbitMQ: the shared ``proj.py`` under a name prefix of its own,
and clean-up of everything under that prefix."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from celeriac import Celeriac

from .conftest import Project


@dataclass
class BrokerProject(Project):
    """A project whose broker and results are at the given URLs."""

    broker: str = ""
    backend: str = ""
    server: str = ""  # the broker server's URL, without the prefix
    prefix: str = ""  # every key, queue and exchange of the project starts with it
    #: read by the reliability tests' ``rel.py`` (REL_LEASE, REL_ETA_HORIZON)
    lease: float = 60.0
    eta_horizon: float = 600.0

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(CELERIAC_BROKER_URL=self.broker, CELERIAC_RESULT_BACKEND=self.backend,
                   REL_LEASE=str(self.lease), REL_ETA_HORIZON=str(self.eta_horizon))
        return env

    def app(self) -> Celeriac:
        app = Celeriac("proj", broker=self.broker, backend=self.backend, environ={})
        app.conf.broker_eta_horizon = self.eta_horizon
        return self.keep(app)


BROKERS = ("sqlite", "redis", "amqp")

#: Runs a test that uses the conftest ``project`` fixture once on each broker.
on_every_broker = pytest.mark.parametrize("project", BROKERS, indirect=True)


def project_on(request: pytest.FixtureRequest, base: Project, prefix: str) -> Iterator[Project]:
    """For a fixture parametrized over "sqlite", "redis" and "amqp": ``base`` itself, or the
    same directory on Redis / RabbitMQ under ``prefix``; closes its apps and removes the
    broker's keys or queues afterwards. A fixture that is not parametrized (or a test that
    does not parametrize it indirectly) gets "sqlite"."""
    broker = getattr(request, "param", "sqlite")
    if broker == "sqlite":
        yield base
        base.close()
    elif broker == "redis":
        server = request.getfixturevalue("redis_server")
        on_redis = redis_project(base.path, server, prefix)
        yield on_redis
        on_redis.close()
        for db in (0, 1):
            drop_redis_keys(f"{server.rstrip('/')}/{db}", prefix)
    else:
        server = request.getfixturevalue("amqp_server")
        on_amqp = amqp_project(base.path, server, prefix)
        yield on_amqp
        on_amqp.close()
        sweep_amqp(server, prefix)


def redis_project(path: Path, server: str, prefix: str) -> BrokerProject:
    """Broker in db 0 and results in db 1, both under ``prefix``."""
    base = server.rstrip("/")
    return BrokerProject(path, broker=f"{base}/0?key_prefix={prefix}",
                         backend=f"{base}/1?key_prefix={prefix}")


def drop_redis_keys(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` in the database of ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def amqp_project(path: Path, server: str, prefix: str) -> BrokerProject:
    """Queues and exchanges under ``prefix``; results over rpc://."""
    return BrokerProject(path, broker=f"{server}?name_prefix={prefix}", backend="rpc://",
                         server=server, prefix=prefix)


def sweep_amqp(server: str, prefix: str) -> None:
    """Delete every queue and exchange whose name starts with ``prefix``."""
    import aiormq

    found: dict[str, list[str]] = {}
    # Both listings at once: each rabbitmqctl call starts an Erlang VM (about a second).
    listings = {what: subprocess.Popen(["rabbitmqctl", "-q", what, "name",
                                        "--no-table-headers"],
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
                for what in ("list_queues", "list_exchanges")}
    for what, listing in listings.items():
        try:
            out, _ = listing.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            listing.kill()
            out, _ = listing.communicate()
        found[what] = [name for name in out.split() if name.startswith(prefix)]

    async def delete() -> None:
        conn = await aiormq.connect(server)
        try:
            channel = await conn.channel()
            for kind, name in [*(("q", n) for n in found["list_queues"]),
                               *(("x", n) for n in found["list_exchanges"])]:
                try:
                    if kind == "q":
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                except aiormq.exceptions.ChannelLockedResource:
                    # an exclusive queue of a connection still open: it goes with it
                    channel = await conn.channel()
        finally:
            await conn.close()

    asyncio.run(delete())


def children_of(pid: int) -> set[int]:
    """Pids of the direct children of ``pid`` (a worker's pool processes)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return found
