"""Waiting in tests on a condition rather than for a fixed time."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01,
               message: str = "") -> T:
    """Call `predicate` until it returns something true and return that; AssertionError after
    `timeout` seconds (the predicate's last value and `message` in its text)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s (last: {value!r}) {message}".rstrip())
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float = 10.0,
                           interval: float = 0.01, message: str = "") -> T:
    """wait_until for a test on an event loop (`predicate` may be a coroutine function)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s (last: {value!r}) {message}".rstrip())
        await asyncio.sleep(interval)


def holds(predicate: Callable[[], object], duration: float, interval: float = 0.05, message: str = "") -> None:
    """Assert `predicate` stays true for `duration` seconds: a deliberate wait for something that
    must NOT happen (tokens after a cancel, a file a refused job would write), failing at the first
    time it does. The duration is how long the thing would take to show if it were happening."""
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            raise AssertionError(f"stopped being true (got {value!r}) {message}".rstrip())
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)
