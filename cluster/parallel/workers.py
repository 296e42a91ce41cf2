"""Worker actors of an expert-parallel group: one per placement-group bundle, ranks 1..N-1.

Inside a Serve replica (ep_size N, N bundles, the replica in bundle 0) `start_group` finds the
replica's placement group and puts worker i in bundle i. Outside Serve (tests, the benchmark) it
reserves its own placement group. Workers answer `ping` while inside a collective
(max_concurrency >= 2), so the replica's health check notices a dead or stuck worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.parallel.driver import GroupDriver
from cluster.parallel.rebalance import ExpertLoadStats
from cluster.parallel.runtime import GroupSpec, ShardRuntime, node_ip
from cluster.sockets import free_port

log = logging.getLogger(__name__)

# On CPU the ranks of a group share the node's cores and meet at two collectives per layer. An
# OpenMP thread that spin-waits after a parallel op (libgomp's default) keeps a core busy that a
# peer rank needs to reach that collective; on a 2-core box it made a step of the tiny preset
# ~2x slower (bench experts). Idle OpenMP threads of CPU workers sleep instead.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@ray.remote(max_concurrency=4)
class ExpertWorker:
    """Rank r >= 1: builds its shard, joins the group, then follows rank 0 in `run`."""

    def __init__(self) -> None:
        self.runtime: ShardRuntime | None = None

    def setup(self, spec: GroupSpec, rank: int) -> int:
        self.runtime = ShardRuntime(spec, rank)
        return os.getpid()

    def run(self) -> int:
        from cluster.parallel.runtime import worker_loop

        try:
            return worker_loop(self.runtime)
        finally:
            self.runtime.close()

    def ping(self) -> int:
        return os.getpid()

    def memory_report(self) -> dict:
        return self.runtime.memory_report()

    def io_write_bytes(self) -> int:
        return io_write_bytes()

    def shm_bytes(self) -> int:
        return self.runtime.comm.shm_bytes


class WorkerGroup:
    """Rank 0's view of the group: the driver (its own shard) and the worker actors."""

    def __init__(self, driver: GroupDriver, workers: list, run_refs: list, own_pg=None):
        self.driver, self.workers, self.run_refs, self._own_pg = driver, workers, run_refs, own_pg

    @property
    def runtime(self) -> ShardRuntime:
        return self.driver.runtime

    def check_health(self, timeout_s: float = 5.0) -> None:
        """Raise (RayActorError, GetTimeoutError, or the group's error) unless every worker answers."""
        if self.driver.error is not None:
            raise RuntimeError("expert-parallel group failed") from self.driver.error
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)
        done, _ = ray.wait(self.run_refs, timeout=0)
        if done:
            ray.get(done)  # a worker loop ended: raises its error
            raise RuntimeError("an expert-parallel worker left its loop")

    def memory_reports(self) -> list[dict]:
        """Each rank's resident bytes, as that rank reads them from its own tensors."""
        return [self.runtime.memory_report()] + ray.get([w.memory_report.remote() for w in self.workers])

    def io_write_bytes(self) -> list[int]:
        """Bytes written so far by each rank's process (rank 0 is this process)."""
        return [io_write_bytes()] + ray.get([w.io_write_bytes.remote() for w in self.workers])

    def shm_bytes(self) -> list[int]:
        """Bytes each rank has copied into the group's shared-memory segment (0 on the gloo path)."""
        return [self.runtime.comm.shm_bytes] + ray.get([w.shm_bytes.remote() for w in self.workers])

    def worker_pids(self) -> list[int]:
        return ray.get([w.ping.remote() for w in self.workers])

    def shutdown(self) -> None:
        self.driver.close()
        try:
            ray.get(self.run_refs, timeout=5)
        except Exception:
            pass
        for w in self.workers:
            ray.kill(w)
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)


def start_group(spec: GroupSpec, *, worker_cpus: float = 0.1, worker_gpus: float = 0.0,
                stats: ExpertLoadStats | None = None, model=None, strategy: str = "STRICT_PACK",
                keepalive_s: float = 1.0, rebalancer=None) -> WorkerGroup:
    """Start ranks 1..N-1 as actors and build rank 0 here; returns when the group has formed.

    `spec.address`/`spec.port` may be empty/0: this node's IP and a free port are filled in.
    """
    if not spec.address:
        spec = dataclasses.replace(spec, address=node_ip())
    if not spec.port:
        spec = dataclasses.replace(spec, port=free_port(""))
    pg = get_current_placement_group()
    own_pg = None
    if pg is None:  # not inside a Serve replica with bundles: reserve the workers' own
        bundle = {"CPU": worker_cpus, **({"GPU": worker_gpus} if worker_gpus else {})}
        own_pg = pg = placement_group([bundle] * spec.world, strategy=strategy)
        ray.get(pg.ready(), timeout=60)
    options = {"num_cpus": worker_cpus, **({"num_gpus": worker_gpus} if worker_gpus else {})}
    if not worker_gpus:  # CPU ranks share cores: see WORKER_ENV
        options["runtime_env"] = {"env_vars": dict(WORKER_ENV)}
    workers = [ExpertWorker.options(
        **options, scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i),
        name=None).remote() for i in range(1, spec.world)]
    t0 = time.monotonic()
    setups = [w.setup.remote(spec, rank) for rank, w in enumerate(workers, start=1)]
    try:
        runtime = ShardRuntime(spec, 0, model=model, stats=stats)
        ray.get(setups, timeout=spec.timeout_s + 60)
    except BaseException:
        for w in workers:
            ray.kill(w)
        if own_pg is not None:
            remove_placement_group(own_pg)
        raise
    log.info("expert-parallel group of %d formed in %.2f s", spec.world, time.monotonic() - t0)
    run_refs = [w.run.remote() for w in workers]
    return WorkerGroup(GroupDriver(runtime, keepalive_s, rebalancer), workers, run_refs, own_pg)


def ep_forward_factory(checkpoint: str, ep_size: int, *, dtype: str = "float32", device: str = "cpu",
                       placements: list | None = None, timeout_s: float = 10.0, torch_threads: int = 1,
                       worker_cpus: float = 0.1, worker_gpus: float = 0.0, model=None,
                       stats: ExpertLoadStats | None = None, on_start=None, placement_policy: str = "contiguous",
                       redundant: int = 0, rebalance_interval_s: float = 0.0, stats_window_steps: int = 256,
                       strategy: str = "STRICT_PACK"):
    """A `forward_factory` for EngineCore: starts the group once the engine has chosen its cache layout.

    `model` (rank 0's, loaded whole) is sharded in place; `on_start(group)` receives the WorkerGroup.
    Rank 0 records tokens per expert (`group.runtime.stats`); with `rebalance_interval_s` > 0 the
    driver re-plans the placement (with `redundant` extra copies) between steps.
    """
    from cluster.parallel.expert_map import static_placement
    from cluster.parallel.rebalance import Rebalancer

    def factory(kv_spec, num_blocks: int) -> GroupDriver:
        nonlocal placements, stats
        locations = [kv_spec.cache_location(layer) for layer in range(kv_spec.num_layers)]
        if model is not None:
            E = model.config.num_local_experts
            if not placements:
                placements = [static_placement(placement_policy, E, ep_size) for _ in range(kv_spec.num_layers)]
            if stats is None:
                stats = ExpertLoadStats(kv_spec.num_layers, E, stats_window_steps)
        rebalancer = Rebalancer(stats, ep_size, redundant, rebalance_interval_s) if stats is not None else None
        spec = GroupSpec(
            checkpoint=str(checkpoint), world=ep_size, address="", port=0, dtype=dtype, device=device,
            placements=[p.to_dict() for p in placements] if placements else [], num_blocks=num_blocks,
            block_size=kv_spec.block_size, layer_group=[g for g, _ in locations],
            layer_tensor=[j for _, j in locations], timeout_s=timeout_s, torch_threads=torch_threads)
        group = start_group(spec, worker_cpus=worker_cpus, worker_gpus=worker_gpus, stats=stats, model=model,
                            strategy=strategy, rebalancer=rebalancer)
        if on_start is not None:
            on_start(group)
        return group.driver

    return factory


def io_write_bytes() -> int:
    """Bytes this process has written (sockets included: gloo's traffic) — Linux /proc/self/io wchar."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0
