"""Ray Serve's built-in gRPC proxy in front of a Serve deployment streaming one message per token.

The straightforward way to serve gptoss.v1 on Serve, measured as an anchor by `bench overhead`:
`python -m cluster.bench.serve_proxy --port P --token-rate R` starts a local Ray, Serve with its
gRPC proxy on 127.0.0.1:P and the `serve-proxy` application, prints `listening 127.0.0.1:P`,
and shuts everything down on SIGTERM. Generate behaves as in cluster.bench.floor (same tokens,
same pacing), but every token is one message through the replica, the Serve router and the proxy.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from ray import serve

from cluster.bench.floor import paced_responses
from cluster.sockets import free_port
from gptoss.v1 import inference_pb2 as pb

APP_NAME = "serve-proxy"
SERVICER_FUNCTION = "gptoss.v1.inference_pb2_grpc.add_InferenceServicer_to_server"


@serve.deployment(name="ServeProxyEcho", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class ServeProxyEcho:
    def __init__(self, tokens_per_s: float) -> None:
        self._tokens_per_s = tokens_per_s

    async def Generate(self, request: pb.GenerateRequest):
        async for response in paced_responses(request, self._tokens_per_s):
            yield response


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="gRPC proxy port (0: a free one)")
    parser.add_argument("--token-rate", type=float, default=1000.0, help="tokens/s per stream (0: unpaced)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    port = args.port or free_port()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel("WARNING")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options={"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        serve.run(ServeProxyEcho.bind(args.token_rate), name=APP_NAME, route_prefix=f"/{APP_NAME}")
        print(f"listening 127.0.0.1:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
