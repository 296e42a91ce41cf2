"""Streamed completion token ids -> channel-tagged text deltas and finished messages.

The model continues a prompt that ends with `<|start|>assistant`, so its output reads

    <|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>

or, for a tool call, `<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>`.
StreamParser hands each message header to a fresh openai-harmony StreamableParser, which works
out role, channel, recipient and content type, and decodes the content itself, incrementally,
so each chunk costs time in proportion to its own length and never re-reads earlier output.

A model with random weights (the embedded default) emits no such structure. Whenever the
output stops being plausible harmony, the parser switches for good to raw mode: every token
not yet shown is decoded as plain text and streamed as deltas with raw=True and no channel,
so the client sees clearly flagged unparsed text instead of an error or silence.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import openai_harmony as oh

from cluster.harmony.render import CHANNELS, Message
from cluster.harmony.tokenizer import (CHANNEL_ID, CONSTRAIN_ID, MESSAGE_ID, START_ID, HarmonyTokenizer,
                                       StreamDecoder, load_tokenizer)

# A real header ("<|channel|>commentary to=functions.some_tool <|constrain|>json") is a few dozen
# tokens at most; a longer one is output that will never reach <|message|>.
MAX_HEADER_TOKENS = 64
_HEADER_SPECIALS = (CHANNEL_ID, CONSTRAIN_ID)
# How a header may open: the first message's role is already in the prompt; later ones name it.
_FIRST_HEADER_OPENINGS = ("<|channel|>", " to=")
_LATER_HEADER_OPENINGS = ("assistant<|channel|>", "assistant to=")
_FUNCTIONS_PREFIX = "functions."


class DeltaKind(enum.Enum):
    TEXT = "text"  # new content text
    MESSAGE_DONE = "message_done"  # a message ended; Delta.message holds it
    TOOL_CALL = "tool_call"  # a message addressed to a tool ended: tool_name and tool_arguments are set


@dataclass(frozen=True, slots=True)
class Delta:
    """One event from StreamParser.

    channel, recipient and content_type describe the message the event belongs to. raw=True
    marks text decoded from output that does not follow the harmony format (channel is None).
    """

    kind: DeltaKind
    text: str = ""
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    raw: bool = False
    message: Message | None = None

    @property
    def tool_name(self) -> str | None:
        """For TOOL_CALL: the function name ("get_weather" for recipient "functions.get_weather");
        built-in tools keep their namespace ("browser.search")."""
        if self.kind is not DeltaKind.TOOL_CALL or self.recipient is None:
            return None
        return self.recipient.removeprefix(_FUNCTIONS_PREFIX)

    @property
    def tool_arguments(self) -> str | None:
        """For TOOL_CALL: the arguments exactly as the model wrote them (JSON text, not validated)."""
        if self.kind is not DeltaKind.TOOL_CALL or self.message is None:
            return None
        return self.message.content


class _State(enum.Enum):
    EXPECT_START = "expect_start"  # between messages: only <|start|> may come
    HEADER = "header"  # reading a header up to <|message|>
    CONTENT = "content"  # reading content up to <|end|>, <|return|> or <|call|>
    RAW = "raw"  # the structure broke: everything from here on is plain text


class StreamParser:
    """Incremental parser for one assistant completion; feed chunks of any size, then finish().

    Never raises on model output. `messages` holds the completed messages, `raw_text` the text
    streamed in raw mode, and `done` tells whether <|return|> or <|call|> ended the turn.
    """

    def __init__(self, tokenizer: HarmonyTokenizer | None = None):
        self._tokenizer = tokenizer or load_tokenizer()
        self._message_end_ids = frozenset(self._tokenizer.message_end_ids)
        self._turn_end_ids = frozenset(self._tokenizer.turn_end_ids)
        self._state = _State.HEADER  # the prompt ends with the first message's "<|start|>assistant"
        # Tokens of the header being read (with its <|start|>): nothing of them has been shown,
        # so they open the raw text if the header turns out to be garbage.
        self._unshown: list[int] = []
        self._header_parser: oh.StreamableParser | None = oh.StreamableParser(
            self._tokenizer._encoding, oh.Role.ASSISTANT, strict=True)
        self._header_opening_ok = False
        self._first_message = True
        self._channel: str | None = None
        self._recipient: str | None = None
        self._content_type: str | None = None
        self._content_decoder: StreamDecoder | None = None
        self._content_parts: list[str] = []
        self._raw_decoder: StreamDecoder | None = None
        self._raw_parts: list[str] = []
        self._messages: list[Message] = []
        self._done = False
        self._finished = False

    @property
    def messages(self) -> list[Message]:
        """Messages completed so far (a copy)."""
        return list(self._messages)

    @property
    def raw_text(self) -> str:
        """All text streamed in raw mode ("" while the output follows the format)."""
        return "".join(self._raw_parts)

    @property
    def is_raw(self) -> bool:
        return self._state is _State.RAW

    @property
    def done(self) -> bool:
        """Whether <|return|> (final answer) or <|call|> (tool call) ended the assistant's turn."""
        return self._done

    def feed(self, ids: Sequence[int]) -> list[Delta]:
        """Consume the next completion ids; returns the events they complete, in order."""
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        ids = list(ids)
        deltas: list[Delta] = []
        content_run: list[int] = []  # content ids of this chunk, decoded together
        for index, token in enumerate(ids):
            if self._state is _State.CONTENT:
                if token in self._message_end_ids:
                    self._flush_content(content_run, deltas, final=True)
                    self._end_message(token, deltas)
                else:
                    content_run.append(token)
            elif self._state is _State.HEADER:
                if not self._read_header_token(token):
                    self._switch_to_raw(ids[index + 1:], deltas)
                    break
            elif self._state is _State.EXPECT_START:
                if token != START_ID or not self._begin_header(token):
                    self._switch_to_raw(ids[index:], deltas)
                    break
            else:
                self._emit_raw(ids[index:], deltas)
                break
        self._flush_content(content_run, deltas)
        return deltas

    def finish(self) -> list[Delta]:
        """End of output (stop token, length limit or abort): returns the last events.

        A message cut off mid-content is completed with what it has; a header cut off before
        <|message|> has shown nothing yet, so its tokens come out as raw text.
        """
        if self._finished:
            return []
        self._finished = True
        deltas: list[Delta] = []
        if self._state is _State.CONTENT:
            self._flush_content([], deltas, final=True)
            self._end_message(None, deltas)
        elif self._state is _State.HEADER and self._unshown not in ([], [START_ID]):
            self._switch_to_raw([], deltas)
        if self._state is _State.RAW:
            self._append_raw_text(self._raw_decoder.flush(), deltas)
        return deltas

    # -- header ------------------------------------------------------------------------------

    def _begin_header(self, start_token: int) -> bool:
        """A <|start|> opened the next message; False if openai-harmony rejects it."""
        self._header_parser = oh.StreamableParser(self._tokenizer._encoding, None, strict=True)
        self._state = _State.HEADER
        self._unshown = []
        self._header_opening_ok = False
        if not self._process(start_token):
            return False
        self._unshown.append(start_token)
        return True

    def _read_header_token(self, token: int) -> bool:
        """Take one header token; False when the header cannot be valid harmony."""
        self._unshown.append(token)
        if token == MESSAGE_ID:
            return self._process(token) and self._begin_content()
        header = self._unshown[1:] if self._unshown[0] == START_ID else self._unshown
        if len(header) > MAX_HEADER_TOKENS:
            return False
        if self._tokenizer.is_special(token) and token not in _HEADER_SPECIALS:
            return False
        if not self._header_opening_ok and not self._check_header_opening(header):
            return False
        return self._process(token)

    def _check_header_opening(self, header: list[int]) -> bool:
        """Whether the header text so far can still open a valid header (cheap: settles in a few tokens)."""
        text = self._tokenizer.decode(header)
        openings = _FIRST_HEADER_OPENINGS if self._first_message else _LATER_HEADER_OPENINGS
        if any(text.startswith(opening) for opening in openings):
            self._header_opening_ok = True
            return True
        return any(opening.startswith(text) for opening in openings)

    def _begin_content(self) -> bool:
        """The header ended at <|message|>; False unless it names an assistant channel."""
        header = self._header_parser
        try:
            role, channel = header.current_role, header.current_channel
        except ValueError:  # a role openai-harmony does not know
            return False
        if role is not oh.Role.ASSISTANT or channel not in CHANNELS:
            return False
        self._channel = channel
        self._recipient = header.current_recipient
        self._content_type = header.current_content_type
        self._state = _State.CONTENT
        self._unshown = []
        self._content_decoder = self._tokenizer.stream_decoder()
        self._content_parts = []
        self._header_parser = None
        return True

    def _process(self, token: int) -> bool:
        try:
            self._header_parser.process(token)
        except oh.HarmonyError:
            return False
        return True

    # -- content -----------------------------------------------------------------------------

    def _flush_content(self, content_run: list[int], deltas: list[Delta], *, final: bool = False) -> None:
        if self._content_decoder is None:
            return
        text = self._content_decoder.push(content_run)
        content_run.clear()
        if final:
            text += self._content_decoder.flush()
        if text:
            self._content_parts.append(text)
            deltas.append(Delta(DeltaKind.TEXT, text, self._channel, self._recipient, self._content_type))

    def _end_message(self, stop_token: int | None, deltas: list[Delta]) -> None:
        """Complete the current message (content already flushed); stop_token is None when cut off."""
        message = Message(role="assistant", content="".join(self._content_parts), channel=self._channel,
                          recipient=self._recipient, content_type=self._content_type)
        self._messages.append(message)
        kind = DeltaKind.TOOL_CALL if message.recipient else DeltaKind.MESSAGE_DONE
        deltas.append(Delta(kind, "", message.channel, message.recipient, message.content_type, message=message))
        self._content_decoder = None
        self._content_parts = []
        self._first_message = False
        self._state = _State.EXPECT_START
        if stop_token in self._turn_end_ids:
            self._done = True

    # -- raw mode ----------------------------------------------------------------------------

    def _switch_to_raw(self, rest: Sequence[int], deltas: list[Delta]) -> None:
        """The structure broke: from now on show everything, starting with what was held back."""
        self._state = _State.RAW
        self._raw_decoder = self._tokenizer.stream_decoder()
        unshown, self._unshown = self._unshown, []
        self._emit_raw([*unshown, *rest], deltas)

    def _emit_raw(self, ids: Sequence[int], deltas: list[Delta]) -> None:
        self._append_raw_text(self._raw_decoder.push(ids), deltas)

    def _append_raw_text(self, text: str, deltas: list[Delta]) -> None:
        if text:
            self._raw_parts.append(text)
            deltas.append(Delta(DeltaKind.TEXT, text, raw=True))
