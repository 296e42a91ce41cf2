"""`bench serving`'s sampling flags (--temperature, --top-p, --seed, --ignore-eos) reach the
engine request on every API: a real front door (gRPC and HTTP) over the harmony script, whose
handle records each GenerateRequest the front door sends to the replicas (no model here)."""

from __future__ import annotations

import pytest

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.workload import APIS, HTTP_APIS, IntRange, SyntheticWorkload
from cluster.cli import build_parser
from cluster.config import FrontdoorConfig
from tests.frontdoor.harmony_script import HarmonyScriptHandle, ThreadedFrontdoor


@pytest.fixture(scope="module")
def door():
    door = ThreadedFrontdoor(HarmonyScriptHandle(chunk_tokens=4),
                             FrontdoorConfig(grpc_port=0, metrics_port=0, http_port=0, load_poll_interval_s=0))
    yield door
    door.close()


def _engine_requests(door, api: str, plan: LoadPlan) -> dict[int, object]:
    """Run the plan; the engine requests the front door made, by the bench's request index."""
    door.handle.requests.clear()
    target = door.server.http_url.removeprefix("http://") if api in HTTP_APIS else door.server.grpc_target
    workload = SyntheticWorkload(api=api, prompt_len=IntRange(8, 8), output_len=IntRange(12, 12), seed=plan.seed)
    result = run_load(Connection(target=target), workload, plan)
    assert all(r.ok for r in result.records), [r.code for r in result.records]
    by_id = {r.request_id: r for r in door.handle.requests}
    assert sorted(by_id) == sorted(f"bench-r{i}" for i in range(plan.num_requests))
    return {int(key.removeprefix("bench-r")): request for key, request in by_id.items()}


@pytest.mark.parametrize("api", APIS)
def test_sampled_run_reaches_the_engine_with_per_request_seeds(door, api):
    plan = LoadPlan(api=api, concurrency=2, num_requests=4, temperature=0.7, top_p=0.9, seed=11)
    requests = _engine_requests(door, api, plan)
    for index, request in requests.items():
        sampling = request.sampling
        assert sampling.temperature == pytest.approx(0.7) and sampling.top_p == pytest.approx(0.9)
        assert sampling.ignore_stop and sampling.max_tokens == 12
        assert sampling.seed == plan.request_seed(index)
    seeds = [r.sampling.seed for r in requests.values()]
    assert len(set(seeds)) == len(seeds)  # one seed per request, not one for the run
    # The same --seed gives the same per-request seeds; another gives others.
    again = LoadPlan(api=api, concurrency=2, num_requests=4, temperature=0.7, top_p=0.9, seed=11)
    other = LoadPlan(api=api, concurrency=2, num_requests=4, temperature=0.7, top_p=0.9, seed=12)
    assert [again.request_seed(i) for i in range(4)] == [plan.request_seed(i) for i in range(4)]
    assert not {other.request_seed(i) for i in range(4)} & set(seeds)


@pytest.mark.parametrize("api", APIS)
def test_default_run_is_greedy_unseeded_and_exact_length_on_every_api(door, api):
    # The HTTP API's own default temperature is 1 (OpenAI's): the bench must send 0 explicitly.
    requests = _engine_requests(door, api, LoadPlan(api=api, concurrency=2, num_requests=2))
    for request in requests.values():
        assert request.sampling.temperature == 0.0 and request.sampling.top_p == 1.0
        assert request.sampling.seed is None and request.sampling.ignore_stop


@pytest.mark.parametrize("api", ["generate", "openai-chat"])
def test_no_ignore_eos_lets_stop_tokens_end_streams(door, api):
    # max_tokens 200 is more than the scripted turn: with stop tokens honoured it ends at <|return|>.
    door.handle.requests.clear()
    target = door.server.http_url.removeprefix("http://") if api in HTTP_APIS else door.server.grpc_target
    workload = SyntheticWorkload(api=api, prompt_len=IntRange(8, 8), output_len=IntRange(200, 200))
    result = run_load(Connection(target=target), workload,
                      LoadPlan(api=api, concurrency=1, num_requests=2, ignore_stop=False))
    assert all(r.ok for r in result.records)
    assert [r.sampling.ignore_stop for r in door.handle.requests] == [False, False]
    assert all(r.usage_completion_tokens < 200 for r in result.records)


def test_cli_flags_and_their_defaults():
    parse = build_parser().parse_args
    args = parse(["bench", "serving", "--target", "x:1"])
    assert (args.ignore_eos, args.temperature, args.top_p, args.seed) == (True, 0.0, None, 0)
    args = parse(["bench", "serving", "--target", "x:1", "--no-ignore-eos", "--temperature", "0.8",
                  "--top-p", "0.95", "--seed", "3"])
    assert (args.ignore_eos, args.temperature, args.top_p, args.seed) == (False, 0.8, 0.95, 3)
    assert parse(["bench", "serving", "--target", "x:1", "--honor-stop"]).ignore_eos is False  # the old name


@pytest.mark.parametrize("field, value, message", [("temperature", -0.1, "temperature must be in [0, 100]"),
                                                   ("top_p", 0.0, "top_p must be in (0, 1]"),
                                                   ("top_p", 1.5, "top_p must be in (0, 1]")])
def test_bad_sampling_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        LoadPlan(concurrency=1, num_requests=1, **{field: value}).check()
