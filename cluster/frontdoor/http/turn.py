"""An assistant turn as the OpenAI APIs see it: the chat stream's deltas (servicer.chat_events)
grouped into output parts - reasoning (analysis), text (final, commentary preambles, raw output)
and function calls - each opened, extended and closed as its tokens arrive, so a call's
arguments stream while the model writes them, whatever the engine's chunk sizes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from gptoss.v1 import inference_pb2 as pb

REASONING, TEXT, CALL = "reasoning", "text", "call"
_FUNCTIONS = "functions."


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Part:
    kind: str  # REASONING | TEXT | CALL
    index: int  # position in the turn's output
    text: str = ""  # the content, or a call's arguments
    name: str = ""  # CALL: the function ("get_weather"; built-in tools keep their namespace)
    call_id: str = ""  # CALL
    item_id: str = ""  # the Responses API's id of this output item
    done: bool = False


@dataclass
class Event:
    kind: str  # "open" | "delta" | "close"
    part: Part
    text: str = ""  # the delta


@dataclass
class Turn:
    parts: list[Part] = field(default_factory=list)
    _open: Part | None = None

    def feed(self, delta: pb.ChatDelta) -> list[Event]:
        out: list[Event] = []
        if delta.text:
            kind, recipient = _kind(delta)
            part = self._open
            if part is None or part.kind != kind or (kind == CALL and part.name != _name(recipient)):
                self._close(out)
                part = self._start(kind, recipient, out)
            part.text += delta.text
            out.append(Event("delta", part, delta.text))
        if delta.message_end:
            if delta.HasField("tool_call") and self._open is None:  # a call with no arguments at all
                self._start(CALL, delta.tool_call.recipient or _FUNCTIONS + delta.tool_call.name, out)
            self._close(out)
        return out

    def finish(self) -> list[Event]:
        out: list[Event] = []
        self._close(out)
        return out

    @property
    def calls(self) -> list[Part]:
        return [part for part in self.parts if part.kind == CALL]

    def text(self, kind: str) -> str:
        return "".join(part.text for part in self.parts if part.kind == kind)

    def _start(self, kind: str, recipient: str, out: list[Event]) -> Part:
        prefix = {REASONING: "rs", TEXT: "msg", CALL: "fc"}[kind]
        part = Part(kind, len(self.parts), name=_name(recipient) if kind == CALL else "",
                    call_id=new_id("call") if kind == CALL else "", item_id=new_id(prefix))
        self.parts.append(part)
        self._open = part
        out.append(Event("open", part))
        return part

    def _close(self, out: list[Event]) -> None:
        if self._open is not None:
            self._open.done = True
            out.append(Event("close", self._open))
            self._open = None


def _kind(delta: pb.ChatDelta) -> tuple[str, str]:
    if delta.recipient:
        return CALL, delta.recipient
    if delta.channel == pb.CHANNEL_ANALYSIS:
        return REASONING, ""
    return TEXT, ""


def _name(recipient: str) -> str:
    return recipient.removeprefix(_FUNCTIONS)
