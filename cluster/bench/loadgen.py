"""The load generator: a grpc.aio client (or, for the OpenAI-compatible HTTP API, an aiohttp
client over keep-alive connections reading server-sent events) sending a workload closed-loop or
open-loop.

  * closed loop (`concurrency=N`): N workers, each sending its next request when the previous
    one ends; the load adapts to the server.
  * open loop (`rate=R`): requests are sent at Poisson arrival times (exponential gaps of mean
    1/R, from the seed) whatever the server does; each is its own task, so a slow server gets
    more requests in flight, never fewer arrivals. `send_lag_ms` reports how late the client
    itself sent them.

A run stops issuing requests after `num_requests` or `duration_s` (whichever comes first) and
lets those in flight finish (each has a deadline of `timeout_s`). Warm-up requests go first,
closed loop, and are counted apart. Only the generated gptoss.v1 stubs are used, through
`WhichOneof`, so servers with newer protos work too.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import grpc.experimental

from cluster.bench.report import RequestRecord
from cluster.bench.workload import CLIENTS, HTTP_APIS, RequestSpec
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER,
         "assistant": pb.ROLE_ASSISTANT, "tool": pb.ROLE_TOOL}
SESSION_HEADER = "x-session-id"
REQUEST_ID_HEADER = "x-request-id"


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class Connection:
    """How to reach the server: address, TLS, API key, extra metadata."""

    target: str
    tls: bool = False
    ca_cert: str | None = None  # PEM file; None: the system roots
    client_cert: str | None = None  # PEM files for mutual TLS
    client_key: str | None = None
    server_name: str | None = None  # TLS name to check, when it differs from the target's host
    api_key: str | None = None  # sent as `authorization: Bearer <key>`
    metadata: tuple[tuple[str, str], ...] = ()
    channels: int = 1  # HTTP/2 connections to spread the streams over

    def _channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_read(self.ca_cert), _read(self.client_key), _read(self.client_cert))

    def open_channels(self) -> list[grpc.aio.Channel]:
        options = self._channel_options()
        if self.channels > 1:  # else grpc shares one subchannel (connection) between the channels
            options.append(("grpc.use_local_subchannel_pool", 1))
        if not self.tls:
            return [grpc.aio.insecure_channel(self.target, options=list(options)) for _ in range(self.channels)]
        return [grpc.aio.secure_channel(self.target, self._credentials(), options=list(options))
                for _ in range(self.channels)]

    def open_blocking_channel(self) -> grpc.Channel:
        """A plain gRPC channel whose server-streaming calls are read on the thread that made them
        (gRPC's single-threaded unary-stream option; see cluster/bench/blocking_client.py)."""
        options = self._channel_options() + [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        if not self.tls:
            return grpc.insecure_channel(self.target, options=options)
        return grpc.secure_channel(self.target, self._credentials(), options=options)

    def http_base(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.target}"

    def call_metadata(self, session_id: str | None, request_id: str | None = None) -> tuple[tuple[str, str], ...]:
        metadata = list(self.metadata)
        if request_id:
            metadata.append((REQUEST_ID_HEADER, request_id))
        if self.api_key:
            metadata.append(("authorization", f"Bearer {self.api_key}"))
        if session_id:
            metadata.append((SESSION_HEADER, session_id))
        return tuple(metadata)


@dataclass(frozen=True)
class LoadPlan:
    """What to send and when; exactly one of concurrency and rate drives the load."""

    api: str = "generate"
    concurrency: int | None = None
    rate: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 0
    timeout_s: float = 300.0
    ignore_stop: bool = True  # generate exactly max_tokens, so lengths are the workload's
    max_in_flight: int | None = None  # open loop only: a safety cap (then it is no longer open)
    seed: int = 0
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # None: not sent (the server's default, 1)
    client: str = "asyncio"  # "blocking": one stream at a time, read on one thread (cluster/bench/blocking_client.py)

    def check(self) -> "LoadPlan":
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound the run: give num_requests, duration_s or both")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got {self.client!r}")
        if self.client == "blocking" and (self.concurrency != 1 or self.api in HTTP_APIS):
            raise ValueError("client 'blocking' sends one gRPC stream at a time: it needs concurrency 1 and a "
                             f"gRPC API, got concurrency {self.concurrency} and api {self.api!r}")
        return self

    def request_seed(self, index: int) -> int | None:
        """Request `index`'s sampling seed, derived from `seed` so a sampled run can be repeated
        stream for stream; None when greedy (nothing to seed)."""
        if self.temperature == 0:
            return None
        return random.Random(f"sampling-{self.seed}-{index}").getrandbits(63)


@dataclass
class RunResult:
    plan: LoadPlan
    records: list[RequestRecord] = field(default_factory=list)
    warmup: list[RequestRecord] = field(default_factory=list)
    started_unix: float = 0.0  # wall-clock time of the records' zero, to find a request in server logs
    client_cpu_s: float | None = None  # the load generator's CPU seconds for the whole run (run_load_apart)


def bench_request_id(index: int, warmup: bool = False) -> str:
    """The x-request-id of a run's request `index` (the servers' logs name it)."""
    return f"bench-{'w' if warmup else 'r'}{index}"


def build_request(spec: RequestSpec, plan: LoadPlan, index: int):
    seed = plan.request_seed(index)
    sampling = pb.SamplingParams(max_tokens=spec.max_tokens, ignore_stop=plan.ignore_stop,
                                 temperature=plan.temperature, top_p=plan.top_p, seed=seed)
    if plan.api == "generate":
        return pb.GenerateRequest(prompt_token_ids=spec.prompt_token_ids, sampling=sampling)
    messages = [pb.ChatMessage(role=ROLES[role], content=content) for role, content in spec.messages]
    return pb.ChatRequest(messages=messages, sampling=sampling, reasoning_effort=pb.REASONING_EFFORT_LOW)


def grpc_call(stub, spec: RequestSpec, plan: LoadPlan, connection: Connection, index: int, warmup: bool):
    """What request `index` of a gRPC run sends: (the stub's Generate or Chat, the request, its metadata)."""
    method = stub.Generate if plan.api == "generate" else stub.Chat
    metadata = connection.call_metadata(spec.session_id, bench_request_id(index, warmup))
    return method, build_request(spec, plan, index), metadata


def output_tokens(plan: LoadPlan, record: RequestRecord, streamed_ids: int) -> int:
    """A gRPC request's output tokens: the ids Generate streamed; the usage Chat reported."""
    return streamed_ids if plan.api == "generate" else (record.usage_completion_tokens or 0)


def read_response(response, record: RequestRecord, stamps: list[float], clock: Callable[[], float]) -> int:
    """Take one streamed Generate or Chat response into `record`: a stamp for each message that
    carries output, the usage from the last one. Returns the token ids it carried (Generate)."""
    kind = response.WhichOneof("response")
    if kind == "chunk":
        n = len(response.chunk.token_ids)
        if n:
            stamps.append(clock())
        return n
    if kind == "delta":
        stamps.append(clock())
    elif kind == "complete":
        usage = response.complete.usage
        record.usage_completion_tokens = usage.completion_tokens
        record.prompt_tokens = usage.prompt_tokens
    return 0


def end_record(record: RequestRecord, stamps: list[float], output_tokens: int, t0: float) -> None:
    """Close `record` now: its end, its output and its first-token time and gaps from the stamps
    (perf_counter values; the record's times count from `t0`)."""
    record.end_s = time.perf_counter() - t0
    record.output_tokens = output_tokens
    record.messages = len(stamps)
    if stamps:
        record.first_token_s = stamps[0] - t0
        record.gaps_s = [b - a for a, b in zip(stamps, stamps[1:])]


def http_request(spec: RequestSpec, plan: LoadPlan, index: int, model: str) -> tuple[str, dict]:
    """(route, body) of an HTTP API request; streamed, low reasoning effort and the same sampling
    as the gRPC request of build_request. temperature is always sent (OpenAI's default is 1, not
    greedy); `ignore_eos` is the server's (and vLLM's) extension that ignores stop tokens, and
    `return_token_ids` vLLM's that puts each chunk's token ids beside its text (ours ignores it)."""
    common = {"model": model, "stream": True, "temperature": plan.temperature, "ignore_eos": plan.ignore_stop}
    if plan.top_p is not None:
        common["top_p"] = plan.top_p
    seed = plan.request_seed(index)
    if seed is not None:
        common["seed"] = seed
    api = plan.api
    if api == "completions":
        return "/v1/completions", {**common, "prompt": list(spec.prompt_token_ids), "max_tokens": spec.max_tokens,
                                   "stream_options": {"include_usage": True}, "return_token_ids": True}
    messages = [{"role": role, "content": content} for role, content in spec.messages]
    if api == "responses":
        return "/v1/responses", {**common, "input": messages, "max_output_tokens": spec.max_tokens,
                                 "reasoning": {"effort": "low"}, "store": False}
    return "/v1/chat/completions", {**common, "messages": messages, "max_completion_tokens": spec.max_tokens,
                                    "reasoning_effort": "low", "stream_options": {"include_usage": True}}


def _sse_usage(event: dict) -> tuple[int, int] | None:
    """(prompt, completion) tokens if this event carries the final usage."""
    usage = event.get("usage") or (event.get("response") or {}).get("usage")
    if not usage:
        return None
    return (usage.get("prompt_tokens", usage.get("input_tokens", 0)),
            usage.get("completion_tokens", usage.get("output_tokens", 0)))


def _sse_has_output(event: dict) -> bool:
    if event.get("type", "").endswith(".delta"):
        return True
    for choice in event.get("choices") or ():
        delta = choice.get("delta")
        if delta is None:  # completions; vLLM's return_token_ids stamps tokens whose text is empty
            return bool(choice.get("text") or choice.get("token_ids"))
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return True
    return False


class LoadGenerator:
    def __init__(self, connection: Connection, workload, plan: LoadPlan,
                 on_done: Callable[[RequestRecord], None] | None = None) -> None:
        self.connection = connection
        self.workload = workload
        self.plan = plan.check()
        self.on_done = on_done
        self._stubs: list[pb_grpc.InferenceStub] = []
        self._http = None  # aiohttp.ClientSession for the HTTP APIs
        self._model = ""
        self._t0 = 0.0

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _one(self, index: int, scheduled_s: float | None = None, warmup: bool = False) -> RequestRecord:
        send = self._one_http if self.plan.api in HTTP_APIS else self._one_grpc
        record = await send(index, scheduled_s, warmup)
        if self.on_done is not None and not warmup:
            self.on_done(record)
        return record

    def _ended(self, record: RequestRecord, stamps: list[float], output_tokens: int) -> None:
        end_record(record, stamps, output_tokens, self._t0)

    async def _one_grpc(self, index: int, scheduled_s: float | None, warmup: bool) -> RequestRecord:
        spec = self.workload.request(index)
        method, request, metadata = grpc_call(self._stubs[index % len(self._stubs)], spec, self.plan,
                                              self.connection, index, warmup)
        record = RequestRecord(index=index, session_id=spec.session_id)
        stamps: list[float] = []
        perf = time.perf_counter
        record.sent_s = self._now()
        record.scheduled_s = record.sent_s if scheduled_s is None else scheduled_s
        tokens = 0
        try:
            async for response in method(request, timeout=self.plan.timeout_s, metadata=metadata):
                tokens += read_response(response, record, stamps, perf)
            record.code = "OK" if record.usage_completion_tokens is not None else "INCOMPLETE"
        except grpc.aio.AioRpcError as err:
            record.code = err.code().name
        except asyncio.CancelledError:
            record.code = "CANCELLED"
            raise
        finally:
            self._ended(record, stamps, output_tokens(self.plan, record, tokens))
        return record

    async def _one_http(self, index: int, scheduled_s: float | None, warmup: bool) -> RequestRecord:
        import aiohttp

        spec = self.workload.request(index)
        route, body = http_request(spec, self.plan, index, self._model)
        headers = dict(self.connection.call_metadata(spec.session_id, bench_request_id(index, warmup)))
        headers["x-request-timeout"] = str(self.plan.timeout_s)
        record = RequestRecord(index=index, session_id=spec.session_id)
        stamps: list[float] = []
        perf = time.perf_counter
        record.sent_s = self._now()
        record.scheduled_s = record.sent_s if scheduled_s is None else scheduled_s
        stream_error = False
        try:
            async with self._http.post(self.connection.http_base() + route, json=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=self.plan.timeout_s)) as answer:
                if answer.status != 200:
                    error = (await answer.json(content_type=None)).get("error") or {}
                    record.code = str(error.get("code") or answer.status).upper()
                else:
                    async for line in answer.content:
                        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                            continue
                        event = json.loads(line[6:])
                        if _sse_has_output(event):
                            stamps.append(perf())
                        usage = _sse_usage(event)
                        if usage is not None:
                            record.prompt_tokens, record.usage_completion_tokens = usage
                        if "error" in event or event.get("type") == "error":
                            stream_error = True
                    if stream_error:
                        record.code = "STREAM_ERROR"
                    else:
                        record.code = "OK" if record.usage_completion_tokens is not None else "INCOMPLETE"
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            record.code = type(err).__name__
        except asyncio.CancelledError:
            record.code = "CANCELLED"
            raise
        finally:
            self._ended(record, stamps, record.usage_completion_tokens or 0)
        return record

    async def _open_http(self) -> None:
        import aiohttp

        # One keep-alive connection per stream in flight, as a pool of HTTP/1.1 clients would hold.
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=None if self.connection.tls
                                                                          else False))
        headers = dict(self.connection.call_metadata(None))
        async with self._http.get(self.connection.http_base() + "/v1/models", headers=headers) as answer:
            answer.raise_for_status()
            self._model = (await answer.json())["data"][0]["id"]

    async def _closed(self, concurrency: int, count: int | None, deadline: float | None,
                      first_index: int, warmup: bool) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        next_index = first_index

        async def worker() -> None:
            nonlocal next_index
            while True:
                if count is not None and next_index - first_index >= count:
                    return
                if deadline is not None and self._now() >= deadline:
                    return
                index = next_index
                next_index += 1
                records.append(await self._one(index, warmup=warmup))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sorted(records, key=lambda r: r.index)

    async def _open(self, rate: float, count: int | None, deadline: float | None,
                    first_index: int) -> list[RequestRecord]:
        rng = random.Random(self.plan.seed)
        tasks: list[asyncio.Task] = []
        limit = asyncio.Semaphore(self.plan.max_in_flight) if self.plan.max_in_flight else None
        start = self._now()
        at = start
        i = 0

        async def limited(index: int, scheduled: float) -> RequestRecord:
            async with limit:
                return await self._one(index, scheduled_s=scheduled)

        while count is None or i < count:
            at += rng.expovariate(rate)
            if deadline is not None and at >= deadline:
                break
            wait = at - self._now()
            if wait > 0:
                await asyncio.sleep(wait)
            index = first_index + i
            coro = limited(index, at) if limit else self._one(index, scheduled_s=at)
            tasks.append(asyncio.ensure_future(coro))
            i += 1
        return list(await asyncio.gather(*tasks))

    async def run(self) -> RunResult:
        plan = self.plan
        http = plan.api in HTTP_APIS
        channels = [] if http else self.connection.open_channels()
        self._stubs = [pb_grpc.InferenceStub(c) for c in channels]
        if http:
            await self._open_http()
        self._t0 = time.perf_counter()
        result = RunResult(plan)
        try:
            if plan.warmup_requests:
                result.warmup = await self._closed(min(plan.concurrency or 8, plan.warmup_requests),
                                                   plan.warmup_requests, None, 0, warmup=True)
            first = plan.warmup_requests
            # Times in records count from the start of the measured part.
            self._t0 = time.perf_counter()
            result.started_unix = time.time()
            deadline = plan.duration_s
            if plan.concurrency is not None:
                result.records = await self._closed(plan.concurrency, plan.num_requests, deadline, first, False)
            else:
                result.records = await self._open(plan.rate, plan.num_requests, deadline, first)
        finally:
            for channel in channels:
                await channel.close()
            if self._http is not None:
                await self._http.close()
        return result


