"""Chat messages -> harmony prompt token ids, through openai-harmony's renderer.

The rest of the cluster sees only the small dataclasses here; openai-harmony's types stay
inside this package. Input is checked first and every problem raises HarmonyInputError
naming the offending field, which the gRPC layer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import datetime
import math
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import openai_harmony as oh

from cluster.harmony.tokenizer import END_ID, MESSAGE_ID, load_tokenizer

if TYPE_CHECKING:  # structured.py imports this module
    from cluster.harmony.structured import ResponseFormat

ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
REASONING_EFFORTS = ("low", "medium", "high")
# The limits OpenAI's API puts on function names; they also keep the rendered TypeScript valid.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_INSTRUCTION_ROLES = ("system", "developer")
# openai-harmony re-reads the whole conversation as JSON with a nesting limit of 128 levels, a
# tool's schema sitting about 12 deep; real schemas nest a few levels, so 64 leaves room to spare.
MAX_SCHEMA_DEPTH = 64
_LARGEST_DOUBLE = int(float.fromhex("0x1.fffffffffffffp+1023"))  # JSON numbers are read back as doubles
# The heading of a JSON-schema response format that has no name.
DEFAULT_FORMAT_NAME = "response"


class HarmonyInputError(ValueError):
    """A request that cannot be rendered; `.field` names the culprit, e.g. "messages[2].role"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message.

    role: system, developer, user, assistant or tool.
    channel: analysis, commentary or final (assistant and tool messages).
    recipient: who an assistant message is addressed to, e.g. "functions.get_weather" for a
        tool call; tool results are addressed to "assistant".
    content_type: e.g. "<|constrain|>json" on a tool call.
    name: the author's name; for a tool result, the tool, e.g. "functions.get_weather".
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function the model may call as `functions.<name>`; parameters is a JSON schema."""

    name: str
    description: str
    parameters: dict | None = None


def render_prompt(
    messages: Sequence[Message],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[ToolDefinition] = (),
    instructions: str | None = None,
    conversation_start_date: str | datetime.date | None = None,
    response_format: ResponseFormat | None = None,
) -> list[int]:
    """Prompt token ids for `messages`, ending with `<|start|>assistant` ready for completion.

    The system message carries the reasoning effort and, when given, the conversation start
    date (left out by default so identical requests render identically, which prefix caching
    relies on). `instructions`, then the content of any leading system/developer messages, go
    into the developer message with the function tool definitions. Defaults follow the harmony
    format: an assistant message without a channel is "final" ("commentary" if it has a
    recipient); a tool result is on "commentary" and addressed to "assistant". Analysis
    messages of earlier turns are dropped once a final answer follows them, as the format
    prescribes. A `json_schema` response format ends the developer message with harmony's
    "# Response Formats" section (its name, description and schema), so the model sees the format
    the grammar will hold it to; other formats add nothing to the prompt.

    Raises HarmonyInputError naming the first invalid field.
    """
    effort = _check_reasoning_effort(reasoning_effort)
    tool_descriptions = _check_tools(tools)
    date = _check_date(conversation_start_date)
    if instructions is not None:
        _check_text(instructions, "instructions")
    developer_instructions, chat = _split_instructions(messages)
    if instructions:
        developer_instructions.insert(0, instructions)
    section = response_format_section(response_format)

    system = oh.SystemContent.new().with_reasoning_effort(effort)
    if date is not None:
        system = system.with_conversation_start_date(date)
    harmony_messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if developer_instructions or tool_descriptions or section:
        developer = oh.DeveloperContent.new()
        if developer_instructions:
            developer = developer.with_instructions("\n\n".join(developer_instructions))
        if tool_descriptions:
            developer = developer.with_function_tools(tool_descriptions)
        harmony_messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    harmony_messages.extend(to_harmony(message) for message in chat)

    conversation = oh.Conversation.from_messages(harmony_messages)
    encoding = load_tokenizer()._encoding
    prompt = encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT)
    return _append_to_developer_message(prompt, section) if section else prompt


def response_format_section(response_format: ResponseFormat | None) -> str:
    """Harmony's structured-output section for a `json_schema` response format ("" for any other):

        # Response Formats

        ## {name}

        // {description, each line commented}
        {schema as compact JSON}
    """
    if response_format is None or response_format.type != "json_schema":
        return ""
    name = response_format.name or DEFAULT_FORMAT_NAME
    _check_text(name, "response_format.name")
    _check_text(response_format.description, "response_format.description")
    _check_schema(response_format.schema, "response_format.schema")
    comment = "".join(f"// {line}\n" for line in response_format.description.splitlines())
    schema = json.dumps(response_format.schema, ensure_ascii=False, separators=(",", ":"))
    return f"# Response Formats\n\n## {name}\n\n{comment}{schema}"


def _append_to_developer_message(prompt: list[int], section: str) -> list[int]:
    """`prompt` with `section` at the end of its developer message (the one after the system
    message). openai-harmony has no API for it, so the message's text is re-tokenized as one piece,
    as openai-harmony tokenizes its own sections: the model sees the tokens of one text, not of
    two halves joined."""
    tokenizer = load_tokenizer()
    body = prompt.index(MESSAGE_ID, prompt.index(END_ID)) + 1
    end = prompt.index(END_ID, body)
    text = tokenizer.decode(prompt[body:end])
    text = f"{text}\n\n{section}" if text else section
    return prompt[:body] + tokenizer.encode(text) + prompt[end:]


def _check_reasoning_effort(value: object) -> oh.ReasoningEffort:
    if not isinstance(value, str) or value.lower() not in REASONING_EFFORTS:
        raise HarmonyInputError("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}")
    return oh.ReasoningEffort(value.capitalize())


def _check_date(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.date):
        return value.isoformat()[:10]
    if isinstance(value, str) and _DATE.fullmatch(value):
        try:
            return datetime.date.fromisoformat(value).isoformat()
        except ValueError:
            pass  # 2025-02-30: the right shape, but no such day
    raise HarmonyInputError("conversation_start_date", f"must be a date like 2025-08-05, got {value!r}")


def _check_text(value: object, field: str, where: str = "") -> None:
    """A string openai-harmony can take: str, and valid Unicode (no lone surrogate such as a JSON "\\ud800")."""
    if not isinstance(value, str):
        raise HarmonyInputError(field, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise HarmonyInputError(field, f"has a lone surrogate {value[err.start]!r} at character {err.start}"
                                       f"{where}, which is not valid Unicode") from None


def _check_schema(value: object, field: str, path: str = "$", depth: int = 1) -> None:
    """`value` is plain JSON: objects with string keys, arrays, valid strings, finite numbers in the
    range of a double, booleans and null, nested at most MAX_SCHEMA_DEPTH levels. `path` locates a
    problem inside the schema, e.g. $.properties.city."""
    if isinstance(value, (dict, list, tuple)):
        if depth > MAX_SCHEMA_DEPTH:
            raise HarmonyInputError(field, f"nests deeper than {MAX_SCHEMA_DEPTH} levels (at {path})")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise HarmonyInputError(field, f"has a key that is not a string at {path}: {key!r}")
                _check_text(key, field, f" of a key at {path}")
                _check_schema(item, field, f"{path}.{key}", depth + 1)
        else:
            for index, item in enumerate(value):
                _check_schema(item, field, f"{path}[{index}]", depth + 1)
    elif isinstance(value, str):
        _check_text(value, field, f" at {path}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise HarmonyInputError(field, f"has {value} at {path}: JSON numbers are finite (NaN, Infinity and values "
                                       "beyond 1.8e308 such as 1e400 are not)")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _LARGEST_DOUBLE:
        raise HarmonyInputError(field, f"has a number beyond the range of a double at {path}")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise HarmonyInputError(field, f"has a {type(value).__name__} at {path}, which is not a JSON value")


def _check_tools(tools: Sequence[ToolDefinition]) -> list[oh.ToolDescription]:
    descriptions = []
    seen = set()
    for index, tool in enumerate(tools):
        field = f"tools[{index}]"
        if not isinstance(tool, ToolDefinition):
            raise HarmonyInputError(field, f"must be a ToolDefinition, got {type(tool).__name__}")
        if not isinstance(tool.name, str) or not _TOOL_NAME.fullmatch(tool.name):
            raise HarmonyInputError(f"{field}.name", f"must be 1-64 letters, digits, _ or -, got {tool.name!r}")
        if tool.name in seen:
            raise HarmonyInputError(f"{field}.name", f"duplicate tool name {tool.name!r}")
        seen.add(tool.name)
        _check_text(tool.description, f"{field}.description")
        if tool.parameters is not None:
            if not isinstance(tool.parameters, dict):
                raise HarmonyInputError(f"{field}.parameters", "must be a JSON schema object (dict) or None")
            _check_schema(tool.parameters, f"{field}.parameters")
        descriptions.append(oh.ToolDescription.new(tool.name, tool.description, tool.parameters))
    return descriptions


def _split_instructions(messages: Sequence[Message]) -> tuple[list[str], list[Message]]:
    """Validate `messages`; return the leading system/developer texts and the chat after them."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise HarmonyInputError("messages", "must be a non-empty list of messages")
    instructions: list[str] = []
    chat: list[Message] = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, Message):
            raise HarmonyInputError(field, f"must be a Message, got {type(message).__name__}")
        _check_message(message, field)
        if message.role in _INSTRUCTION_ROLES:
            if chat:
                # Harmony has one system and one developer message, both before the chat.
                raise HarmonyInputError(f"{field}.role", f"a {message.role} message must come before all "
                                        "user, assistant and tool messages")
            if message.content:
                instructions.append(message.content)
        else:
            chat.append(message)
    if not chat:
        raise HarmonyInputError("messages", "needs at least one user, assistant or tool message")
    return instructions, chat


