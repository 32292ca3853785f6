"""Celery's task message protocol, version 2: building, reading and (de)serializing messages.

A task message is a :class:`Message`: AMQP-style properties, the protocol's headers
(``task``, ``id``, ``eta``, ``timelimit`` ...) and a body ``[args, kwargs, embed]``. Bodies
are JSON by default, with datetimes, UUIDs, decimals and bytes wrapped as
``{"__type__": ..., "__value__": ...}``. Pickle is used only when ``accept_content`` names it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pickle
import reprlib
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .exceptions import ContentDisallowed, DecodeError, MessageError

__all__ = [
    "Message",
    "TaskHeaders",
    "build_task_message",
    "content_type_for",
    "decode_body",
    "dumps",
    "loads",
    "read_task_headers",
]

JSON = "application/json"
PICKLE = "application/x-python-serialize"
_SERIALIZERS = {"json": JSON, "pickle": PICKLE}
_CONTENT_NAMES = {JSON: "json", PICKLE: "pickle", "json": "json", "pickle": "pickle"}
_REPR = reprlib.Repr()
_REPR.maxstring = 200
_REPR.maxother = 200
_REPR_LIMIT = 1024


# -- JSON with typed wrapping ---------------------------------------------------------------

def _wrap(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {"__type__": "datetime", "__value__": value.isoformat()}
    if isinstance(value, dt.date):
        return {"__type__": "date", "__value__": value.isoformat()}
    if isinstance(value, dt.time):
        return {"__type__": "time", "__value__": value.isoformat()}
    if isinstance(value, Decimal):
        return {"__type__": "decimal", "__value__": str(value)}
    if isinstance(value, uuid.UUID):
        return {"__type__": "uuid", "__value__": {"hex": value.hex}}
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return {"__type__": "bytes", "__value__": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"__type__": "base64", "__value__": base64.b64encode(raw).decode("ascii")}
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_UNWRAP = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "decimal": Decimal,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]) if isinstance(v, dict) else uuid.UUID(v),
    "bytes": lambda v: v.encode("utf-8"),
    "base64": base64.b64decode,
}


def _unwrap(obj: dict[str, Any]) -> Any:
    if len(obj) == 2 and "__type__" in obj and "__value__" in obj:
        revive = _UNWRAP.get(obj["__type__"])
        if revive is not None:
            return revive(obj["__value__"])
    return obj


_ENCODER = json.JSONEncoder(default=_wrap, ensure_ascii=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(object_hook=_unwrap)


def dumps(value: Any, serializer: str = "json") -> tuple[bytes, str, str]:
    """Serialize ``value``; returns ``(body, content_type, content_encoding)``."""
    if serializer == "json":
        return _ENCODER.encode(value).encode("utf-8"), JSON, "utf-8"
    if serializer == "pickle":
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), PICKLE, "binary"
    raise MessageError(f"Unknown serializer {serializer!r}: use 'json' or 'pickle'.")


def content_type_for(name: str) -> str:
    """The content type a serializer name (``json``, ``pickle``) or content type stands for."""
    if name in _SERIALIZERS:
        return _SERIALIZERS[name]
    if name in _CONTENT_NAMES:
        return name
    raise MessageError(f"Unknown content type {name!r}: use 'json' or 'pickle'.")


def loads(body: bytes | str, content_type: str, accept: Sequence[str]) -> Any:
    """Deserialize a body whose content type must be in ``accept`` (names or MIME types)."""
    allowed = {content_type_for(a) for a in accept}
    kind = _CONTENT_NAMES.get(content_type)
    if content_type not in allowed or kind is None:
        raise ContentDisallowed(
            f"Refusing content type {content_type!r}: accept_content allows "
            f"{sorted(allowed)}. Add it to accept_content only if you trust every producer."
        )
    try:
        if kind == "json":
            text = body.decode("utf-8") if isinstance(body, bytes | bytearray) else body
            return _DECODER.decode(text)
        return pickle.loads(body if isinstance(body, bytes) else body.encode("latin-1"))
    except Exception as exc:
        raise DecodeError(f"Cannot decode {kind} body: {type(exc).__name__}: {exc}") from exc


def saferepr(value: Any, limit: int = _REPR_LIMIT) -> str:
    """A repr that is bounded in size and never raises."""
    if not value and type(value) in (tuple, dict):  # no arguments: the common case, for free
        return "()" if type(value) is tuple else "{}"
    if value is None or type(value) is bool:  # a task's usual result, also for free
        return "None" if value is None else "True" if value else "False"
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__ must not break sending
        text = f"<unrepresentable {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_id() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` makes it, in half the time:
    a task id for every message sent."""
    return _uuid4_text(bytearray(os.urandom(16)), 0)


