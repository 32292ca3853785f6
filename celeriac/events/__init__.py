"""Worker and task events, broadcast for monitors (``celeriac events``, dashboards)."""

from __future__ import annotations

from .dispatcher import EVENT_CHANNEL, EventDispatcher

__all__ = ["EVENT_CHANNEL", "EventDispatcher"]
