"""Remote control: the mailbox (messages on a transport) and the client (``app.control``)."""

from __future__ import annotations

from .client import Control, Inspect

__all__ = ["Control", "Inspect"]
