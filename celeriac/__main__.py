"""``python -m celeriac`` and the ``celeriac`` command.

``-P gevent`` is looked for before anything else is imported: gevent must patch the
standard library before the app and celeriac's own modules load.
"""

from __future__ import annotations

import sys


def main() -> None:
    """The ``celeriac`` console script."""
    from .greenlets import patch_for_argv

    patch_for_argv(sys.argv[1:])
    from .cli.main import main as cli

    cli(prog_name="celeriac")


if __name__ == "__main__":
    main()
