"""The fork guard: broker calls share it, a fork takes it alone."""

from __future__ import annotations

import threading

from celeriac.worker.forkguard import ForkGuard


def _inside(guard: ForkGuard, entered: threading.Event, leave: threading.Event) -> None:
    with guard.shared():
        entered.set()
        leave.wait(10)


def test_shared_holders_do_not_wait_for_each_other():
    guard = ForkGuard()
    entered, leave = threading.Event(), threading.Event()
    holder = threading.Thread(target=_inside, args=(guard, entered, leave))
    holder.start()
    assert entered.wait(5)
    second = threading.Event()
    other = threading.Thread(target=_inside, args=(guard, second, threading.Event()))
    other.daemon = True
    other.start()
    try:
        assert second.wait(5), "a second shared holder waited for the first"
    finally:
        leave.set()
        holder.join(5)


def test_a_fork_waits_for_holders_and_holds_new_ones_back():
    guard = ForkGuard()
    order: list[str] = []
    entered, leave = threading.Event(), threading.Event()
    holder = threading.Thread(target=_inside, args=(guard, entered, leave))
    holder.start()
    assert entered.wait(5)

    forked = threading.Event()

    def fork() -> None:
        with guard:
            order.append("fork")
        forked.set()

    late_entered = threading.Event()

    def late() -> None:
        with guard.shared():
            order.append("late")
        late_entered.set()

    forker = threading.Thread(target=fork)
    forker.start()
    # The fork is pending while the holder is inside; a newcomer must queue behind it.
    assert not forked.wait(0.3), "the fork went ahead while a holder was inside"
    newcomer = threading.Thread(target=late)
    newcomer.start()
    assert not late_entered.wait(0.3), "a new holder entered while a fork was pending"
    leave.set()
    for thread in (holder, forker, newcomer):
        thread.join(5)
        assert not thread.is_alive()
    assert order == ["fork", "late"]
