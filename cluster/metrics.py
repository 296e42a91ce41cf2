"""Every Prometheus metric of gptoss-cluster, defined once.

Names follow the Prometheus guide: prefix `gptoss_`, subsystem, base units in the name
(`_seconds`, `_tokens_total`), counters end in `_total`. Each front door owns one
`FrontdoorMetrics` bound to a registry (the process default unless a test passes its own),
served over HTTP by `serve_metrics`. The `gptoss_replica_*` families are the engines' own
statistics (label `replica`: Ray Serve's replica id), as the front door last polled them from
the replicas' load reports; `ReplicaLoadCollector` exposes them, and the `gptoss_expert_*`
families of expert-parallel replicas from the same reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

# Latency buckets: from sub-millisecond (tiny model, CPU) to a minute (large prompts, cold replicas).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class _Families:
    """Declares metric families on one registry, each labelled by `labels` first (the label list its
    group shares), then by its own; a histogram has the latency buckets unless it says otherwise."""

    def __init__(self, registry: CollectorRegistry, *labels: str) -> None:
        self.registry = registry
        self.labels = labels

    def __call__(self, kind: type[_Metric], name: str, documentation: str, *labels: str, **options) -> _Metric:
        if kind is Histogram:
            options.setdefault("buckets", _LATENCY_BUCKETS_S)
        return kind(name, documentation, [*self.labels, *labels], registry=self.registry, **options)


class FrontdoorMetrics:
    """Metrics the front door records, one set per registry. `api` is grpc (gptoss.v1) or http
    (the OpenAI-compatible routes, whose `method` is the route path, e.g. /v1/chat/completions);
    `code` is the canonical status name for both (errors.py maps each internal error to one)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        per_method, declare = _Families(registry, "api", "method"), _Families(registry)
        self.requests_total = per_method(
            Counter, "gptoss_frontdoor_requests_total",
            "Requests finished, by API, method and canonical (gRPC) status code.", "code")
        self.requests_in_flight = per_method(
            Gauge, "gptoss_frontdoor_requests_in_flight", "Requests being served now, by API and method.")
        self.time_to_first_token_seconds = per_method(
            Histogram, "gptoss_frontdoor_time_to_first_token_seconds",
            "Time from receiving a streaming RPC to sending its first token.")
        self.inter_token_latency_seconds = per_method(
            Histogram, "gptoss_frontdoor_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream as clients see them (a chunk of n "
            "tokens after t seconds counts as n observations of t/n).")
        self.request_duration_seconds = per_method(
            Histogram, "gptoss_frontdoor_request_duration_seconds", "Time from receiving an RPC to its end, by method.")
        self.prompt_tokens_total = per_method(
            Counter, "gptoss_frontdoor_prompt_tokens_total", "Prompt tokens of requests sent to the model, by method.")
        self.completion_tokens_total = per_method(
            Counter, "gptoss_frontdoor_completion_tokens_total", "Tokens generated and streamed to clients, by method.")
        self.rejected_requests_total = per_method(
            Counter, "gptoss_frontdoor_rejected_requests_total",
            "RPCs refused with RESOURCE_EXHAUSTED, by method and reason (MODEL_OVERLOADED: the "
            "replicas or Serve's queue are full; TENANT_RATE_LIMITED: the tenant's limits).", "reason")
        self.routable_replicas = declare(
            Gauge, "gptoss_frontdoor_routable_replicas",
            "Model replicas this front door can send requests to now; at 0 its health is "
            "NOT_SERVING (degraded) and requests wait at most frontdoor.replica_wait_s.")
        self.migrations_total = declare(
            Counter, "gptoss_frontdoor_migrations_total",
            "Streams whose replica failed mid-stream, by outcome (resumed: continued on another "
            "replica; exhausted: frontdoor.migration_attempts used up; no_replica: no replica took "
            "the rest; deadline: the call's deadline left no time; constrained: a structured-output "
            "stream on an engine that cannot resume its grammar, vLLM).", "outcome")

        self.tenant = TenantUsageMetrics(registry)

        self.replicas = ReplicaLoadCollector()
        registry.register(self.replicas)
        self.autoscaler = AutoscalerMetrics(registry)


