"""freeze_startup_heap, which `gptoss-cluster serve` and `gptoss-cluster frontdoor` call once the
front door is up: garbage is collected first (not frozen forever), everything alive is frozen, so
later full collections walk only what requests allocate."""

from __future__ import annotations

import gc
import weakref

from cluster.frontdoor.server import freeze_startup_heap


class _Node:
    pass


def test_startup_garbage_is_collected_and_the_live_heap_frozen():
    cycle = _Node()
    cycle.me = cycle
    dead = weakref.ref(cycle)
    del cycle
    alive = _Node()
    try:
        freeze_startup_heap()
        assert dead() is None, "a garbage cycle from startup was frozen instead of collected"
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # this process's modules, pytest's and ours
        assert gc.is_tracked(alive) and all(alive not in gc.get_objects(g) for g in range(3))
    finally:
        gc.unfreeze()
