"""The replicas run at the front door's priority, not at Ray's default nice 15 for workers: read
from the live processes of the session's Ray (the replica actor, and the Serve controller beside
it) in /proc, the nice value the kernel schedules them with."""

from __future__ import annotations

import os

import pytest
import ray

from cluster.bench.processes import nice
from cluster.procfs import serve_replicas

pytestmark = pytest.mark.slow


def _our_replicas() -> list[int]:
    """Replica processes of the Ray this session started (other engineers' Rays run on the box)."""
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return serve_replicas(raylet)


def test_replica_runs_at_the_front_doors_priority(ray_serving):
    ray_serving.handle.model_info.remote().result(timeout_s=60)  # the replica is up
    replicas = _our_replicas()
    assert replicas, "no replica process found under this session's raylet"
    front_door = os.getpriority(os.PRIO_PROCESS, 0)  # the driver: the front door's process in `serve`
    assert [nice(p) for p in replicas] == [front_door] * len(replicas)
    assert all(nice(p) != front_door + 15 for p in replicas)  # Ray's default would show here
