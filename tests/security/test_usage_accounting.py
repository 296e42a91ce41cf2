"""Usage per tenant equals what the clients received: a mixed run of 500 calls over three tenants
(completed Generate and Chat, cancelled streams, streams past their deadline, invalid requests,
calls refused by a tenant's stream limit) on the echo engine, and the gptoss_tenant_tokens_total
counters and the usage log against the client-side totals: difference 0."""

from __future__ import annotations

import asyncio
import collections
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.frontdoor.usage import TOKEN_TYPES
from gptoss.v1 import inference_pb2 as pb
from tests.security.secure_app import SecureApp, bearer

pytestmark = pytest.mark.slow

TENANTS_YAML = """
tenants:
  acme: {max_output_tokens: 8}
  initech: {max_concurrent_streams: 1}
"""
# Tokens come at once, then one per 2 s: a client cancels after the first, a deadline of 0.25 s
# falls after the first, so neither races the next token (a client thread that stalls past the
# gap on a loaded machine would be sent a second one it never reads).
TOKENS_PER_S = 0.5
DEADLINE_S = 0.25


@pytest.fixture(scope="module")
def app(ray_serving, serving_config, tmp_path_factory):
    app = SecureApp(serving_config, tmp_path_factory.mktemp("usage"), "usage-echo", TENANTS_YAML,
                    **{"engine.echo_tokens_per_s": TOKENS_PER_S, "engine.default_max_tokens": 4})
    yield app
    app.close()


def _one(stub, i: int, rng: random.Random) -> tuple[str, str, dict]:
    metadata = (*bearer(("acme", "globex", "initech")[i % 3]), ("x-request-id", f"usage-{i}"))
    """Run call i; returns (tenant, outcome, the tokens the client received or was billed in Usage)."""
    tenant = ("acme", "globex", "initech")[i % 3]
    prompt = [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 12))]
    kind = i % 10
    got = dict.fromkeys(TOKEN_TYPES, 0)
    if kind == 5:  # Chat, completed
        request = pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello " * (i % 7 + 1))],
                                 sampling=pb.SamplingParams(max_tokens=1))
        calls = stub.Chat(request, timeout=30, metadata=metadata)
    else:
        max_tokens = {6: 5, 7: 5, 8: 100 if tenant == "acme" else 1}.get(kind, 1)
        if kind == 9:
            prompt = []  # INVALID_ARGUMENT: empty prompt
        request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
        calls = stub.Generate(request, timeout=DEADLINE_S if kind == 7 else 30, metadata=metadata)
    received = 0
    try:
        for response in calls:
            if response.HasField("complete"):
                usage = response.complete.usage
                got.update(prompt=usage.prompt_tokens, cached_prompt=usage.cached_prompt_tokens,
                           reasoning=usage.reasoning_tokens, completion=usage.completion_tokens)
                return tenant, "OK", got
            if isinstance(response, pb.GenerateResponse):
                received += len(response.chunk.token_ids)
            if kind == 6:
                calls.cancel()
                break
        outcome = "CANCELLED"
    except grpc.RpcError as err:
        outcome = err.code().name
    if received:  # a stream that ended early: the tokens it got, and its prompt once any came
        got.update(prompt=len(prompt), completion=received)
    return tenant, outcome, got


def test_usage_counters_equal_client_side_totals_over_a_mixed_run(app):
    rng_lock = threading.Lock()
    rng = random.Random(21)

    def run(i):
        with rng_lock:
            seed = rng.random()
        return _one(app.stub, i, random.Random(seed))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(500)))
    # A call the client gave up on (cancel, deadline) ends on the server a moment later.
    deadline = time.monotonic() + 10
    while app.door.server.admission.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    outcomes = collections.Counter(outcome for _, outcome, _ in results)
    # The mix really happened: every kind of ending is there.
    # (initech's stream limit refuses some of its calls of every kind: RESOURCE_EXHAUSTED.)
    assert outcomes["OK"] >= 200 and outcomes["CANCELLED"] >= 25 and outcomes["DEADLINE_EXCEEDED"] >= 25, outcomes
    assert outcomes["INVALID_ARGUMENT"] >= 40 and outcomes["RESOURCE_EXHAUSTED"] >= 1, outcomes
    client = collections.defaultdict(lambda: dict.fromkeys(TOKEN_TYPES, 0))
    for tenant, _, got in results:
        for kind in TOKEN_TYPES:
            client[tenant][kind] += got[kind]
    assert client["acme"]["completion"] > 0 and client["globex"]["prompt"] > 0
    records = app.usage_records()
    for tenant in ("acme", "globex", "initech"):
        for kind in TOKEN_TYPES:
            server = app.tokens_counter(tenant, kind)
            logged = sum(r[f"{kind}_tokens"] for r in records if r["tenant"] == tenant)
            assert server - client[tenant][kind] == 0, (tenant, kind, server, client[tenant][kind])
            assert logged == client[tenant][kind], (tenant, kind)
    # One usage record per call the server saw, with the client's request id, the tenant, the model
    # and the outcome. A call can end on the client (cancel, deadline) before the server started it:
    # no record then, and nothing received. A client's deadline may reach the server as its cancel.
    by_id = {r["request_id"]: r for r in records}
    assert len(by_id) == len(records) and {r["model"] for r in records} == {app.door.server.info.model_name}
    ended_by_client = {"CANCELLED", "DEADLINE_EXCEEDED"}
    for i, (tenant, outcome, got) in enumerate(results):
        record = by_id.get(f"usage-{i}")
        if record is None:
            assert outcome in ended_by_client and not any(got.values()), (i, outcome, got)
            continue
        assert record["tenant"] == tenant
        assert record["outcome"] == outcome or {record["outcome"], outcome} <= ended_by_client, (i, record, outcome)
        assert {kind: record[f"{kind}_tokens"] for kind in TOKEN_TYPES} == got, (i, record, got)
    assert len(records) >= 490


@pytest.mark.parametrize("method", ["Generate", "Chat"])
def test_a_client_that_leaves_after_the_last_message_ends_an_answered_call(app, monkeypatch, method):
    """A client may stop after the message with the usage, without waiting for the status (the
    Python client cancels the call then). The stream had ended: its record says OK, not CANCELLED.
    The server is held after its last message here, so that the client's cancel always comes first."""
    from cluster.frontdoor.servicer import InferenceServicer

    events = "generate_events" if method == "Generate" else "chat_events"
    original = getattr(InferenceServicer, events)

    async def held_after_the_last(self, *args, **kwargs):
        async for item in original(self, *args, **kwargs):
            yield item
        await asyncio.sleep(5.0)  # the client's cancel arrives here

    monkeypatch.setattr(InferenceServicer, events, held_after_the_last)
    request_id = f"leaves-after-last-{method}"
    metadata = (*bearer("globex"), ("x-request-id", request_id))
    if method == "Generate":
        calls = app.stub.Generate(pb.GenerateRequest(prompt_token_ids=[1000, 1001], sampling=pb.SamplingParams(
            max_tokens=1)), timeout=30, metadata=metadata)
    else:
        calls = app.stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")],
                                             sampling=pb.SamplingParams(max_tokens=1)), timeout=30, metadata=metadata)
    assert any(response.HasField("complete") for response in calls)
    calls.cancel()
    deadline = time.monotonic() + 10
    while not (records := [r for r in app.usage_records() if r["request_id"] == request_id]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["outcome"] for r in records] == ["OK"], records
    assert records[0]["completion_tokens"] == 1
