"""The one typed configuration of a gptoss-cluster deployment.

Sources, later ones winning: defaults (which work on the embedded path: local Ray, tiny model,
CPU), a YAML file, environment variables `GPTOSS_<UPPER_PATH>` (e.g. `GPTOSS_SERVING_REPLICAS=2`,
`GPTOSS_CACHE_DIR=/tmp/c`), then command-line flags. Each section is a pydantic model whose fields
carry their constraints and, as attribute docstrings, their descriptions (docs/configuration.md is
generated from them: `python -m cluster.config --markdown`). Loading reports every bad value at
once, one "config: <key path> ..." line each, in one ConfigError.

The environment variables are read here, not by pydantic-settings: their names join the key path
with "_", which also occurs inside keys (GPTOSS_ENGINE_MAX_NUM_SEQS), so only a walk over the known
paths can tell the levels apart.
"""

from __future__ import annotations

import copy
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

ENV_PREFIX = "GPTOSS_"
LogLevel = Literal["debug", "info", "warning", "error"]
EngineKind = Literal["torch", "echo", "vllm"]  # echo: a test engine without a model; vllm: needs the vllm extra
ReplicaStreamKind = Literal["per_request", "multiplexed", "socket"]
RouterPolicy = Literal["round_robin", "least_loaded", "prefix_affinity", "session"]
ResponseStoreKind = Literal["memory", "redis"]
PlacementStrategy = Literal["STRICT_PACK", "PACK", "SPREAD"]
PlacementPolicy = Literal["contiguous", "round_robin"]
LOG_LEVELS = typing.get_args(LogLevel)
ENGINE_KINDS = typing.get_args(EngineKind)
ROUTER_POLICIES = typing.get_args(RouterPolicy)
RESPONSE_STORES = typing.get_args(ResponseStoreKind)
PLACEMENT_STRATEGIES = typing.get_args(PlacementStrategy)
PLACEMENT_POLICIES = typing.get_args(PlacementPolicy)


class ConfigError(ValueError):
    """Invalid configuration; each line of the message starts with "config: <key path>"."""

    def __init__(self, message: str, *more: str) -> None:
        super().__init__("\n".join((message, *more)))
        self.messages = (message, *more)


class Section(BaseModel):
    """A part of the configuration: unknown keys are errors, numbers are finite, and each field's
    attribute docstring is its description."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _paths_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


def _rule(field: str, ok: bool, message: str, reads: tuple[str, ...]) -> InitErrorDetails | None:
    """A rule between fields of one section: `field` (what the error names) fails with `message`
    unless `ok`; `reads` are the other fields (relative paths) the rule looks at."""
    if ok:
        return None
    return InitErrorDetails(type=PydanticCustomError("rule", message, {"field": field, "reads": reads}),
                            loc=tuple(field.split(".")), input=None)


def _raise_broken(model: BaseModel, *rules: InitErrorDetails | None) -> BaseModel:
    """Raise every broken rule at once (pydantic puts each under its key path); else return `model`."""
    broken = [dict(r, input=get_path(model, ".".join(r["loc"]))) for r in rules if r is not None]
    if broken:
        raise ValidationError.from_exception_data(type(model).__name__, broken)
    return model


class ModelConfig(Section):
    path: str | None = None
    """Checkpoint directory (HF layout). None: build the `preset` checkpoint once into the cache."""
    preset: str = "gpt-oss-tiny"
    """Preset built when no path is given: "gpt-oss-tiny" is the small model trained to speak harmony
    (cluster/tiny); "tiny" and the other shapes get random weights."""
    name: str = ""
    """Name reported by GetModelInfo; empty: the preset ("gpt-oss-<preset>" for shape names like "tiny")
    or the checkpoint's directory name."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the loaded weights."""
    hugepage_weights: bool = True
    """CPU: copy the weights of 2 MB and more out of the checkpoint's mapped pages into memory backed by
    2 MB pages, where the kernel offers transparent huge pages (~12% faster batch-1 decode of
    gpt-oss-20b: fewer TLB misses). Off: the weights stay the mapped checkpoint, whose page cache the
    replicas of one host share."""

    @model_validator(mode="after")
    def _rules(self) -> ModelConfig:
        return _raise_broken(self, _rule("preset", bool(self.preset) or self.path is not None,
                                         "must be set when model.path is not", ("path",)))


