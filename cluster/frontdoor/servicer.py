"""InferenceServicer: the gptoss.v1.Inference RPCs.

Each RPC is admitted first (admission.py: request id, drain, auth, tenant budget), validates its
request (every bad field becomes one BadRequest violation), converts protos to the engine's
dataclasses, streams from the ModelReplica Serve's router chose (serving/replica_streams.py: the
replica's direct stream, or the DeploymentHandle), relays the replica's token chunks, and in
`finally` cancels the downstream call, so a client that cancels (or whose deadline passes) stops
generation. The call's deadline also travels with the request, so the replica stops on its own
at that time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from typing import AsyncIterator

import grpc
from ray.serve.handle import DeploymentHandle

from cluster.engine.errors import EngineOverloadedError, InvalidRequestError, retry_after_s
from cluster.engine.request import (MAX_LOGPROBS, GenerateRequest, SamplingParams, TokenChunk, TokenLogprobs,
                                    validate_request, validate_sampling)
from cluster.frontdoor import errors
from cluster.frontdoor.admission import Admission, announce
from cluster.frontdoor.call import CallInfo
from cluster.frontdoor.chat_stream import ChatStream
from cluster.frontdoor.loads import replica_load_to_proto, sample_loads
from cluster.frontdoor.migration import MigratingStream
from cluster.frontdoor.stops import StopMatcher
from cluster.frontdoor.usage import Usage, UsageRecorder
from cluster.harmony.render import MAX_SCHEMA_DEPTH, HarmonyInputError, Message, ToolDefinition, render_prompt
from cluster.harmony.structured import ConstraintError, ResponseFormat, StrictTool, TurnConstraint, check_constraint
from cluster.harmony.tokenizer import FIRST_SPECIAL_ID, START_ID, load_tokenizer
from cluster.metrics import FrontdoorMetrics
from cluster.serving.model_info import ModelInfo
from cluster.serving.replica_streams import ReplicaStreams
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

ROLE_NAMES = {pb.ROLE_SYSTEM: "system", pb.ROLE_DEVELOPER: "developer", pb.ROLE_USER: "user",
              pb.ROLE_ASSISTANT: "assistant", pb.ROLE_TOOL: "tool"}
CHANNEL_NAMES = {pb.CHANNEL_UNSPECIFIED: None, pb.CHANNEL_ANALYSIS: "analysis",
                 pb.CHANNEL_COMMENTARY: "commentary", pb.CHANNEL_FINAL: "final"}
REASONING_EFFORTS = {pb.REASONING_EFFORT_UNSPECIFIED: "medium", pb.REASONING_EFFORT_LOW: "low",
                     pb.REASONING_EFFORT_MEDIUM: "medium", pb.REASONING_EFFORT_HIGH: "high"}
FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
QUANTIZATIONS = {"mxfp4": pb.QUANTIZATION_MXFP4, "none": pb.QUANTIZATION_NONE}
GRAMMAR_SYNTAXES = {pb.GRAMMAR_SYNTAX_UNSPECIFIED: "lark", pb.GRAMMAR_SYNTAX_LARK: "lark",
                    pb.GRAMMAR_SYNTAX_GBNF: "gbnf"}

MAX_STOP_SEQUENCES, MAX_STOP_LENGTH, MAX_STOP_TOKEN_IDS = 16, 256, 64
MAX_TOOLS = 128
MAX_TEXT_BYTES = 1 << 20
MAX_DETOKENIZE_IDS = 1 << 20
LOADS_TIMEOUT_S = 5.0
ENDED_WINDOW_S = 10.0  # streams ended within this window give the rate a refusal's retry hint uses


# ───────────────────────────── proto -> internal (with validation) ─────────────────────────────

class Violations:
    """Collects bad fields so one INVALID_ARGUMENT names all of them."""

    def __init__(self) -> None:
        self.errors: list[InvalidRequestError] = []

    def add(self, field: str, reason: str) -> None:
        self.errors.append(errors.FieldError(field, reason))

    @contextlib.contextmanager
    def collect(self):
        """Run a validator that stops at its first bad field; record that field and go on."""
        try:
            yield
        except errors.FieldErrors as err:
            self.errors.extend(err.errors)
        except InvalidRequestError as err:
            self.errors.append(err)

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise errors.FieldErrors(self.errors)


def sampling_from_proto(sampling: pb.SamplingParams, info: ModelInfo, violations: Violations) -> SamplingParams:
    """Internal SamplingParams; checks the fields only the front door handles (stops, logprobs)."""
    check_stops(sampling.stop, "sampling.stop", violations)
    if len(sampling.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        violations.add("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(sampling.stop_token_ids)}")
    if sampling.HasField("logprobs"):
        check_logprobs(sampling.logprobs, "sampling.logprobs", info, violations)
    return SamplingParams(
        max_tokens=sampling.max_tokens if sampling.HasField("max_tokens") else None,
        temperature=sampling.temperature if sampling.HasField("temperature") else 0.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop_token_ids=tuple(sampling.stop_token_ids) or None,
        ignore_stop=sampling.ignore_stop,
        logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
    )


def check_stops(stops, field: str, violations: Violations) -> None:
    """Stop sequences the front door matches on streamed text (both APIs)."""
    if len(stops) > MAX_STOP_SEQUENCES:
        violations.add(field, f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    for i, stop in enumerate(stops):
        if not 1 <= len(stop) <= MAX_STOP_LENGTH:
            violations.add(f"{field}[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters, got {len(stop)}")


def check_logprobs(logprobs: int, field: str, info: ModelInfo, violations: Violations) -> None:
    if not info.supports_logprobs:
        violations.add(field, f"the {info.engine} engine does not report log probabilities "
                              "(GetModelInfo.supports_logprobs)")
    elif not 0 <= logprobs <= MAX_LOGPROBS:
        violations.add(field, f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")


def _check_sampling(sampling: SamplingParams, prompt_len: int, info: ModelInfo, violations: Violations,
                    prefix: str = "sampling.") -> None:
    """Every sampling field the engine would refuse, each reported (the engine stops at the first)."""
    limits = info.limits
    try:
        validate_sampling(sampling, prompt_len, limits, prefix)
        return  # the usual case: all valid, one pass
    except InvalidRequestError:
        pass  # find every bad field, one at a time
    for name, value in (("temperature", sampling.temperature), ("top_p", sampling.top_p), ("top_k", sampling.top_k),
                        ("max_tokens", sampling.max_tokens)):
        alone = SamplingParams(**{name: value})
        with violations.collect():
            validate_sampling(alone, prompt_len, limits, prefix)
    with violations.collect():
        validate_sampling(SamplingParams(stop_token_ids=sampling.stop_token_ids), prompt_len, limits, prefix)


def _request(prompt: list[int], sampling: SamplingParams, call: CallInfo, context,
             constraint: TurnConstraint | None = None) -> GenerateRequest:
    remaining = context.time_remaining()
    return GenerateRequest(prompt_token_ids=tuple(prompt), sampling=sampling, request_id=call.request_id,
                           session_id=call.session_id, tenant=call.tenant,
                           deadline_s=None if remaining is None else time.time() + remaining, constraint=constraint)


def response_format_from_proto(fmt: pb.ResponseFormat, violations: Violations) -> ResponseFormat:
    kind = fmt.WhichOneof("format")
    if kind == "json_schema":
        try:
            schema = json.loads(fmt.json_schema.schema_json)
        except ValueError as err:
            violations.add("response_format.json_schema.schema_json", f"is not valid JSON: {err}")
            return ResponseFormat()
        return ResponseFormat("json_schema", schema=schema, strict=fmt.json_schema.strict, name=fmt.json_schema.name)
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "regex":
        return ResponseFormat("regex", pattern=fmt.regex)
    if kind == "grammar":
        return ResponseFormat("grammar", grammar=fmt.grammar.text,
                              grammar_syntax=GRAMMAR_SYNTAXES.get(fmt.grammar.syntax, str(fmt.grammar.syntax)))
    return ResponseFormat()


_PROTO_FIELDS = {"response_format.schema": "response_format.json_schema.schema_json",
                 "response_format.pattern": "response_format.regex",
                 "response_format.grammar": "response_format.grammar.text",
                 "response_format.grammar_syntax": "response_format.grammar.syntax"}


def constraint_from_proto(request, tools: list[ToolDefinition], strict: list[bool],
                          violations: Violations) -> TurnConstraint | None:
    """The request's structured-output constraint, compiled once here so a bad one is refused
    before anything is generated; None when the request constrains nothing."""
    budget = request.reasoning_budget if request.HasField("reasoning_budget") else None
    constraint = TurnConstraint(
        response_format=response_format_from_proto(request.response_format, violations),
        strict_tools=tuple(StrictTool(t.name, t.parameters or {"type": "object"})
                           for t, is_strict in zip(tools, strict) if is_strict),
        reasoning_budget=budget)
    if not constraint.active:
        return None
    try:
        check_constraint(constraint)
    except ConstraintError as err:
        field = _PROTO_FIELDS.get(err.field, err.field)
        if field.startswith("tools["):  # numbered among the strict tools: name the request's own index
            strict_index = int(field[6:field.index("]")])
            index = [i for i, is_strict in enumerate(strict) if is_strict][strict_index]
            field = f"tools[{index}].parameters_json"
        violations.add(field, err.problem)
    return constraint


def generate_request_from_proto(request: pb.GenerateRequest, info: ModelInfo, call: CallInfo,
                                context) -> GenerateRequest:
    """The engine request for a Generate call; raises naming every bad field."""
    violations = Violations()
    sampling = sampling_from_proto(request.sampling, info, violations)
    constraint = constraint_from_proto(request, [], [], violations)
    if sampling.stop_token_ids is None and constraint is None:
        # Generate keeps its documented default: every harmony message end, <|end|> included
        # (Chat, through the engine's default, stops only at the end of the turn, and so does a
        # constrained Generate, whose grammar covers the whole turn).
        sampling = dataclasses.replace(sampling, stop_token_ids=load_tokenizer().message_end_ids)
    prompt: list[int] = list(request.prompt_token_ids)
    if prompt and request.prompt_text:
        violations.add("prompt_text", "set either prompt_token_ids or prompt_text, not both")
    elif request.prompt_text:
        prompt = encode_prompt_text(request.prompt_text, "prompt_text", violations)
    elif not prompt:
        violations.add("prompt_token_ids", "must not be empty (or set prompt_text)")
    return build_generate_request(prompt, sampling, info, call, context, violations, constraint=constraint)


def _check_constrained_sampling(sampling: SamplingParams, violations: Violations, prefix: str) -> None:
    if sampling.ignore_stop:
        violations.add(f"{prefix}ignore_stop", "cannot be combined with a constrained output, which ends at the "
                                               "end of the turn")


def encode_prompt_text(text: str, field: str, violations: Violations) -> list[int]:
    """A raw prompt's token ids (special tokens written as text are special)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
        violations.add(field, f"must be at most {MAX_TEXT_BYTES} bytes")
        return []
    return load_tokenizer().encode(text, allow_special=True)


