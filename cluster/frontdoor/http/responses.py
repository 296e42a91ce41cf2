"""The Responses API: POST /v1/responses (input items -> the same internal chat request as gRPC
Chat; the chat stream -> output items and the documented event sequence), stored responses and
previous_response_id.

A stored record holds the response and the harmony conversation it ended (earlier turns, this
input, this output), so a follow-up with previous_response_id renders the whole conversation
on whichever front door it reaches (store.py). A background response (background: true) runs
detached from its HTTP exchange (background.py); its record holds only the response until it ends.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from cluster.engine.request import GenerateRequest
from cluster.frontdoor import errors
from cluster.frontdoor.http.chat import JSON_CALL, text_content
from cluster.frontdoor.http.fields import (Fields, apply_tool_choice, read_effort, read_sampling, read_tool_choice,
                                           read_constraint, read_tools, renamed)
from cluster.frontdoor.http.store import ResponseStore
from cluster.frontdoor.http.turn import CALL, REASONING, TEXT, Event, Part, Turn, new_id
from cluster.frontdoor.conversion import Violations, build_chat_request
from cluster.harmony.render import Message
from gptoss.v1 import inference_pb2 as pb

_TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class ResponsesCall:
    internal: GenerateRequest
    conversation: list[Message]  # what was rendered, minus the developer/system instructions
    calls: dict[str, str]  # call_id -> function name, for function_call_output items
    echo: dict  # request fields the response object repeats
    store: bool
    stream: bool
    previous_response_id: str | None
    background: bool = False
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))


def _message_dict(message: Message) -> dict:
    return {k: v for k, v in asdict(message).items() if v is not None}


def read_input(fields: Fields, calls: dict[str, str]) -> list[Message]:
    violations = fields.violations
    value = fields.body.get("input")
    if value is None:
        violations.add("input", "is required")
        return []
    if isinstance(value, str):
        return [Message(role="user", content=value)]
    if not isinstance(value, list) or not value:
        violations.add("input", "must be a string or a non-empty array of input items")
        return []
    out: list[Message] = []
    for i, raw in enumerate(value):
        item = Fields(raw, violations, f"input[{i}]")
        kind = item.get("type", str, "message")
        if kind == "message":
            role = item.choice("role", ("user", "system", "developer", "assistant"))
            if role is None:
                if not item.has("role"):
                    violations.add(f"input[{i}].role", "is required")
                continue
            content = text_content(item.body.get("content"), f"input[{i}].content", violations, part_types=_TEXT_PARTS)
            out.append(Message(role=role, content=content, channel="final" if role == "assistant" else None))
        elif kind == "function_call":
            name = item.get("name", str, required=True)
            call_id = item.get("call_id", str, required=True)
            arguments = item.get("arguments", str, "")
            if name is not None:
                if call_id is not None:
                    calls[call_id] = name
                out.append(Message(role="assistant", content=arguments, channel="commentary",
                                   recipient="functions." + name, content_type=JSON_CALL))
        elif kind == "function_call_output":
            call_id = item.get("call_id", str, required=True)
            output = item.body.get("output")
            text = output if isinstance(output, str) else text_content(output, f"input[{i}].output", violations,
                                                                        part_types=_TEXT_PARTS)
            if call_id is not None and call_id not in calls:
                violations.add(f"input[{i}].call_id", f"matches no function_call in this conversation: {call_id!r}")
                continue
            out.append(Message(role="tool", content=text, name="functions." + calls.get(call_id, "")))
        elif kind == "reasoning":
            parts = item.get("content", list, [])
            text = text_content(parts, f"input[{i}].content", violations, part_types=("reasoning_text",))
            if text:
                out.append(Message(role="assistant", content=text, channel="analysis"))
        else:
            violations.add(f"input[{i}].type", "must be message, function_call, function_call_output or reasoning, "
                                               f"got {kind!r}")
    return out


async def read_responses(body: object, info, call, context, model: str, store: ResponseStore) -> ResponsesCall:
    violations = Violations()
    fields = Fields(body, violations)
    fields.get("model", str)
    previous_id = fields.get("previous_response_id", str)
    history: list[Message] = []
    calls: dict[str, str] = {}
    if previous_id is not None:
        record = await store.get(call.tenant, previous_id)
        if record is None:
            raise errors.NotFoundError("RESPONSE_NOT_FOUND", "previous_response_id",
                                       f"previous_response_id: no stored response {previous_id!r}")
        if "conversation" not in record:  # a background response that has not ended
            raise errors.FieldError("previous_response_id", f"response {previous_id!r} is "
                                                            f"{record['response']['status']}: continue it once it ended")
        history = [Message(**m) for m in record["conversation"]]
        calls = dict(record.get("calls", {}))
    messages = history + read_input(fields, calls)
    instructions = fields.get("instructions", str)
    tools = read_tools(fields, nested=False)
    choice = read_tool_choice(fields, tools, nested=False)
    rendered_tools, rendered_instructions = apply_tool_choice(choice, tools, instructions)
    reasoning = fields.object("reasoning")
    effort = read_effort(reasoning.body.get("effort") if reasoning is not None else None, "reasoning.effort",
                         violations)
    sampling = read_sampling(fields, info, max_tokens_keys=("max_output_tokens",))
    text = fields.object("text")
    text_format = text.object("format") if text is not None else None
    constraint = read_constraint(fields, text_format, "text.format", rendered_tools, nested=False)
    background = bool(fields.get("background", bool, False))
    metadata = fields.get("metadata", dict, {})
    store_it = fields.get("store", bool, True)
    stream = fields.get("stream", bool, False)
    if background and store_it is False:
        violations.add("store", "must be true for a background response (background: true): it is polled from the "
                                "store")
    try:
        internal = build_chat_request(messages, rendered_tools, effort, rendered_instructions, sampling, info, call,
                                      context, violations, messages_field="input", sampling_prefix="",
                                      constraint=constraint)
    except Exception as err:  # noqa: BLE001 - re-raised with the request's own field names
        raise renamed(err, {"max_tokens": "max_output_tokens", "messages": "input"}) from None
    echo = {"instructions": instructions, "max_output_tokens": sampling.max_tokens, "model": model,
            "metadata": metadata, "parallel_tool_calls": True, "previous_response_id": previous_id,
            "reasoning": {"effort": effort, "summary": None}, "temperature": sampling.temperature,
            "text": {"format": text_format.body if text_format is not None else {"type": "text"}}, "tool_choice": fields.body.get("tool_choice", "auto"),
            "tools": fields.body.get("tools", []), "top_p": sampling.top_p, "truncation": "disabled",
            "store": store_it, "background": background, "user": fields.get("user", str)}
    return ResponsesCall(internal, messages, calls, echo, store_it, stream, previous_id, background)


# ───────────────────────────────────────── output ─────────────────────────────────────────

def item(part: Part, *, done: bool) -> dict:
    status = "completed" if done else "in_progress"
    if part.kind == REASONING:
        return {"type": "reasoning", "id": part.item_id, "summary": [],
                "content": [{"type": "reasoning_text", "text": part.text}] if done else [], "status": status}
    if part.kind == TEXT:
        return {"type": "message", "id": part.item_id, "role": "assistant", "status": status,
                "content": [_text_part(part.text)] if done else []}
    return {"type": "function_call", "id": part.item_id, "call_id": part.call_id, "name": part.name,
            "arguments": part.text if done else "", "status": status}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(complete: pb.ChatComplete) -> dict:
    u = complete.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class ResponsesOutput:
    """One response as it is generated: its stream events, its final object, its stored record."""

    def __init__(self, call: ResponsesCall) -> None:
        self.call = call
        self.turn = Turn()
        self._sequence = 0

    def response(self, status: str, complete: pb.ChatComplete | None = None) -> dict:
        incomplete = None
        if complete is not None and complete.finish_reason == pb.FINISH_REASON_LENGTH:
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {"id": self.call.id, "object": "response", "created_at": self.call.created_at, "status": status,
                "error": None, "incomplete_details": incomplete,
                "output": [item(part, done=True) for part in self.turn.parts if part.done],
                "usage": usage(complete) if complete is not None else None, **self.call.echo}

    def _event(self, kind: str, **body) -> dict:
        event = {"type": kind, "sequence_number": self._sequence, **body}
        self._sequence += 1
        return event

    def opening(self) -> list[dict]:
        created = self.response("in_progress")
        return [self._event("response.created", response=created),
                self._event("response.in_progress", response=created)]

    def events(self, deltas: list[pb.ChatDelta], finished: bool) -> list[dict]:
        out: list[dict] = []
        for delta in deltas:
            for event in self.turn.feed(delta):
                out += self._stream_event(event)
        if finished:
            for event in self.turn.finish():
                out += self._stream_event(event)
        return out

    def feed(self, deltas: list[pb.ChatDelta]) -> None:
        for delta in deltas:
            self.turn.feed(delta)

    def closing(self, complete: pb.ChatComplete) -> list[dict]:
        final = self.response("completed", complete)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [self._event(kind, response=final)]

    def failure(self, final: dict) -> list[dict]:
        return [self._event("response.failed", response=final)]

    def _stream_event(self, event: Event) -> list[dict]:
        part = event.part
        where = {"item_id": part.item_id, "output_index": part.index}
        if event.kind == "open":
            added = [self._event("response.output_item.added", output_index=part.index, item=item(part, done=False))]
            if part.kind != CALL:
                empty = {"type": "reasoning_text", "text": ""} if part.kind == REASONING else _text_part("")
                added.append(self._event("response.content_part.added", content_index=0, part=empty, **where))
            return added
        if event.kind == "delta":
            if part.kind == CALL:
                return [self._event("response.function_call_arguments.delta", delta=event.text, **where)]
            if part.kind == REASONING:
                return [self._event("response.reasoning_text.delta", content_index=0, delta=event.text, **where)]
            return [self._event("response.output_text.delta", content_index=0, delta=event.text, logprobs=[],
                                **where)]
        if part.kind == CALL:
            closing = [self._event("response.function_call_arguments.done", arguments=part.text, name=part.name,
                                   **where)]
        elif part.kind == REASONING:
            closing = [self._event("response.reasoning_text.done", content_index=0, text=part.text, **where),
                       self._event("response.content_part.done", content_index=0,
                                   part={"type": "reasoning_text", "text": part.text}, **where)]
        else:
            closing = [self._event("response.output_text.done", content_index=0, text=part.text, logprobs=[],
                                   **where),
                       self._event("response.content_part.done", content_index=0, part=_text_part(part.text),
                                   **where)]
        return closing + [self._event("response.output_item.done", output_index=part.index,
                                      item=item(part, done=True))]

    def record(self, final: dict) -> dict:
        """What the store keeps: the response, and the conversation a follow-up continues."""
        output: list[Message] = []
        calls = dict(self.call.calls)
        for part in self.turn.parts:
            if part.kind == REASONING:
                output.append(Message(role="assistant", content=part.text, channel="analysis"))
            elif part.kind == TEXT:
                output.append(Message(role="assistant", content=part.text, channel="final"))
            else:
                calls[part.call_id] = part.name
                output.append(Message(role="assistant", content=part.text, channel="commentary",
                                      recipient="functions." + part.name, content_type=JSON_CALL))
        return {"response": final, "conversation": [_message_dict(m) for m in self.call.conversation + output],
                "calls": calls}
