"""InferenceServicer: the gptoss.v1.Inference RPCs.

Each RPC validates its request (a bad field -> INVALID_ARGUMENT naming it), converts protos to
the engine's dataclasses, forwards to the ModelReplica deployment through a DeploymentHandle
with `.options(stream=True)`, relays the replica's token chunks, and in `finally` cancels the
downstream call, so a client that cancels (or whose deadline passes) stops generation.
Chat renders harmony messages into the prompt and parses the streamed tokens back into channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from ray.serve.handle import DeploymentHandle

from cluster.engine.request import (GenerateRequest, SamplingParams, TokenChunk, validate_request,
                                    validate_sampling)
from cluster.frontdoor import errors
from cluster.harmony.parse import Delta, DeltaKind, StreamParser
from cluster.harmony.render import Message, render_prompt
from cluster.metrics import FrontdoorMetrics
from cluster.serving.model_info import ModelInfo
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "developer", pb.ROLE_USER: "user",
              pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool"}
REASONING_EFFORTS = {pb.REASONING_EFFORT_UNSPECIFIED: "medium", pb.REASONING_EFFORT_LOW: "low",
                     pb.REASONING_EFFORT_MEDIUM: "medium", pb.REASONING_EFFORT_HIGH: "high"}
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
QUANTIZATIONS = {"mxfp4": pb.QUANTIZATION_MXFP4, "none": pb.QUANTIZATION_NONE}


# ───────────────────────────── proto -> internal (with validation) ─────────────────────────────

def sampling_from_proto(sampling: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else None,
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(sampling.stop_token_ids) or None,
        ignore_stop=sampling.ignore_stop,
    )


def generate_request_from_proto(request: pb.GenerateRequest, info: ModelInfo) -> GenerateRequest:
    """The engine request for a Generate call; raises FieldError naming a bad field."""
    internal = GenerateRequest(prompt_token_ids=tuple(request.prompt_token_ids),
                               sampling=sampling_from_proto(request.sampling),
                               request_id=request.request_id or uuid.uuid4().hex[:16])
    validate_request(internal, info.limits)
    return internal


def messages_from_proto(messages) -> list[Message]:
    if not messages:
        raise errors.FieldError("messages", "must contain at least one message")
    converted = []
    for i, message in enumerate(messages):
        role = ROLE_NAMES.get(message.role)
        if role is None:
            name = pb.Role.Name(message.role) if message.role in pb.Role.values() else str(message.role)
            raise errors.FieldError(f"messages[{i}].role",
                                    f"must be one of {', '.join(pb.Role.Name(r) for r in ROLE_NAMES)}, got {name}")
        converted.append(Message(
            role=role, content=message.content,
            channel=message.channel if message.HasField("channel") else None,
            recipient=message.recipient if message.HasField("recipient") else None,
            content_type=message.content_type if message.HasField("content_type") else None,
            name=message.name if message.HasField("name") else None))
    return converted


def chat_request_from_proto(request: pb.ChatRequest, info: ModelInfo) -> GenerateRequest:
    """Render a Chat call into an engine request; raises FieldError/HarmonyInputError."""
    messages = messages_from_proto(request.messages)
    effort = REASONING_EFFORTS.get(request.reasoning_effort)
    if effort is None:
        raise errors.FieldError("reasoning_effort", f"unknown value {request.reasoning_effort}")
    prompt = render_prompt(messages, reasoning_effort=effort,
                           instructions=request.instructions if request.HasField("instructions") else None)
    if len(prompt) >= info.context_length:
        raise errors.FieldError("messages", f"the rendered prompt has {len(prompt)} tokens, "
                                            f"more than the context length {info.context_length} allows")
    sampling = sampling_from_proto(request.sampling)
    validate_sampling(sampling, len(prompt), info.limits)
    return GenerateRequest(prompt_token_ids=tuple(prompt), sampling=sampling,
                           request_id=request.request_id or uuid.uuid4().hex[:16])


# ───────────────────────────────────── internal -> proto ─────────────────────────────────────

def chat_delta_to_proto(delta: Delta) -> pb.ChatDelta | None:
    """The ChatDelta for one parser event (None for an event a client need not see)."""
    if delta.kind is DeltaKind.TEXT:
        if not delta.text:
            return None
        return pb.ChatDelta(channel=delta.channel or "", recipient=delta.recipient or "",
                            content_type=delta.content_type or "", text=delta.text, raw=delta.raw)
    # MESSAGE_DONE and TOOL_CALL both close a message; a recipient marks the tool call.
    return pb.ChatDelta(channel=delta.channel or "", recipient=delta.recipient or "",
                        content_type=delta.content_type or "", raw=delta.raw, message_end=True)


def usage_to_proto(chunk: TokenChunk) -> pb.Usage:
    return pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens)


def model_info_to_proto(info: ModelInfo) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_name=info.model_name, preset=info.preset, vocab_size=info.vocab_size,
        context_length=info.context_length, num_layers=info.num_layers, num_experts=info.num_experts,
        experts_per_token=info.experts_per_token,
        quantization=QUANTIZATIONS.get(info.quantization, pb.QUANTIZATION_UNSPECIFIED),
        dtype=info.dtype, engine=info.engine, replicas=info.replicas)


# ───────────────────────────────────────── servicer ─────────────────────────────────────────

class _Rpc:
    """Bookkeeping of one RPC: in-flight gauge, status code, latencies, token counters."""

    def __init__(self, metrics: FrontdoorMetrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.code = grpc.StatusCode.UNKNOWN
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        metrics.requests_in_flight.labels(method).inc()

    def prompt(self, n_tokens: int) -> None:
        self.metrics.prompt_tokens_total.labels(self.method).inc(n_tokens)

    def tokens(self, n_tokens: int) -> None:
        if not n_tokens:
            return
        now = time.perf_counter()
        histogram = self.metrics.inter_token_latency_seconds.labels(self.method)
        if self._last_token_at is None:
            # The first token's wait is time to first token; tokens that came with it waited 0.
            self.metrics.time_to_first_token_seconds.labels(self.method).observe(now - self.start)
            for _ in range(n_tokens - 1):
                histogram.observe(0.0)
        else:
            # A chunk of n tokens after t seconds: n observations of t/n (one per completion
            # token after the first, so the count is completion_tokens - 1 per stream).
            per_token = (now - self._last_token_at) / n_tokens
            for _ in range(n_tokens):
                histogram.observe(per_token)
        self._last_token_at = now
        self.metrics.completion_tokens_total.labels(self.method).inc(n_tokens)

    def end(self) -> None:
        m = self.metrics
        m.requests_in_flight.labels(self.method).dec()
        m.requests_total.labels(self.method, errors.code_label(self.code)).inc()
        m.request_duration_seconds.labels(self.method).observe(time.perf_counter() - self.start)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, handle: DeploymentHandle, info: ModelInfo, metrics: FrontdoorMetrics) -> None:
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._info = info
        self._metrics = metrics

    async def _chunks(self, request: GenerateRequest) -> AsyncIterator[TokenChunk]:
        """Relay the replica's chunks; cancel the downstream call however this ends early."""
        response = self._stream_handle.generate.remote(request)
        finished = False
        try:
            async for chunk in response:
                yield chunk
                if chunk.finish_reason is not None:
                    finished = True
        finally:
            if not finished:
                response.cancel()

    async def _fail(self, rpc: _Rpc, context: grpc.aio.ServicerContext, err: BaseException,
                    request_id: str) -> None:
        status = errors.status_for(err, request_id=request_id)
        rpc.code = status.code
        await context.abort_with_status(status.to_status())

    def _cancelled_code(self, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
            else grpc.StatusCode.CANCELLED

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rpc = _Rpc(self._metrics, "Generate")
        request_id = request.request_id
        try:
            try:
                internal = generate_request_from_proto(request, self._info)
                request_id = internal.request_id
                rpc.prompt(len(internal.prompt_token_ids))
                async with contextlib.aclosing(self._chunks(internal)) as chunks:
                    async for chunk in chunks:
                        if chunk.token_ids:
                            rpc.tokens(len(chunk.token_ids))
                            yield pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=chunk.token_ids))
                        if chunk.finish_reason is not None:
                            rpc.code = grpc.StatusCode.OK
                            yield pb.GenerateResponse(complete=pb.GenerateComplete(
                                finish_reason=FINISH_REASONS[chunk.finish_reason.value], usage=usage_to_proto(chunk)))
            except (asyncio.CancelledError, GeneratorExit):  # client went away or deadline passed
                rpc.code = self._cancelled_code(context)
                raise
            except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
                await self._fail(rpc, context, err, request_id)
        finally:
            rpc.end()

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext):
        rpc = _Rpc(self._metrics, "Chat")
        request_id = request.request_id
        try:
            try:
                internal = chat_request_from_proto(request, self._info)
                request_id = internal.request_id
                rpc.prompt(len(internal.prompt_token_ids))
                parser = StreamParser()
                async with contextlib.aclosing(self._chunks(internal)) as chunks:
                    async for chunk in chunks:
                        rpc.tokens(len(chunk.token_ids))
                        deltas = parser.feed(chunk.token_ids)
                        if chunk.finish_reason is not None:
                            deltas += parser.finish()
                        for delta in deltas:
                            message = chat_delta_to_proto(delta)
                            if message is not None:
                                yield pb.ChatResponse(delta=message)
                        if chunk.finish_reason is not None:
                            rpc.code = grpc.StatusCode.OK
                            yield pb.ChatResponse(complete=pb.ChatComplete(
                                finish_reason=FINISH_REASONS[chunk.finish_reason.value], usage=usage_to_proto(chunk)))
            except (asyncio.CancelledError, GeneratorExit):  # client went away or deadline passed
                rpc.code = self._cancelled_code(context)
                raise
            except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
                await self._fail(rpc, context, err, request_id)
        finally:
            rpc.end()

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        rpc = _Rpc(self._metrics, "GetModelInfo")
        try:
            rpc.code = grpc.StatusCode.OK
            return model_info_to_proto(self._info)
        finally:
            rpc.end()

