"""FrontdoorServer: the grpc.aio server with gptoss.v1.Inference, gptoss.v1.Admin, health and
reflection, optional TLS/mTLS, API-key auth, per-tenant limits and drain; and, on the same event
loop and core, the OpenAI-compatible HTTP API (frontdoor.http_port; http/).

At start it asks the Serve application for its ModelInfo (which also waits for a replica to be
ready), decides whether auth is on (API keys configured; off only on a loopback host, or when
explicitly allowed, and says so in the log), and reports SERVING for every service through
grpc.health.v1. A drain (Admin.Drain, or stop()) turns health NOT_SERVING, refuses new calls
with UNAVAILABLE and waits for calls in flight; stop() then cancels what is left. While it runs
with a metrics server it polls the replicas' load reports for the gptoss_replica_* metrics.

It also watches how many replicas its router can reach (gptoss_frontdoor_routable_replicas):
with none, the Inference service (and the server's overall health, "") reports NOT_SERVING until
one is back, so a load balancer sends the traffic elsewhere; requests that still arrive wait at
most frontdoor.replica_wait_s.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray.serve.handle import DeploymentHandle

from cluster.config import ConfigError, FrontdoorConfig
from cluster.frontdoor.admission import Admission, safe_deserializer
from cluster.frontdoor.auth import ApiKeys, ReloadingApiKeys, admin_tenants
from cluster.frontdoor.loads import LoadPoller
from cluster.frontdoor.limits import TenantLimits
from cluster.frontdoor.ports import NO_REUSEPORT, PortUnavailable
from cluster.frontdoor.servicer import InferenceServicer, fail
from cluster.frontdoor.tenants import Tenants
from cluster.frontdoor.usage import UsageRecorder, configure_usage_log
from cluster.harmony.tokenizer import load_tokenizer
from cluster.metrics import FrontdoorMetrics, serve_metrics
from cluster.serving.handles import close_loop_handle, loop_handle
from cluster.serving.model_info import ModelInfo
from gptoss.v1 import admin_pb2, admin_pb2_grpc
from gptoss.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "gptoss.v1.Inference"
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name  # "gptoss.v1.Admin"
REPLICA_WATCH_S = 0.5  # how often the routable-replica count is read (a local lookup, no call)
# The most each step of closing may take once the drain is over (stop() then returns within the
# grace period plus 7 of these): Helm's terminationGracePeriodSeconds leaves 15 s after the grace
# for closing and stopping Ray, and a step that waits on a dead replica or node must not use them up.
CLOSE_STEP_S = 2.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generic_handler(servicer, service) -> grpc.GenericRpcHandler:
    """The service's method handlers, with a deserializer that hands an undecodable message to
    the RPC (which answers INVALID_ARGUMENT) instead of grpc's bare INTERNAL."""
    from google.protobuf import message_factory

    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=safe_deserializer(request_class),
                                     response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, server: "FrontdoorServer") -> None:
        self._server = server

    async def Drain(self, request: admin_pb2.DrainRequest, context):
        admission = self._server.admission
        call, problem = admission.open("Drain", context)
        try:
            await admission.admit(call, problem, request, context, admin=True)
            call.logger(log).warning("drain requested")
            at_start = max(0, admission.in_flight - 1)
            timeout = request.timeout_s if request.timeout_s > 0 else None
            left = await self._server.drain(timeout, besides=1)
            return admin_pb2.DrainResponse(in_flight_at_start=at_start, in_flight_at_end=left)
        except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
            await fail(context, err, call)
        finally:
            admission.leave()


    async def Resume(self, request: admin_pb2.ResumeRequest, context):
        admission = self._server.admission
        call, problem = admission.open("Resume", context)
        try:
            await admission.admit(call, problem, request, context, admin=True)
            was_draining = await self._server.resume()
            call.logger(log).warning("resume requested (was draining: %s)", was_draining)
            return admin_pb2.ResumeResponse(was_draining=was_draining)
        except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
            await fail(context, err, call)
        finally:
            admission.leave()


