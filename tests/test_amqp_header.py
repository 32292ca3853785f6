"""Our content-header reader gives what pamqp gives, for every property and value type."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import socket
from typing import Any

import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

from celeriac.transports import amqp_header
from celeriac.transports.amqp_consume import FrameReader, LeanChannel
from celeriac.transports.amqp_header import Properties, read_content_header
from celeriac.transports.amqp_io import Settings

NAMES = [name for name, _ in amqp_header._FIELDS]

TASK_HEADERS: dict[str, Any] = {
    "lang": "py", "task": "proj.add", "id": "685c5673-c635-4b21-b389-43639f09ef3c",
    "shadow": None, "eta": "2026-11-22T05:00:00+00:00", "expires": None, "group": None,
    "group_index": 3, "retries": 0, "timelimit": [None, 30.5], "root_id": "r",
    "parent_id": None, "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "gen1@vm",
    "ignore_result": False, "x-celeriac-deliveries": 2, "big": 2 ** 40, "negative": -7,
    "nested": {"set": {"reply_to": "q"}, "unset": ["priority"], "flags": [True, "é", {}]},
    "x-death": [{"count": 1, "reason": "rejected", "queues": ["a", "b"]}],
}


def _frame(**props: Any) -> bytes:
    return pamqp_frame.marshal(ContentHeader(0, 1234, spec.Basic.Properties(**props)), 1)


def _same(frame: bytes) -> None:
    ours = read_content_header(frame)
    theirs = pamqp_frame.unmarshal(frame)[2]
    assert ours.body_size == theirs.body_size == 1234
    for name in NAMES:
        assert getattr(ours.properties, name) == getattr(theirs.properties, name), name


@pytest.mark.parametrize("props", [
    {},
    {"content_type": "application/json", "content_encoding": "utf-8",
     "headers": TASK_HEADERS, "delivery_mode": 2, "priority": 9,
     "correlation_id": "c", "reply_to": "replies.1", "expiration": "60000"},
    {"message_id": "m1", "message_type": "t", "user_id": "guest", "app_id": "a",
     "headers": {}},
    {"headers": {"only": "one"}, "priority": 0},
])
def test_task_message_properties_read_as_pamqp_reads_them(props: dict[str, Any]) -> None:
    frame = _frame(**props)
    assert isinstance(amqp_header._read(frame).properties, Properties)  # read by us
    _same(frame)


@pytest.mark.parametrize("props", [
    {"timestamp": dt.datetime(2026, 11, 22, 5, 0, tzinfo=dt.UTC)},
    {"headers": {"price": decimal.Decimal("1.25")}},
    {"headers": {"raw": bytearray(b"\x00\xff")}},
    {"headers": {"when": dt.datetime(2026, 11, 22, 5, 0, tzinfo=dt.UTC)}},
])
def test_what_task_messages_do_not_use_is_left_to_pamqp(props: dict[str, Any]) -> None:
    frame = _frame(**props)
    with pytest.raises(amqp_header._Elsewhere):
        amqp_header._read(frame)
    _same(frame)


def test_text_that_is_not_utf8_reads_as_pamqp_reads_it() -> None:
    frame = _frame(headers={"k": "placeholder"})
    frame = frame.replace(b"placeholder", b"\xffplacehold\xfe")
    _same(frame)  # a long string that is not UTF-8 comes back as bytes


def test_a_frame_that_is_not_a_content_header_ends_the_connection() -> None:
    method = pamqp_frame.marshal(spec.Basic.Ack(delivery_tag=1), 1)
    with pytest.raises(ConnectionError, match="content header"):
        read_content_header(method)


def test_the_consuming_connection_reads_deliveries_with_this_reader() -> None:
    ours, broker = socket.socketpair()
    loop = asyncio.new_event_loop()
    try:
        body = b"x" * 300
        broker.sendall(pamqp_frame.marshal(ContentHeader(0, len(body), spec.Basic.Properties(
            content_type="application/json", headers=TASK_HEADERS)), 1)
            + bytes([3, 0, 1]) + len(body[:200]).to_bytes(4, "big") + body[:200] + b"\xce"
            + bytes([3, 0, 1]) + len(body[200:]).to_bytes(4, "big") + body[200:] + b"\xce")
        lean = LeanChannel(Settings.parse("amqp://", {}), loop)
        got = lean._read_content(FrameReader(ours), "delivery")
        assert got.body == body and got.delivery == "delivery"
        assert isinstance(got.header.properties, Properties)
        assert got.header.properties.headers == TASK_HEADERS
    finally:
        ours.close()
        broker.close()
        loop.close()
