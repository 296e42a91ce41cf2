"""Reading an OpenAI request body: typed fields, each bad one a violation naming its param.

Also the input pieces the Chat Completions and Responses routes share: function tools,
tool_choice, reasoning effort and sampling.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from cluster.engine.errors import InvalidRequestError
from cluster.engine.request import SamplingParams
from cluster.frontdoor import errors
from cluster.frontdoor.conversion import MAX_TOOLS, Violations, check_logprobs, check_stops
from cluster.harmony.render import REASONING_EFFORTS, ToolDefinition
from cluster.harmony.structured import ConstraintError, ResponseFormat, StrictTool, TurnConstraint, check_constraint
from cluster.serving.model_info import ModelInfo

_MISSING = object()
_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
               list: "an array"}


class Fields:
    """Typed access to one JSON object; a wrong type is recorded (the value reads as absent)."""

    def __init__(self, body: object, violations: Violations, path: str = "") -> None:
        self.violations = violations
        self.path = path
        if not isinstance(body, dict):
            violations.add(path or "body", "must be a JSON object")
            body = {}
        self.body = body

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.body.get(key) is not None

    def get(self, key: str, kind: type | tuple[type, ...], default=None, *, required: bool = False):
        value = self.body.get(key, _MISSING)
        if value is _MISSING or value is None:
            if required:
                self.violations.add(self.name(key), "is required")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = any(_is(value, k) for k in kinds)
        if not ok:
            self.violations.add(self.name(key), "must be " + " or ".join(_TYPE_NAMES[k] for k in kinds)
                                + f", got {_json_type(value)}")
            return default
        return float(value) if kinds == (float,) else value

    def object(self, key: str, *, required: bool = False) -> "Fields | None":
        value = self.get(key, dict, required=required)
        return None if value is None else Fields(value, self.violations, self.name(key))

    def choice(self, key: str, allowed: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.get(key, str)
        if value is None:
            return default
        if value not in allowed:
            self.violations.add(self.name(key), f"must be one of {', '.join(allowed)}, got {value!r}")
            return default
        return value


def _is(value: object, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _json_type(value: object) -> str:
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", dict: "an object",
            list: "an array"}.get(type(value), type(value).__name__)


def parse_json(raw: bytes, violations: Violations) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        violations.add("body", f"is not valid JSON: {err}")
        return {}


# ─────────────────────────────────────── shared inputs ───────────────────────────────────────

@dataclass(frozen=True)
class ToolChoice:
    mode: str  # auto | none | required | function
    function: str | None = None


def read_tools(fields: Fields, *, nested: bool) -> list[ToolDefinition]:
    """Function tools: Chat Completions nests them ({"type": "function", "function": {...}}),
    Responses does not ({"type": "function", "name": ...})."""
    tools = fields.get("tools", list, [])
    if len(tools) > MAX_TOOLS:
        fields.violations.add("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
        return []
    out = []
    for i, raw in enumerate(tools):
        tool = Fields(raw, fields.violations, f"tools[{i}]")
        kind = tool.get("type", str, required=True)
        if kind is not None and kind != "function":
            fields.violations.add(f"tools[{i}].type", f"only function tools are supported, got {kind!r}")
            continue
        spec = tool.object("function", required=True) if nested else tool
        if spec is None:
            continue
        name = spec.get("name", str, required=True)
        description = spec.get("description", str, "")
        parameters = spec.get("parameters", dict)
        spec.get("strict", bool)  # read again by read_constraint
        if name is not None:
            out.append(ToolDefinition(name=name, description=description, parameters=parameters))
    return out


def read_tool_choice(fields: Fields, tools: list[ToolDefinition], *, nested: bool) -> ToolChoice:
    value = fields.body.get("tool_choice")
    if value is None:
        return ToolChoice("auto")
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            fields.violations.add("tool_choice", f"must be auto, none, required or a function, got {value!r}")
            return ToolChoice("auto")
        if value == "required" and not tools:
            fields.violations.add("tool_choice", "required needs at least one tool in tools")
        return ToolChoice(value)
    choice = Fields(value, fields.violations, "tool_choice")
    if choice.get("type", str) != "function":
        fields.violations.add("tool_choice.type", "must be function")
        return ToolChoice("auto")
    spec = choice.object("function", required=True) if nested else choice
    name = spec.get("name", str, required=True) if spec is not None else None
    if name is None:
        return ToolChoice("auto")
    if name not in {tool.name for tool in tools}:
        fields.violations.add(spec.name("name"), f"names no tool in tools: {name!r}")
    return ToolChoice("function", name)


def apply_tool_choice(choice: ToolChoice, tools: list[ToolDefinition], instructions: str | None
                      ) -> tuple[list[ToolDefinition], str | None]:
    """The tools to render and the instructions to add for a tool_choice. Harmony has no
    forcing syntax and nothing constrains decoding yet, so required and a named function are
    instructions to the model (none leaves the tools out of the prompt): a model may still
    answer without calling."""
    if choice.mode == "none":
        return [], instructions
    if choice.mode == "auto":
        return tools, instructions
    if choice.mode == "required":
        must = "Always respond by calling one of the available functions."
    else:
        tools = [tool for tool in tools if tool.name == choice.function]
        must = f"Always respond by calling the function {choice.function}."
    return tools, f"{instructions}\n\n{must}" if instructions else must


def read_effort(value: object, field: str, violations: Violations) -> str:
    if value is None:
        return "medium"
    if value not in REASONING_EFFORTS:
        violations.add(field, f"must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}")
        return "medium"
    return value


def read_stops(fields: Fields) -> tuple[str, ...]:
    stop = fields.get("stop", (str, list))
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stops):
        fields.violations.add("stop", "must be a string or an array of strings")
        return ()
    check_stops(stops, "stop", fields.violations)
    return stops


def read_sampling(fields: Fields, info: ModelInfo, *, max_tokens_keys: tuple[str, ...],
                  logprobs: int | None = None, logprobs_field: str | None = None) -> SamplingParams:
    """OpenAI's sampling fields. temperature and top_p default to 1 as in OpenAI's API (gRPC's
    default is greedy). `ignore_eos` (vLLM's extension, for benchmarks) generates exactly
    max_tokens, as gRPC's ignore_stop."""
    max_tokens = None
    for key in max_tokens_keys:  # the first one present wins (max_completion_tokens over max_tokens)
        if fields.has(key):
            max_tokens = fields.get(key, int)
            break
    n = fields.get("n", int, 1)
    if n != 1:
        fields.violations.add("n", f"only n=1 is supported, got {n}")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if fields.get(penalty, float, 0.0) != 0.0:
            fields.violations.add(penalty, "is not supported (only 0)")
    if logprobs is not None:
        field = logprobs_field or ("top_logprobs" if logprobs else "logprobs")
        check_logprobs(logprobs, field, info, fields.violations)
    return SamplingParams(max_tokens=max_tokens, temperature=fields.get("temperature", float, 1.0),
                          top_p=fields.get("top_p", float, 1.0), seed=fields.get("seed", int),
                          logprobs=logprobs, ignore_stop=bool(fields.get("ignore_eos", bool, False)))


def max_tokens_field(keys: tuple[str, ...], fields: Fields) -> str:
    """The request's own name for max_tokens (errors name it as sent)."""
    return next((key for key in keys if fields.has(key)), keys[0])

def renamed(err: Exception, names: dict[str, str]) -> Exception:
    """`err` with internal field names replaced by the request's own (e.g. max_tokens ->
    max_completion_tokens); other errors unchanged."""
    if isinstance(err, errors.FieldErrors):
        return errors.FieldErrors([renamed(e, names) for e in err.errors])
    field = getattr(err, "field", None)
    if isinstance(err, InvalidRequestError) and field is not None:
        head = field.split("[", 1)[0].split(".", 1)[0]
        if head in names:
            return errors.FieldError(names[head] + field[len(head):], err.reason)
    return err


def strict_tool_names(fields: Fields, *, nested: bool) -> set[str]:
    """Names of the function tools declared with strict: true (their arguments are constrained)."""
    names = set()
    for raw in fields.body.get("tools") or ():
        spec = raw.get("function") if nested and isinstance(raw, dict) else raw
        if isinstance(spec, dict) and spec.get("strict") is True and isinstance(spec.get("name"), str):
            names.add(spec["name"])
    return names


def read_response_format(fmt: Fields | None, prefix: str, *, nested: bool) -> ResponseFormat:
    """Chat Completions' response_format (nested: {"type": "json_schema", "json_schema": {...}}) or
    Responses' text.format (flat: {"type": "json_schema", "name", "schema", "strict"}); also
    {"type": "regex", "pattern"} and {"type": "grammar", "grammar", "syntax": lark|gbnf}."""
    if fmt is None:
        return ResponseFormat()
    kind = fmt.choice("type", ("text", "json_object", "json_schema", "regex", "grammar"), "text")
    if kind == "json_schema":
        spec = fmt.object("json_schema", required=True) if nested else fmt
        if spec is None:
            return ResponseFormat()
        schema = spec.body.get("schema")
        if not isinstance(schema, (dict, bool)):
            fmt.violations.add(spec.name("schema"), "must be a JSON Schema (an object)")
            return ResponseFormat()
        return ResponseFormat("json_schema", schema=schema, strict=bool(spec.get("strict", bool, False)),
                              name=spec.get("name", str, ""), description=spec.get("description", str, ""))
    if kind == "regex":
        return ResponseFormat("regex", pattern=fmt.get("pattern", str, "", required=True))
    if kind == "grammar":
        return ResponseFormat("grammar", grammar=fmt.get("grammar", str, "", required=True),
                              grammar_syntax=fmt.choice("syntax", ("lark", "gbnf"), "lark"))
    return ResponseFormat(kind or "text")


def read_constraint(fields: Fields, fmt: Fields | None, prefix: str, tools: list[ToolDefinition], *,
                    nested: bool) -> TurnConstraint | None:
    """The structured-output constraint of an HTTP request (None when it constrains nothing),
    checked here so a bad one is a 400 naming the param before anything is generated. The
    reasoning budget is the extension field `reasoning_budget`."""
    strict = strict_tool_names(fields, nested=nested)
    strict_tools = tuple(StrictTool(t.name, t.parameters or {"type": "object"}) for t in tools if t.name in strict)
    budget = fields.get("reasoning_budget", int)
    constraint = TurnConstraint(read_response_format(fmt, prefix, nested=nested), strict_tools, budget, prefix)
    if not constraint.active:
        return None
    try:
        check_constraint(constraint)
    except ConstraintError as err:
        field = err.field
        if nested:
            field = re.sub(rf"^{re.escape(prefix)}\.(schema|name|description)\b", rf"{prefix}.json_schema.\1", field)
        if field.startswith("tools["):  # numbered among the strict tools: name the request's own index
            name = strict_tools[int(field[6:field.index("]")])].name
            index = next(i for i, t in enumerate(tools) if t.name == name)
            field = f"tools[{index}].function.parameters" if nested else f"tools[{index}].parameters"
        fields.violations.add(field, err.problem)
    return constraint
