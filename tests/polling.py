"""Waiting in tests: poll an observable condition until it holds, or fail at a deadline naming what never happened.

Tests synchronise on what a user could see (a metric, an HTTP answer, a file), never on a fixed sleep.
"""

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, what: str | Callable[[], str],
               interval: float = 0.1) -> T:
    """``condition()``'s first truthy value, polled every ``interval`` s; after ``timeout`` s the test fails
    with "``what`` did not happen within ``timeout`` s" (``what`` may be a callable, for the last state seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what() if callable(what) else what} did not happen within {timeout:g} s")
        time.sleep(interval)