def fresh_ids(batch: int = 256) -> Iterator[str]:
    """Ids as :func:`new_id` makes them, without end, from one read of randomness per
    ``batch``: for bulk sends."""
    while True:
        raw = bytearray(os.urandom(16 * batch))
        for i in range(0, len(raw), 16):
            yield _uuid4_text(raw, i)


def _uuid4_text(raw: bytearray, i: int) -> str:
    """The 16 random bytes at ``raw[i:]`` as a version 4 UUID string (``raw`` is changed)."""
    raw[i + 6] = (raw[i + 6] & 0x0F) | 0x40  # version 4
    raw[i + 8] = (raw[i + 8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw[i:i + 16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- messages ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Message:
    """One message as it travels: properties, headers and a serialized body."""

    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    content_type: str = JSON
    content_encoding: str = "utf-8"
    properties: Mapping[str, Any] = field(default_factory=dict)
    #: the envelope already made, when this message was rebadged from another (:meth:`with_id`)
    envelope: bytes | None = field(default=None, compare=False, repr=False)

    def with_id(self, task_id: str) -> Message:
        """This same call under another task id (a batch of identical calls is built once).

        The id is a fresh random UUID wherever it appears (``id``, a ``root_id`` equal to it,
        ``correlation_id``), so the envelope is rebadged by replacing its text."""
        old = self.headers["id"]
        headers = {**self.headers, "id": task_id}
        if headers.get("root_id") == old:
            headers["root_id"] = task_id
        properties = {**self.properties}
        if properties.get("correlation_id") == old:
            properties["correlation_id"] = task_id
        envelope = self.to_envelope().replace(old.encode(), task_id.encode())
        return Message(self.body, headers, self.content_type, self.content_encoding,
                       properties, envelope)

    def to_envelope(self) -> bytes:
        """One JSON document holding the whole message, for stores that keep one value."""
        if self.envelope is not None:
            return self.envelope
        try:
            body: str = self.body.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode("ascii"), "base64"
        doc = {
            "body": body, "body_encoding": encoding, "headers": dict(self.headers),
            "content-type": self.content_type, "content-encoding": self.content_encoding,
            "properties": dict(self.properties),
        }
        return _ENCODER.encode(doc).encode("utf-8")

    @classmethod
    def from_envelope(cls, raw: bytes | str) -> Message:
        """The inverse of :meth:`to_envelope`; raises :class:`DecodeError` on a bad envelope."""
        try:
            doc = json.loads(raw)
            body = doc["body"]
            data = (base64.b64decode(body) if doc.get("body_encoding") == "base64"
                    else body.encode("utf-8"))
            return cls(body=data, headers=doc.get("headers") or {},
                       content_type=doc.get("content-type", JSON),
                       content_encoding=doc.get("content-encoding", "utf-8"),
                       properties=doc.get("properties") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DecodeError(f"Malformed message envelope: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TaskHeaders:
    """The protocol-v2 headers a worker needs before it decodes a body."""

    id: str
    task: str
    eta: dt.datetime | None = None
    expires: dt.datetime | None = None
    retries: int = 0
    time_limit: float | None = None
    soft_time_limit: float | None = None
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    argsrepr: str = ""
    kwargsrepr: str = ""
    origin: str = ""
    ignore_result: bool = False


def _parse_time(value: Any, name: str) -> dt.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise DecodeError(f"Header {name!r} is not an ISO-8601 time: {value!r}") from exc
    else:
        raise DecodeError(f"Header {name!r} must be an ISO-8601 string, not {type(value).__name__}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _limit(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise DecodeError(f"timelimit entries must be positive numbers or null, not {value!r}")


def read_task_headers(headers: Mapping[str, Any]) -> TaskHeaders:
    """Check and convert a v2 message's headers; raises :class:`DecodeError` if they are bad."""
    task_id, name = headers.get("id"), headers.get("task")
    if not isinstance(task_id, str) or not task_id:
        raise DecodeError("Message has no 'id' header: not a celeriac/Celery v2 task message")
    if not isinstance(name, str) or not name:
        raise DecodeError("Message has no 'task' header: not a celeriac/Celery v2 task message")
    timelimit = headers.get("timelimit") or (None, None)
    if not isinstance(timelimit, list | tuple) or len(timelimit) != 2:
        raise DecodeError(f"Header 'timelimit' must be [hard, soft], not {timelimit!r}")
    retries = headers.get("retries") or 0
    if not isinstance(retries, int):
        raise DecodeError(f"Header 'retries' must be an integer, not {retries!r}")
    return TaskHeaders(
        id=task_id, task=name,
        eta=_parse_time(headers.get("eta"), "eta"),
        expires=_parse_time(headers.get("expires"), "expires"),
        retries=retries,
        time_limit=_limit(timelimit[0]), soft_time_limit=_limit(timelimit[1]),
        root_id=headers.get("root_id"), parent_id=headers.get("parent_id"),
        group=headers.get("group"),
        argsrepr=str(headers.get("argsrepr") or ""),
        kwargsrepr=str(headers.get("kwargsrepr") or ""),
        origin=str(headers.get("origin") or ""),
        ignore_result=bool(headers.get("ignore_result", False)),
    )


def decode_body(message: Message,
                accept: Sequence[str]) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Decode a v2 body into ``(args, kwargs, embed)``, checking its shape."""
    body = loads(message.body, message.content_type, accept)
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise DecodeError("Task body must be a 3-element array [args, kwargs, embed]")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
        raise DecodeError("Task body must hold a list of args and a dict of kwargs")
    return list(args), kwargs, embed if isinstance(embed, dict) else {}


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()


def origin_name() -> str:
    """The ``origin`` header of messages sent from this process: ``gen<pid>@<host>``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def build_task_message(
    name: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, *,
    task_id: str | None = None, eta: dt.datetime | None = None,
    expires: dt.datetime | None = None, retries: int = 0,
    time_limit: float | None = None, soft_time_limit: float | None = None,
    root_id: str | None = None, parent_id: str | None = None, group: str | None = None,
    ignore_result: bool = False, serializer: str = "json", priority: int | None = None,
    reply_to: str | None = None, origin: str | None = None,
) -> Message:
    """A protocol-v2 task message, ready to publish."""
    task_id = task_id or new_id()
    kwargs = dict(kwargs or {})
    body, content_type, encoding = dumps(
        [list(args), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        serializer,
    )
    headers = {
        "lang": "py", "task": name, "id": task_id, "shadow": None,
        "eta": _iso(eta), "expires": _iso(expires), "group": group, "group_index": None,
        "retries": retries, "timelimit": [time_limit, soft_time_limit],
        "root_id": root_id or task_id, "parent_id": parent_id,
        "argsrepr": saferepr(tuple(args)), "kwargsrepr": saferepr(kwargs),
        "origin": origin or origin_name(), "ignore_result": ignore_result,
    }
    properties: dict[str, Any] = {
        "correlation_id": task_id, "delivery_mode": 2, "priority": priority or 0,
    }
    if reply_to:
        properties["reply_to"] = reply_to
    return Message(body=body, headers=headers, content_type=content_type,
                   content_encoding=encoding, properties=properties)