class TenantUsageMetrics:
    """Usage per tenant, for billing (cluster/frontdoor/usage.py). Label `tenant` is bounded: a
    configured tenant's name, `_other` for any other, `_anonymous` when auth is off."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        per_tenant = _Families(registry, "tenant")
        self.tokens_total = per_tenant(
            Counter, "gptoss_tenant_tokens_total",
            "Tokens of finished Generate/Chat calls by tenant and type: prompt (sent to the model), "
            "cached_prompt (of those, served from the prefix cache), reasoning (of the completion, in "
            "analysis messages), completion (streamed to the client, cancelled and failed calls included).", "type")
        self.requests_total = per_tenant(
            Counter, "gptoss_tenant_requests_total",
            "Finished Generate/Chat calls of authenticated tenants, by tenant and gRPC status code.", "code")


class RouterMetrics:
    """Metrics of the Serve request routers (cluster/serving/router.py). A router runs in the
    process that holds the deployment handle - the front door - so these register there."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        per_deployment = _Families(registry, "application", "deployment")
        self.decisions_total = per_deployment(
            Counter, "gptoss_router_decisions_total",
            "Routing decisions, by deployment, policy and outcome (chosen: no preference involved; "
            "affinity_hit: the replica holding the prefix/session was taken; fallback: it was over "
            "the load bound, least_loaded chose; no_affinity: nothing to prefer).", "policy", "outcome")
        self.prefix_matched_blocks = per_deployment(
            Histogram, "gptoss_router_prefix_matched_blocks",
            "Prompt-prefix blocks (serving.router.block_size tokens each) found on the best replica "
            "per prefix_affinity decision.", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.replica_load = per_deployment(
            Gauge, "gptoss_router_replica_load",
            "Load of each replica as the router last saw it: waiting + running sequences (the larger "
            "of the replica's report and this router's in-flight count) + kv_weight x KV-cache use.", "replica")
        self.replicas = per_deployment(Gauge, "gptoss_router_replicas", "Replicas the router can route to now.")
        self.streams_total = per_deployment(
            Counter, "gptoss_router_streams_total",
            "Generate streams by the way they reached the replica the router chose (direct: the "
            "replica's own gRPC stream; engine_client: from the replica's vLLM engine core, to which "
            "this front door is attached on the same node; serve_handle: through the Serve handle, because the replica "
            "publishes no direct stream or the channel to it is not connected yet; "
            "serve_handle_after_refusal: the replica refused the direct stream before its first token "
            "- full, stopping or unreachable - and the handle routed it again).", "path")


class AutoscalerMetrics:
    """Replica counts of the front door's deployment, polled from the Serve controller by the
    front door's load poller (cluster.frontdoor.loads.LoadPoller); part of FrontdoorMetrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        per_deployment = _Families(registry, "application", "deployment")
        self.desired_replicas = per_deployment(
            Gauge, "gptoss_autoscaler_desired_replicas",
            "Replicas the autoscaling policy asks for (Serve's target), by deployment.")
        self.replicas = per_deployment(Gauge, "gptoss_autoscaler_replicas", "Replicas running now, by deployment.")


_process_metrics: dict[type, object] = {}


def router_metrics() -> RouterMetrics:
    """The process's RouterMetrics on the default registry (one per process: every router shares it)."""
    if _process_metrics.get(RouterMetrics) is None:
        _process_metrics[RouterMetrics] = RouterMetrics()
    return _process_metrics[RouterMetrics]


class ServeInternalsMetrics:
    """Ray Serve internals the direct path needs but did not find (cluster/serving/serve_internals.py);
    counted in the process that looked them up (the front door)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.unavailable_total = _Families(registry)(
            Counter, "gptoss_serve_internal_unavailable_total",
            "Lookups of a Ray Serve private attribute that was not there (after a Ray upgrade), by "
            "item; while it grows, requests take the slower Serve handle path instead of the direct one.", "item")


def serve_internals_metrics() -> ServeInternalsMetrics:
    """The process's ServeInternalsMetrics on the default registry."""
    if _process_metrics.get(ServeInternalsMetrics) is None:
        _process_metrics[ServeInternalsMetrics] = ServeInternalsMetrics()
    return _process_metrics[ServeInternalsMetrics]


class _Registries:
    """Collects several registries as one, for one /metrics page."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self):
        for registry in self.registries:
            yield from registry.collect()


# One line a family: (name, help, how to read it from an engine's stats (cluster.engine.protocol.EngineStats)).
_REPLICA_FAMILIES = (
    ("gptoss_replica_waiting_requests", "Requests queued in the replica's engine, waiting for a place in the batch.", lambda s: s.waiting_requests),
    ("gptoss_replica_running_requests", "Requests in the replica's running batch.", lambda s: s.running_requests),
    ("gptoss_replica_kv_cache_usage_ratio", "Fraction of the replica's KV-cache blocks in use (0-1).", lambda s: s.kv_cache_usage),
    ("gptoss_replica_kv_cache_blocks", "KV-cache blocks the replica's engine can hand out.", lambda s: s.kv_blocks_total or None),
    ("gptoss_replica_generation_tokens_per_second", "Tokens the replica generated per second, over its last few seconds.", lambda s: s.generation_tokens_per_s),
    ("gptoss_replica_generation_tokens_total", "Tokens the replica generated since it started.", lambda s: s.tokens_generated_total),
    ("gptoss_replica_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the replica's prefix cache.", lambda s: s.prefix_cache_queried_tokens_total),
    ("gptoss_replica_prefix_cache_hit_tokens_total", "Prompt tokens whose KV blocks the prefix cache supplied.", lambda s: s.prefix_cache_hit_tokens_total),
    ("gptoss_replica_preemptions_total", "Running requests evicted to free KV blocks (recomputed later).", lambda s: s.preemptions_total),
)


def _collected_family(name: str, documentation: str, labels) -> CounterMetricFamily | GaugeMetricFamily:
    """An empty family for a collector to fill: a counter when its name ends in _total, else a gauge."""
    kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
    return kind(name, documentation, labels=labels)


class ReplicaLoadCollector(Collector):
    """The replicas' engine statistics as last reported, one series per replica.

    A poll samples replicas through Serve's router and may miss one, so a replica's series stays
    until it has not been seen for `stale_after_s`.
    """

    def __init__(self, stale_after_s: float = 30.0) -> None:
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()  # updated on the front door's loop, read by the HTTP thread
        self._reports: dict[str, tuple[float, object]] = {}  # replica id -> (seen at, stats)

    def update(self, reports: Iterable[tuple[str, object]]) -> None:
        now = time.monotonic()
        with self._lock:
            for replica_id, stats in reports:
                self._reports[replica_id] = (now, stats)
            for replica_id in [r for r, (seen, _) in self._reports.items() if now - seen > self.stale_after_s]:
                del self._reports[replica_id]

    def describe(self):
        return []  # series appear with the first report; nothing to check at registration

    def collect(self):
        with self._lock:
            reports = sorted((rid, stats) for rid, (_, stats) in self._reports.items())
        for name, documentation, read in _REPLICA_FAMILIES:
            family = _collected_family(name, documentation, ["replica"])
            for replica_id, stats in reports:
                value = read(stats)
                if value is not None:
                    family.add_metric([replica_id], float(value))
            yield family
        yield from _expert_families(reports)


# Expert-parallel replicas only (parallel.ep_size > 1): their rank 0 sees every token's routing.
# Cardinality: gptoss_expert_tokens_total has layers x experts series per replica (36 x 128 for
# 120b); the imbalance gauge, one per layer, is the cheap signal to alert on.
_EXPERT_FAMILIES = (
    ("gptoss_expert_tokens_total", "Tokens routed to each expert (each token counts once per chosen expert).",
     ("replica", "layer", "expert")),
    ("gptoss_expert_imbalance_ratio",
     "Per-rank expert load max/mean over the recent window under the current placement (1 = balanced).",
     ("replica", "layer")),
    ("gptoss_expert_rebalances_total", "Expert placements the replica's rebalancer applied.", ("replica",)),
)


def _expert_families(reports: list[tuple[str, object]]):
    loads = [(rid, stats.expert_load) for rid, stats in reports if getattr(stats, "expert_load", None) is not None]
    if not loads:
        return
    tokens, imbalance, rebalances = (_collected_family(*family) for family in _EXPERT_FAMILIES)
    for replica_id, load in loads:
        for layer, row in enumerate(load.tokens_per_expert_total):
            for expert, n in enumerate(row):
                tokens.add_metric([replica_id, str(layer), str(expert)], float(n))
        for layer, ratio in enumerate(load.imbalance):
            imbalance.add_metric([replica_id, str(layer)], float(ratio))
        rebalances.add_metric([replica_id], float(load.rebalances_total))
    yield from (tokens, imbalance, rebalances)


def serve_metrics(metrics: FrontdoorMetrics, host: str, port: int):
    """Serve /metrics for `metrics` on host:port (0: a free port) from a daemon thread.

    Returns the HTTP server: `server.server_address[1]` is the port, `server.shutdown()` stops it.
    Metrics on the process's default registry (the routers' and autoscaler's) are served too, so
    this page is the cluster-wide view even when `metrics` has a registry of its own.
    """
    registry = metrics.registry if metrics.registry is REGISTRY else _Registries(metrics.registry, REGISTRY)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