def _check_message(message: Message, field: str) -> None:
    if message.role not in ROLES:
        raise HarmonyInputError(f"{field}.role", f"must be one of {', '.join(ROLES)}, got {message.role!r}")
    _check_text(message.content, f"{field}.content")
    if message.channel is not None and message.channel not in CHANNELS:
        raise HarmonyInputError(f"{field}.channel", f"must be one of {', '.join(CHANNELS)}, got {message.channel!r}")
    for name in ("recipient", "content_type", "name"):
        value = getattr(message, name)
        if value is not None and (not isinstance(value, str) or not value or any(c.isspace() for c in value)):
            raise HarmonyInputError(f"{field}.{name}", f"must be a non-empty string without spaces, got {value!r}")
        if value is not None:
            _check_text(value, f"{field}.{name}")
    if message.role == "tool" and message.name is None:
        raise HarmonyInputError(f"{field}.name", "a tool message needs the tool's name, e.g. functions.get_weather")


def to_harmony(message: Message) -> oh.Message:
    """openai-harmony's message for `message`, with the format's default channel and recipient."""
    channel, recipient = message.channel, message.recipient
    if message.role == "assistant" and channel is None:
        channel = "commentary" if recipient else "final"
    elif message.role == "tool":
        channel = channel or "commentary"
        recipient = recipient or "assistant"
    author = oh.Author(role=oh.Role(message.role), name=message.name)
    rendered = oh.Message.from_author_and_content(author, message.content)
    if channel is not None:
        rendered = rendered.with_channel(channel)
    if recipient is not None:
        rendered = rendered.with_recipient(recipient)
    if message.content_type is not None:
        rendered = rendered.with_content_type(message.content_type)
    return rendered
