"""``control``, ``inspect`` and ``status``: remote control of running workers from the shell.

The commands and their arguments come from the worker's registry (:class:`Panel` plus the
app's ``@app.control_command`` commands, after importing the task modules as a worker
would), so custom commands can be called, and appear in ``--help``, like built-in ones.

Positional arguments map onto the command's declared arguments in order and are converted
to their declared types (int, float, bool, str). An argument whose handler takes a list
(``revoke``'s task ids, ``query_task``'s ids, ...) takes every remaining value.

Output: ``-> <node>: OK`` and the reply indented, per replying node, then a summary on
stderr; ``--json`` prints only ``{node: reply}``. Exit status: 0 when every reply is fine,
1 when some node replied with an error, 2 for a usage error, and 69 (EX_UNAVAILABLE) when
no node replied within the timeout.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from ..app import Celeriac
from ..worker.control import Command, Panel
from .base import CLIContext, CLIError, die, pass_cli

__all__ = ["EX_UNAVAILABLE", "control", "inspect", "status"]

#: Exit status when no node replied (sysexits.h EX_UNAVAILABLE, as Celery uses).
EX_UNAVAILABLE = 69
NO_REPLY = "No nodes replied within time constraint."

#: Commands workers send each other; callable, but not listed.
HIDDEN = frozenset({"hello"})
#: Commands listed (and accepted) by both ``control`` and ``inspect``.
BOTH_KINDS = frozenset({"ping"})

_LIST_ANNOTATION = re.compile(r"\b(list|List|Sequence|tuple|Tuple|Iterable|set)\b")
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


# -- the registry, as the CLI sees it -----------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One argument of a command: its name, type, whether it is required or takes the rest."""

    name: str
    type: type
    required: bool
    variadic: bool

    @property
    def usage(self) -> str:
        text = f"<{self.name}>"
        if self.variadic:
            text = f"{text} [<{self.name}> ...]" if self.required else f"[<{self.name}> ...]"
        elif not self.required:
            text = f"[{text}]"
        return text


def _params(command: Command) -> list[Param]:
    """The command's arguments as the CLI takes them; none after a variadic one."""
    try:
        signature: dict[str, pyinspect.Parameter] = dict(
            pyinspect.signature(command.fun).parameters)
    except (TypeError, ValueError):
        signature = {}
    params: list[Param] = []
    for name, kind in command.args:
        declared = signature.get(name)
        required = declared is not None and declared.default is pyinspect.Parameter.empty
        annotation = "" if declared is None else declared.annotation
        if not isinstance(annotation, str):
            annotation = repr(annotation)
        variadic = kind in (list, tuple) or bool(_LIST_ANNOTATION.search(annotation))
        params.append(Param(name, str if kind in (list, tuple) else kind, required, variadic))
        if variadic:
            break
    return params


def usage_of(command: Command) -> str:
    """``name <arg> [<optional>]``, as typed after ``celeriac control``/``inspect``."""
    return " ".join([command.name, *(p.usage for p in _params(command))])


def registry(app: Celeriac | None) -> dict[str, Command]:
    """Every command a worker of ``app`` knows: ``Panel``'s, then the app's own."""
    return {**Panel.data, **(app.control_commands if app is not None else {})}


def commands_of_kind(commands: dict[str, Command], kind: str) -> dict[str, Command]:
    return {name: cmd for name, cmd in sorted(commands.items())
            if name not in HIDDEN and (cmd.kind == kind or name in BOTH_KINDS)}


