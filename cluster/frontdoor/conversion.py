"""Proto <-> internal conversion for gptoss.v1 (and the builders the OpenAI HTTP routes share).

Requests become the engine's GenerateRequest with every bad field collected (Violations), so one
INVALID_ARGUMENT names all of them; token chunks, usage and model info become protos.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time

from cluster.engine.errors import InvalidRequestError
from cluster.engine.request import (MAX_LOGPROBS, GenerateRequest, SamplingParams, TokenChunk, TokenLogprobs,
                                    validate_request, validate_sampling)
from cluster.frontdoor import errors
from cluster.frontdoor.call import CallInfo
from cluster.harmony.render import MAX_SCHEMA_DEPTH, HarmonyInputError, Message, ToolDefinition, render_prompt
from cluster.harmony.structured import ConstraintError, ResponseFormat, StrictTool, TurnConstraint, check_constraint
from cluster.harmony.tokenizer import START_ID, load_tokenizer
from cluster.serving.model_info import ModelInfo
from gptoss.v1 import inference_pb2 as pb

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
        return ResponseFormat("json_schema", schema=schema, strict=fmt.json_schema.strict, name=fmt.json_schema.name,
                              description=fmt.json_schema.description)
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "regex":
        return ResponseFormat("regex", pattern=fmt.regex)
    if kind == "grammar":
        return ResponseFormat("grammar", grammar=fmt.grammar.text,
                              grammar_syntax=GRAMMAR_SYNTAXES.get(fmt.grammar.syntax, str(fmt.grammar.syntax)))
    return ResponseFormat()


_PROTO_FIELDS = {"response_format.schema": "response_format.json_schema.schema_json",
                 "response_format.name": "response_format.json_schema.name",
                 "response_format.description": "response_format.json_schema.description",
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
            prompt = render_prompt(messages, reasoning_effort=effort, tools=tools, instructions=instructions,
                                   response_format=constraint.response_format if constraint else None)
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
