"""Structured outputs for a harmony turn: what a request may constrain, how it is validated, and the
grammar that covers the whole assistant turn.

A constraint never applies to the raw continuation alone. The prompt ends with `<|start|>assistant`
and the grammar starts there:

    <|channel|>analysis<|message|> free text (at most `reasoning_budget` tokens) <|end|>
    <|start|>assistant<|channel|>final<|message|> VALUE <|return|>
  | ... <|start|>assistant to=functions.NAME<|channel|>commentary <|constrain|>json<|message|> ARGUMENTS <|call|>
  | ... <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|> ARGUMENTS <|call|>

A tool call's recipient may stand in either place of its header, as harmony allows; the first is
how openai-harmony renders a call (and so how gpt-oss writes one), and masking it away would push a
model that knows the format off its own path.

The analysis message is optional and unconstrained (only its end, and the control tokens that lead
to the answer, are imposed); VALUE is the response format, ARGUMENTS the parameter schema of a
strict tool. When the reasoning budget is spent, only `<|end|>` and the header of the answer can
follow, so even a model that never writes harmony by itself ends with a valid constrained answer.

llguidance compiles the grammar (docs/structured-output.md says why: it was measured against
xgrammar on this vocabulary). Its Lark dialect names special tokens directly (`<|channel|>`) and
references sub-grammars (`@value`), so the user's schema, regex or grammar is embedded unchanged.
The HTTP and gRPC layers build a `TurnConstraint` and call `check_constraint` to refuse a bad one
before anything is generated; the engine compiles it with `grammar_tokenizer()`.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import threading
from dataclasses import dataclass, field

import llguidance

from cluster.harmony.render import HarmonyInputError
from cluster.harmony.tokenizer import (CALL_ID, FIRST_SPECIAL_ID, RETURN_ID, VOCAB_FILE_NAME, VOCAB_SIZE,
                                       default_cache_dir, load_tokenizer, materialize_vocab_file)

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "grammar")
# Analysis tokens a constrained turn may use when the request sets no budget. Whatever is asked,
# the analysis never takes more than half of max_tokens, so the answer always has room.
DEFAULT_REASONING_BUDGET = 1024
MAX_SCHEMA_BYTES = 256 << 10
MAX_PATTERN_BYTES = 16 << 10
# OpenAI's rule for a response format's name; it keeps the prompt section's heading one line.
FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The end of a constrained turn: a final answer returns, a tool call calls.
CONSTRAINED_STOP_TOKEN_IDS = (RETURN_ID, CALL_ID)
# Grammars far beyond what a JSON schema of a real API needs are refused, not compiled.
PARSER_LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                     step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000)


@dataclass(frozen=True)
class ResponseFormat:
    """The shape of the final answer.

    type: text (no constraint), json_object (any JSON object), json_schema (`schema`; `strict`
        refuses a schema with keywords the compiler cannot enforce instead of ignoring them),
        regex (`pattern`, Rust regex syntax, matched whole) or grammar (`grammar`: a Lark grammar
        in llguidance's dialect, or GBNF, whichever `grammar_syntax` says).
    name, description: a json_schema's heading and explanation in the prompt's "# Response
        Formats" section (render_prompt), as in OpenAI's API; they do not constrain anything.
    """

    type: str = "text"
    schema: dict | None = None
    strict: bool = False
    name: str = ""
    description: str = ""
    pattern: str = ""
    grammar: str = ""
    grammar_syntax: str = "lark"  # lark | gbnf

    @property
    def constrains(self) -> bool:
        return self.type != "text"


@dataclass(frozen=True)
class StrictTool:
    """A function whose call arguments must match `parameters` (a JSON schema)."""

    name: str
    parameters: dict = field(default_factory=lambda: {"type": "object"})


@dataclass(frozen=True)
class TurnConstraint:
    """Everything that constrains one assistant turn. `field_prefix` is where the fields sit in
    the caller's request ("response_format", "text.format"), for error messages."""

    response_format: ResponseFormat = ResponseFormat()
    strict_tools: tuple[StrictTool, ...] = ()
    reasoning_budget: int | None = None  # None: DEFAULT_REASONING_BUDGET
    field_prefix: str = "response_format"

    @property
    def active(self) -> bool:
        return self.response_format.constrains or bool(self.strict_tools) or self.reasoning_budget is not None

    def budget_for(self, max_tokens: int) -> int:
        """Analysis tokens allowed within a turn of at most `max_tokens` tokens."""
        budget = DEFAULT_REASONING_BUDGET if self.reasoning_budget is None else self.reasoning_budget
        return max(0, min(budget, max_tokens // 2))


class ConstraintError(HarmonyInputError):
    """A response format, tool schema or budget that cannot be compiled; `.field` names it."""


def _value_grammar(fmt: ResponseFormat, prefix: str) -> dict:
    """The llguidance grammar entry for the final answer's content."""
    if fmt.type not in FORMAT_TYPES:
        raise ConstraintError(f"{prefix}.type", f"must be one of {', '.join(FORMAT_TYPES)}, got {fmt.type!r}")
    if fmt.type == "text":
        return {"lark_grammar": _ANY_TEXT}
    if fmt.type == "json_object":
        return {"json_schema": _checked_schema({"type": "object"}, True, f"{prefix}.type")}
    if fmt.type == "json_schema":
        _check_label(fmt, prefix)
        return {"json_schema": _checked_schema(fmt.schema, fmt.strict, f"{prefix}.schema")}
    if fmt.type == "regex":
        if not fmt.pattern:
            raise ConstraintError(f"{prefix}.pattern", "must not be empty for type regex")
        if len(fmt.pattern.encode()) > MAX_PATTERN_BYTES:
            raise ConstraintError(f"{prefix}.pattern", f"must be at most {MAX_PATTERN_BYTES} bytes")
        return json.loads(llguidance.LLMatcher.grammar_from_regex(fmt.pattern))["grammars"][0]
    if not fmt.grammar:
        raise ConstraintError(f"{prefix}.grammar", "must not be empty for type grammar")
    if len(fmt.grammar.encode()) > MAX_PATTERN_BYTES:
        raise ConstraintError(f"{prefix}.grammar", f"must be at most {MAX_PATTERN_BYTES} bytes")
    if fmt.grammar_syntax not in ("lark", "gbnf"):
        raise ConstraintError(f"{prefix}.grammar_syntax", f"must be lark or gbnf, got {fmt.grammar_syntax!r}")
    try:
        lark = llguidance.grammar_from(fmt.grammar_syntax, fmt.grammar)
    except ValueError as err:
        raise ConstraintError(f"{prefix}.grammar", str(err).splitlines()[0]) from None
    return {"lark_grammar": lark}


def _check_label(fmt: ResponseFormat, prefix: str) -> None:
    """The name and description that go into the prompt (render_prompt's response format section)."""
    if fmt.name and not (isinstance(fmt.name, str) and FORMAT_NAME.fullmatch(fmt.name)):
        raise ConstraintError(f"{prefix}.name", f"must be 1-64 letters, digits, _ or -, got {fmt.name!r}")
    if not isinstance(fmt.description, str):
        raise ConstraintError(f"{prefix}.description", f"must be a string, got {type(fmt.description).__name__}")
    if len(fmt.description.encode("utf-8", "surrogatepass")) > MAX_PATTERN_BYTES:
        raise ConstraintError(f"{prefix}.description", f"must be at most {MAX_PATTERN_BYTES} bytes")
    try:
        fmt.description.encode("utf-8")
    except UnicodeEncodeError:
        raise ConstraintError(f"{prefix}.description", "has a lone surrogate, which is not valid Unicode") from None


def _checked_schema(schema: object, strict: bool, name: str) -> dict | bool:
    if schema is None:
        raise ConstraintError(name, "is required for type json_schema")
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(name, f"must be a JSON object (a JSON Schema), got {type(schema).__name__}")
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as err:
        raise ConstraintError(name, f"is not serialisable as JSON: {err}") from None
    if len(text) > MAX_SCHEMA_BYTES:
        raise ConstraintError(name, f"must be at most {MAX_SCHEMA_BYTES} bytes of JSON, got {len(text)}")
    if isinstance(schema, dict):
        # At most one space where JSON allows whitespace: both the compact form and json.dumps'
        # `{"a": 1, "b": 2}` pass (a model trained on either keeps to its own path), but a model
        # cannot pad the answer with blank lines. Not strict: keywords the compiler cannot enforce
        # are ignored (the output may then miss them); strict refuses such a schema instead.
        options = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?", "lenient": not strict}
        schema = {**schema, "x-guidance": options}
    return schema


# Any sequence of text tokens, token by token rather than as characters: a model's reasoning may
# split a character across tokens in ways a character regex would refuse.
_ANY_TEXT = f"start: <[0-{FIRST_SPECIAL_ID - 1}]>*"


def _lark_string(text: str) -> str:
    return json.dumps(text)


def turn_grammar(constraint: TurnConstraint, max_tokens: int) -> str:
    """The llguidance grammar (JSON text) of the whole assistant turn; raises ConstraintError on a
    field that cannot be turned into one (it does not compile the grammar: `check_constraint` does)."""
    prefix = constraint.field_prefix
    fmt = constraint.response_format
    grammars: list[dict] = [{**_value_grammar(fmt, prefix), "name": "value"}]
    answers = ['<|channel|> "final" <|message|> @value <|return|>']
    for i, tool in enumerate(constraint.strict_tools):
        grammars.append({"name": f"tool{i}", "json_schema": _checked_schema(
            tool.parameters, True, f"tools[{i}].parameters")})
        arguments = f'<|constrain|> "json" <|message|> @tool{i} <|call|>'
        answers.append(f'{_lark_string(f" to=functions.{tool.name}")} <|channel|> "commentary " {arguments}')
        answers.append(f'<|channel|> {_lark_string(f"commentary to=functions.{tool.name} ")} {arguments}')
    budget = constraint.budget_for(max_tokens)
    lines = ["start: analysis? answer" if budget else "start: answer",
             "answer: " + "\n      | ".join(answers)]
    if budget:
        lines += ['analysis: <|channel|> "analysis" <|message|> reasoning <|end|> <|start|> "assistant"',
                  f"reasoning[max_tokens={budget}]: @thought"]
        grammars.append({"name": "thought", "lark_grammar": _ANY_TEXT})
    grammars.insert(0, {"name": "turn", "lark_grammar": "\n".join(lines) + "\n"})
    return json.dumps({"grammars": grammars})


def turn_lark(constraint: TurnConstraint, max_tokens: int) -> str:
    """The same turn grammar as one Lark text (sub-grammars inlined as `%json {...}` / `%lark {...}`),
    for engines that take a grammar only as Lark: vLLM's `StructuredOutputsParams(grammar=...)`
    with its guidance backend."""
    grammars = json.loads(turn_grammar(constraint, max_tokens))["grammars"]
    inline = {g["name"]: (f"%json {json.dumps(g['json_schema'])}" if g.get("json_schema") is not None
                          else "%lark {\n" + g["lark_grammar"] + "\n}") for g in grammars[1:]}
    lines = grammars[0]["lark_grammar"].replace("@thought", inline.pop("thought", "@thought")).splitlines()
    for name, body in inline.items():
        lines = [line.replace(f"@{name}", name) for line in lines] + [f"{name}: {body}"]
    return "\n".join(lines) + "\n"


def check_constraint(constraint: TurnConstraint, max_tokens: int = 2 * DEFAULT_REASONING_BUDGET) -> str:
    """Validate `constraint` without generating anything; returns its grammar, raises ConstraintError
    naming the field and the reason. Needs no tokenizer (so the front door can call it)."""
    budget = constraint.reasoning_budget
    if budget is not None and not 0 <= budget <= 1 << 20:
        raise ConstraintError("reasoning_budget", f"must be in [0, {1 << 20}], got {budget}")
    grammar = turn_grammar(constraint, max_tokens)
    try:
        message = llguidance.LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    except ValueError as err:  # the schema is not a JSON object llguidance can read
        message = str(err)
    if message:
        raise ConstraintError(*_blame(constraint, message))
    return grammar


def _invalid(grammar: dict) -> str:
    """The compiler's complaint about one sub-grammar alone ("" when it compiles)."""
    try:
        return llguidance.LLMatcher.validate_grammar(json.dumps({"grammars": [grammar]}), None, limits=parser_limits())
    except ValueError as err:
        return str(err)


def _blame(constraint: TurnConstraint, message: str) -> tuple[str, str]:
    """(field, reason) for a failed turn grammar: the first strict tool whose schema fails alone,
    else the response format."""
    for i, tool in enumerate(constraint.strict_tools):
        alone = _invalid({"json_schema": _checked_schema(tool.parameters, True, f"tools[{i}].parameters")})
        if alone:
            return f"tools[{i}].parameters", _first_lines(alone)
    fmt = constraint.response_format
    part = {"json_schema": "schema", "regex": "pattern", "grammar": "grammar"}.get(fmt.type, "type")
    return f"{constraint.field_prefix}.{part}", _first_lines(message)


def _first_lines(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else message


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**PARSER_LIMITS)


class _VocabularyView:
    """o200k_harmony as llguidance's TokenizerWrapper reads it: the bytes of every id (specials as
    their names), the special ids, and an encode function."""

    def __init__(self) -> None:
        tokenizer = load_tokenizer()
        path = materialize_vocab_file(default_cache_dir())
        assert path.name == VOCAB_FILE_NAME
        tokens = [base64.b64decode(line.split(b" ", 1)[0]) for line in path.read_bytes().splitlines() if line]
        assert len(tokens) == FIRST_SPECIAL_ID
        self.special_token_ids = list(range(FIRST_SPECIAL_ID, VOCAB_SIZE))
        tokens += [tokenizer.decode([i]).encode() for i in self.special_token_ids]
        self.tokens = tokens
        self.eos_token_id = RETURN_ID
        self.bos_token_id = None
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


_build_lock = threading.RLock()


@functools.cache
def _vocabulary() -> _VocabularyView:
    with _build_lock:
        return _VocabularyView()


@functools.cache
def _grammar_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_vocabulary()))


def grammar_tokenizer() -> llguidance.LLTokenizer:
    """The process-wide llguidance view of o200k_harmony (built once, by one thread: seconds)."""
    with _build_lock:
        return _grammar_tokenizer()


def token_bytes() -> list[bytes]:
    """Each id's bytes (specials as their names), for callers that classify tokens."""
    return _vocabulary().tokens