def _split(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            if item.strip() and item.strip() not in out:
                out.append(item.strip())
    return out


def _load_app(cli: CLIContext, include: Sequence[str]) -> Celeriac:
    """The app with its task modules and ``-I`` modules imported, as a worker does, so
    that commands registered there are known."""
    app = cli.app
    try:
        app.import_task_modules()
        for module in _split(include):
            __import__(module)
    except ModuleNotFoundError as exc:
        die(f"Cannot import {exc.name!r} (from -I/--include or the imports setting): {exc}")
    except CLIError:
        raise
    except Exception as exc:
        die(f"Importing the task modules (imports setting, -I/--include) raised "
            f"{type(exc).__name__}: {exc}")
    return app


# -- arguments ----------------------------------------------------------------------------------
def _convert(command: Command, param: Param, value: str, kind_name: str) -> Any:
    def bad(expected: str) -> CLIError:
        return CLIError(f"{kind_name} {command.name}: argument <{param.name}> must be "
                        f"{expected}, not {value!r}. Usage: celeriac {kind_name} "
                        f"{usage_of(command)}")

    if param.type is bool:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise bad("true or false")
    if param.type is str:
        return value
    try:
        return param.type(value)
    except (TypeError, ValueError):
        raise bad(_TYPE_NAMES.get(param.type, f"a {param.type.__name__}")) from None


def build_arguments(command: Command, values: Sequence[str], kind_name: str) -> dict[str, Any]:
    """Map positional ``values`` onto the command's arguments, converted to their types."""
    params = _params(command)
    arguments: dict[str, Any] = {}
    rest = list(values)
    for param in params:
        if not rest:
            if param.required:
                raise CLIError(f"{kind_name} {command.name}: missing argument "
                               f"<{param.name}>. Usage: celeriac {kind_name} "
                               f"{usage_of(command)}")
            break
        if param.variadic:
            arguments[param.name] = [_convert(command, param, v, kind_name) for v in rest]
            rest = []
            break
        arguments[param.name] = _convert(command, param, rest.pop(0), kind_name)
    if rest:
        count = len(params)
        takes = ("takes no arguments" if not count else
                 f"takes at most {count} argument{'s' if count > 1 else ''}")
        raise CLIError(f"{kind_name} {command.name} {takes}, got {len(values)} "
                       f"({' '.join(values)}). Usage: celeriac {kind_name} "
                       f"{usage_of(command)}")
    return arguments


def resolve(commands: dict[str, Command], name: str | None, kind: str) -> Command:
    """The command ``name`` of ``kind``, or a usage error listing the known ones."""
    known = commands_of_kind(commands, kind)
    command = commands.get(name) if name else None
    if command is not None and (name in known or name in HIDDEN):
        return command
    listing = ", ".join(known)
    if name is None:
        die(f"Missing the {kind} command. Known commands: {listing}. "
            f"See 'celeriac {kind} --help' for their arguments.")
    if command is not None:
        die(f"{name!r} is an {command.kind} command, not a {kind} command: run "
            f"'celeriac {command.kind} {name} ...'.")
    die(f"Unknown {kind} command {name!r}. Known commands: {listing}. "
        f"See 'celeriac {kind} --help' for their arguments.")


# -- output -------------------------------------------------------------------------------------
INDENT = "    "


def is_error(reply: Any) -> bool:
    return isinstance(reply, dict) and set(reply) == {"error"}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=repr)


def render(reply: Any) -> list[str]:
    """The lines that show one node's reply, before indenting."""
    if isinstance(reply, dict) and set(reply) in ({"ok"}, {"error"}):
        return _text(next(iter(reply.values()))).splitlines() or [""]
    if isinstance(reply, list):
        if not reply:
            return ["- empty -"]
        return [f"* {_text(item)}" for item in reply]
    if isinstance(reply, dict):
        if not reply:
            return ["- empty -"]
        return json.dumps(reply, indent=4, sort_keys=True, default=repr).splitlines()
    return _text(reply).splitlines() or [""]


def _count(n: int, word: str) -> str:
    return f"{n} node{'' if n == 1 else 's'} {word}."


def report(replies: list[dict[str, Any]], as_json: bool, summary_word: str) -> None:
    """Print the replies; exit 69 when there are none, 1 when one is an error."""
    entries = sorted((node, reply) for entry in replies for node, reply in entry.items())
    if as_json:
        click.echo(json.dumps(dict(entries), indent=None, sort_keys=True, default=repr))
    else:
        for node, reply in entries:
            click.echo(f"-> {node}: {'ERROR' if is_error(reply) else 'OK'}")
            for line in render(reply):
                click.echo(f"{INDENT}{line}" if line else "")
        if entries:
            click.echo(_count(len(entries), summary_word), err=True)
    if not entries:
        die(NO_REPLY, EX_UNAVAILABLE)
    if any(is_error(reply) for _, reply in entries):
        click.get_current_context().exit(1)


# -- click plumbing -----------------------------------------------------------------------------
def _raw_includes(args: Sequence[str]) -> list[str]:
    """The ``-I``/``--include`` values in a raw command line (``--help`` is handled before
    options are converted)."""
    found: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-I", "--include"):
            found.append(next(it, ""))
        elif arg.startswith("--include="):
            found.append(arg.partition("=")[2])
        elif arg.startswith("-I") and len(arg) > 2:
            found.append(arg[2:])
    return found


