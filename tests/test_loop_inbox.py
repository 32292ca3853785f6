"""LoopInbox: calls for an event loop from other threads, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from celeriac.pools.base import LoopInbox


def test_calls_from_many_threads_run_on_the_loop_in_order_with_few_wake_ups() -> None:
    loop = asyncio.new_event_loop()
    wakes = 0
    plain = loop.call_soon_threadsafe

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal wakes
        wakes += 1
        return plain(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    inbox = LoopInbox(loop)
    seen: list[tuple[int, int, int]] = []
    done = asyncio.Event()
    loop_thread: list[int] = []

    def record(sender: int, n: int) -> None:
        seen.append((sender, n, threading.get_ident()))
        if len(seen) == 4 * 500:
            done.set()

    def send(sender: int) -> None:
        for n in range(500):
            inbox.put(record, sender, n)

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for t in senders:
            t.start()
        await asyncio.to_thread(lambda: [t.join() for t in senders])
        await asyncio.wait_for(done.wait(), 10)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert len(seen) == 2000
    assert {tid for _, _, tid in seen} == set(loop_thread)  # all on the loop's thread
    for sender in range(4):  # each sender's calls in the order it made them
        assert [n for s, n, _ in seen if s == sender] == list(range(500))
    assert wakes < 2000  # calls that came while a wake-up was pending shared it


def test_a_call_that_raises_goes_to_the_loops_handler_and_the_rest_still_run() -> None:
    loop = asyncio.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    inbox = LoopInbox(loop)
    ran: list[str] = []

    def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        inbox.put(ran.append, "first")
        inbox.put(boom)
        inbox.put(ran.append, "last")
        await asyncio.sleep(0.05)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert ran == ["first", "last"]
    assert [type(c["exception"]) for c in errors] == [ValueError]
