"""What every command shares: the :class:`CLIContext` object, app loading from ``-A``, and
:func:`die` for clean errors.

``-A`` accepts ``module``, ``module:attr`` (``attr`` may be dotted), ``package`` and
``module.attr``. The working directory goes first on ``sys.path`` (as with ``python -m``),
so ``celeriac -A proj`` finds ``./proj.py``. The app is loaded on first use, so ``--help``
never imports user code.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import types
from dataclasses import dataclass, field
from typing import Any, NoReturn

import click

from ..app import Celeriac

__all__ = ["CLIContext", "CLIError", "configured_queues", "die", "find_app", "pass_cli"]

# Attributes of a module or package that name its app, in the order they are tried.
APP_ATTRIBUTES = ("app", "celeriac", "celery")
# Submodules of a package that are imported to look for its app (``proj/celery.py``).
APP_SUBMODULES = ("celeriac", "celery")


class CLIError(click.ClickException):
    """A clean command-line error: ``Error: <message>`` on stderr and ``exit_code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        # click declares exit_code a class variable; this instance carries its own.
        setattr(self, "exit_code", code)  # noqa: B010


def die(message: str, code: int = 2) -> NoReturn:
    """Stop the command with ``message`` on stderr and exit status ``code``."""
    raise CLIError(message, code)


@dataclass
class CLIContext:
    """The click context object: the global options, and the app they name.

    ``broker`` and ``result_backend`` (``-b``, ``--result-backend``) win over everything
    else: they are applied to the app after it is loaded, before it opens any connection.
    """

    app_spec: str | None = None
    broker: str | None = None
    result_backend: str | None = None
    _app: Celeriac | None = field(default=None, init=False, repr=False)
    _owns_connections: bool = field(default=False, init=False, repr=False)

    @property
    def app(self) -> Celeriac:
        """The app named by ``-A``, loaded once; ``Celeriac()`` with defaults without ``-A``."""
        if self._app is None:
            app = find_app(self.app_spec)
            self._apply_overrides(app)
            self._owns_connections = app._transport is None and app._backend is None
            self._app = app
        return self._app

    def require_app(self, why: str) -> Celeriac:
        """The app, or a clean error saying that ``-A`` is required ``why``."""
        if self.app_spec is None:
            die(f"-A/--app is required {why}: name the module that defines your Celeriac "
                "app, e.g. 'celeriac -A proj ...' or 'celeriac -A proj.tasks:app ...'.")
        return self.app

    def close(self) -> None:
        """Close the app's connections if this command opened them (code that opened them
        before, such as the app module or a test, keeps them)."""
        if self._app is not None and self._owns_connections:
            self._app.close()

    def _apply_overrides(self, app: Celeriac) -> None:
        if self.broker:
            app._broker_arg = self.broker
        if self.result_backend:
            app._backend_arg = self.result_backend
        if (self.broker or self.result_backend) and (
                app._transport is not None or app._backend is not None):
            # The app module opened connections while being imported; reopen them lazily
            # with the overridden URLs.
            app.close()


pass_cli = click.make_pass_decorator(CLIContext)


def configured_queues(app: Celeriac) -> list[str]:
    """The queue names the app declares: ``task_queues`` (names, a name -> options mapping,
    or objects with a ``name``), else ``[task_default_queue]``."""
    declared = app.conf.task_queues
    if isinstance(declared, str):
        declared = declared.split(",")
    names: list[str] = []
    for item in declared or ():
        name = item if isinstance(item, str) else getattr(item, "name", None)
        if isinstance(name, str) and name.strip() and name.strip() not in names:
            names.append(name.strip())
    return names or [str(app.conf.task_default_queue)]


def find_app(spec: str | None) -> Celeriac:
    """The :class:`Celeriac` app that ``spec`` (the ``-A`` value) names.

    ``None`` gives ``Celeriac()`` with default settings. Every failure is a :class:`CLIError`
    (exit status 2) that names the problem and the fix.
    """
    if spec is None:
        return Celeriac()
    spec = spec.strip()
    if not spec:
        die("-A/--app is empty: give a module name such as 'proj' or 'proj.tasks:app'.")
    _cwd_first_on_path()
    module_name, colon, attr = spec.partition(":")
    if colon:
        if not module_name or not attr:
            die(f"-A {spec!r} is not valid: use 'module' or 'module:attribute'.")
        return _app_from_attr(_import(module_name, spec), attr, spec)
    module = _import_module_or_attr(spec)
    if isinstance(module, types.ModuleType):
        return _app_in_module(module, spec)
    return _check_app(module, spec)


