"""ChatStream: a Chat call's generated token ids -> ChatDelta messages.

Tokens go through the harmony StreamParser one at a time, so that each token can be counted
toward the message it belongs to (reasoning_tokens = the tokens of analysis messages, their
header and end tokens included), a stop sequence ends the stream at the exact token that
completed it, and returned token ids (and their log probabilities, when asked) ride on the delta
they produced.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.harmony.parse import Delta, DeltaKind, StreamParser
from cluster.harmony.tokenizer import CALL_ID
from cluster.frontdoor.stops import StopMatcher
from gptoss.v1 import inference_pb2 as pb

CHANNELS = {"analysis": pb.CHANNEL_ANALYSIS, "commentary": pb.CHANNEL_COMMENTARY, "final": pb.CHANNEL_FINAL}


class ChatStream:
    def __init__(self, stops: Sequence[str] = (), return_token_ids: bool = False) -> None:
        self._parser = StreamParser()
        self._matcher = StopMatcher(stops) if stops else None
        self._return_token_ids = return_token_ids
        self._pending_ids: list[int] = []
        self._pending_logprobs: list[pb.TokenLogprob] = []
        self._unattributed = 0  # tokens fed since the last event
        self._meta: Delta | None = None  # the message the latest event belonged to
        self._tool_calls = 0
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.last_token: int | None = None

    @property
    def stop_sequence(self) -> str | None:
        return self._matcher.matched if self._matcher is not None else None

    @property
    def ended_with_tool_call(self) -> bool:
        return self.last_token == CALL_ID

    def feed(self, token_ids: Sequence[int], logprobs: Sequence[pb.TokenLogprob] = ()) -> list[pb.ChatDelta]:
        """Deltas for the next tokens; `logprobs`, when given, has one entry per token."""
        out: list[pb.ChatDelta] = []
        for i, token in enumerate(token_ids):
            if self.stop_sequence is not None:
                break  # the tokens after a stop sequence are never shown or counted
            self.completion_tokens += 1
            self.last_token = token
            self._pending_ids.append(token)
            if logprobs:
                self._pending_logprobs.append(logprobs[i])
            self._unattributed += 1
            for delta in self._parser.feed([token]):
                self._event(delta, out)
        self._flush_ids(out)
        return out

    def finish(self) -> list[pb.ChatDelta]:
        """Events of the end of output (a message cut off by max_tokens, text held for stops)."""
        out: list[pb.ChatDelta] = []
        if self.stop_sequence is None:
            for delta in self._parser.finish():
                self._event(delta, out)
            if self._matcher is not None and self._meta is not None:
                self._text(self._matcher.flush(), self._meta, out)
        self._flush_ids(out)
        return out

    def _event(self, delta: Delta, out: list[pb.ChatDelta]) -> None:
        if delta.channel == "analysis":
            self.reasoning_tokens += self._unattributed
        self._unattributed = 0
        self._meta = delta
        if delta.kind is DeltaKind.TEXT:
            text = self._matcher.feed(delta.text) if self._matcher is not None else delta.text
            self._text(text, delta, out)
            return
        if self._matcher is not None:  # stop sequences never span two messages
            self._text(self._matcher.flush(), delta, out)
        end = self._message(delta, message_end=True)
        if delta.kind is DeltaKind.TOOL_CALL:
            end.tool_call.CopyFrom(pb.ToolCall(id=f"call_{self._tool_calls}", name=delta.tool_name or "",
                                               arguments_json=delta.tool_arguments or "",
                                               recipient=delta.recipient or ""))
            self._tool_calls += 1
        self._emit(end, out)

    def _text(self, text: str, meta: Delta, out: list[pb.ChatDelta]) -> None:
        if text:
            self._emit(self._message(meta, text=text), out)

    @staticmethod
    def _message(meta: Delta, **fields) -> pb.ChatDelta:
        return pb.ChatDelta(channel=CHANNELS.get(meta.channel or "", pb.CHANNEL_UNSPECIFIED),
                            recipient=meta.recipient or "", content_type=meta.content_type or "", raw=meta.raw,
                            **fields)

    def _emit(self, message: pb.ChatDelta, out: list[pb.ChatDelta]) -> None:
        if self._return_token_ids and self._pending_ids:
            message.token_ids.extend(self._pending_ids)
            self._pending_ids = []
        if self._pending_logprobs:
            message.logprobs.extend(self._pending_logprobs)
            self._pending_logprobs = []
        out.append(message)

    def _flush_ids(self, out: list[pb.ChatDelta]) -> None:
        """Ids that produced no event yet (a header in progress) travel on an id-only delta."""
        if (self._return_token_ids and self._pending_ids) or self._pending_logprobs:
            meta = self._meta or Delta(DeltaKind.TEXT)
            self._emit(self._message(meta), out)
        self._pending_ids = []