def build_generate_request(prompt: list[int], sampling: SamplingParams, info: ModelInfo, call: CallInfo, context,
                           violations: Violations, *, prompt_field: str = "prompt_token_ids",
                           sampling_prefix: str = "sampling.", constraint: TurnConstraint | None = None
                           ) -> GenerateRequest:
    """The engine request for a raw prompt (gRPC Generate and the HTTP completions route); raises
    naming every bad field, those found while converting included. `constraint`: structured output,
    already checked (constraint_from_proto; check_constraint for other callers)."""
    if prompt:
        with violations.collect():
            try:
                validate_request(GenerateRequest(prompt_token_ids=tuple(prompt)), info.limits)
            except InvalidRequestError as err:  # named as in gptoss.v1; the HTTP route names its own field
                raise errors.FieldError(err.field.replace("prompt_token_ids", prompt_field, 1), err.reason) from None
    _check_sampling(sampling, max(1, len(prompt)), info, violations, sampling_prefix)
    if constraint is not None:
        if prompt[-2:] != [START_ID, load_tokenizer().encode("assistant")[0]]:
            violations.add(constraint.field_prefix, "a constrained raw prompt must be a harmony prompt that ends "
                                                    "with <|start|>assistant (the constraint covers the assistant's turn)")
        _check_constrained_sampling(sampling, violations, sampling_prefix)
    violations.raise_any()
    return _request(prompt, sampling, call, context, constraint)