class VllmConfig(Section):
    """engine.kind vllm: how the replica starts vLLM's AsyncLLM (cluster/engine/vllm_engine.py).

    The replica's GPUs are tensor_parallel_size x data_parallel_size; cluster/serving/builder.py
    reserves them for the replica (see `vllm_placement` there). 0 means vLLM's own default.
    """

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one copy of the weights is split over (attention heads, MoE intermediate blocks)."""
    data_parallel_size: int = Field(1, ge=1)
    """Engine copies inside this replica (attention data parallel); with enable_expert_parallel the
    experts are spread over tensor_parallel_size x data_parallel_size ranks."""
    enable_expert_parallel: bool = False
    """Place whole experts on ranks (EP = TP x DP) instead of slicing every expert."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may take (weights, activations, KV cache)."""
    max_model_len: int = Field(0, ge=0)
    """Context length; 0: the checkpoint's max_position_embeddings."""
    max_num_seqs: int = Field(0, ge=0)
    """Sequences per step; 0: engine.max_num_seqs."""
    max_num_batched_tokens: int = Field(0, ge=0)
    """Tokens per step (chunked prefill); 0: vLLM's default."""
    async_scheduling: bool = False
    """Overlap scheduling of step N+1 with step N on the GPU."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile (quick start; the CPU tests use it)."""
    distributed_executor_backend: Literal["", "mp", "ray"] = ""
    """"" lets vLLM choose (one process per GPU via multiprocessing); "ray" runs the workers as Ray
    actors in the bundles the replica reserved (needed when the GPUs span nodes)."""
    cpu_kv_cache_space_gib: int = Field(1, ge=1)
    """vllm-cpu only: GiB for the KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    cpu_omp_threads_bind: str = ""
    """vllm-cpu only: the cores its OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1";
    "": vLLM's "auto")."""
    structured_outputs: bool = False
    """Structured output (response_format, strict tools) through vLLM's guidance backend. vLLM then
    starts its tokenizer: the model directory's tokenizer files, or o200k_harmony's built once into
    the cache (transformers + tiktoken, ~1 min); off: a constrained request is refused
    (INVALID_ARGUMENT naming response_format)."""


