"""POST /v1/chat/completions: OpenAI chat messages -> the gRPC Chat's internal request, and the
chat stream's deltas -> chat.completion (or SSE chat.completion.chunk) objects.

Reasoning (the analysis channel) travels in `reasoning_content`, beside `content`, as DeepSeek's
API, vLLM and SGLang send it; assistant messages sent back may carry it as `reasoning_content`
or `reasoning`, and it is rendered as the analysis message before their tool calls.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from cluster.engine.request import GenerateRequest
from cluster.frontdoor.http.fields import (Fields, apply_tool_choice, read_effort, read_sampling, read_stops,
                                           read_constraint, read_tool_choice, read_tools, renamed)
from cluster.frontdoor.http.turn import CALL, REASONING, Turn, new_id
from cluster.frontdoor.conversion import Violations, build_chat_request
from cluster.harmony.render import Message
from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb

MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens")
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_TOOL_CALL: "tool_calls",
          pb.FINISH_REASON_ABORTED: "stop"}
JSON_CALL = "<|constrain|>json"


@dataclass
class ChatCall:
    internal: GenerateRequest
    stops: tuple[str, ...]
    model: str
    stream: bool
    include_usage: bool
    logprobs: bool


def text_content(value: object, field: str, violations: Violations, *, part_types=("text",)) -> str:
    """A message's content: a string or an array of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        violations.add(field, "must be a string or an array of content parts")
        return ""
    texts = []
    for i, raw in enumerate(value):
        part = Fields(raw, violations, f"{field}[{i}]")
        kind = part.get("type", str, required=True)
        if kind is not None and kind not in part_types:
            violations.add(f"{field}[{i}].type", f"only text parts are supported, got {kind!r}")
            continue
        text = part.get("text", str, required=True)
        if text is not None:
            texts.append(text)
    return "".join(texts)


def read_messages(fields: Fields) -> list[Message]:
    violations = fields.violations
    raw = fields.get("messages", list, required=True) or []
    if fields.has("messages") and not raw:
        violations.add("messages", "must contain at least one message")
    calls: dict[str, str] = {}  # tool_call_id -> function name, to name tool results
    out: list[Message] = []
    for i, item in enumerate(raw):
        message = Fields(item, violations, f"messages[{i}]")
        role = message.choice("role", ("system", "developer", "user", "assistant", "tool"))
        if role is None:
            if not message.has("role"):
                violations.add(f"messages[{i}].role", "is required")
            continue
        content = text_content(message.body.get("content"), f"messages[{i}].content", violations)
        if role in ("system", "developer", "user"):
            out.append(Message(role=role, content=content))
        elif role == "tool":
            call_id = message.get("tool_call_id", str, required=True)
            if call_id is not None and call_id not in calls:
                violations.add(f"messages[{i}].tool_call_id", f"matches no tool call of an earlier assistant "
                                                             f"message: {call_id!r}")
            out.append(Message(role="tool", content=content, name="functions." + calls.get(call_id, "unknown")))
        else:
            reasoning = message.get("reasoning_content", str) or message.get("reasoning", str)
            tool_calls = message.get("tool_calls", list, [])
            if reasoning:
                out.append(Message(role="assistant", content=reasoning, channel="analysis"))
            if content:
                out.append(Message(role="assistant", content=content,
                                   channel="commentary" if tool_calls else "final"))
            for j, raw_call in enumerate(tool_calls):
                call = Fields(raw_call, violations, f"messages[{i}].tool_calls[{j}]")
                function = call.object("function", required=True)
                call_id = call.get("id", str, required=True)
                if function is None:
                    continue
                name = function.get("name", str, required=True)
                arguments = function.get("arguments", str, "")
                if name is None:
                    continue
                if call_id is not None:
                    calls[call_id] = name
                out.append(Message(role="assistant", content=arguments, channel="commentary",
                                   recipient="functions." + name, content_type=JSON_CALL))
            if not (reasoning or content or tool_calls):
                out.append(Message(role="assistant", content=""))
    return out


