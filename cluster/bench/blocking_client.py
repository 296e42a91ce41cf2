"""A load generator for one gRPC stream at a time that reads every response on the thread that sent
the request: a plain gRPC channel with gRPC's single-threaded unary-stream option, no event loop.

Why it exists: at concurrency 1 the first-token time is a few milliseconds, and the client's own
wake-ups are part of what a load generator measures. grpc.aio hands each message through three
threads (gRPC's event engine, grpc.aio's poller, the asyncio loop); on a busy box each hand-over
can wait for a CPU, and that wait is counted as the server's (docs/performance.md, "Where ours'
p99 at concurrency 1 goes"). The aiohttp client that loads an HTTP server reads on one thread,
and so does this one. It takes the plans of LoadGenerator with `client="blocking"`: closed loop at
concurrency 1, Generate or Chat, the same requests, records and ids.
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

from cluster.bench.loadgen import (Connection, LoadPlan, RunResult, end_record, grpc_call, output_tokens,
                                   read_response)
from cluster.bench.report import RequestRecord
from gptoss.v1 import inference_pb2_grpc as pb_grpc


class BlockingLoad:
    def __init__(self, connection: Connection, workload, plan: LoadPlan,
                 on_done: Callable[[RequestRecord], None] | None = None) -> None:
        self.connection = connection
        self.workload = workload
        self.plan = plan.check()
        if self.plan.client != "blocking":
            raise ValueError(f"BlockingLoad runs plans of client 'blocking', got {self.plan.client!r}")
        self.on_done = on_done
        self._t0 = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _one(self, stub: pb_grpc.InferenceStub, index: int, warmup: bool) -> RequestRecord:
        spec = self.workload.request(index)
        method, request, metadata = grpc_call(stub, spec, self.plan, self.connection, index, warmup)
        record = RequestRecord(index=index, session_id=spec.session_id)
        stamps: list[float] = []
        tokens = 0
        record.sent_s = record.scheduled_s = self._now()
        try:
            for response in method(request, timeout=self.plan.timeout_s, metadata=metadata):
                tokens += read_response(response, record, stamps, time.perf_counter)
            record.code = "OK" if record.usage_completion_tokens is not None else "INCOMPLETE"
        except grpc.RpcError as err:
            record.code = err.code().name
        finally:
            end_record(record, stamps, output_tokens(self.plan, record, tokens), self._t0)
        if self.on_done is not None and not warmup:
            self.on_done(record)
        return record

    def _sequence(self, stub: pb_grpc.InferenceStub, first: int, count: int | None, deadline: float | None,
                  warmup: bool) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        while count is None or len(records) < count:
            if deadline is not None and self._now() >= deadline:
                break
            records.append(self._one(stub, first + len(records), warmup))
        return records

    def run(self) -> RunResult:
        plan = self.plan
        channel = self.connection.open_blocking_channel()
        stub = pb_grpc.InferenceStub(channel)
        result = RunResult(plan)
        try:
            self._t0 = time.perf_counter()
            if plan.warmup_requests:
                result.warmup = self._sequence(stub, 0, plan.warmup_requests, None, warmup=True)
            self._t0 = time.perf_counter()  # times in records count from the start of the measured part
            result.started_unix = time.time()
            result.records = self._sequence(stub, plan.warmup_requests, plan.num_requests, plan.duration_s, False)
        finally:
            channel.close()
        return result