class EngineConfig(Section):
    """The replica's engine. The torch engine's core and scheduler (cluster/engine/) take their
    sizes from this section; they have no defaults of their own."""

    kind: EngineKind = "torch"
    """"torch" runs the model; "vllm" runs it in vLLM (settings under engine.vllm); "echo" is a TEST
    engine with no model that streams the prompt's tokens back at echo_tokens_per_s (for measuring
    the serving path; see cluster/engine/echo_engine.py)."""
    max_num_seqs: int = Field(32, ge=1)
    """Sequences in one forward pass (the batch); more requests wait in the engine's queue."""
    max_num_batched_tokens: int = 512
    """Tokens in one forward pass: long prompts are prefilled in chunks of at most this many, so they
    do not stall the decoding of others. Must be >= max_num_seqs."""
    max_waiting_requests: int = Field(64, ge=1)
    """Requests waiting for a place in the batch; beyond it a request is refused at once
    (RESOURCE_EXHAUSTED with a retry hint). echo: max_num_seqs + this many streams at once."""
    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per KV-cache block (the unit of allocation and of prefix reuse)."""
    kv_cache_memory_mib: float = Field(64.0, gt=0)
    """Memory for the KV cache of one replica, in MiB; sets the number of blocks. 64 MiB holds about
    64k tokens of the float32 tiny preset; size it to the GPU for real models."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a prompt prefix seen before (same system prompt, same conversation)."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens when a request leaves it unset (capped by the context length)."""
    chunk_interval_ms: float = Field(10.0, ge=0, le=1000)
    """Least time between two chunks of one stream: tokens ready within it travel together, because
    each message through Ray costs about 1 ms of CPU (see RAY-SERVE-NOTES)."""
    torch_threads: int = Field(1, ge=1)
    """torch intra-op threads per replica; 1 suits many concurrent small decodes on a small box."""
    echo_tokens_per_s: float = Field(1000.0, ge=0)
    """engine.kind echo only: tokens per second per stream (0: every token at once)."""
    structured_wrap_up_tokens: int = Field(64, ge=0)
    """Structured output (torch engine): in a constrained request's last this many tokens before
    max_tokens, only tokens that close the value (quotes, brackets, the turn's end) are allowed where
    the grammar allows any, so a long answer ends shortened but valid (finish reason stop) instead
    of cut off and invalid (length). 0: off. See docs/structured-output.md."""
    vllm: VllmConfig = Field(default_factory=VllmConfig)

    @property
    def kv_cache_memory_bytes(self) -> int:
        return int(self.kv_cache_memory_mib * (1 << 20))

    @model_validator(mode="after")
    def _rules(self) -> EngineConfig:
        return _raise_broken(self, _rule(
            "max_num_batched_tokens", self.max_num_batched_tokens >= self.max_num_seqs,
            "must be >= engine.max_num_seqs (else running requests could starve)", ("max_num_seqs",)))


class RouterConfig(Section):
    policy: RouterPolicy = "least_loaded"
    """Routing policy of the Serve request router (cluster/serving/router.py): round_robin,
    least_loaded (power of two on load), prefix_affinity, session (x-session-id)."""
    load_bound_ratio: float = Field(0.5, ge=0)
    """Load bound of prefix_affinity and session: the preferred replica is taken only while its load
    <= (1 + load_bound_ratio) * least load + load_bound_slack; else the request falls back to
    least_loaded."""
    load_bound_slack: float = Field(4.0, ge=0)
    """The additive part of that load bound (see load_bound_ratio)."""
    kv_weight: float = Field(4.0, ge=0)
    """Weight of the KV-cache fraction in use in a replica's load (load = waiting + running + weight *
    kv_use)."""
    block_size: int = Field(16, ge=1)
    """Tokens per block of the prompt-prefix hashes prefix_affinity tracks."""
    prefix_blocks_per_replica: int = Field(65536, ge=1)
    """Prefix blocks remembered per replica (LRU), roughly what its KV cache holds."""
    stats_period_s: float = Field(1.0, gt=0)
    """Seconds between record_routing_stats calls on each replica."""


class AutoscalingSettings(Section):
    enabled: bool = False
    """Off: a fixed serving.replicas. On: replicas between min and max, from engine signals."""
    min_replicas: int = Field(1, ge=1)
    """Fewest replicas autoscaling keeps."""
    max_replicas: int = 4
    """Most replicas autoscaling starts."""
    target_ongoing_per_replica: float = Field(16.0, gt=0)
    """Target per replica of sequences waiting + running."""
    target_kv_use: float = Field(0.8, gt=0, le=1)
    """Target per replica of the KV-cache fraction in use."""
    upscale_delay_s: float = Field(30.0, ge=0)
    """Hysteresis: a scale-up is applied once wanted continuously this long."""
    downscale_delay_s: float = Field(300.0, ge=0)
    """Hysteresis: a scale-down is applied once wanted continuously this long."""
    look_back_period_s: float = Field(10.0, gt=0)
    """Window the per-replica signals are averaged over."""
    metrics_interval_s: float = Field(2.0, gt=0)
    """How often replicas report their signals."""

    @model_validator(mode="after")
    def _rules(self) -> AutoscalingSettings:
        return _raise_broken(self, _rule("max_replicas", self.max_replicas >= self.min_replicas,
                                         "must be >= serving.autoscaling.min_replicas", ("min_replicas",)))


class ServingConfig(Section):
    app_name: str = "gptoss"
    """Ray Serve application name."""
    replicas: int = Field(1, ge=1)
    """Model replicas (Serve deployment num_replicas)."""
    num_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per replica; 0 lets replicas share a 2-core box with Ray's own processes."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica."""
    max_ongoing_requests: int = Field(96, ge=1)
    """Requests Serve sends to one replica at once (Serve's max_ongoing_requests); at least
    engine.max_num_seqs + engine.max_waiting_requests lets the engine's own queue fill, so its
    waiting count means something to routing and autoscaling."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests waiting in a caller's queue before Serve rejects more (-1: unbounded, and then the
    front door does not refuse streams for lack of replica room either)."""
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)
    """Seconds Serve waits for in-flight requests when a replica stops."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Seconds `serve` waits for the replicas to be placed (resources found for them) before it
    reports what they ask for against what the cluster has, removes the app and exits non-zero.
    Serve reports an unplaceable replica after 30 s (RAY_SERVE_SLOW_STARTUP_WARNING_S), so the
    failure comes after the larger of the two."""
    max_replicas_per_node: int = Field(0, ge=0, le=100)
    """At most this many replicas on one Ray node (Serve's max_replicas_per_node, a hard limit:
    replicas beyond nodes x this stay pending), so a node's loss takes at most this many; 0: no
    limit, and Serve spreads single-actor replicas over the nodes as best it can (its default SPREAD
    scheduling, which packs when nodes are few). Not with placement groups (parallel.ep_size > 1,
    vLLM's Ray executor): Serve 2.60 refuses the two together."""
    keep_off_engine_cores: bool = True
    """`serve` keeps its own process, Ray's daemons and the replica actors off the cores a replica's
    engine binds its compute threads to (vLLM on CPU), on the node `serve` runs on
    (cluster/serving/engine_cores.py); nothing changes where no engine binds its threads."""
    user_code_on_main_loop: bool = True
    """Run the replica's methods on its main event loop rather than on a loop in a thread of their
    own (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0): a thread hop less per request and per
    streamed chunk. Our engines decode in threads of their own and never block the loop; the
    replica's constructor (model loading) then runs on that loop before it takes requests."""
    direct_stream: bool = True
    """Each replica also streams tokens to the front doors over a gRPC server of its own, so a request
    skips Serve's per-request machinery after Serve's router has chosen the replica
    (cluster/serving/direct_stream.py); off, or with Ray's TLS on, requests go through Serve's
    handle only."""
    replica_stream: ReplicaStreamKind = "socket"
    """How the direct stream carries requests. socket: one connection per front door and replica to a
    TLS socket the replica opens beside its gRPC server (same certificate and token) that carries all
    their requests, each message holding the chunks of every request ready at that moment, with flow
    control per request (cluster/serving/framed_socket.py; the least CPU per streamed token and the
    shortest hop); multiplexed: the same on one long-lived gRPC call instead
    (cluster/serving/multiplexed_stream.py); per_request: one gRPC call per request and a message per
    token chunk. The replica announces what it serves; front doors follow it (one that knows no
    socket uses the gRPC call)."""
    frontdoor_engine_client: bool = True
    """With engine.kind vllm: a front door on the same node as a replica streams from the replica's
    vLLM engine core itself, as a second client of it (as vLLM's own API servers are), one process
    fewer on every token's way; the replica's own client serves everything else. Needs the direct
    stream (through which the front door finds the engine) and an engine reachable over IPC sockets
    (one data-parallel rank, no Ray executor); elsewhere, and for front doors on other nodes,
    requests take the direct stream (cluster/engine/vllm_shared.py, cluster/serving/engine_clients.py)."""
    direct_stream_tls: bool = True
    """The direct stream's transport: TLS (besides the per-replica token), or plaintext when false
    (only on a network you trust: anyone on the path could read prompts and tokens)."""
    direct_stream_cert_file: str | None = None
    """The direct stream's certificate chain (PEM file, e.g. a mounted Secret); unset: Ray's TLS files
    when RAY_USE_TLS is on, else a fresh self-signed certificate per replica, announced to the front
    doors with its address (cluster/serving/direct_stream.py)."""
    direct_stream_key_file: str | None = None
    """The private key of direct_stream_cert_file (PEM)."""
    direct_stream_ca_file: str | None = None
    """The CA front doors check the direct stream's certificate with (PEM)."""
    direct_stream_server_name: str = ""
    """The name that certificate is issued for, when it is not the node's IP."""
    router: RouterConfig = Field(default_factory=RouterConfig)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)

    @model_validator(mode="after")
    def _rules(self) -> ServingConfig:
        return _raise_broken(self, _rule(
            "direct_stream_key_file", (self.direct_stream_cert_file is None) == (self.direct_stream_key_file is None),
            "must be set exactly when serving.direct_stream_cert_file is", ("direct_stream_cert_file",)))


