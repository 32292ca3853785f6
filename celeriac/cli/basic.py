"""``call``, ``result`` and ``purge``: send a task by name, read its result, empty queues.

Output is for people and scripts alike: ``call`` prints only the task id; ``result`` prints
the value as JSON when the task succeeded and the state name otherwise; details of failures
go to stderr with exit status 1.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import click

from .. import states
from ..app import Celeriac
from ..exceptions import RemoteTaskError
from .base import CLIContext, configured_queues, die, pass_cli

__all__ = ["call", "purge", "result"]


_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


class JSONValue(click.ParamType):
    """A JSON document that must decode to ``expected`` (``list`` or ``dict``)."""

    def __init__(self, expected: type, example: str) -> None:
        self.expected = expected
        self.example = example
        self.kind = "JSON list" if expected is list else "JSON object"
        self.name = self.kind.lower()

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.expected):
            return value
        try:
            decoded = json.loads(value)
        except ValueError as exc:
            self.fail(f"{value!r} is not valid JSON ({exc}); give a {self.kind}, "
                      f"e.g. {self.example}", param, ctx)
        if not isinstance(decoded, self.expected):
            found = _JSON_KINDS.get(type(decoded), "value")
            self.fail(f"{value!r} is a JSON {found}, not a {self.kind}; "
                      f"e.g. {self.example}", param, ctx)
        return decoded


class ISOTime(click.ParamType):
    """An ISO 8601 date and time; one without a UTC offset is taken as UTC."""

    name = "iso-time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dt.datetime):
            return value
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 time such as 2030-01-31T18:00:00+01:00",
                      param, ctx)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


class SecondsOrTime(ISOTime):
    """A number of seconds from now, or an ISO 8601 time."""

    name = "seconds|iso-time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            return super().convert(value, param, ctx)
        if seconds < 0:
            self.fail(f"{value!r} is negative; give seconds from now (>= 0)", param, ctx)
        return seconds


# -- call ---------------------------------------------------------------------------------------
@click.command()
@click.argument("name")
@click.option("-a", "--args", "args", type=JSONValue(list, "'[2, 2]'"), default="[]",
              help="Positional arguments, as a JSON list: '[2, 2]'.")
@click.option("-k", "--kwargs", "kwargs", type=JSONValue(dict, "'{\"x\": 1}'"), default="{}",
              help="Keyword arguments, as a JSON object: '{\"x\": 1}'.")
@click.option("--countdown", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Run the task no earlier than this many seconds from now.")
@click.option("--eta", type=ISOTime(), help="Run the task no earlier than this time "
              "(ISO 8601; without an offset it is UTC).")
@click.option("--expires", type=SecondsOrTime(),
              help="Discard the task if it has not started by then: seconds from now, or an "
                   "ISO 8601 time.")
@click.option("-Q", "--queue", help="Queue to send to (default: the task's own queue if the "
              "app registers it, else task_default_queue).")
@click.option("--priority", type=click.IntRange(0, 255), help="Message priority, 0-255.")
@pass_cli
def call(cli: CLIContext, name: str, args: list[Any], kwargs: dict[str, Any],
         countdown: float | None, eta: dt.datetime | None, expires: float | dt.datetime | None,
         queue: str | None, priority: int | None) -> None:
    """Send a task by name and print its id.

    The task need not be importable here; a worker that has it will run it.
    """
    if countdown is not None and eta is not None:
        raise click.UsageError("--countdown and --eta both say when to run; give only one.")
    app = cli.app
    options: dict[str, Any] = {key: value for key, value in
               {"countdown": countdown, "eta": eta, "expires": expires, "priority": priority,
                "queue": queue}.items() if value is not None}
    task = app.tasks.get(name)
    sent = (task.apply_async(args, kwargs, **options) if task is not None
            else app.send_task(name, args, kwargs, **options))
    click.echo(sent.id)


# -- result -------------------------------------------------------------------------------------
def _format_value(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _failure_lines(app: Celeriac, meta: dict[str, Any], with_traceback: bool) -> list[str]:
    stored = meta.get("result")
    if meta["status"] == states.REVOKED and not (isinstance(stored, dict)
                                                 and "exc_type" in stored):
        reason = f" ({stored})" if stored and stored != "revoked" else ""
        return [f"Task {meta['task_id']} was revoked{reason}."]
    exc = app.known_exceptions.rebuild(stored, meta.get("traceback"))
    kind = exc.exc_type if isinstance(exc, RemoteTaskError) else type(exc).__name__
    summary = f"{kind}: {exc}" if str(exc) else kind
    stored_tb = meta.get("traceback")
    if not (with_traceback and stored_tb):
        return [summary]
    lines = str(stored_tb).rstrip().splitlines()
    return lines if lines and lines[-1].endswith(summary) else [*lines, summary]


@click.command()
@click.argument("task_id")
@click.option("-t", "--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Wait up to this long for the task to finish (default: don't wait).")
@click.option("--traceback", "with_traceback", is_flag=True,
              help="For a failed task, print the traceback too.")
@pass_cli
def result(cli: CLIContext, task_id: str, timeout: float | None, with_traceback: bool) -> None:
    """Print a task's result, or its state while it is not finished.

    A successful task's value is printed as JSON. For a failed or revoked task the state is
    printed, the error goes to stderr and the exit status is 1; likewise when --timeout
    passes before the task finishes. PENDING also means the id is unknown.
    """
    app = cli.app
    meta = None if timeout is None else app.backend.wait(task_id, timeout)
    if meta is None:
        meta = app.backend.get(task_id)
    status = str(meta["status"]) if meta else states.PENDING
    if meta is not None and status == states.SUCCESS:
        click.echo(_format_value(meta.get("result")))
        return
    click.echo(status)
    if meta is not None and status in states.READY_STATES:
        for line in _failure_lines(app, meta, with_traceback):
            click.echo(line, err=True)
        click.get_current_context().exit(1)
    if timeout is not None:
        die(f"Task {task_id} did not finish within {timeout:g}s (state {status}). Is a "
            "worker running and consuming its queue?", code=1)


# -- purge --------------------------------------------------------------------------------------
def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _queue_names(names: list[str]) -> str:
    return ("queue " if len(names) == 1 else "queues ") + ", ".join(names)


def _split(values: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


@click.command()
@click.option("-Q", "--queues", multiple=True, metavar="Q1,Q2",
              help="Queues to purge, comma-separated (default: the queues in task_queues, "
                   "else task_default_queue).")
@click.option("-f", "--force", is_flag=True, help="Delete without asking first.")
@pass_cli
def purge(cli: CLIContext, queues: tuple[str, ...], force: bool) -> None:
    """Delete all waiting messages from queues, for good.

    Messages a worker holds right now are not touched. Asks first unless -f is given.
    """
    app = cli.app
    names = _split(queues) or configured_queues(app)
    total = sum(app.transport.queue_size(name) for name in names)
    if not total:
        click.echo(f"No messages to purge in {_queue_names(names)}.")
        return
    if not force:
        question = (f"This will permanently delete {_count(total, 'message')} from "
                    f"{_queue_names(names)}. Continue?")
        try:
            confirmed = click.confirm(question, default=False, err=True)
        except click.Abort:  # no answer: stdin closed, or Ctrl-C
            click.echo(err=True)
            confirmed = False
        if not confirmed:
            die("Purge cancelled: no messages were deleted.", code=1)
    purged = {name: app.transport.purge(name) for name in names}
    for name, n in purged.items():
        click.echo(f"{name}: {_count(n, 'message')} deleted")
    click.echo(f"Purged {_count(sum(purged.values()), 'message')} from "
               f"{_count(len(names), 'queue')}.")