def messages_from_proto(messages, violations: Violations) -> list[Message]:
    if not messages:
        violations.add("messages", "must contain at least one message")
    converted = []
    for i, message in enumerate(messages):
        role = ROLE_NAMES.get(message.role)
        if role is None:
            name = pb.Role.Name(message.role) if message.role in pb.Role.values() else str(message.role)
            violations.add(f"messages[{i}].role",
                           f"must be one of {', '.join(pb.Role.Name(r) for r in ROLE_NAMES)}, got {name}")
        if message.channel not in CHANNEL_NAMES:
            violations.add(f"messages[{i}].channel", f"unknown value {message.channel}")
        converted.append(Message(
            role=role or "user", content=message.content, channel=CHANNEL_NAMES.get(message.channel),
            recipient=message.recipient if message.HasField("recipient") else None,
            content_type=message.content_type if message.HasField("content_type") else None,
            name=message.name if message.HasField("name") else None))
    return converted


def tools_from_proto(tools, violations: Violations) -> list[ToolDefinition]:
    if len(tools) > MAX_TOOLS:
        violations.add("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    converted = []
    for i, tool in enumerate(tools):
        parameters = None
        if tool.parameters_json:
            try:
                parameters = json.loads(tool.parameters_json)
            except ValueError as err:
                violations.add(f"tools[{i}].parameters_json", f"is not valid JSON: {err}")
                continue
            except RecursionError:
                violations.add(f"tools[{i}].parameters_json", f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
                continue
            if not isinstance(parameters, dict):
                violations.add(f"tools[{i}].parameters_json", "must be a JSON object (a JSON Schema)")
                continue
        converted.append(ToolDefinition(name=tool.name, description=tool.description, parameters=parameters))
    return converted


def proto_field(harmony_field: str) -> str:
    """The ChatRequest field a render_prompt error names: harmony's ToolDefinition holds the parsed
    schema as `parameters`, the proto its JSON text as `parameters_json`; other names are the same."""
    return re.sub(r"^(tools\[\d+\])\.parameters$", r"\1.parameters_json", harmony_field)


def chat_request_from_proto(request: pb.ChatRequest, info: ModelInfo, call: CallInfo, context) -> GenerateRequest:
    """Render a Chat call into an engine request; raises naming every bad field."""
    violations = Violations()
    messages = messages_from_proto(request.messages, violations)
    tools = tools_from_proto(request.tools, violations)
    effort = REASONING_EFFORTS.get(request.reasoning_effort)
    if effort is None:
        violations.add("reasoning_effort", f"unknown value {request.reasoning_effort}")
    sampling = sampling_from_proto(request.sampling, info, violations)
    constraint = None
    if len(tools) == len(request.tools):  # else a tool is already refused
        constraint = constraint_from_proto(request, tools, [t.strict for t in request.tools], violations)
    return build_chat_request(messages, tools, effort, request.instructions if request.HasField("instructions") else None,
                              sampling, info, call, context, violations, constraint=constraint)


def build_chat_request(messages: list[Message], tools: list[ToolDefinition], effort: str | None,
                       instructions: str | None, sampling: SamplingParams, info: ModelInfo, call: CallInfo, context,
                       violations: Violations, *, messages_field: str = "messages",
                       sampling_prefix: str = "sampling.", field_name=proto_field,
                       constraint: TurnConstraint | None = None) -> GenerateRequest:
    """Render converted chat input into an engine request (gRPC Chat and the OpenAI HTTP routes);
    raises naming every bad field, those found while converting included. `field_name` turns a
    render_prompt field into the request's own. `constraint`: structured output, already checked
    (constraint_from_proto; check_constraint for other callers)."""
    prompt: list[int] = []
    if not violations.errors:
        try:
            prompt = render_prompt(messages, reasoning_effort=effort, tools=tools, instructions=instructions)
        except HarmonyInputError as err:
            violations.add(field_name(err.field), err.problem)
        if len(prompt) >= info.context_length:
            violations.add(messages_field, f"the rendered prompt has {len(prompt)} tokens, more than the context "
                                           f"length {info.context_length} allows")
    _check_sampling(sampling, max(1, min(len(prompt), info.context_length - 1)), info, violations, sampling_prefix)
    if constraint is not None:
        _check_constrained_sampling(sampling, violations, sampling_prefix)
    violations.raise_any()
    return _request(prompt, sampling, call, context, constraint)


# ───────────────────────────────────── internal -> proto ─────────────────────────────────────

def logprobs_to_proto(logprobs: tuple[TokenLogprobs, ...]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in zip(lp.top_token_ids, lp.top_logprobs)])
            for lp in logprobs]