class AuthConfig(Section):
    api_keys_file: str | None = None
    """API keys as "<tenant>:<key>" lines (# comments allowed), or a directory with one file per tenant
    holding its key(s) - what a Kubernetes Secret mounted as a volume looks like."""
    api_keys_env: str = "GPTOSS_API_KEYS"
    """Environment variable read at start for more keys, same "<tenant>:<key>" form (comma- or
    newline-separated); the keys never enter this configuration object or any log."""
    admin_tenants: str = ""
    """Tenants allowed to call gptoss.v1.Admin (comma-separated)."""
    allow_unauthenticated: bool = False
    """With no API keys configured, auth is off only on a loopback host; set this to serve
    unauthenticated on any other interface (behind a gateway that authenticates)."""
    loopback_admin: bool = False
    """gptoss.v1.Admin always needs the API key of an admin tenant; with this on, a call from this host
    (loopback or a unix socket) may call it without a key too."""
    reload_interval_s: float = Field(5.0, ge=0)
    """Seconds between checks of api_keys_file for changes (a rotated Secret is picked up without a
    restart; 0: read once at start)."""


class TlsConfig(Section):
    cert_file: str | None = None
    """PEM server certificate chain; with key_file, or neither (plaintext)."""
    key_file: str | None = None
    """PEM private key of cert_file."""
    client_ca_file: str | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS)."""

    @model_validator(mode="after")
    def _rules(self) -> TlsConfig:
        return _raise_broken(
            self,
            _rule("key_file", (self.cert_file is None) == (self.key_file is None),
                  "must be set exactly when frontdoor.tls.cert_file is", ("cert_file",)),
            _rule("client_ca_file", self.client_ca_file is None or self.cert_file is not None,
                  "needs frontdoor.tls.cert_file (mTLS is TLS)", ("cert_file",)))


class LimitsConfig(Section):
    """Per-tenant token buckets (each tenant, and the anonymous caller when auth is off, has its own).
    0 turns a limit off. A burst of 0 means one second's worth of the rate (at least 1)."""

    requests_per_s: float = Field(0.0, ge=0)
    """Requests per second one tenant may start."""
    request_burst: float = Field(0.0, ge=0)
    """Requests one tenant may start at once above requests_per_s."""
    tokens_per_s: float = Field(0.0, ge=0)
    """Tokens per second of one tenant: prompt plus generated tokens, charged as they are used; a tenant
    in debt is refused new calls until its bucket refills."""
    token_burst: float = Field(0.0, ge=0)
    """Tokens one tenant may use at once above the token rate."""
    tokens_per_min: float = Field(0.0, ge=0)
    """The same token budget per minute (the burst then defaults to one minute's worth); set this or
    tokens_per_s, not both."""
    max_concurrent_streams: int = Field(0, ge=0)
    """Streaming calls (Generate, Chat) one tenant may have open at once."""
    max_context_tokens: int = Field(0, ge=0)
    """Prompt tokens and generated tokens (max_tokens) one request of a tenant may have."""
    max_output_tokens: int = Field(0, ge=0)
    """Generated tokens (max_tokens) one request of a tenant may ask for; an unset max_tokens is capped
    at it."""
    tenants_file: str | None = None
    """YAML file of per-tenant overrides of these limits and of the role (cluster/frontdoor/tenants.py):
    tenants: {acme: {tokens_per_min: 60000, max_concurrent_streams: 8}, ops: {role: admin}}"""

    @model_validator(mode="after")
    def _rules(self) -> LimitsConfig:
        return _raise_broken(self, _rule(
            "tokens_per_min", not (self.tokens_per_min > 0 and self.tokens_per_s > 0),
            "and frontdoor.limits.tokens_per_s are one budget: set one of them", ("tokens_per_s",)))


