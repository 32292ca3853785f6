"""Reading an AMQP content header frame (a message's properties) on the consuming path.

pamqp decodes a field table by slicing the rest of the buffer at every value, which costs
about 26 µs for the headers of one task message here, on the thread that hands deliveries
to the worker. This reads the same frame by offsets, for the properties and field-value
types task messages use, into the same values pamqp gives. Anything else (a timestamp, a
decimal, a byte array, a continued flag word, text that is not UTF-8, a malformed frame)
goes to pamqp, so nothing is read differently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

try:
    from pamqp import frame as pamqp_frame
    from pamqp.header import ContentHeader
except ImportError:  # pragma: no cover - the amqp extra is not installed
    pamqp_frame = None  # type: ignore[assignment]

__all__ = ["Header", "Properties", "read_content_header"]

_HEAD = struct.Struct(">HHQH")  # class id, weight, body size, property flags
_U8, _I8 = struct.Struct(">B"), struct.Struct(">b")
_U16, _I16 = struct.Struct(">H"), struct.Struct(">h")
_U32, _I32 = struct.Struct(">I"), struct.Struct(">i")
_I64 = struct.Struct(">q")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
#: the basic class's properties, by flag bit, with how each is read (15 is the first)
_FIELDS = (("content_type", "s"), ("content_encoding", "s"), ("headers", "F"),
           ("delivery_mode", "o"), ("priority", "o"), ("correlation_id", "s"),
           ("reply_to", "s"), ("expiration", "s"), ("message_id", "s"),
           ("timestamp", None), ("message_type", "s"), ("user_id", "s"), ("app_id", "s"),
           ("cluster_id", "s"))
_NUMBERS = {ord("b"): _I8, ord("B"): _U8, ord("s"): _I16, ord("u"): _U16, ord("I"): _I32,
            ord("i"): _U32, ord("l"): _I64, ord("L"): _I64, ord("f"): _F32, ord("d"): _F64}


class _Elsewhere(Exception):
    """Something this reader leaves to pamqp."""


@dataclass(slots=True)
class Properties:
    """A message's basic properties, under pamqp's names."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: Any = None
    message_type: str | None = None
    user_id: str | None = None
    app_id: str | None = None
    cluster_id: str | None = ""  # (as pamqp has it when absent)


@dataclass(slots=True)
class Header:
    """What the consumer reads of a content header: the body's size and the properties."""

    body_size: int
    properties: Any


def read_content_header(frame: bytes) -> Header:
    """The content header in ``frame`` (a whole frame, as the frame reader returns it)."""
    if frame[0] != 2:
        raise ConnectionError(f"expected a content header, got a frame of type {frame[0]}")
    try:
        return _read(frame)
    except (_Elsewhere, IndexError, struct.error, UnicodeDecodeError):
        pass  # pamqp reads it, or says what is wrong with it
    header = pamqp_frame.unmarshal(frame)[2]
    if not isinstance(header, ContentHeader):
        raise ConnectionError(f"expected a content header, got {type(header).__name__}")
    return Header(header.body_size, header.properties)


def _read(data: bytes) -> Header:
    _, _, body_size, flags = _HEAD.unpack_from(data, 7)
    if flags & 1 or flags & (1 << 6):  # more flag words, or a timestamp
        raise _Elsewhere
    props = Properties()
    at = 21
    for bit, (name, kind) in zip(range(15, 1, -1), _FIELDS, strict=True):
        if not flags & (1 << bit):
            continue
        if kind == "s":
            size = data[at]
            value: Any = data[at + 1:at + 1 + size].decode()
            at += 1 + size
        elif kind == "o":
            value = data[at]
            at += 1
        else:
            value, at = _table(data, at)
        setattr(props, name, value)
    return Header(body_size, props)


def _table(data: bytes, at: int) -> tuple[dict[str, Any], int]:
    end = at + 4 + _U32.unpack_from(data, at)[0]
    at += 4
    table: dict[str, Any] = {}
    while at < end:
        size = data[at]
        key = data[at + 1:at + 1 + size].decode()
        table[key], at = _value(data, at + 1 + size)
    if at != end:
        raise IndexError("a field table overran its length")
    return table, end


def _value(data: bytes, at: int) -> tuple[Any, int]:
    kind = data[at]
    at += 1
    if kind == 83:  # S: long string
        size = _U32.unpack_from(data, at)[0]
        raw = data[at + 4:at + 4 + size]
        try:
            return raw.decode(), at + 4 + size
        except UnicodeDecodeError:
            return raw, at + 4 + size
    if kind == 86:  # V: void
        return None, at
    if kind == 116:  # t: boolean
        return bool(data[at]), at + 1
    if kind == 70:  # F: table
        return _table(data, at)
    if kind == 65:  # A: array
        end = at + 4 + _U32.unpack_from(data, at)[0]
        at += 4
        items = []
        while at < end:
            item, at = _value(data, at)
            items.append(item)
        if at != end:
            raise IndexError("a field array overran its length")
        return items, end
    number = _NUMBERS.get(kind)
    if number is None:  # D (decimal), T (timestamp), x (bytes) or unknown: pamqp decides
        raise _Elsewhere
    return number.unpack_from(data, at)[0], at + number.size