def usage_to_proto(prompt_tokens: int, completion_tokens: int, chunk: TokenChunk | None,
                   reasoning_tokens: int = 0) -> pb.Usage:
    cached = chunk.cached_prompt_tokens if chunk is not None else 0
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    reasoning_tokens=reasoning_tokens, cached_prompt_tokens=cached)


def model_info_to_proto(info: ModelInfo) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        model_name=info.model_name, preset=info.preset, vocab_size=info.vocab_size,
        context_length=info.context_length, num_layers=info.num_layers, num_experts=info.num_experts,
        experts_per_token=info.experts_per_token,
        quantization=QUANTIZATIONS.get(info.quantization, pb.QUANTIZATION_UNSPECIFIED),
        dtype=info.dtype, engine=info.engine, replicas=info.replicas,
        parallel=pb.ParallelLayout(expert_parallel_size=info.expert_parallel_size,
                                   tensor_parallel_size=info.tensor_parallel_size,
                                   gpus_per_replica=info.gpus_per_replica),
        supports_logprobs=info.supports_logprobs,
        default_max_tokens=info.default_max_tokens)


# ───────────────────────────────────────── servicer ─────────────────────────────────────────

class _MethodMetrics:
    """One RPC method's labelled metric children, looked up once rather than on every chunk."""

    def __init__(self, metrics: FrontdoorMetrics, method: str, api: str = "grpc") -> None:
        self.in_flight = metrics.requests_in_flight.labels(api, method)
        self.prompt_tokens = metrics.prompt_tokens_total.labels(api, method)
        self.completion_tokens = metrics.completion_tokens_total.labels(api, method)
        self.ttft = metrics.time_to_first_token_seconds.labels(api, method)
        self.itl = metrics.inter_token_latency_seconds.labels(api, method)
        self.duration = metrics.request_duration_seconds.labels(api, method)