def read_chat(body: object, info, call, context, model: str) -> ChatCall:
    violations = Violations()
    fields = Fields(body, violations)
    fields.get("model", str)
    messages = read_messages(fields)
    tools = read_tools(fields, nested=True)
    choice = read_tool_choice(fields, tools, nested=True)
    tools, instructions = apply_tool_choice(choice, tools, None)
    effort = read_effort(fields.body.get("reasoning_effort"), "reasoning_effort", violations)
    stops = read_stops(fields)
    want_logprobs = bool(fields.get("logprobs", bool, False))
    top = fields.get("top_logprobs", int)
    if top is not None and not want_logprobs:
        violations.add("top_logprobs", "needs logprobs: true")
    sampling = read_sampling(fields, info, max_tokens_keys=MAX_TOKENS_KEYS,
                             logprobs=(top or 0) if want_logprobs else None)
    stream = bool(fields.get("stream", bool, False))
    options = fields.object("stream_options")
    include_usage = bool(options.get("include_usage", bool, False)) if options is not None else False
    constraint = read_constraint(fields, fields.object("response_format"), "response_format", tools, nested=True)
    max_key = next((key for key in MAX_TOKENS_KEYS if fields.has(key)), "max_tokens")
    try:
        internal = build_chat_request(messages, tools, effort, instructions, sampling, info, call, context, violations,
                                      sampling_prefix="", field_name=_tool_field, constraint=constraint)
    except Exception as err:  # noqa: BLE001 - re-raised with the request's own field names
        raise renamed(err, {"max_tokens": max_key, "logprobs": "top_logprobs"}) from None
    return ChatCall(internal, stops, model, stream, include_usage, want_logprobs)


def _tool_field(harmony_field: str) -> str:
    """A render_prompt field as Chat Completions names it (tools[i].function.parameters)."""
    return re.sub(r"^(tools\[\d+\])\.", r"\1.function.", harmony_field)


# ───────────────────────────────────────── output ─────────────────────────────────────────

def usage(complete: pb.ChatComplete | pb.GenerateComplete) -> dict:
    u = complete.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}}


def logprobs_content(logprobs) -> list[dict]:
    tokenizer = load_tokenizer()

    def entry(token_id: int, logprob: float) -> dict:
        raw = tokenizer.decode_bytes([token_id])
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]}
            for lp in logprobs]


class ChatOutput:
    """Builds the chunks of one streamed completion, or the whole completion at the end."""

    def __init__(self, chat: ChatCall) -> None:
        self.chat = chat
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.turn = Turn()
        self.logprobs: list[dict] = []

    def _chunk(self, delta: dict, finish: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.chat.model,
                "system_fingerprint": None, "choices": [choice]}

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def chunks(self, deltas: list[pb.ChatDelta], complete: pb.ChatComplete | None) -> list[dict]:
        out = []
        for delta in deltas:
            logprobs = logprobs_content(delta.logprobs) if self.chat.logprobs and delta.logprobs else None
            pieces = []
            for event in self.turn.feed(delta):
                pieces.append(self._delta(event))
            pieces = [p for p in pieces if p]
            if logprobs and not pieces:
                pieces = [{}]
            for k, piece in enumerate(pieces):
                out.append(self._chunk(piece, logprobs=logprobs if k == 0 else None))
        if complete is not None:
            for event in self.turn.finish():
                piece = self._delta(event)
                if piece:
                    out.append(self._chunk(piece))
            out.append(self._chunk({}, FINISH.get(complete.finish_reason, "stop")))
            if self.chat.include_usage:
                out.append({**self._chunk({}), "choices": [], "usage": usage(complete)})
        return out

    def _delta(self, event) -> dict | None:
        part = event.part
        if part.kind == CALL:
            position = self.turn.calls.index(part)
            if event.kind == "open":
                return {"tool_calls": [{"index": position, "id": part.call_id, "type": "function",
                                        "function": {"name": part.name, "arguments": ""}}]}
            if event.kind == "delta":
                return {"tool_calls": [{"index": position, "function": {"arguments": event.text}}]}
            return None
        if event.kind != "delta":
            return None
        return {"reasoning_content": event.text} if part.kind == REASONING else {"content": event.text}

    def feed(self, deltas: list[pb.ChatDelta]) -> None:
        for delta in deltas:
            if self.chat.logprobs and delta.logprobs:
                self.logprobs.extend(logprobs_content(delta.logprobs))
            self.turn.feed(delta)

    def completion(self, complete: pb.ChatComplete) -> dict:
        self.turn.finish()
        calls = [{"id": part.call_id, "type": "function", "function": {"name": part.name, "arguments": part.text}}
                 for part in self.turn.calls]
        content = self.turn.text("text")
        message = {"role": "assistant", "content": content if content or not calls else None,
                   "reasoning_content": self.turn.text(REASONING) or None, "tool_calls": calls or None}
        choice = {"index": 0, "message": message, "finish_reason": FINISH.get(complete.finish_reason, "stop"),
                  "logprobs": {"content": self.logprobs} if self.chat.logprobs else None}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.chat.model,
                "system_fingerprint": None, "choices": [choice], "usage": usage(complete)}
