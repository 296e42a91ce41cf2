"""frontdoor.slow_first_token_s: a stream whose first token takes longer gets one warning that says
where the time went. Real parts: the session's Serve app (the tiny checkpoint on our torch engine,
the direct stream on its socket), a front door of its own over it, gRPC Chat and the HTTP API."""

from __future__ import annotations

import json
import logging
import re
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry

from cluster.metrics import FrontdoorMetrics
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc
from tests.conftest import BackgroundFrontdoor

LINE = re.compile(r"request_id=(\S+) .*slow first token: ttft_ms=(\S+) frontdoor_before_ms=(\S+) "
                  r"to_replica_and_back_ms=(\S+) replica_ms=(\S+) frontdoor_after_ms=(\S+) \(api=(\w+)\)")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: dict[str, dict] = {}
        self.count: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = LINE.search(record.getMessage())
        if match:
            request_id, *numbers, api = match.groups()
            names = ("ttft", "before", "way", "replica", "after")
            self.count[request_id] = self.count.get(request_id, 0) + 1
            self.found[request_id] = {"api": api, **{n: float(v) for n, v in zip(names, numbers)}}


@pytest.fixture
def door(ray_serving, serving_config):
    """A front door that logs every first token slower than 1 µs (all of them), and its lines."""
    config = serving_config.frontdoor.model_copy(update={"slow_first_token_s": 1e-6})
    door = BackgroundFrontdoor(ray_serving.handle, config, FrontdoorMetrics(CollectorRegistry()))
    lines = Lines()
    logger = logging.getLogger("cluster.frontdoor.servicer")  # the call's logger
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.WARNING)
    yield door, lines
    logger.removeHandler(lines)
    logger.setLevel(level)
    door.close()


def chat(target: str, text: str, request_id: str) -> None:
    with grpc.insecure_channel(target) as channel:
        calls = pb_grpc.InferenceStub(channel).Chat(
            pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)],
                           sampling=pb.SamplingParams(max_tokens=4)),
            timeout=60, metadata=(("x-request-id", request_id),))
        assert any(r.HasField("complete") for r in calls)


def test_each_slow_first_token_is_logged_once_with_parts_that_add_up(door):
    door, lines = door
    chat(door.target, "Upper-case this: black cat", "slow-grpc-1")
    body = json.dumps({"model": "gpt-oss-tiny-test", "max_tokens": 4, "stream": True,
                       "messages": [{"role": "user", "content": "Reverse the words: green road star"}]}).encode()
    request = urllib.request.Request(door.server.http_url + "/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json", "x-request-id": "slow-http-1"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert b"data: [DONE]" in answer.read()
    for request_id, api in (("slow-grpc-1", "grpc"), ("slow-http-1", "http")):
        parts = lines.found[request_id]
        assert lines.count[request_id] == 1 and parts["api"] == api
        # every part measured (the replica says how long it took), none negative, together the TTFT
        assert min(parts[k] for k in ("before", "way", "replica", "after")) >= 0.0, parts
        total = parts["before"] + parts["way"] + parts["replica"] + parts["after"]
        assert abs(total - parts["ttft"]) <= 0.25, parts
        assert 0.0 < parts["replica"] < parts["ttft"], parts


def test_a_long_prefill_is_put_on_the_replica(door):
    """A prompt of thousands of tokens waits longer for its first token than a short one, and the
    line puts the difference on the replica (its engine's prefill), not on the front door or the way."""
    door, lines = door
    chat(door.target, "Count the words: ice tree sea", "short-prompt")
    chat(door.target, "Count the words: " + "ice tree sea " * 1100, "long-prompt")
    short, long = lines.found["short-prompt"], lines.found["long-prompt"]
    assert long["replica"] > 5 * short["replica"], (short, long)
    assert long["replica"] - short["replica"] > 0.8 * (long["ttft"] - short["ttft"]), (short, long)
