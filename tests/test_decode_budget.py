"""Concurrent decodes share a pixel budget, so many large photos cannot exhaust memory."""

from __future__ import annotations

import threading
import time

from biolit_id.server.preprocess import PixelBudget


def test_a_decode_waits_while_the_budget_is_taken() -> None:
    budget = PixelBudget()
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with budget.hold(8, capacity=10):
            order.append("first in")
            first_in.set()
            release_first.wait(5)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        with budget.hold(8, capacity=10):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_in.wait(5)
    time.sleep(0.2)  # the second decode had time to start: it must still be waiting
    assert order == ["first in"]
    release_first.set()
    for t in threads:
        t.join(5)
    assert order == ["first in", "first out", "second in"]


def test_small_decodes_share_the_budget_and_a_lone_photo_always_fits() -> None:
    budget = PixelBudget()
    with budget.hold(4, capacity=10), budget.hold(4, capacity=10):
        pass  # two fit together without waiting
    with budget.hold(50, capacity=10):
        pass  # larger than the whole budget, but alone: it is let through
