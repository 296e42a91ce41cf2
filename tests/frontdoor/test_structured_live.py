"""Structured output through the real gRPC front door, Serve and the random tiny model: Chat and
Generate answers match their format, a strict tool's arguments match its schema, a bad format is
INVALID_ARGUMENT naming the field, and fuzzed schemas never break the server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.harmony.render import Message, render_prompt
from cluster.harmony.structured import ResponseFormat
from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb
from tests.frontdoor.status_details import bad_fields

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from structured_cases import BUDGET, MAX_TOKENS, RANDOM_MODEL_SCHEMAS, strict_tool_chats  # noqa: E402

pytestmark = pytest.mark.slow

USER = [pb.ChatMessage(role=pb.ROLE_USER, content="Reply in the requested format.")]
SAMPLING = pb.SamplingParams(max_tokens=MAX_TOKENS)


def chat(stub, **fields):
    responses = list(stub.Chat(pb.ChatRequest(messages=USER, sampling=SAMPLING, reasoning_budget=BUDGET, **fields),
                               timeout=120))
    return [r.delta for r in responses if r.HasField("delta")], responses[-1].complete


@pytest.mark.parametrize("name", ["nested_object", "array_of_objects", "enum_string", "pattern", "recursive_tree",
                                  "one_of_objects"])
def test_chat_final_answer_matches_the_json_schema(stub, name):
    schema = RANDOM_MODEL_SCHEMAS[name]
    fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name=name, schema_json=json.dumps(schema), strict=True))
    deltas, complete = chat(stub, response_format=fmt)
    assert complete.finish_reason == pb.FINISH_REASON_STOP
    assert not any(d.raw for d in deltas)
    final = "".join(d.text for d in deltas if d.channel == pb.CHANNEL_FINAL)
    jsonschema.validate(json.loads(final), schema)
    # The model may skip the analysis; if it wrote one, the budget bounded it (plus its header and end).
    assert complete.usage.reasoning_tokens <= BUDGET + 6


def _section_tokens(fmt: ResponseFormat) -> int:
    """How many prompt tokens a response format adds to USER's rendered prompt (its developer message)."""
    messages = [Message("user", USER[0].content)]
    return len(render_prompt(messages, response_format=fmt)) - len(render_prompt(messages))


def test_chat_prompt_carries_the_json_schema_for_the_model_to_read(stub):
    """Chat renders the schema into the developer message ("# Response Formats"): the served prompt
    grows by exactly that section, and a longer description makes it longer still."""
    schema = RANDOM_MODEL_SCHEMAS["enum_string"]
    short = pb.JsonSchemaFormat(name="color", schema_json=json.dumps(schema), strict=True)
    long = pb.JsonSchemaFormat(name="color", schema_json=json.dumps(schema), strict=True,
                               description="A color the user might like, as one of the listed names.")
    _, plain = chat(stub)
    _, with_short = chat(stub, response_format=pb.ResponseFormat(json_schema=short))
    _, with_long = chat(stub, response_format=pb.ResponseFormat(json_schema=long))
    expected = _section_tokens(ResponseFormat("json_schema", schema=schema, name="color"))
    assert expected > len(load_tokenizer().encode(json.dumps(schema, separators=(",", ":"))))
    assert with_short.usage.prompt_tokens - plain.usage.prompt_tokens == expected
    assert with_long.usage.prompt_tokens - plain.usage.prompt_tokens == _section_tokens(
        ResponseFormat("json_schema", schema=schema, name="color", description=long.description))
    assert with_long.usage.prompt_tokens > with_short.usage.prompt_tokens


def test_chat_strict_tool_call_arguments_match_the_parameters(stub):
    parameters = RANDOM_MODEL_SCHEMAS["weather_tool"]
    tool = pb.ToolDefinition(name="get_weather", description="Weather", parameters_json=json.dumps(parameters),
                             strict=True)
    # A final answer is an enum value the model is unlikely to pick over a call; either way it validates.
    calls = strict_tool_chats(stub, USER, tool, parameters, range(4), max_tokens=MAX_TOKENS, timeout=120)
    assert calls > 0