class PanelCommand(click.Command):
    """A command whose ``--help`` lists the remote commands of one kind from the registry.

    With ``-A``, the app and its task modules (and ``-I`` modules) are imported first, so
    custom commands are listed too.
    """

    def __init__(self, *args: Any, panel_kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.panel_kind = panel_kind

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["celeriac.raw_args"] = list(args)
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        app, note = None, ""
        cli = ctx.find_object(CLIContext)
        if cli is not None and cli.app_spec is not None:
            try:
                app = _load_app(cli, _raw_includes(ctx.meta.get("celeriac.raw_args", ())))
            except click.ClickException as exc:
                note = f"(Custom commands are not listed: {exc.format_message()})"
        rows = [(usage_of(cmd), cmd.help or "")
                for cmd in commands_of_kind(registry(app), self.panel_kind).values()]
        with formatter.section(f"{self.panel_kind.capitalize()} commands"):
            formatter.write_dl(rows)
            if note or app is None:
                formatter.write_paragraph()
                formatter.write_text(note or "Give -A to list your app's own commands too.")
        super().format_epilog(ctx, formatter)


def _common(fun: Any) -> Any:
    for decorator in reversed((
        click.argument("name", metavar="COMMAND", required=False),
        click.argument("values", metavar="[ARGS]...", nargs=-1),
        click.option("-d", "--destination", multiple=True, metavar="NODE,NODE",
                     help="Only these nodes (comma-separated, or repeat -d). "
                          "Default: all workers."),
        click.option("-t", "--timeout", type=click.FloatRange(min=0), default=1.0,
                     show_default=True, metavar="SECONDS",
                     help="How long to wait for replies (with -d: until every named node "
                          "replied, at most this long)."),
        click.option("-I", "--include", multiple=True, metavar="MODULE,MODULE",
                     help="Also import these modules, for commands registered there."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print only a JSON object {node: reply} on stdout."),
    )):
        fun = decorator(fun)
    return fun


def _run(cli: CLIContext, kind: str, name: str | None, values: tuple[str, ...],
         destination: tuple[str, ...], timeout: float, include: tuple[str, ...],
         as_json: bool) -> None:
    app = _load_app(cli, include)
    command = resolve(registry(app), name, kind)
    arguments = build_arguments(command, values, kind)
    nodes = _split(destination) or None
    replies = app.control.broadcast(command.name, arguments, destination=nodes, reply=True,
                                    timeout=timeout) or []
    report(replies, as_json, "online" if command.name == "ping" else "replied")


_EXIT_STATUS = """
    \b
    Exit status: 0 when every node that replied says OK; 1 when a node replied
    with an error; 2 for a usage error (unknown command, wrong arguments);
    69 (EX_UNAVAILABLE) when no node replied within --timeout.
"""


@click.command("control", cls=PanelCommand, panel_kind="control")
@_common
@pass_cli
def control(cli: CLIContext, name: str | None, values: tuple[str, ...],
            destination: tuple[str, ...], timeout: float, include: tuple[str, ...],
            as_json: bool) -> None:
    """Send a remote-control command to the workers and print their replies.

    \b
    Examples:
      celeriac -A proj control rate_limit proj.add 10/s
      celeriac -A proj control add_consumer foo -d worker1@example.com
      celeriac -A proj control revoke <task_id> <task_id>
      celeriac -A proj control terminate SIGKILL <task_id>
      celeriac -A proj control shutdown -d worker1@example.com
    """
    _run(cli, "control", name, values, destination, timeout, include, as_json)


@click.command("inspect", cls=PanelCommand, panel_kind="inspect")
@_common
@pass_cli
def inspect(cli: CLIContext, name: str | None, values: tuple[str, ...],
            destination: tuple[str, ...], timeout: float, include: tuple[str, ...],
            as_json: bool) -> None:
    """Ask the workers what they are doing and print their replies.

    \b
    Examples:
      celeriac -A proj inspect active
      celeriac -A proj inspect active_queues -d worker1@example.com
      celeriac -A proj inspect stats --json
      celeriac -A proj inspect query_task <task_id> <task_id>
    """
    _run(cli, "inspect", name, values, destination, timeout, include, as_json)


for _command in (control, inspect):
    _command.help = (_command.help or "") + _EXIT_STATUS


@click.command("status")
@click.option("-t", "--timeout", type=click.FloatRange(min=0), default=1.0,
              show_default=True, metavar="SECONDS", help="How long to wait for replies.")
@pass_cli
def status(cli: CLIContext, timeout: float) -> None:
    """Ping every worker and list those that answer.

    Exit status 0 when at least one node answered, 69 (EX_UNAVAILABLE) when none did
    within --timeout.
    """
    replies = cli.app.control.ping(timeout=timeout)
    entries = sorted((node, reply) for entry in replies for node, reply in entry.items())
    if not entries:
        die(NO_REPLY, EX_UNAVAILABLE)
    for node, reply in entries:
        click.echo(f"{node}: {'OK' if reply == {'ok': 'pong'} else _text(reply)}")
    click.echo()
    click.echo(_count(len(entries), "online"))