class _Rpc:
    """Bookkeeping of one RPC: in-flight gauge, status code, latencies, token counters."""

    def __init__(self, metrics: FrontdoorMetrics, method: str, children: _MethodMetrics, api: str = "grpc") -> None:
        self.metrics = metrics
        self.method = method
        self.api = api
        self._m = children
        self.code = grpc.StatusCode.UNKNOWN
        self.usage = Usage()  # what the client was sent, for the tenant's usage record
        self.start = time.perf_counter()
        self._last_token_at: float | None = None
        self._m.in_flight.inc()

    def prompt(self, n_tokens: int) -> None:
        self._m.prompt_tokens.inc(n_tokens)

    def tokens(self, n_tokens: int) -> None:
        if not n_tokens:
            return
        now = time.perf_counter()
        histogram = self._m.itl
        if self._last_token_at is None:
            # The first token's wait is time to first token; tokens that came with it waited 0.
            self._m.ttft.observe(now - self.start)
            for _ in range(n_tokens - 1):
                histogram.observe(0.0)
        else:
            # A chunk of n tokens after t seconds: n observations of t/n (one per completion
            # token after the first, so the count is completion_tokens - 1 per stream).
            per_token = (now - self._last_token_at) / n_tokens
            for _ in range(n_tokens):
                histogram.observe(per_token)
        self._last_token_at = now
        self._m.completion_tokens.inc(n_tokens)

    def end(self) -> None:
        self._m.in_flight.dec()
        self.metrics.requests_total.labels(self.api, self.method, errors.code_label(self.code)).inc()
        self._m.duration.observe(time.perf_counter() - self.start)


def _cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
        else grpc.StatusCode.CANCELLED


