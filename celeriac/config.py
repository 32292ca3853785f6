"""Settings: the modern lowercase names with their defaults, and the guide's uppercase aliases.

``Settings`` is what ``app.conf`` is. Reading or writing a name it does not know raises
:class:`~celeriac.exceptions.UnknownSettingError` with the closest known name, so a typo never
passes silently.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterator, Mapping
from typing import Any

from .exceptions import UnknownSettingError

__all__ = ["ALIASES", "DEFAULTS", "Settings"]

DEFAULTS: dict[str, Any] = {
    # broker and results
    "broker_url": None,
    "broker_transport_options": {},
    "broker_connection_timeout": 4.0,
    "broker_connection_retry": True,
    "broker_connection_max_retries": 100,
    "broker_lease_seconds": 60.0,
    "broker_max_deliveries": 5,
    "broker_eta_horizon": 600.0,
    "result_backend": None,
    "result_backend_transport_options": {},
    "result_expires": 86400,
    "result_cleanup_interval": 600.0,  # how often workers delete expired results (0: never)
    "result_serializer": "json",
    "result_accept_content": None,
    # task messages
    "task_serializer": "json",
    "accept_content": ["json"],
    "task_default_queue": "celery",
    "task_queues": None,
    "task_create_missing_queues": True,
    "task_default_priority": None,
    "task_acks_late": False,
    "task_track_started": False,
    "task_ignore_result": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_default_rate_limit": None,
    "task_default_max_retries": 3,
    "task_default_retry_delay": 180,
    "timezone": "UTC",
    "imports": (),
    "include": (),
    # worker
    "worker_pool": "prefork",
    "worker_concurrency": None,
    "worker_prefetch_multiplier": 4,
    "worker_max_tasks_per_child": None,
    "worker_pool_pipeline": 0,  # prefork jobs per process: 0 adaptive, 1 fair, N fixed
    "worker_max_memory_per_child": None,
    "worker_disable_rate_limits": False,
    "worker_pool_restarts": False,
    "worker_autoscaler": None,
    "worker_autoscale": None,
    "worker_autoscale_keepalive": 30.0,
    "worker_state_db": None,
    "worker_send_task_events": False,
    "worker_heartbeat_interval": 2.0,
    "worker_shutdown_timeout": None,
    "control_signing_key": None,
}

ALIASES: dict[str, str] = {
    "BROKER_URL": "broker_url",
    "BROKER_TRANSPORT_OPTIONS": "broker_transport_options",
    "BROKER_CONNECTION_TIMEOUT": "broker_connection_timeout",
    "BROKER_CONNECTION_RETRY": "broker_connection_retry",
    "BROKER_CONNECTION_MAX_RETRIES": "broker_connection_max_retries",
    "CELERY_RESULT_BACKEND": "result_backend",
    "CELERY_TASK_RESULT_EXPIRES": "result_expires",
    "CELERY_RESULT_SERIALIZER": "result_serializer",
    "CELERY_TASK_SERIALIZER": "task_serializer",
    "CELERY_ACCEPT_CONTENT": "accept_content",
    "CELERY_DEFAULT_QUEUE": "task_default_queue",
    "CELERY_QUEUES": "task_queues",
    "CELERY_CREATE_MISSING_QUEUES": "task_create_missing_queues",
    "CELERY_ACKS_LATE": "task_acks_late",
    "CELERY_TRACK_STARTED": "task_track_started",
    "CELERY_IGNORE_RESULT": "task_ignore_result",
    "CELERYD_TASK_TIME_LIMIT": "task_time_limit",
    "CELERYD_TASK_SOFT_TIME_LIMIT": "task_soft_time_limit",
    "CELERYD_SOFT_TASK_TIME_LIMIT": "task_soft_time_limit",
    "CELERY_DEFAULT_RATE_LIMIT": "task_default_rate_limit",
    "CELERY_TIMEZONE": "timezone",
    "CELERY_IMPORTS": "imports",
    "CELERY_INCLUDE": "include",
    "CELERYD_POOL": "worker_pool",
    "CELERYD_CONCURRENCY": "worker_concurrency",
    "CELERYD_PREFETCH_MULTIPLIER": "worker_prefetch_multiplier",
    "CELERYD_MAX_TASKS_PER_CHILD": "worker_max_tasks_per_child",
    "CELERYD_MAX_MEMORY_PER_CHILD": "worker_max_memory_per_child",
    "CELERY_DISABLE_RATE_LIMITS": "worker_disable_rate_limits",
    "CELERYD_POOL_RESTARTS": "worker_pool_restarts",
    "CELERYD_AUTOSCALER": "worker_autoscaler",
    "CELERYD_STATE_DB": "worker_state_db",
    "CELERY_SEND_TASK_EVENTS": "worker_send_task_events",
    "CELERYD_SEND_EVENTS": "worker_send_task_events",
}


def canonical_name(name: str) -> str:
    """The modern name for ``name`` (itself or an alias); unknown names raise with a hint."""
    if name in DEFAULTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name.lower() in DEFAULTS:
        return name.lower()
    known = list(DEFAULTS) + list(ALIASES)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownSettingError(
        f"Unknown setting {name!r}.{hint} The settings celeriac knows are listed in "
        "celeriac.config.DEFAULTS (modern names) and celeriac.config.ALIASES (the guide's names)."
    )


class Settings(Mapping[str, Any]):
    """``app.conf``: a mapping of modern setting names, readable and writable by alias too."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_values", {})
        if values:
            self.update(values)

    def __getitem__(self, name: str) -> Any:
        key = canonical_name(name)
        values: dict[str, Any] = self._values
        return values[key] if key in values else DEFAULTS[key]

    def __setitem__(self, name: str, value: Any) -> None:
        self._values[canonical_name(name)] = value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except UnknownSettingError as exc:
            raise AttributeError(str(exc)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __iter__(self) -> Iterator[str]:
        return iter(DEFAULTS)

    def __len__(self) -> int:
        return len(DEFAULTS)

    def update(self, values: Mapping[str, Any] | None = None, **more: Any) -> None:
        """Set several settings; every name is checked before any is changed."""
        pairs = {**(values or {}), **more}
        checked = {canonical_name(name): value for name, value in pairs.items()}
        self._values.update(checked)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults."""
        return dict(self._values)

    def load_object(self, obj: Any) -> list[str]:
        """Take every setting-like attribute of a module or object.

        Returns the names that look like settings (upper-case, or lower-case without a
        leading underscore and not a module, class or function) but are unknown, so the
        caller can report them.
        """
        unknown: list[str] = []
        for name in dir(obj):
            if name.startswith("_"):
                continue
            value = getattr(obj, name)
            if isinstance(value, types.ModuleType | type | types.FunctionType):
                continue
            try:
                self[name] = value
            except UnknownSettingError:
                unknown.append(name)
        return unknown
