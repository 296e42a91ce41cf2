"""GetLoads: ask the model replicas for their engine stats through the Serve handle.

A DeploymentHandle routes each call to one replica of its choice; there is no broadcast. So the
front door sends a few concurrent `load_report` calls (twice the configured replica count, at
least 4) and keeps one answer per replica id. With the default power-of-two router, concurrent
calls spread over replicas, but a replica can still be missed: the response says how many
replicas were expected, and a gateway treats a missing one as unknown, not idle. Stats are
what each engine last counted, so they are approximate by the time they arrive.
"""

from __future__ import annotations

import asyncio

from ray.serve.handle import DeploymentHandle

from gptoss.v1 import inference_pb2 as pb

MAX_PROBES = 64


async def sample_loads(handle: DeploymentHandle, expected_replicas: int, timeout_s: float) -> list[tuple[str, object]]:
    """(replica id, engine stats) of the replicas reached, sorted by id; raises only if none answered."""
    probes = min(MAX_PROBES, max(4, 2 * expected_replicas))
    calls = [handle.load_report.remote() for _ in range(probes)]
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s)
    reports: dict[str, object] = {}
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


def replica_load_to_proto(replica_id: str, stats) -> pb.ReplicaLoad:
    """Read whichever stats the engine has (the simple engine and the batching one differ)."""
    running = getattr(stats, "num_running", None)
    if running is None:
        running = getattr(stats, "active_requests", 0)
    load = pb.ReplicaLoad(
        replica_id=replica_id, running_requests=running, waiting_requests=getattr(stats, "num_waiting", 0),
        generated_tokens_total=getattr(stats, "generation_tokens_total", None)
        or getattr(stats, "tokens_generated_total", 0))
    usage = getattr(stats, "kv_cache_usage", None)
    if usage is not None:
        load.kv_cache_usage = float(usage)
    return load