def run_load(connection: Connection, workload, plan: LoadPlan,
             on_done: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Run one load plan to the end (blocking); see LoadGenerator, and BlockingLoad for the plan's
    client "blocking"."""
    if plan.client == "blocking":
        from cluster.bench.blocking_client import BlockingLoad

        return BlockingLoad(connection, workload, plan, on_done).run()
    return asyncio.run(LoadGenerator(connection, workload, plan, on_done).run())


CLIENT_NICE = -19  # the load generator's priority in run_load_apart, where this user may raise it


def run_load_apart(connection: Connection, workload, plan: LoadPlan,
                   on_ready: Callable[[], None] = lambda: None) -> RunResult:
    """run_load in a process of its own, in a session of its own and at CLIENT_NICE where this user
    may set it (root, CAP_SYS_NICE; else as it is). A load generator on the box it loads is a client no
    deployment has: Linux shares the CPU between sessions first, and vLLM's engine busy-polls its
    worker for a second after each step, so a load generator left in the caller's session was seen
    kept off the CPU for 0.5-2 s at a time, late to read first tokens the server had sent
    (docs/performance.md). Its own session, raised, reads them when they arrive. `on_ready` runs once
    the process has started, just before the load does (to read the servers' CPU clocks)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or gRPC state inherited
    pipe, child_end = context.Pipe()
    child = context.Process(target=_load_in_own_session, args=(child_end, connection, workload, plan),
                            name="gptoss-load-generator", daemon=True)
    child.start()
    child_end.close()
    try:
        outcome = pipe.recv()
        if outcome == "ready":
            on_ready()
            pipe.send("go")
            outcome = pipe.recv()
    except EOFError:
        outcome = None
    child.join()
    if not isinstance(outcome, RunResult):
        raise RuntimeError(f"load generator process: {outcome or f'exited with code {child.exitcode}'}")
    return outcome


def _load_in_own_session(pipe, connection: Connection, workload, plan: LoadPlan) -> None:
    os.setsid()
    raise_priority(CLIENT_NICE)
    try:
        pipe.send("ready")
        pipe.recv()
        start = time.process_time()
        result = run_load(connection, workload, plan)
        result.client_cpu_s = time.process_time() - start
        pipe.send(result)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
        pipe.send(f"{type(err).__name__}: {err}")
    finally:
        pipe.close()


def raise_priority(nice: int) -> None:
    """This process's session (its scheduling group: Linux autogroups) and this process at `nice`,
    each where permitted."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass
