"""The ``celeriac`` command: global options and the registry of subcommands.

``-b/--broker`` and ``--result-backend`` are kept on the :class:`~.base.CLIContext` and
applied to the app after it is loaded, so they win over the app's own arguments, the
``CELERIAC_*`` environment variables and the settings, without touching the environment of
this process.
"""

from __future__ import annotations

from typing import Any

import click

from .. import __version__
from ..exceptions import CeleriacError, ConfigurationError
from .base import CLIContext, CLIError
from .basic import call, purge, result
from .control import control, inspect, status
from .worker import worker

__all__ = ["main"]


class _CeleriacGroup(click.Group):
    """Turns a :class:`CeleriacError` escaping a command into a clean one-line error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CeleriacError as exc:
            code = 2 if isinstance(exc, ConfigurationError) else 1
            raise CLIError(str(exc), code) from exc


@click.group(cls=_CeleriacGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-A", "--app", "app_spec", metavar="APP",
              help="Your Celeriac app: 'module', 'module:attr' or 'package' "
                   "(looked up from the current directory first).")
@click.option("-b", "--broker", metavar="URL",
              help="Broker URL, overriding the app's and CELERIAC_BROKER_URL.")
@click.option("--result-backend", metavar="URL",
              help="Result store URL, overriding the app's and CELERIAC_RESULT_BACKEND.")
@click.version_option(__version__, "--version", prog_name="celeriac",
                      message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None, broker: str | None,
         result_backend: str | None) -> None:
    """celeriac: a distributed task queue for Python, compatible with Celery.

    Workers execute tasks that your code queues on a broker (SQLite by default, in the
    current directory); results go to a result store. Name your app with -A, then run a
    command:

    \b
      celeriac -A proj worker -l info
      celeriac -A proj call proj.add --args '[2, 2]'
      celeriac -A proj result <task-id> --timeout 10

    Run 'celeriac COMMAND --help' for a command's options.
    """
    ctx.obj = CLIContext(app_spec=app_spec, broker=broker, result_backend=result_backend)
    ctx.call_on_close(ctx.obj.close)


main.add_command(worker)
main.add_command(call)
main.add_command(result)
main.add_command(purge)
main.add_command(control)
main.add_command(inspect)
main.add_command(status)

if __name__ == "__main__":
    main()