def freeze_startup_heap() -> None:
    """Collect, then move every object alive now out of the collector's reach (gc.freeze), once a
    front door process has started: the Ray driver, Serve's router, gRPC and the tokenizer leave
    ~300k long-lived objects that each full collection would otherwise walk again, holding the
    event loop (and every stream on it) for tens of ms, far more on a core shared with an engine.
    Serve does the same in its proxy and replicas, vLLM in its API server."""
    gc.collect()
    gc.freeze()


class FrontdoorServer:
    def __init__(self, handle: DeploymentHandle, config: FrontdoorConfig,
                 metrics: FrontdoorMetrics | None = None, *, api_keys: ApiKeys | None = None,
                 bind_to_loop: bool = True) -> None:
        """api_keys: the key table; None loads it from config.auth (file and environment).
        bind_to_loop: serve through our own handle routed on the serving loop (below); False uses
        `handle` as given (a test's scripted stand-in for a Serve handle)."""
        self._handle = handle
        self._bind_to_loop = bind_to_loop
        self._loop_handle = None  # ours, made in start() on the serving loop
        self._config = config
        self.metrics = metrics or FrontdoorMetrics()
        self._api_keys = api_keys
        self._server: grpc.aio.Server | None = None
        self._inference: InferenceServicer | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http = None
        self._poller: LoadPoller | None = None
        self._watcher: asyncio.Task | None = None
        self._left_behind: set[asyncio.Future] = set()  # close steps that overran (kept from garbage collection)
        self._routable: int | None = None  # replicas the router can reach, as last read
        self.admission: Admission | None = None
        self.info: ModelInfo | None = None
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self._http = None
        self._store = None
        self.metrics_port: int | None = None
        self.auth_notice = ""
        self.tenants = Tenants.from_config(config.limits, admin_tenants(config.auth))

    def _auth(self) -> ApiKeys | ReloadingApiKeys | None:
        keys = self._api_keys if self._api_keys is not None else \
            ReloadingApiKeys(self._config.auth, admins=self.tenants.admins)
        if len(keys):
            self.auth_notice = f"auth: on ({len(keys.tenants)} tenants)"
            return keys
        if not (is_loopback(self._config.host) or self._config.auth.allow_unauthenticated):
            raise ConfigError(f"config: frontdoor.auth: no API keys configured for host {self._config.host}; "
                              "set frontdoor.auth.api_keys_file or $" + (self._config.auth.api_keys_env or "?")
                              + ", or frontdoor.auth.allow_unauthenticated=true behind an authenticating gateway")
        admin = ("gptoss.v1.Admin from this host only" if self._config.auth.loopback_admin
                 else "gptoss.v1.Admin refused to everyone")
        self.auth_notice = (f"auth: OFF - no API keys configured; every caller of {self._config.host} is trusted "
                            f"with inference ({admin})")
        return None

    def _billed_tenants(self) -> set[str]:
        """Tenants with their own usage label: those with keys and those configured in the tenants file."""
        keys = self.admission.api_keys if self.admission is not None else None
        return self.tenants.names | set(keys.tenants if keys is not None else ())

    def _credentials(self) -> grpc.ServerCredentials | None:
        tls = self._config.tls
        if tls.cert_file is None:
            return None
        client_ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
        return grpc.ssl_server_credentials([(Path(tls.key_file).read_bytes(), Path(tls.cert_file).read_bytes())],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)

    async def start(self) -> None:
        configure_usage_log(self._config.usage_log)
        api_keys = self._auth()
        credentials = self._credentials()
        # Our own handle, routed on this loop and talking gRPC to the replicas (serving/handles.py);
        # the caller's handle stays usable for synchronous calls.
        handle = self._loop_handle = loop_handle(self._handle) if self._bind_to_loop else self._handle
        try:
            await self._start(handle, api_keys, credentials)
        except BaseException:
            await self._close()  # a port in use: nothing of ours outlives the failed start
            raise

    async def _start(self, handle, api_keys: ApiKeys | None, credentials: grpc.ServerCredentials | None) -> None:
        self.info = await handle.model_info.remote()
        # Built now (about 0.2 s) rather than by the first request, which would hold this loop,
        # and every call that arrives with it, for that long.
        await asyncio.get_running_loop().run_in_executor(None, load_tokenizer)
        self.admission = Admission(api_keys, TenantLimits(self.tenants),
                                   loopback_admin=self._config.auth.loopback_admin)
        server = self._server = grpc.aio.server(maximum_concurrent_rpcs=self._config.max_concurrent_rpcs or None,
                                                options=[NO_REUSEPORT])
        usage = UsageRecorder(self.metrics.tenant, self._billed_tenants, self.info.model_name)
        inference = self._inference = InferenceServicer(handle, self.info, self.metrics, self.admission,
                                                        replica_wait_s=self._config.replica_wait_s,
                                                        migration_attempts=self._config.migration_attempts,
                                                        usage=usage,
                                                        slow_first_token_s=self._config.slow_first_token_s)
        server.add_generic_rpc_handlers((
            generic_handler(inference, pb.DESCRIPTOR.services_by_name["Inference"]),
            generic_handler(AdminServicer(self), admin_pb2.DESCRIPTOR.services_by_name["Admin"]),
        ))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host, port = self._config.host, self._config.grpc_port
        address = f"{host}:{port}"
        try:
            if credentials is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc reports a port in use this way (or as port 0)
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise PortUnavailable("frontdoor.grpc_port", host, port, "address in use or not available")
        await server.start()
        if self._config.http_port >= 0:
            await self._start_http(inference)
        await self._health.set(ADMIN_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self._set_inference_health()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_replicas())
        if self._config.metrics_port >= 0:
            try:
                self._metrics_http = serve_metrics(self.metrics, host, self._config.metrics_port)
            except OSError as err:
                raise PortUnavailable("frontdoor.metrics_port", host, self._config.metrics_port,
                                      err.strerror or str(err)) from None
            self.metrics_port = self._metrics_http.server_address[1]
            if self._config.load_poll_interval_s > 0:
                self._poller = LoadPoller(handle, self.info.replicas, self._config.load_poll_interval_s,
                                          self.metrics.replicas.update, on_counts=self._set_replica_counts)
                self._poller.start()
        tls = "mTLS" if self._config.tls.client_ca_file else "TLS" if credentials else "plaintext"
        http = f"; HTTP on {self.http_url}" if self._http is not None else ""
        log.warning("front door on %s (%s)%s; %s", self.grpc_target, tls, http, self.auth_notice)

    async def _start_http(self, inference: InferenceServicer) -> None:
        from cluster.frontdoor.http.app import HttpServer, OpenAIApi
        from cluster.frontdoor.http.store import RedisResponseStore, open_store

        if self._config.tls.cert_file is not None:
            log.warning("the HTTP API serves plaintext; terminate TLS in front of it (Ingress)")
        self._store = open_store(self._config.responses)
        if isinstance(self._store, RedisResponseStore):
            try:
                await self._store.ping()
            except ConnectionError as err:  # keep serving; stored responses answer 503 until Redis is back
                log.warning("%s", err)
        api = OpenAIApi(inference, self.admission, self.info, self._store)
        self._http = HttpServer(api, self._config.host, self._config.http_port)
        await self._http.start()
        self.http_port = self._http.port

    @property
    def http_url(self) -> str:
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"http://{host}:{self.http_port}"

    async def _set_inference_health(self) -> None:
        """SERVING unless draining or no replica is routable (an unknown count counts as routable)."""
        serving = not self.draining and self._routable != 0
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _watch_replicas(self) -> None:
        while True:
            routable = self._inference.routable_replicas() if self._inference is not None else None
            if routable:
                self._inference.connect_replicas()
            if routable is not None:
                self.metrics.routable_replicas.set(routable)
            before, self._routable = self._routable, routable
            if (routable == 0) != (before == 0):
                if routable == 0:
                    log.warning("no model replica is routable: health NOT_SERVING until one is back")
                else:
                    log.warning("%s model replica(s) routable again", routable)
                await self._set_inference_health()
            await asyncio.sleep(REPLICA_WATCH_S)

    def _set_replica_counts(self, application: str, deployment: str, target: int, running: int) -> None:
        self.metrics.autoscaler.desired_replicas.labels(application, deployment).set(target)
        self.metrics.autoscaler.replicas.labels(application, deployment).set(running)

    @property
    def grpc_target(self) -> str:
        return f"{self._config.host}:{self.grpc_port}"

    @property
    def draining(self) -> bool:
        return self.admission is not None and self.admission.draining

    async def drain(self, timeout_s: float | None = None, *, besides: int = 0) -> int:
        """NOT_SERVING, refuse new calls, wait for those in flight; returns how many are left."""
        assert self.admission is not None
        if not self.admission.draining:
            self.admission.draining = True
            for service in ("", SERVICE_NAME, ADMIN_SERVICE_NAME):
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            log.warning("draining: %d calls in flight", max(0, self.admission.in_flight - besides))
        timeout = self._config.grace_period_s if timeout_s is None else timeout_s
        return await self.admission.wait_idle(timeout, besides=besides)

    async def resume(self) -> bool:
        """Undo a drain: admit new calls and report SERVING again; returns whether it was draining."""
        assert self.admission is not None
        was_draining, self.admission.draining = self.admission.draining, False
        if was_draining:
            await self._health.set(ADMIN_SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            await self._set_inference_health()
        return was_draining

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain within the grace period, cancel what is left, close."""
        if self._server is None:
            return
        grace = self._config.grace_period_s if grace_s is None else grace_s
        await self.drain(grace)
        await self._close()

    async def _close(self) -> None:
        """Cancel what is left and release everything start() made, in this order: stop watching
        and polling, stop accepting (HTTP, then gRPC, whose stop cancels the calls left), then the
        store, the channels to the replicas and the router, all of which live on this loop. Each
        step gets CLOSE_STEP_S at most (_close_step), so that stop() returns even when one of them
        waits on a replica or node that is gone."""
        if self._watcher is not None:
            self._watcher.cancel()
            await self._close_step("replica_watcher", self._watcher)
            self._watcher = None
        if self._poller is not None:
            await self._close_step("load_poller", self._poller.stop())
            self._poller = None
        if self._http is not None:
            await self._close_step("http_server", self._http.stop())
            self._http = None
        if self._server is not None:
            await self._close_step("grpc_server", self._server.stop(0.1))
            self._server = None
        if self._store is not None:
            await self._close_step("response_store", self._store.close())
            self._store = None
        if self._inference is not None:
            await self._close_step("replica_channels", self._inference.close())
            self._inference = None
        if self._loop_handle is not None and self._loop_handle is not self._handle:
            await self._close_step("serve_router", close_loop_handle(self._loop_handle))
        self._loop_handle = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def _close_step(self, step: str, awaitable) -> None:
        """Await one step of _close for CLOSE_STEP_S at most. One that overruns is cancelled and
        left behind (a coroutine may ignore the cancellation: it is not awaited again) and logged
        once; one that fails is logged. Either way the next step runs."""
        task = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait({task}, timeout=CLOSE_STEP_S)
        if not done:
            task.cancel()
            self._left_behind.add(task)
            task.add_done_callback(self._left_behind.discard)
            log.warning("shutdown step=%s did not finish within %g s: left behind, going on", step, CLOSE_STEP_S,
                        extra={"shutdown_step": step, "timeout_s": CLOSE_STEP_S})
        elif not task.cancelled() and task.exception() is not None:
            log.warning("shutdown step=%s failed: %r", step, task.exception(), extra={"shutdown_step": step})
