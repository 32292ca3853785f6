"""Protocol v2 messages and serialization."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import pytest

from celeriac.exceptions import ContentDisallowed, DecodeError
from celeriac.protocol import (
    Message,
    build_task_message,
    decode_body,
    dumps,
    loads,
    read_task_headers,
)


def test_json_wraps_and_revives_rich_types():
    value = {"when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "day": dt.date(2026, 1, 2),
             "id": uuid.UUID(int=5), "price": Decimal("1.10"), "raw": b"\xff\x00",
             "text": b"hello"}
    body, content_type, encoding = dumps(value)
    assert content_type == "application/json" and encoding == "utf-8"
    assert b'"__type__":"base64"' in body and b'"__type__":"bytes"' in body
    assert loads(body, content_type, ["json"]) == value


def test_pickle_is_refused_unless_accepted():
    body, content_type, _ = dumps([1, 2], "pickle")
    with pytest.raises(ContentDisallowed, match="accept_content"):
        loads(body, content_type, ["json"])
    assert loads(body, content_type, ["json", "pickle"]) == [1, 2]


def test_bad_bodies_and_headers_raise_decode_errors():
    with pytest.raises(DecodeError):
        loads(b"{", "application/json", ["json"])
    with pytest.raises(DecodeError, match="3-element"):
        decode_body(Message(b"[1, 2]"), ["json"])
    with pytest.raises(DecodeError, match="'id'"):
        read_task_headers({"task": "x"})
    with pytest.raises(DecodeError, match="'task'"):
        read_task_headers({"id": "1"})
    with pytest.raises(DecodeError, match="timelimit"):
        read_task_headers({"id": "1", "task": "x", "timelimit": [1]})
    with pytest.raises(DecodeError, match="eta"):
        read_task_headers({"id": "1", "task": "x", "eta": "tomorrow"})


def test_naive_times_are_read_as_utc():
    headers = read_task_headers({"id": "1", "task": "t", "eta": "2026-01-01T00:00:00"})
    assert headers.eta == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_message_envelope_round_trip_including_binary():
    message = build_task_message("t", (1,), {"a": b"\xff"}, priority=3)
    again = Message.from_envelope(message.to_envelope())
    assert again == message
    binary = Message(b"\x80\x81", {"id": "1"}, "application/x-python-serialize", "binary")
    assert Message.from_envelope(binary.to_envelope()) == binary
    with pytest.raises(DecodeError):
        Message.from_envelope(b"not json")


def test_reprs_are_bounded():
    message = build_task_message("t", ("x" * 5000,))
    assert len(message.headers["argsrepr"]) <= 1024