def _cwd_first_on_path() -> None:
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in (cwd, ""):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()


def _is_missing(exc: ModuleNotFoundError, name: str) -> bool:
    """Whether ``exc`` says ``name`` itself (or a package above it) does not exist, as
    opposed to a module that ``name`` imports."""
    missing = exc.name or ""
    return name == missing or name.startswith(missing + ".")


def _not_found(exc: ModuleNotFoundError, spec: str) -> NoReturn:
    die(f"-A {spec}: no module named {exc.name!r} in {os.getcwd()} (the current directory, "
        "searched first) or on the Python path. Run celeriac from the directory that holds "
        "your project, or install it.")


def _import_failed(name: str, spec: str, exc: BaseException) -> NoReturn:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    die(f"-A {spec}: importing {name!r} raised {type(exc).__name__}: {exc}{where}. "
        "Fix the error in your module, then run the command again.")


def _import(name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if _is_missing(exc, name):
            _not_found(exc, spec)
        _import_failed(name, spec, exc)
    except Exception as exc:
        _import_failed(name, spec, exc)


def _import_module_or_attr(spec: str) -> Any:
    """The module ``spec`` names, or for ``pkg.mod.attr`` the attribute of ``pkg.mod``."""
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        parent, dot, attr = spec.rpartition(".")
        if dot and exc.name == spec:
            return _app_from_attr(_import(parent, spec), attr, spec)
        if _is_missing(exc, spec):
            _not_found(exc, spec)
        _import_failed(spec, spec, exc)
    except Exception as exc:
        _import_failed(spec, spec, exc)


def _app_from_attr(module: types.ModuleType, attr: str, spec: str) -> Celeriac:
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            die(f"-A {spec}: {module.__name__!r} has no attribute {attr!r}. Check the name "
                f"after the module; it should be your Celeriac instance, e.g. "
                f"'{module.__name__}:app'.")
    return _check_app(value, spec)


def _check_app(value: Any, spec: str) -> Celeriac:
    if not isinstance(value, Celeriac):
        die(f"-A {spec}: that is a {type(value).__name__}, not a Celeriac app. Point -A at "
            "the instance, e.g. 'app = Celeriac(\"proj\")' in proj.py and '-A proj:app'.")
    return value


def _app_in_module(module: types.ModuleType, spec: str) -> Celeriac:
    """The app of a module: its ``app``, ``celeriac`` or ``celery`` attribute (an app, or a
    submodule holding one), else the only Celeriac instance among its attributes."""
    for name in APP_ATTRIBUTES:
        value = getattr(module, name, None)
        if value is None and name in APP_SUBMODULES and hasattr(module, "__path__"):
            value = _import_submodule(module, name, spec)
        if isinstance(value, Celeriac):
            return value
        if isinstance(value, types.ModuleType) and value is not module:
            found = _single_app(value)
            if found is not None:
                return found
    found = _single_app(module, spec)
    if found is None:
        die(f"-A {spec}: module {module.__name__!r} defines no Celeriac app. Create one there "
            "('app = Celeriac(\"proj\")'), or name it with -A module:attribute.")
    return found


def _import_submodule(package: types.ModuleType, name: str, spec: str) -> Any:
    full = f"{package.__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if _is_missing(exc, full):
            return None
        _import_failed(full, spec, exc)
    except Exception as exc:
        _import_failed(full, spec, exc)


def _single_app(module: types.ModuleType, spec: str | None = None) -> Celeriac | None:
    """The only Celeriac instance among the module's attributes; with ``spec``, several of
    them are an error naming them."""
    found = {name: value for name, value in vars(module).items()
             if isinstance(value, Celeriac) and not name.startswith("_")}
    apps = {id(value): value for value in found.values()}
    if len(apps) == 1:
        return next(iter(apps.values()))
    if len(apps) > 1 and spec is not None:
        names = ", ".join(f"{module.__name__}:{name}" for name in sorted(found))
        die(f"-A {spec}: module {module.__name__!r} has several Celeriac apps ({names}); "
            "say which one with -A module:attribute.")
    return None