class ResponseStoreConfig(Section):
    kind: ResponseStoreKind = "memory"
    """Where the HTTP Responses API keeps stored responses (store: true) for previous_response_id:
    "memory" lives in this front door process only (the embedded default; one process); "redis" is
    shared by every front door replica and survives their restarts."""
    redis_url: str = ""
    """redis://[:password@]host:port/db (or rediss:// for TLS); required for kind redis."""
    ttl_s: float = Field(86400.0, gt=0)
    """Seconds a stored response is kept after it was written."""
    max_response_bytes: int = Field(1 << 20, ge=1024)
    """A response (with the conversation it continues) larger than this is not stored."""
    max_entries: int = Field(10000, ge=1)
    """memory: most responses kept (least recently written go first)."""

    @model_validator(mode="after")
    def _rules(self) -> ResponseStoreConfig:
        return _raise_broken(self, _rule(
            "redis_url", self.kind != "redis" or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "must be a redis://, rediss:// or unix:// URL for kind redis", ("kind",)))


class FrontdoorConfig(Section):
    host: str = "127.0.0.1"
    """Interface the gRPC and metrics servers bind to."""
    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0: pick a free one)."""
    metrics_port: int = Field(9464, ge=-1, le=65535)
    """Prometheus /metrics port (0: pick a free one; -1: no metrics server)."""
    http_port: int = Field(8088, ge=-1, le=65535)
    """OpenAI-compatible HTTP API port (0: pick a free one; -1: no HTTP API)."""
    grace_period_s: float = Field(120.0, ge=0)
    """Seconds in-flight RPCs get to finish on shutdown (SIGTERM, Admin.Drain without timeout): sized
    for a chat's stream. Helm's terminationGracePeriodSeconds follows it."""
    max_concurrent_rpcs: int = Field(0, ge=0)
    """gRPC's own cap on concurrent RPCs (0: none). Its refusals carry no error details, so keep it off
    or well above what the replicas hold: the front door's admission refuses a stream the routable
    replicas have no room for (RESOURCE_EXHAUSTED with RetryInfo) before this cap is hit."""
    replica_wait_s: float = Field(30.0, gt=0)
    """Seconds a request may wait for Serve to find it a replica (none routable: all dead, not yet
    placed) before it is answered UNAVAILABLE with RetryInfo."""
    migration_attempts: int = Field(3, ge=0)
    """Times a stream whose replica dies mid-way is resumed on another replica (prompt + tokens already
    sent; see cluster/frontdoor/migration.py); 0: never, the call ends UNAVAILABLE."""
    load_poll_interval_s: float = Field(5.0, ge=0)
    """Seconds between polls of the replicas' load reports for the gptoss_replica_* metrics (0: no
    polling; GetLoads still refreshes them)."""
    slow_first_token_s: float = Field(0.0, ge=0)
    """Log a warning for every stream, either API, whose first token took longer than this many
    seconds, with where the time went: the front door before the request left, the way to the
    replica and back, the replica (its engine's queue and prefill), the front door after (0: off)."""
    usage_log: str = ""
    """Where usage records go (one JSON line per finished Generate/Chat call, cluster/frontdoor/usage.py):
    "stdout", "stderr", a file path, or "" (the `gptoss.usage` logger, off at the default log level)."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    responses: ResponseStoreConfig = Field(default_factory=ResponseStoreConfig)


class RayConfig(Section):
    address: str | None = None
    """Existing Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None: start a local one."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs the local Ray advertises; None: the machine's core count."""
    temp_dir: str | None = None
    """Ray's temp/session directory for a local cluster; None: Ray's default (/tmp/ray)."""
    gcs_reconnect_timeout_s: float = Field(60.0, gt=0)
    """Seconds `gptoss-cluster frontdoor` keeps serving while the Ray cluster's GCS does not answer
    (a head restart with GCS fault tolerance: replicas keep streaming, the router keeps routing)
    before it exits as having lost the cluster. Match RAY_gcs_rpc_server_reconnect_timeout_s, after
    which Ray's own processes give up (Ray's default 60 s; the Helm chart sets both from
    ray.gcsFaultTolerance.reconnectTimeoutS)."""


class ParallelConfig(Section):
    ep_size: int = Field(1, ge=1, le=64)
    """Expert-parallel ranks per replica: one worker process per GPU (a CPU bundle without GPUs), each
    holding 1/ep_size of the experts and of the attention heads (gpt-oss: ep_size <= 8)."""
    placement_strategy: PlacementStrategy = "STRICT_PACK"
    """Placement-group strategy for a replica's ep_size bundles: STRICT_PACK keeps them on one node
    (NVLink); PACK or SPREAD let a group span nodes."""
    placement_policy: PlacementPolicy = "contiguous"
    """Initial expert -> rank map: contiguous ranges (as vLLM) or round_robin."""
    rebalance_interval_s: float = Field(0.0, ge=0)
    """Seconds between expert rebalancings from the recorded loads (0: never rebalance)."""
    redundant_experts: int = Field(0, ge=0)
    """Extra copies of hot experts per layer a rebalancing may place (tokens split among copies)."""
    stats_window_steps: int = Field(256, ge=1)
    """Engine steps of expert-load history the planner and the imbalance gauge look at."""
    expert_token_series: bool = True
    """gptoss_expert_tokens_total on /metrics: layers x experts series per replica (36 x 128 for 120b).
    Off keeps the per-layer imbalance gauge and the rebalance count."""
    bundle_cpus: float = Field(0.1, gt=0)
    """CPUs reserved per bundle (rank); small so groups fit a 2-core test box."""
    collective_timeout_s: float = Field(10.0, gt=0)
    """Seconds a collective may wait for a peer before the step fails (a dead rank -> UNAVAILABLE)."""


class ClusterConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    frontdoor: FrontdoorConfig = Field(default_factory=FrontdoorConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    cache_dir: str = "~/.cache/gptoss-cluster"
    """Where built checkpoints are cached."""
    log_level: LogLevel = "warning"
    """Log level of our own loggers (Ray and Serve stay at warning unless this is debug)."""

    @model_validator(mode="after")
    def _rules(self) -> ClusterConfig:
        return _raise_broken(self, _rule("parallel.ep_size", self.parallel.ep_size == 1 or self.engine.kind == "torch",
                                         "needs engine.kind torch", ("engine.kind",)))

    def validate(self) -> ClusterConfig:  # type: ignore[override]  # pydantic's deprecated classmethod
        """Check every value again (fields may have been assigned since loading); raise one ConfigError
        naming every invalid key, or return self."""
        _build(self.model_dump(), {}, "")
        return self

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


def get_path(config: Any, path: str) -> Any:
    for part in path.split("."):
        config = getattr(config, part)
    return config


def _leaves(cls: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key's dotted path -> its FieldInfo."""
    paths: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            paths.update(_leaves(info.annotation, f"{prefix}{name}."))
        else:
            paths[prefix + name] = info
    return paths


FIELDS = _leaves(ClusterConfig)


def _is_optional(path: str) -> bool:
    annotation = FIELDS[path].annotation
    return isinstance(annotation, types.UnionType) and type(None) in typing.get_args(annotation)


def _type_name(path: str) -> str:
    annotation = FIELDS[path].annotation
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    return getattr(base, "__name__", str(base))


def rule_text(path: str) -> str:
    """What the field at `path` accepts ("must be in [0, 65535]"), from its declared constraints."""
    info = FIELDS[path]
    if typing.get_origin(info.annotation) is Literal:
        return "must be one of " + ", ".join(repr(c) if c == "" else str(c) for c in typing.get_args(info.annotation))
    bounds = {name: getattr(m, name) for m in info.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = (bounds["le"], "]") if "le" in bounds else (bounds["lt"], ")") if "lt" in bounds else None
    if low and high:
        return f"must be in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"must be {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"must be {'<=' if high[1] == ']' else '<'} {high[0]}"
    return f"must be {_type_name(path)}"


_CONSTRAINT_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "literal_error"}


def _shown(path: str, value: Any) -> Any:
    """The value as the field's type holds it (5000 or "5000" for a float field shows as 5000.0)."""
    base = {"float": float, "int": int}.get(_type_name(path))
    if base is not None and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return base(value)
        except ValueError:
            pass
    return value


def _message(error: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    source = f" ({sources[path]})" if path in sources else ""
    kind, value = error["type"], error.get("input")
    if kind == "rule":
        return f"config: {path} {error['msg']}, got {value!r}"
    if kind == "extra_forbidden":
        return f"config: unknown field {path!r}{source}"
    if path not in FIELDS:  # a section given something else than a mapping
        return f"config: {path} must be a mapping, got {value!r}{source}"
    if kind in _CONSTRAINT_ERRORS:
        return f"config: {path} {rule_text(path)}, got {_shown(path, value)!r}"
    if value is None:
        return f"config: {path} must not be empty{source}"
    if kind == "finite_number":
        return f"config: {path} must be a finite number, got {value!r}{source}"
    return f"config: {path} must be {_type_name(path)}, got {value!r}{source}"


def _error_path(error: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(part) for part in error["loc"])


def _without(data: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """A copy of nested `data` with the values at `paths` taken out (defaults stand in for them)."""
    out = copy.deepcopy(dict(data))
    for path in paths:
        target: Any = out
        for part in path[:-1]:
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            target.pop(path[-1], None)
    return out


def _rule_reads(error: Mapping[str, Any]) -> set[tuple[str, ...]]:
    """The key paths a broken rule looked at: the one it names and the ones it read."""
    loc = _error_path(error)
    model_at = loc[:len(loc) - len(error["ctx"]["field"].split("."))]
    return {loc} | {model_at + tuple(r.split(".")) for r in error["ctx"]["reads"]}


def _build(data: Mapping[str, Any], sources: Mapping[str, str], default_source: str) -> ClusterConfig:
    """Validate nested `data` into a ClusterConfig, or raise one ConfigError naming every bad key.

    pydantic checks a model's rules between fields only when everything inside it is valid, so
    after errors the data is checked again without the values named so far (defaults stand in), and
    the rules that broke without reading any of those are reported too; a round per nesting level."""
    errors: list[dict[str, Any]] = []
    removed: set[tuple[str, ...]] = set()
    while True:
        try:
            config = ClusterConfig.model_validate(_without(data, removed))
        except ValidationError as err:
            broken = err.errors()
        else:
            if not errors:
                return config
            break
        # A rule that read a removed value may have broken only because a default stood in for it:
        # not reported, but taken out too so the rules around it run.
        errors += [e for e in broken if e["type"] != "rule" or not _rule_reads(e) & removed]
        before = len(removed)
        removed |= {_error_path(e) for e in broken}
        if len(removed) == before:
            break
    sources = {**dict.fromkeys(FIELDS, default_source), **sources} if default_source else sources
    raise ConfigError(*dict.fromkeys(_message(e, sources) for e in errors))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in FIELDS:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `path` in nested `data`; an optional field takes "", "none" and "null" for None."""
    if path in FIELDS and _is_optional(path) and isinstance(value, str) and value.lower() in ("", "none", "null"):
        value = None
    *parents, leaf = path.split(".")
    target = data
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            return  # the section itself holds a non-mapping: that is the error reported
        target = child
    target[leaf] = value


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
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[tuple[str, Any, str]] = []
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config: {yaml_path} must hold a mapping at the top level")
        layers += [(path, value, str(yaml_path)) for path, value in _flatten(loaded).items()]
    env = os.environ if env is None else env
    layers += [(path, env[env_var_name(path)], env_var_name(path)) for path in FIELDS if env_var_name(path) in env]
    layers += [(path, value, "command line") for path, value in (overrides or {}).items() if value is not None]
    for path, value, source in layers:
        _put(data, path, value)
        sources[path] = source
    return _build(data, sources, "")


def to_dict(config: ClusterConfig) -> dict[str, Any]:
    return config.model_dump()


def from_dict(data: Mapping[str, Any]) -> ClusterConfig:
    """Rebuild a ClusterConfig from to_dict() output (e.g. the args of a Serve config file)."""
    nested: dict[str, Any] = {}
    for path, value in _flatten(data).items():
        _put(nested, path, value)
    return _build(nested, {}, "dict")


def _type_text(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{c!r}`" if c == "" else f"`{c}`" for c in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType):
        return " or ".join("none" if a is type(None) else a.__name__ for a in typing.get_args(annotation))
    return annotation.__name__


def _sections(cls: type[BaseModel], prefix: str = "") -> Iterable[tuple[str, type[BaseModel]]]:
    yield prefix, cls
    for name, info in cls.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _sections(info.annotation, f"{prefix}{name}.")


def markdown_reference() -> str:
    """docs/configuration.md: every key with its type, default, constraint, environment variable and
    description, from the models above (tests/test_config_docs.py keeps the committed file current)."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from cluster/config.py by `python -m cluster.config --markdown > docs/configuration.md`;",
        "     edit the field docstrings there, not this file (tests/test_config_docs.py checks it is current). -->",
        "",
        "A deployment has one configuration, `ClusterConfig` in `cluster/config.py`. Its sources, later ones",
        "winning: the defaults below (which run the embedded path: a local Ray, the gpt-oss-tiny model, CPU), a",
        "YAML file (`--config`), environment variables `GPTOSS_<KEY PATH>` (`GPTOSS_SERVING_REPLICAS=2`), then",
        "command-line flags. An optional key takes `none`, `null` or an empty string for none. Loading reports",
        "every invalid key at once, one `config: <key path> ...` line each. The Helm chart sets these keys from",
        "its camelCase values (`helm/gptoss-cluster/templates/_helpers.tpl`); `deploy/config.example.yaml` is",
        "an example file.",
    ]
    for prefix, cls in _sections(ClusterConfig):
        leaves = [(name, info) for name, info in cls.model_fields.items()
                  if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))]
        if not leaves:
            continue
        lines += ["", f"## `{prefix.rstrip('.')}`" if prefix else "## Top level", ""]
        if cls.__doc__ and cls is not ClusterConfig and cls.__doc__ != Section.__doc__:
            lines += [" ".join(cls.__doc__.split()), ""]
        lines += ["| Key | Type | Default | Accepts | Environment variable | Description |",
                  "|---|---|---|---|---|---|"]
        for name, info in leaves:
            path = prefix + name
            default = info.get_default(call_default_factory=True)
            accepts = rule_text(path).removeprefix("must be ") if info.metadata else ""
            description = " ".join((info.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{path}` | {_type_text(info.annotation)} | `{yaml.safe_dump(default).splitlines()[0]}` "
                         f"| {accepts} | `{env_var_name(path)}` | {description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m cluster.config --markdown  (prints docs/configuration.md)")
    sys.stdout.write(markdown_reference())
