"""Reading the session app's replica from tests: its engine stats, and waiting for it to go idle.

Tests that compare the replica's counters before and after a request need a quiet replica to start
from; a request that an earlier test left running would change those counters under them.
"""

from __future__ import annotations

import time


def replica_stats(ray_serving):
    return ray_serving.handle.stats.remote().result(timeout_s=30)


def wait_idle(ray_serving, timeout_s: float = 30.0):
    """The replica's stats once nothing runs or waits; fails if an earlier request never ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = replica_stats(ray_serving)
        if not stats.active_requests and not stats.waiting_requests:
            return stats
        assert time.monotonic() < deadline, f"replica still busy {timeout_s:.0f} s into a test: {stats}"
        time.sleep(0.05)
