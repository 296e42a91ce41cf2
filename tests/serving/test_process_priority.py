"""The replicas run at the front door's priority, not at Ray's default nice 15 for workers: read
from the live processes of the session's Ray (the replica actor, and the Serve controller beside
it) in /proc, the nice value the kernel schedules them with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

pytestmark = pytest.mark.slow


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after "pid (comm)": [0] is the state, [1] the parent, [16] nice."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat(int(entry.name))[1])
            except (OSError, IndexError):
                pass  # ended meanwhile
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _our_replicas() -> list[int]:
    """Replica processes of the Ray this session started (other engineers' Rays run on the box)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [pid for pid in _descendants(raylet)
            if b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _nice(pid: int) -> int:
    return int(_stat(pid)[16])


def test_replica_runs_at_the_front_doors_priority(ray_serving):
    ray_serving.handle.model_info.remote().result(timeout_s=60)  # the replica is up
    replicas = _our_replicas()
    assert replicas, "no replica process found under this session's raylet"
    front_door = os.getpriority(os.PRIO_PROCESS, 0)  # the driver: the front door's process in `serve`
    assert [_nice(p) for p in replicas] == [front_door] * len(replicas)
    assert all(_nice(p) != front_door + 15 for p in replicas)  # Ray's default would show here
