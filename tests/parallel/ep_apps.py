"""An expert-parallel ModelReplica app on the session's Ray, beside its ep 1 app, with its own front
door (gRPC and /metrics, polling the replica's load reports), and the calls the tests make on it."""

from __future__ import annotations

import copy
import time
import urllib.request

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc


class EpApp:
    def __init__(self, serving_config, name: str, **parallel) -> None:
        from ray import serve

        from cluster.metrics import FrontdoorMetrics
        from cluster.serving.builder import build_app
        from tests.conftest import BackgroundFrontdoor

        config = copy.deepcopy(serving_config)
        config.serving.app_name = name
        config.parallel.collective_timeout_s = 5.0
        for key, value in parallel.items():
            setattr(config.parallel, key, value)
        config.serving.graceful_shutdown_timeout_s = 1.0
        # A lost rank ends the call UNAVAILABLE here, so the tests see the group fail and come back;
        # resuming such a stream on another replica is tests/faults' ep_rank_killed scenario.
        config.frontdoor.migration_attempts = 0
        config.validate()
        self.name = name
        self.handle = serve.run(build_app(config), name=name, route_prefix=None)
        self.door = BackgroundFrontdoor(self.handle, config.frontdoor, FrontdoorMetrics(CollectorRegistry()))
        self.channel = grpc.insecure_channel(self.door.target)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """The front door's /metrics over HTTP: (sample name, labels) -> value."""
        url = f"http://127.0.0.1:{self.door.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def close(self) -> None:
        from ray import serve

        self.channel.close()
        self.door.close()
        serve.delete(self.name)


def generate(stub, prompt, max_tokens, timeout=120, logprobs=None):
    """Greedy tokens (ignore_stop) of `prompt`; with `logprobs`, (tokens, [[(token, logprob)] per position])."""
    sampling = pb.SamplingParams(max_tokens=max_tokens, ignore_stop=True)
    if logprobs is not None:
        sampling.logprobs = logprobs
    tokens, top = [], []
    for response in stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling), timeout=timeout):
        if response.HasField("chunk"):
            tokens.extend(response.chunk.token_ids)
            top.extend([(t.token_id, t.logprob) for t in lp.top] for lp in response.chunk.logprobs)
    return tokens if logprobs is None else (tokens, top)


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    """`condition()`'s first truthy value, polled until `timeout_s`; fails naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
