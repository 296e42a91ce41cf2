"""FrontdoorServer: the grpc.aio server with gptoss.v1.Inference, health and reflection.

It asks the Serve application for its ModelInfo once at start (which also waits for a replica
to be ready), reports SERVING through grpc.health.v1, and on stop reports NOT_SERVING, gives
in-flight RPCs `grace_period_s` to finish, then cancels the rest (which cancels their
downstream calls).
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray.serve.handle import DeploymentHandle

from cluster.config import FrontdoorConfig
from cluster.frontdoor.servicer import InferenceServicer
from cluster.metrics import FrontdoorMetrics, serve_metrics
from cluster.serving.model_info import ModelInfo
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name  # "gptoss.v1.Inference"


class FrontdoorServer:
    def __init__(self, handle: DeploymentHandle, config: FrontdoorConfig,
                 metrics: FrontdoorMetrics | None = None) -> None:
        self._handle = handle
        self._config = config
        self.metrics = metrics or FrontdoorMetrics()
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._metrics_http = None
        self.info: ModelInfo | None = None
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> None:
        self.info = await self._handle.model_info.remote()
        server = grpc.aio.server(maximum_concurrent_rpcs=self._config.max_concurrent_rpcs)
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self._handle, self.info, self.metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self._config.host}:{self._config.grpc_port}"
        try:
            self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as err:  # grpc reports a port in use this way
            raise OSError(f"cannot listen on {address}: {err}") from None
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {address}")
        await server.start()
        self._server = server
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if self._config.metrics_port >= 0:
            self._metrics_http = serve_metrics(self.metrics, self._config.host, self._config.metrics_port)
            self.metrics_port = self._metrics_http.server_address[1]

    @property
    def grpc_target(self) -> str:
        return f"{self._config.host}:{self.grpc_port}"

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop serving: NOT_SERVING, let in-flight RPCs finish within the grace period, close."""
        if self._server is None:
            return
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._config.grace_period_s if grace_s is None else grace_s)
        self._server = None
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