async def fail(context: grpc.aio.ServicerContext, err: BaseException, call: CallInfo, bookkeeping) -> None:
    """Abort the call with the status errors.status_for chooses (this raises, ending the RPC)."""
    status = errors.status_for(err, request_id=call.request_id)
    bookkeeping.code = status.code
    if status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(bookkeeping, _Rpc):
        bookkeeping.metrics.rejected_requests_total.labels(bookkeeping.api, bookkeeping.method,
                                                           status.reason or "").inc()
    call.logger(log).info("-> %s: %s", status.code.name, status.message)
    await announce(call, context)  # x-request-id first, as for every answer
    await context.abort_with_status(status.to_status())


def rpc(method: str, *, streaming: bool):
    """Wrap an RPC body `(self, request, context, call, rpc)` with admission, metrics and the
    one failure path, for a unary or a server-streaming method."""

    def decorate(body):
        if streaming:
            @functools.wraps(body)
            async def stream_wrapper(self, request, context):
                bookkeeping = _Rpc(self._metrics, method, self._method_metrics(method))
                call, problem = self._admission.open(method, context)
                try:
                    try:
                        # Checked now, announced by the body once its downstream call is on its way.
                        self._admission.check(call, problem, request, streaming=True)
                        # Overload is refused before the request is converted: under a burst the
                        # refusals are most of the calls, and each is then only a few lookups.
                        self.admit_stream()
                        async for message in body(self, request, context, call, bookkeeping):
                            if not call.announced:
                                await announce(call, context)
                            yield message
                        bookkeeping.code = grpc.StatusCode.OK
                    except (asyncio.CancelledError, GeneratorExit):  # client went away or deadline passed
                        bookkeeping.code = _cancelled_code(context)
                        call.logger(log).info("-> %s by the client", bookkeeping.code.name)
                        raise
                    except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
                        await fail(context, err, call, bookkeeping)
                finally:
                    self._admission.leave(call)
                    bookkeeping.end()
                    self.record_usage(call, method, bookkeeping)
            return stream_wrapper

        @functools.wraps(body)
        async def unary_wrapper(self, request, context):
            bookkeeping = _Rpc(self._metrics, method, self._method_metrics(method))
            call, problem = self._admission.open(method, context)
            try:
                try:
                    await self._admission.admit(call, problem, request, context)
                    response = await body(self, request, context, call, bookkeeping)
                    bookkeeping.code = grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    bookkeeping.code = _cancelled_code(context)
                    raise
                except Exception as err:  # noqa: BLE001 - every error leaves through errors.status_for
                    await fail(context, err, call, bookkeeping)
            finally:
                self._admission.leave()
                bookkeeping.end()
        return unary_wrapper

    return decorate


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, handle: DeploymentHandle, info: ModelInfo, metrics: FrontdoorMetrics,
                 admission: Admission, *, replica_wait_s: float = 30.0, migration_attempts: int = 3,
                 usage: UsageRecorder | None = None) -> None:
        self._handle = handle
        self._migration_attempts = migration_attempts
        self._replicas = ReplicaStreams(handle, replica_wait_s)
        self._info = info
        self._metrics = metrics
        self._admission = admission
        self._usage = usage or UsageRecorder(metrics.tenant, lambda: (), info.model_name)
        self._model_info = model_info_to_proto(info)
        self._streams_in_flight = 0
        self._ended: collections.deque[float] = collections.deque()  # when recent streams ended
        self._per_method: dict[tuple[str, str], _MethodMetrics] = {}

    def _method_metrics(self, method: str, api: str = "grpc") -> _MethodMetrics:
        children = self._per_method.get((api, method))
        if children is None:
            children = self._per_method[(api, method)] = _MethodMetrics(self._metrics, method, api)
        return children

    async def close(self) -> None:
        await self._replicas.close()

    def routable_replicas(self) -> int | None:
        return self._replicas.routable_replicas()

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

    async def _chunks(self, request: GenerateRequest, call: CallInfo, context) -> AsyncIterator[TokenChunk]:
        """Relay the replica's chunks; cancel the downstream call however this ends early.

        The call's x-request-id goes out while the request is on its way, not before."""
        self.admit_stream()  # every stream of both APIs (a gRPC call was checked before its conversion too)
        self._streams_in_flight += 1
        try:
            async for chunk in self._relay(request, call, context):
                yield chunk
        finally:
            self._streams_in_flight -= 1
            self._ended.append(time.monotonic())

    async def _relay(self, request: GenerateRequest, call: CallInfo, context) -> AsyncIterator[TokenChunk]:
        stream = MigratingStream(self._replicas, request, attempts=self._migration_attempts,
                                 default_max_tokens=self._info.default_max_tokens,
                                 context_length=self._info.context_length, migrations=self._metrics.migrations_total,
                                 retry_for_s=self._replicas.replica_wait_s)
        try:
            await announce(call, context)
            async for chunk in stream:
                yield chunk
        finally:
            stream.close()

    def record_usage(self, call: CallInfo, method: str, bookkeeping: _Rpc) -> None:
        """The tenant's usage record and counters for a finished generating call, either API."""
        if call.tenant or self._admission.api_keys is None:  # refused unauthenticated: no tenant to bill
            self._usage.record(request_id=call.request_id, tenant=call.tenant, method=method,
                               usage=bookkeeping.usage, outcome=bookkeeping.code.name,
                               duration_s=time.perf_counter() - bookkeeping.start)

    def _within_tenant_limits(self, call: CallInfo, request: GenerateRequest, prompt_field: str) -> GenerateRequest:
        max_tokens = self._admission.limits.fit_request(call.tenant, len(request.prompt_token_ids),
                                                        request.sampling.max_tokens, prompt_field=prompt_field)
        if max_tokens == request.sampling.max_tokens:
            return request
        if request.sampling.max_tokens is None:  # the tenant's cap on an unset max_tokens still fits the context
            max_tokens = max(1, min(max_tokens, self._info.context_length - len(request.prompt_token_ids)))
        return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=max_tokens))

    def _charge(self, call: CallInfo, n_tokens: int) -> None:
        self._admission.limits.charge_tokens(call.tenant, n_tokens)

    @rpc("Chat", streaming=True)
    async def Chat(self, request: pb.ChatRequest, context, call: CallInfo, bookkeeping: _Rpc):
        internal = self._within_tenant_limits(call, chat_request_from_proto(request, self._info, call, context),
                                              "messages")
        async with contextlib.aclosing(self.chat_events(internal, request.sampling.stop, request.return_token_ids,
                                                        call, context, bookkeeping)) as events:
            async for deltas, complete in events:
                for delta in deltas:
                    yield pb.ChatResponse(delta=delta)
                if complete is not None:
                    yield pb.ChatResponse(complete=complete)

    async def chat_events(self, internal: GenerateRequest, stops, return_token_ids: bool, call: CallInfo, context,
                          bookkeeping: _Rpc) -> AsyncIterator[tuple[list[pb.ChatDelta], pb.ChatComplete | None]]:
        """The one chat path of both APIs: stream `internal` from a replica and parse the tokens
        into deltas, counting and charging them; the last item carries the ChatComplete. Tokens
        count in the tenant's usage once the consumer took them (resumed this generator)."""
        prompt_tokens = len(internal.prompt_token_ids)
        bookkeeping.prompt(prompt_tokens)
        self._charge(call, prompt_tokens)
        stream = ChatStream(stops if not internal.sampling.ignore_stop else (), return_token_ids)
        async with contextlib.aclosing(self._chunks(internal, call, context)) as chunks:
            async for chunk in chunks:
                before = stream.completion_tokens
                deltas = stream.feed(chunk.token_ids, logprobs_to_proto(chunk.logprobs))
                finished = chunk.finish_reason is not None or stream.stop_sequence is not None
                if finished:
                    deltas += stream.finish()
                used = stream.completion_tokens - before
                bookkeeping.tokens(used)
                self._charge(call, used)
                yield deltas, None
                bookkeeping.usage.sent(prompt_tokens, used, chunk.cached_prompt_tokens, stream.reasoning_tokens)
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

    @rpc("Generate", streaming=True)
    async def Generate(self, request: pb.GenerateRequest, context, call: CallInfo, bookkeeping: _Rpc):
        internal = self._within_tenant_limits(call, generate_request_from_proto(request, self._info, call, context),
                                              "prompt_text" if request.prompt_text else "prompt_token_ids")
        send_text = bool(request.prompt_text or request.return_text)
        async with contextlib.aclosing(self.generate_events(internal, request.sampling.stop, send_text,
                                                            call, context, bookkeeping)) as events:
            async for chunk, complete in events:
                if chunk is not None:
                    yield pb.GenerateResponse(chunk=chunk)
                if complete is not None:
                    yield pb.GenerateResponse(complete=complete)

    async def generate_events(self, internal: GenerateRequest, stops, send_text: bool, call: CallInfo, context,
                              bookkeeping: _Rpc
                              ) -> AsyncIterator[tuple[pb.GenerateChunk | None, pb.GenerateComplete | None]]:
        """The one raw-prompt path of both APIs: relay `internal`'s tokens (with text when asked,
        cut at a stop sequence), counting and charging them; the last item has the complete."""
        prompt_tokens = len(internal.prompt_token_ids)
        bookkeeping.prompt(prompt_tokens)
        self._charge(call, prompt_tokens)
        stops = tuple(stops) if not internal.sampling.ignore_stop else ()
        matcher = StopMatcher(stops) if stops else None
        decoder = load_tokenizer().stream_decoder() if (stops or send_text) else None
        completion = 0
        async with contextlib.aclosing(self._chunks(internal, call, context)) as chunks:
            async for chunk in chunks:
                ids: list[int] = []
                text = ""
                for token in chunk.token_ids:  # token by token only so a stop sequence cuts exactly
                    ids.append(token)
                    if decoder is not None:
                        piece = decoder.push([token])
                        text += matcher.feed(piece) if matcher is not None else piece
                        if matcher is not None and matcher.matched is not None:
                            break
                finished = chunk.finish_reason is not None or (matcher is not None and matcher.matched is not None)
                if finished and decoder is not None and (matcher is None or matcher.matched is None):
                    tail = decoder.flush()
                    text += (matcher.feed(tail) + matcher.flush()) if matcher is not None else tail
                completion += len(ids)
                bookkeeping.tokens(len(ids))
                self._charge(call, len(ids))
                out = pb.GenerateChunk(token_ids=ids, text=text if send_text else "",
                                       logprobs=logprobs_to_proto(chunk.logprobs[:len(ids)])) if ids or text else None
                if out is not None:
                    yield out, None
                bookkeeping.usage.sent(prompt_tokens, len(ids), chunk.cached_prompt_tokens)
                if not finished:
                    continue
                stopped = matcher.matched if matcher is not None else None
                reason = pb.FINISH_REASON_STOP if stopped else FINISH_REASONS[chunk.finish_reason.value]
                yield None, pb.GenerateComplete(finish_reason=reason, stop_sequence=stopped or "",
                                                usage=usage_to_proto(prompt_tokens, completion, chunk))
                return

    @rpc("Tokenize", streaming=False)
    async def Tokenize(self, request: pb.TokenizeRequest, context, call: CallInfo, bookkeeping: _Rpc):
        if len(request.text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES:
            raise errors.FieldError("text", f"must be at most {MAX_TEXT_BYTES} bytes")
        return pb.TokenizeResponse(token_ids=load_tokenizer().encode(request.text,
                                                                     allow_special=request.allow_special_tokens))

    @rpc("Detokenize", streaming=False)
    async def Detokenize(self, request: pb.DetokenizeRequest, context, call: CallInfo, bookkeeping: _Rpc):
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

    @rpc("GetModelInfo", streaming=False)
    async def GetModelInfo(self, request, context, call: CallInfo, bookkeeping: _Rpc):
        return self._model_info

    @rpc("GetLoads", streaming=False)
    async def GetLoads(self, request, context, call: CallInfo, bookkeeping: _Rpc):
        reports = await sample_loads(self._handle, self._info.replicas, LOADS_TIMEOUT_S)
        self._metrics.replicas.update(reports)  # fresher than the periodic poll
        return pb.GetLoadsResponse(replicas=[replica_load_to_proto(rid, stats) for rid, stats in reports],
                                   expected_replicas=self._info.replicas,
                                   frontdoor_in_flight=max(0, self._admission.in_flight - 1))
