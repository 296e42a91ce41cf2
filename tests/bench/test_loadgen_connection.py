"""What the load generator puts on the wire: API key, session ids, extra metadata, TLS; and how it
counts failures by status code. Against a small real gRPC server that records what it gets."""

from __future__ import annotations

import subprocess
import threading
from concurrent import futures

import grpc
import pytest

from cluster.bench.loadgen import Connection, LoadPlan, run_load
from cluster.bench.report import summarize
from cluster.bench.workload import IntRange, SyntheticWorkload
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

KEY = "sk-test-123"


class RecordingServicer(pb_grpc.InferenceServicer):
    """Streams max_tokens one-token chunks to callers with the right key; UNAUTHENTICATED otherwise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict] = []

    def Generate(self, request, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.seen.append(metadata)
        if metadata.get("authorization") != f"Bearer {KEY}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
        for i in range(request.sampling.max_tokens):
            yield pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=[i]))
        yield pb.GenerateResponse(complete=pb.GenerateComplete(
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=request.sampling.max_tokens)))


@pytest.fixture
def server():
    def start(credentials=None):
        servicer = RecordingServicer()
        srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_InferenceServicer_to_server(servicer, srv)
        port = (srv.add_secure_port("127.0.0.1:0", credentials) if credentials
                else srv.add_insecure_port("127.0.0.1:0"))
        srv.start()
        started.append(srv)
        return servicer, f"127.0.0.1:{port}"

    started: list = []
    yield start
    for srv in started:
        srv.stop(0)


WORKLOAD = SyntheticWorkload(api="generate", prompt_len=IntRange(4, 4), output_len=IntRange(5, 5), sessions=3)


def test_api_key_sessions_and_metadata_are_sent(server):
    servicer, target = server()
    connection = Connection(target, api_key=KEY, metadata=(("application", "demo"),))
    result = run_load(connection, WORKLOAD, LoadPlan(concurrency=2, num_requests=6))
    assert all(r.ok and r.output_tokens == 5 for r in result.records)
    assert all(m["authorization"] == f"Bearer {KEY}" and m["application"] == "demo" for m in servicer.seen)
    assert sorted(m["x-session-id"] for m in servicer.seen) == sorted(f"session-{i % 3}" for i in range(6))


def test_failures_are_counted_by_status_code(server):
    _, target = server()
    result = run_load(Connection(target, api_key="wrong"), WORKLOAD, LoadPlan(concurrency=2, num_requests=4))
    s = summarize(result.records)
    assert s["errors_by_code"] == {"UNAUTHENTICATED": 4} and s["completed"] == 0 and s["output_tokens"] == 0
    unreachable = run_load(Connection("127.0.0.1:1"), WORKLOAD, LoadPlan(concurrency=1, num_requests=2, timeout_s=5))
    assert summarize(unreachable.records)["errors_by_code"] == {"UNAVAILABLE": 2}


def test_tls_with_a_private_ca(server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test"],
                   check=True, capture_output=True)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    servicer, target = server(credentials)
    tls = Connection(target, tls=True, ca_cert=str(cert), server_name="bench.test", api_key=KEY)
    result = run_load(tls, WORKLOAD, LoadPlan(concurrency=1, num_requests=2))
    assert all(r.ok for r in result.records) and len(servicer.seen) == 2
    # Plain text against a TLS port fails; it is counted, not raised.
    plain = run_load(Connection(target, api_key=KEY), WORKLOAD, LoadPlan(concurrency=1, num_requests=1, timeout_s=5))
    assert not plain.records[0].ok


def test_the_blocking_client_sends_and_counts_what_the_asyncio_client_does(server):
    """client="blocking" (one stream at a time, read on the calling thread) puts the same requests
    and metadata on the wire and makes the same records; a failure is counted by its status code."""
    servicer, target = server()
    connection = Connection(target, api_key=KEY, metadata=(("application", "demo"),))
    plan = dict(concurrency=1, num_requests=6, warmup_requests=2)
    runs = {client: run_load(connection, WORKLOAD, LoadPlan(client=client, **plan)) for client in ("asyncio", "blocking")}
    for result in runs.values():
        assert [(r.index, r.session_id, r.code, r.output_tokens, r.usage_completion_tokens, r.messages)
                for r in result.records] == [(2 + i, f"session-{(2 + i) % 3}", "OK", 5, 5, 5) for i in range(6)]
        assert len(result.warmup) == 2 and all(r.ok for r in result.warmup)
        for r in result.records:  # times count from the measured part's start, in order
            assert 0 <= r.sent_s < r.first_token_s <= r.end_s and len(r.gaps_s) == 4
        assert all(a.end_s <= b.sent_s for a, b in zip(result.records, result.records[1:]))  # one at a time
    asyncio_seen, blocking_seen = servicer.seen[:8], servicer.seen[8:]
    wire = lambda seen: [(m["x-request-id"], m["x-session-id"], m["authorization"], m["application"]) for m in seen]
    assert wire(blocking_seen) == wire(asyncio_seen) and len(blocking_seen) == 8
    failed = run_load(Connection(target, api_key="wrong"), WORKLOAD, LoadPlan(concurrency=1, num_requests=3,
                                                                               client="blocking"))
    assert summarize(failed.records)["errors_by_code"] == {"UNAUTHENTICATED": 3}


def test_the_blocking_channel_reads_streams_on_the_calling_thread(server):
    """The option that makes it one thread is an experimental gRPC one: were it renamed, gRPC would
    ignore it silently and hand each message through its own thread again. The stub's server-
    streaming callables show which kind of call gRPC made."""
    _, target = server()
    channel = Connection(target).open_blocking_channel()
    try:
        assert type(pb_grpc.InferenceStub(channel).Generate).__name__ == "_SingleThreadedUnaryStreamMultiCallable"
    finally:
        channel.close()


@pytest.mark.parametrize("plan, names", [
    (dict(concurrency=4, num_requests=1), "concurrency 4"),
    (dict(rate=2.0, num_requests=1), "concurrency None"),
    (dict(concurrency=1, num_requests=1, api="completions"), "api 'completions'"),
    (dict(concurrency=1, num_requests=1, client="threads"), "'threads'"),
])
def test_a_plan_the_blocking_client_cannot_run_is_refused_up_front(plan, names):
    plan.setdefault("client", "blocking")
    with pytest.raises(ValueError, match=names):
        LoadPlan(**plan).check()
