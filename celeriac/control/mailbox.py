"""The control mailbox: command messages broadcast to workers, and replies to one client.

A request is a JSON document broadcast on :data:`CONTROL_CHANNEL`::

    {"method": "rate_limit", "arguments": {...}, "destination": ["w1@host"] | null,
     "ticket": "<uuid>" | null, "reply_to": "<reply queue>" | null,
     "clock": 7, "expires": 1763700000.5}

A reply, left at ``reply_to`` with :meth:`Transport.reply`, is
``{"ticket": ..., "hostname": ..., "reply": {...}, "clock": ...}``.

With ``control_signing_key`` set, every request travels as
``{"signed": <request JSON text>, "hmac": <hex SHA-256 HMAC of that text>}`` and workers
refuse requests that are unsigned, wrongly signed, or past their ``expires``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..exceptions import MessageError

__all__ = ["CONTROL_CHANNEL", "ControlRequest", "RefusedRequest", "decode_request",
           "encode_reply", "encode_request", "new_reply_queue"]

CONTROL_CHANNEL = "celeriac.pidbox"
REPLY_PREFIX = "celeriac.pidbox.reply."


class RefusedRequest(MessageError):
    """A control message a worker will not act on (malformed, unsigned, forged, expired)."""


@dataclass(frozen=True)
class ControlRequest:
    """One decoded control command."""

    method: str
    arguments: Mapping[str, Any]
    destination: Sequence[str] | None = None
    ticket: str | None = None
    reply_to: str | None = None
    clock: int = 0
    expires: float | None = None

    def addressed_to(self, nodename: str) -> bool:
        return not self.destination or nodename in self.destination


def new_reply_queue() -> str:
    return f"{REPLY_PREFIX}{uuid.uuid4().hex}"


def _sign(text: str, key: str) -> str:
    return hmac.new(key.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()


def encode_request(request: ControlRequest, key: str | None) -> bytes:
    """The wire form of ``request``, signed when ``key`` is given."""
    text = json.dumps({
        "method": request.method, "arguments": dict(request.arguments),
        "destination": list(request.destination) if request.destination else None,
        "ticket": request.ticket, "reply_to": request.reply_to, "clock": request.clock,
        "expires": request.expires,
    }, separators=(",", ":"))
    if key:
        text = json.dumps({"signed": text, "hmac": _sign(text, key)}, separators=(",", ":"))
    return text.encode("utf-8")


def _verified(doc: Any, key: str | None, now: float) -> Any:
    if not key:
        return doc
    if not isinstance(doc, dict) or "signed" not in doc or "hmac" not in doc:
        raise RefusedRequest("unsigned control message (control_signing_key is set)")
    text = doc["signed"]
    if not isinstance(text, str) or not hmac.compare_digest(str(doc["hmac"]), _sign(text, key)):
        raise RefusedRequest("control message with a wrong signature")
    inner = json.loads(text)
    expires = inner.get("expires") if isinstance(inner, dict) else None
    if not isinstance(expires, int | float) or expires < now:
        raise RefusedRequest("expired control message")
    return inner


def decode_request(raw: bytes, key: str | None, now: float | None = None) -> ControlRequest:
    """Check and decode a request; raises :class:`RefusedRequest` saying why it is refused."""
    try:
        doc = _verified(json.loads(raw), key, time.time() if now is None else now)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RefusedRequest(f"control message is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("method"), str):
        raise RefusedRequest("control message has no 'method'")
    arguments = doc.get("arguments") or {}
    destination = doc.get("destination")
    if not isinstance(arguments, dict):
        raise RefusedRequest("control message 'arguments' must be an object")
    if destination is not None and not (isinstance(destination, list)
                                        and all(isinstance(d, str) for d in destination)):
        raise RefusedRequest("control message 'destination' must be a list of node names")
    reply_to = doc.get("reply_to")
    clock = doc.get("clock")
    return ControlRequest(
        method=doc["method"], arguments=arguments, destination=destination,
        ticket=doc.get("ticket") if isinstance(doc.get("ticket"), str) else None,
        reply_to=reply_to if isinstance(reply_to, str) else None,
        clock=clock if isinstance(clock, int) else 0,
        expires=doc.get("expires") if isinstance(doc.get("expires"), int | float) else None,
    )


def encode_reply(ticket: str | None, hostname: str, reply: Any, clock: int) -> bytes:
    return json.dumps({"ticket": ticket, "hostname": hostname, "reply": reply, "clock": clock},
                      default=repr, separators=(",", ":")).encode("utf-8")


def decode_reply(raw: bytes) -> dict[str, Any] | None:
    """A reply document, or ``None`` for something that is not one."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("hostname"), str) and "reply" in doc:
        return doc
    return None