def test_generate_with_a_regex_and_a_harmony_prompt(stub):
    prompt = load_tokenizer().encode("<|start|>user<|message|>Code?<|end|><|start|>assistant", allow_special=True)
    responses = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=SAMPLING, reasoning_budget=0,
                                                      response_format=pb.ResponseFormat(regex="[A-Z]{3}-[0-9]{2}")),
                                   timeout=120))
    ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    text = load_tokenizer().decode(ids)
    assert text.startswith("<|channel|>final<|message|>") and text.endswith("<|return|>"), text
    body = text.removeprefix("<|channel|>final<|message|>").removesuffix("<|return|>")
    assert len(body) == 6 and body[3] == "-" and body[:3].isupper() and body[4:].isdigit(), body


@pytest.mark.parametrize("fields, field", [
    (dict(response_format=pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema_json='{"type": "strin"}',
                                                                             strict=True))),
     "response_format.json_schema.schema_json"),
    (dict(response_format=pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema_json="{not json"))),
     "response_format.json_schema.schema_json"),
    (dict(response_format=pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(name="two words", schema_json="{}"))),
     "response_format.json_schema.name"),
    (dict(response_format=pb.ResponseFormat(regex="a(b")), "response_format.regex"),
    (dict(response_format=pb.ResponseFormat(grammar=pb.GrammarFormat(text="start: nowhere"))),
     "response_format.grammar.text"),
    (dict(tools=[pb.ToolDefinition(name="a", parameters_json="{}"),
                 pb.ToolDefinition(name="b", parameters_json='{"type": "object", "properties": {"x": {"$ref": "#/no"}}}',
                                   strict=True)]), "tools[1].parameters_json"),
    (dict(reasoning_budget=-3), "reasoning_budget"),
])
def test_a_bad_format_is_invalid_argument_naming_the_field(stub, fields, field):
    fields.setdefault("reasoning_budget", BUDGET)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Chat(pb.ChatRequest(messages=USER, sampling=SAMPLING, **fields), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(info.value) == [field], info.value.details()


def test_generate_refuses_a_constraint_on_a_prompt_that_is_not_an_assistant_turn(stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt_text="The sky is", response_format=pb.ResponseFormat(
            json_object=pb.JsonObjectFormat())), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(info.value) == ["response_format"]


_KEYWORDS = ["type", "properties", "required", "items", "enum", "const", "pattern", "minLength", "maxLength",
             "minimum", "maximum", "anyOf", "oneOf", "allOf", "$ref", "$defs", "additionalProperties", "format",
             "minItems", "maxItems", "prefixItems", "not", "uniqueItems", "multipleOf"]
_TYPES = st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "strin"])
_LEAF = st.one_of(_TYPES, st.integers(-3, 20), st.booleans(), st.none(), st.text(max_size=8),
                  st.sampled_from(["#/$defs/a", "#", "^[a-z]+$", "(", "date", "email"]))
_SCHEMAS = st.recursive(
    st.dictionaries(st.sampled_from(_KEYWORDS), _LEAF, max_size=4),
    lambda inner: st.one_of(
        st.dictionaries(st.sampled_from(_KEYWORDS), st.one_of(_LEAF, inner, st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=4), inner,
                                                                               max_size=3)), max_size=5),
        st.lists(_LEAF, max_size=3)),
    max_leaves=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(schema=_SCHEMAS, strict=st.booleans())
def test_fuzzed_schemas_compile_or_are_refused_never_crash(stub, schema, strict):
    fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(schema_json=json.dumps(schema), strict=strict))
    try:
        responses = list(stub.Chat(pb.ChatRequest(messages=USER, sampling=pb.SamplingParams(max_tokens=12),
                                                  response_format=fmt, reasoning_budget=0), timeout=60))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert bad_fields(err)[0].startswith("response_format"), err.details()
        return
    assert responses[-1].HasField("complete")


