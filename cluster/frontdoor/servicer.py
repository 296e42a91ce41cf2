"""InferenceServicer: the gptoss.v1.Inference RPCs, and the core the OpenAI HTTP routes share.

Every call of either API runs inside `call_context`: admission first (admission.py: request id,
drain, auth, tenant budget), then the body, which converts protos to the engine's dataclasses
(conversion.py; every bad field becomes one BadRequest violation), streams from the ModelReplica
Serve's router chose (serving/replica_streams.py: the replica's direct stream, or the
DeploymentHandle), and relays its token chunks (chat_stream.py, generate_stream.py); in `finally`
it cancels the downstream call, so a client that cancels (or whose deadline passes) stops
generation. The call's deadline also travels with the request, so the replica stops on its own
at that time. Errors leave through errors.status_for only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
from ray.serve.handle import DeploymentHandle

from cluster.engine.errors import EngineOverloadedError, retry_after_s
from cluster.engine.request import GenerateRequest
from cluster.frontdoor import errors
from cluster.frontdoor.admission import Admission
from cluster.frontdoor.call import CallInfo
from cluster.frontdoor.call_record import CallRecord, MethodMetrics
from cluster.frontdoor.chat_stream import ChatStream
from cluster.frontdoor.conversion import (FINISH_REASONS, MAX_TEXT_BYTES, chat_request_from_proto,
                                          generate_request_from_proto, logprobs_to_proto, model_info_to_proto,
                                          usage_to_proto)
from cluster.frontdoor.generate_stream import GenerateStream
from cluster.frontdoor.loads import replica_load_to_proto, sample_loads
from cluster.frontdoor.migration import MigratingStream
from cluster.frontdoor.usage import UsageRecorder
from cluster.harmony.tokenizer import FIRST_SPECIAL_ID, load_tokenizer
from cluster.metrics import FrontdoorMetrics
from cluster.serving.model_info import ModelInfo
from cluster.serving.replica_streams import ReplicaStreams
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_DETOKENIZE_IDS = 1 << 20
LOADS_TIMEOUT_S = 5.0
ENDED_WINDOW_S = 10.0  # streams ended within this window give the rate a refusal's retry hint uses

# How a call that failed answers its client: gRPC aborts the call; HTTP writes an error body.
Answer = Callable[[CallInfo, object, errors.RpcError], Awaitable[None]]


def cancelled_code(context) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


async def abort(call: CallInfo, context: grpc.aio.ServicerContext, status: errors.RpcError) -> None:
    """End a gRPC call with `status` (this raises), x-request-id first as for every answer."""
    await call.announce(context)
    await context.abort_with_status(status.to_status())


async def fail(context: grpc.aio.ServicerContext, err: BaseException, call: CallInfo) -> None:
    """Abort a call no CallRecord follows (Admin) with the status errors.status_for chooses."""
    status = errors.status_for(err, request_id=call.request_id)
    call.logger(log).info("-> %s: %s", status.code.name, status.message)
    await abort(call, context, status)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, handle: DeploymentHandle, info: ModelInfo, metrics: FrontdoorMetrics,
                 admission: Admission, *, replica_wait_s: float = 30.0, migration_attempts: int = 3,
                 usage: UsageRecorder | None = None, slow_first_token_s: float = 0.0) -> None:
        self._handle = handle
        self._slow_first_token_s = slow_first_token_s
        self._migration_attempts = migration_attempts
        self._replicas = ReplicaStreams(handle, replica_wait_s)
        self._info = info
        self._metrics = metrics
        self._admission = admission
        self._usage = usage or UsageRecorder(metrics.tenant, lambda: (), info.model_name)
        self._model_info = model_info_to_proto(info)
        self._streams_in_flight = 0
        self._ended: collections.deque[float] = collections.deque()  # when recent streams ended
        self._per_method: dict[tuple[str, str], MethodMetrics] = {}

    async def close(self) -> None:
        await self._replicas.close()

    def routable_replicas(self) -> int | None:
        return self._replicas.routable_replicas()

    # ── what every call of either API goes through ──

    @contextlib.asynccontextmanager
    async def call_context(self, method: str, context, request=None, *, api: str = "grpc", streaming: bool = False,
                           billed: bool | None = None, problem: Exception | None = None,
                           answer: Answer = abort) -> AsyncIterator[tuple[CallInfo, CallRecord]]:
        """One call from admission to its metrics and usage record; the body runs inside.

        `streaming`: a gRPC stream, which holds one of the tenant's concurrent streams and sends
        x-request-id once its downstream call is on its way (a unary call sends it first).
        `billed` (default: `streaming`): the call generates, so it leaves a usage record.
        `problem`: one more reason to refuse the call (an HTTP header that did not parse).
        An exception from the body leaves as the status errors.status_for chooses, through `answer`.
        A body that hands the call on (record.detached) leaves record.release() to its new owner."""
        record = CallRecord(self._metrics, method, self._method_metrics(method, api), api, self._slow_first_token_s)
        call, metadata_problem = self._admission.open(method, context)
        record.log = call.logger(log)

        def release() -> None:
            self._admission.leave(call)
            record.end()
            if streaming if billed is None else billed:
                self.record_usage(call, record)
        record.release = release
        try:
            try:
                if not streaming:
                    await call.announce(context)
                self._admission.check(call, metadata_problem or problem, request, streaming=streaming)
                if streaming:
                    # Overload is refused before the request is converted: under a burst the
                    # refusals are most of the calls, and each is then only a few lookups.
                    self.admit_stream()
                yield call, record
                record.code = grpc.StatusCode.OK
            except (asyncio.CancelledError, GeneratorExit):  # client went away or deadline passed
                if record.answered:  # the client left after the last message, before the status
                    record.code = grpc.StatusCode.OK
                else:
                    record.code = cancelled_code(context)
                    call.logger(log).info("-> %s by the client", record.code.name)
                raise
            except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
                status = errors.status_for(err, request_id=call.request_id)
                record.failed(status)
                call.logger(log).info("-> %s: %s", status.code.name, status.message)
                await answer(call, context, status)
        finally:
            if not record.detached:
                release()

    def _method_metrics(self, method: str, api: str) -> MethodMetrics:
        children = self._per_method.get((api, method))
        if children is None:
            children = self._per_method[(api, method)] = MethodMetrics(self._metrics, method, api)
        return children

    def record_usage(self, call: CallInfo, record: CallRecord) -> None:
        """The tenant's usage record and counters for a finished generating call, either API."""
        if call.tenant or self._admission.api_keys is None:  # refused unauthenticated: no tenant to bill
            self._usage.record(request_id=call.request_id, tenant=call.tenant, method=record.method,
                               usage=record.usage, outcome=record.code.name,
                               duration_s=time.perf_counter() - record.start)

    def fit_to_tenant(self, call: CallInfo, request: GenerateRequest, prompt_field: str) -> GenerateRequest:
        """`request` within the tenant's token limits (its max_tokens lowered to fit, or refused
        naming `prompt_field` when the prompt alone is over)."""
        max_tokens = self._admission.limits.fit_request(call.tenant, len(request.prompt_token_ids),
                                                        request.sampling.max_tokens, prompt_field=prompt_field)
        if max_tokens == request.sampling.max_tokens:
            return request
        if request.sampling.max_tokens is None:  # the tenant's cap on an unset max_tokens still fits the context
            max_tokens = max(1, min(max_tokens, self._info.context_length - len(request.prompt_token_ids)))
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=max_tokens))

    # ── the replica stream ──

    def connect_replicas(self) -> None:
        self._replicas.connect()

    def admit_stream(self) -> None:
        """Refuse a stream the routable replicas have no room for (each holds
        ModelInfo.max_active_requests), at once and with a retry hint from the queue ahead of it
        and the rate streams ended at lately, instead of sending it to be refused by a replica.

        What they hold: per replica, the larger of its last load report (which counts other front
        doors' requests too) and what this front door's router has on it, plus this front door's
        streams the router has not placed yet (a burst arrives faster than the router runs)."""
        routable = self._replicas.routable_replicas()
        capacity = (routable or 0) * self._info.max_active_requests
        if not capacity:
            return
        held, routed = self._replicas.requests_held()
        holding = held + max(0, self._streams_in_flight - routed)
        if holding >= capacity:
            now = time.monotonic()
            while self._ended and self._ended[0] < now - ENDED_WINDOW_S:
                self._ended.popleft()
            raise EngineOverloadedError(holding, capacity,
                                        retry_after_s(holding - capacity + 1, len(self._ended) / ENDED_WINDOW_S))

    @contextlib.asynccontextmanager
    async def _replica_chunks(self, request: GenerateRequest, call: CallInfo, context,
                              record: CallRecord) -> AsyncIterator[MigratingStream]:
        """The replica's chunks (iterate what this yields), after counting and charging the
        prompt; the downstream call is cancelled however the body ends early. A context manager
        rather than one more generator around the stream: each level of generators costs every
        streamed message a resumption.

        The call's x-request-id goes out while the request is on its way, not before."""
        prompt_tokens = len(request.prompt_token_ids)
        record.prompt(prompt_tokens)
        self._charge(call, prompt_tokens)
        self.admit_stream()  # every stream of both APIs (a gRPC call was checked before its conversion too)
        self._streams_in_flight += 1
        try:
            record.dispatched_at = time.perf_counter()  # the stream sends the request as it is made
            stream = MigratingStream(self._replicas, request, attempts=self._migration_attempts,
                                     default_max_tokens=self._info.default_max_tokens,
                                     context_length=self._info.context_length,
                                     migrations=self._metrics.migrations_total,
                                     retry_for_s=self._replicas.replica_wait_s,
                                     resumes_constrained=self._info.resumes_constrained)
            try:
                await call.announce(context)
                yield stream
            finally:
                stream.close()
        finally:
            self._streams_in_flight -= 1
            self._ended.append(time.monotonic())

    def _charge(self, call: CallInfo, n_tokens: int) -> None:
        self._admission.limits.charge_tokens(call.tenant, n_tokens)

    def _completion(self, call: CallInfo, record: CallRecord, n_tokens: int) -> None:
        record.tokens(n_tokens)
        self._charge(call, n_tokens)

    # ── the two generating paths, shared by both APIs ──

    async def chat_events(self, internal: GenerateRequest, stops, return_token_ids: bool, call: CallInfo, context,
                          record: CallRecord) -> AsyncIterator[tuple[list[pb.ChatDelta], pb.ChatComplete | None]]:
        """The one chat path of both APIs: stream `internal` from a replica and parse the tokens
        into deltas, counting and charging them; the last item carries the ChatComplete. Tokens
        count in the tenant's usage as they are handed to the consumer, before the yield: a cancel
        can land after the client got them but before the write's completion resumes this."""
        prompt_tokens = len(internal.prompt_token_ids)
        stream = ChatStream(stops if not internal.sampling.ignore_stop else (), return_token_ids)
        async with self._replica_chunks(internal, call, context, record) as chunks:
            async for chunk in chunks:
                if record.first_chunk_at is None:
                    record.first_chunk(chunk.replica_first_chunk_s)
                before = stream.completion_tokens
                deltas = stream.feed(chunk.token_ids, logprobs_to_proto(chunk.logprobs))
                finished = chunk.finish_reason is not None or stream.stop_sequence is not None
                if finished:
                    deltas += stream.finish()
                used = stream.completion_tokens - before
                self._completion(call, record, used)
                record.usage.sent(prompt_tokens, used, chunk.cached_prompt_tokens, stream.reasoning_tokens)
                yield deltas, None
                if not finished:
                    continue
                if stream.stop_sequence is not None:
                    reason = pb.FINISH_REASON_STOP
                elif stream.ended_with_tool_call:
                    reason = pb.FINISH_REASON_TOOL_CALL
                else:
                    reason = FINISH_REASONS[chunk.finish_reason.value]
                yield [], pb.ChatComplete(
                    finish_reason=reason, stop_sequence=stream.stop_sequence or "",
                    usage=usage_to_proto(prompt_tokens, stream.completion_tokens, chunk, stream.reasoning_tokens))
                return

    async def generate_events(self, internal: GenerateRequest, stops, send_text: bool, call: CallInfo, context,
                              record: CallRecord
                              ) -> AsyncIterator[tuple[pb.GenerateChunk | None, pb.GenerateComplete | None]]:
        """The one raw-prompt path of both APIs: relay `internal`'s tokens (with text when asked,
        cut at a stop sequence), counting and charging them; the last item has the complete."""
        prompt_tokens = len(internal.prompt_token_ids)
        stream = GenerateStream(tuple(stops) if not internal.sampling.ignore_stop else (), send_text)
        async with self._replica_chunks(internal, call, context, record) as chunks:
            async for chunk in chunks:
                if record.first_chunk_at is None:
                    record.first_chunk(chunk.replica_first_chunk_s)
                before = stream.completion_tokens
                out = stream.feed(chunk.token_ids, logprobs_to_proto(chunk.logprobs),
                                  last=chunk.finish_reason is not None)
                used = stream.completion_tokens - before
                self._completion(call, record, used)
                record.usage.sent(prompt_tokens, used, chunk.cached_prompt_tokens)
                if out is not None:
                    yield out, None
                if not stream.finished:
                    continue
                stopped = stream.stop_sequence
                reason = pb.FINISH_REASON_STOP if stopped else FINISH_REASONS[chunk.finish_reason.value]
                yield None, pb.GenerateComplete(finish_reason=reason, stop_sequence=stopped or "",
                                                usage=usage_to_proto(prompt_tokens, stream.completion_tokens, chunk))
                return

    # ── the RPCs ──

    async def Chat(self, request: pb.ChatRequest, context):
        async with self.call_context("Chat", context, request, streaming=True) as (call, record):
            internal = self.fit_to_tenant(call, chat_request_from_proto(request, self._info, call, context), "messages")
            async with contextlib.aclosing(self.chat_events(internal, request.sampling.stop, request.return_token_ids,
                                                            call, context, record)) as events:
                async for deltas, complete in events:
                    for delta in deltas:
                        yield pb.ChatResponse(delta=delta)
                    if complete is not None:
                        record.answered = True
                        yield pb.ChatResponse(complete=complete)

    async def Generate(self, request: pb.GenerateRequest, context):
        async with self.call_context("Generate", context, request, streaming=True) as (call, record):
            internal = self.fit_to_tenant(call, generate_request_from_proto(request, self._info, call, context),
                                          "prompt_text" if request.prompt_text else "prompt_token_ids")
            send_text = bool(request.prompt_text or request.return_text)
            async with contextlib.aclosing(self.generate_events(internal, request.sampling.stop, send_text,
                                                                call, context, record)) as events:
                async for chunk, complete in events:
                    if chunk is not None:
                        yield pb.GenerateResponse(chunk=chunk)
                    if complete is not None:
                        record.answered = True
                        yield pb.GenerateResponse(complete=complete)

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        async with self.call_context("Tokenize", context, request):
            if len(request.text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
                raise errors.FieldError("text", f"must be at most {MAX_TEXT_BYTES} bytes")
            return pb.TokenizeResponse(token_ids=load_tokenizer().encode(request.text,
                                                                         allow_special=request.allow_special_tokens))

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        async with self.call_context("Detokenize", context, request):
            ids = request.token_ids
            if len(ids) > MAX_DETOKENIZE_IDS:
                raise errors.FieldError("token_ids", f"at most {MAX_DETOKENIZE_IDS} ids, got {len(ids)}")
            for i, token in enumerate(ids):
                if token >= self._info.vocab_size:
                    raise errors.FieldError(f"token_ids[{i}]", f"{token} is outside the vocabulary "
                                                              f"[0, {self._info.vocab_size})")
            if request.skip_special_tokens:
                ids = [t for t in ids if t < FIRST_SPECIAL_ID]
            return pb.DetokenizeResponse(text=load_tokenizer().decode(ids))

    async def GetModelInfo(self, request, context):
        async with self.call_context("GetModelInfo", context, request):
            return self._model_info

    async def GetLoads(self, request, context):
        async with self.call_context("GetLoads", context, request):
            reports = await sample_loads(self._handle, self._info.replicas, LOADS_TIMEOUT_S)
            self._metrics.replicas.update(reports)  # fresher than the periodic poll
            return pb.GetLoadsResponse(replicas=[replica_load_to_proto(rid, stats) for rid, stats in reports],
                                       expected_replicas=self._info.replicas,
                                       frontdoor_in_flight=max(0, self._admission.in_flight - 1))
