"""Replica load reports: sampling them through the Serve handle (GetLoads, and a periodic poll
that keeps the `gptoss_replica_*` metrics fresh) and turning them into protos.

A DeploymentHandle routes each call to one replica of its choice; there is no broadcast. So the
front door sends a few concurrent `load_report` calls (twice the configured replica count, at
least 4) and keeps one answer per replica id. With the default power-of-two router, concurrent
calls spread over replicas, but a replica can still be missed: the response says how many
replicas were expected, and a gateway treats a missing one as unknown, not idle. Stats are
what each engine last counted, so they are approximate by the time they arrive.

The same poll asks the Serve controller (serving/serve_internals.py) for the deployment's replica counts (its target, which
an autoscaling deployment's policy sets, and the replicas running) for the
`gptoss_autoscaler_*` gauges; the running count also sizes the next sample's probes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ray.serve.handle import DeploymentHandle

from cluster.engine.protocol import EngineStats
from cluster.serving.serve_internals import ReplicaCounts
from gptoss.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

MAX_PROBES = 64


async def sample_loads(handle: DeploymentHandle, expected_replicas: int, timeout_s: float) -> list[tuple[str, EngineStats]]:
    """(replica id, engine stats) of the replicas reached, sorted by id; raises only if none answered."""
    probes = min(MAX_PROBES, max(4, 2 * expected_replicas))
    calls = [handle.load_report.remote() for _ in range(probes)]
    gathered = asyncio.gather(*calls, return_exceptions=True)
    # A poll cut short (timeout, or the poller stopped at shutdown) leaves the gather holding a
    # CancelledError nobody reads, which asyncio would print as a traceback: read it here.
    gathered.add_done_callback(lambda future: future.cancelled() or future.exception())
    # asyncio.timeout, not wait_for: on Python 3.11, wait_for returns the result when it arrives in
    # the same turn of the loop as a cancel, and drops the cancel; LoadPoller.stop() then waited
    # forever for a poller that went on polling (a front door that never finished stopping).
    async with asyncio.timeout(timeout_s):
        done = await gathered
    reports: dict[str, EngineStats] = {}
    failures = []
    for result in done:
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            replica_id, stats = result
            reports[replica_id] = stats
    if not reports and failures:
        raise failures[0]
    return sorted(reports.items())


def replica_load_to_proto(replica_id: str, stats: EngineStats) -> pb.ReplicaLoad:
    load = pb.ReplicaLoad(replica_id=replica_id, running_requests=stats.running_requests,
                          waiting_requests=stats.waiting_requests, generated_tokens_total=stats.tokens_generated_total)
    if stats.kv_cache_usage is not None:
        load.kv_cache_usage = stats.kv_cache_usage
    return load


class LoadPoller:
    """Samples the replicas' load reports every `interval_s` and hands them to `on_reports`; with
    `on_counts`, also the deployment's (application, deployment, target, running) replica counts."""

    def __init__(self, handle: DeploymentHandle, expected_replicas: int, interval_s: float,
                 on_reports: Callable[[list[tuple[str, EngineStats]]], None], timeout_s: float = 5.0,
                 on_counts: Callable[[str, str, int, int], None] | None = None) -> None:
        self._handle = handle
        self._expected = expected_replicas
        self._interval_s = interval_s
        self._on_reports = on_reports
        self._on_counts = on_counts
        self._counts = ReplicaCounts(handle.deployment_id.app_name, handle.deployment_id.name) if on_counts else None
        self._timeout_s = timeout_s
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="replica-load-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def poll_once(self) -> None:
        if self._counts is not None:
            try:
                target, running = await self._counts.read(self._timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - controller busy or restarting: loads still count
                log.info("replica count poll failed: %r", err)
            else:
                self._on_counts(self._counts.app_name, self._counts.deployment_name, target, running)
                self._expected = max(1, running)
        self._on_reports(await sample_loads(self._handle, self._expected, self._timeout_s))

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - replicas restarting; the next poll tries again
                log.info("replica load poll failed: %r", err)
            await asyncio.sleep(self._interval_s)