# ── the OpenAI HTTP API (same front door): response_format, text.format, strict tools ──

def _openai(frontdoor):
    import openai

    return openai.OpenAI(base_url=frontdoor.server.http_url + "/v1", api_key="x", max_retries=0)


def test_http_chat_completions_response_format_json_schema(frontdoor):
    schema = RANDOM_MODEL_SCHEMAS["refs_defs"]
    with _openai(frontdoor) as client:
        completion = client.chat.completions.create(
            model="gpt-oss-tiny-test", messages=[{"role": "user", "content": "Two points, please."}],
            max_tokens=MAX_TOKENS, extra_body={"reasoning_budget": BUDGET},
            response_format={"type": "json_schema", "json_schema": {"name": "line", "schema": schema, "strict": True}})
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_http_prompts_carry_the_json_schema_for_the_model_to_read(frontdoor):
    """Chat Completions' response_format and Responses' text.format both reach the prompt (the
    same renderer as gRPC): usage.prompt_tokens grows by the rendered section."""
    schema = RANDOM_MODEL_SCHEMAS["enum_string"]
    description = "A color the user might like."
    expected = _section_tokens(ResponseFormat("json_schema", schema=schema, name="color", description=description))
    user = USER[0].content
    with _openai(frontdoor) as client:
        def completion_prompt(**fmt):
            return client.chat.completions.create(
                model="gpt-oss-tiny-test", messages=[{"role": "user", "content": user}], max_tokens=MAX_TOKENS,
                extra_body={"reasoning_budget": BUDGET}, **fmt).usage.prompt_tokens

        def response_prompt(**fmt):
            return client.responses.create(model="gpt-oss-tiny-test", input=user, max_output_tokens=MAX_TOKENS,
                                           extra_body={"reasoning_budget": BUDGET}, **fmt).usage.input_tokens

        assert completion_prompt(response_format={"type": "json_schema", "json_schema": {
            "name": "color", "description": description, "schema": schema, "strict": True}}) \
            - completion_prompt() == expected
        assert response_prompt(text={"format": {"type": "json_schema", "name": "color", "description": description,
                                                "schema": schema, "strict": True}}) - response_prompt() == expected


def test_http_responses_text_format_and_strict_tool(frontdoor):
    schema = RANDOM_MODEL_SCHEMAS["enum_string"]
    parameters = RANDOM_MODEL_SCHEMAS["weather_tool"]
    with _openai(frontdoor) as client:
        response = client.responses.create(
            model="gpt-oss-tiny-test", input="A color, or the weather.", max_output_tokens=MAX_TOKENS,
            extra_body={"reasoning_budget": BUDGET},
            text={"format": {"type": "json_schema", "name": "color", "schema": schema, "strict": True}},
            tools=[{"type": "function", "name": "get_weather", "parameters": parameters, "strict": True}])
    calls = [item for item in response.output if item.type == "function_call"]
    if calls:
        jsonschema.validate(json.loads(calls[0].arguments), parameters)
    else:
        jsonschema.validate(json.loads(response.output_text), schema)


@pytest.mark.parametrize("json_schema, param", [
    ({"name": "x", "schema": {"type": "strin"}, "strict": True}, "response_format.json_schema.schema"),
    ({"name": "two words", "schema": {"type": "string"}}, "response_format.json_schema.name"),
])
def test_http_bad_schema_is_400_naming_the_param(frontdoor, json_schema, param):
    import openai

    with _openai(frontdoor) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="gpt-oss-tiny-test", messages=[{"role": "user", "content": "x"}], max_tokens=8,
            response_format={"type": "json_schema", "json_schema": json_schema})
    assert info.value.body["param"] == param, info.value.body
