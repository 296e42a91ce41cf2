import json

import openai_harmony as oh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.harmony import DeltaKind, HarmonyTokenizer, Message, StreamParser
from cluster.harmony.parse import MAX_HEADER_TOKENS

# Completions as the model writes them after a prompt ending in "<|start|>assistant".
COMPLETIONS = {
    "analysis then final": (
        "<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>"),
    "tool call": (
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
        '{"city": "Paris", "unit": "celsius"}<|call|>'),
    "recipient in the role part": (
        "<|channel|>commentary<|message|>Checking the weather…<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>'
        '{"city":"東京"}<|call|>'),
    "final only": "<|channel|>final<|message|>Plain answer.<|return|>",
    "split characters": (
        "<|channel|>analysis<|message|>𓀀𓀁 🦩👩‍👩‍👧 e\u0301<|end|>"
        "<|start|>assistant<|channel|>final<|message|>世界 𝔘𝔫𝔦 🇮🇹<|return|>"),
    "cut off mid-content": "<|channel|>analysis<|message|>Thinking about 🦩",
}
EXPECTED_KINDS = {
    "analysis then final": [DeltaKind.MESSAGE_DONE, DeltaKind.MESSAGE_DONE],
    "tool call": [DeltaKind.MESSAGE_DONE, DeltaKind.TOOL_CALL],
    "recipient in the role part": [DeltaKind.MESSAGE_DONE, DeltaKind.TOOL_CALL],
    "final only": [DeltaKind.MESSAGE_DONE],
    "split characters": [DeltaKind.MESSAGE_DONE, DeltaKind.MESSAGE_DONE],
    "cut off mid-content": [DeltaKind.MESSAGE_DONE],
}


@pytest.fixture(scope="module")
def completions(tokenizer):
    return {name: tokenizer.encode(text, allow_special=True) for name, text in COMPLETIONS.items()}


@pytest.fixture(scope="module")
def harmony_encoding(tokenizer):
    """openai-harmony's encoding, the reference parser (load_tokenizer() lets it load offline)."""
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _reference_parse(harmony_encoding, ids):
    """openai-harmony's own parse of a completion, in our Message type."""
    return [Message(role=m.author.role.value, content="".join(c.text for c in m.content), channel=m.channel,
                    recipient=m.recipient, content_type=m.content_type, name=m.author.name)
            for m in harmony_encoding.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)]


@pytest.fixture(scope="module")
def reference_messages(harmony_encoding, completions):
    return {name: _reference_parse(harmony_encoding, ids) for name, ids in completions.items()}


def _chunks(ids, cuts):
    bounds = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def _run(parser, chunks):
    deltas = []
    for chunk in chunks:
        deltas.extend(parser.feed(chunk))
    return deltas + parser.finish()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 10_000), max_size=30), name=st.sampled_from(sorted(COMPLETIONS)))
def test_messages_equal_openai_harmony_however_chunked(completions, reference_messages, name, cuts):
    parser = StreamParser()
    deltas = _run(parser, _chunks(completions[name], cuts))
    assert parser.messages == reference_messages[name]
    assert not parser.is_raw and not any(d.raw for d in deltas)

    # The text deltas of each message add up to its content, carry its header, and never show a
    # replacement character for a character split across chunks.
    ends = [d for d in deltas if d.kind is not DeltaKind.TEXT]
    assert [d.kind for d in ends] == EXPECTED_KINDS[name]
    assert [d.message for d in ends] == parser.messages
    text_of_message, index = [""] * len(ends), 0
    for delta in deltas:
        if delta.kind is DeltaKind.TEXT:
            message = parser.messages[index]
            assert (delta.channel, delta.recipient, delta.content_type) == (
                message.channel, message.recipient, message.content_type)
            assert "\ufffd" not in delta.text and delta.text
            text_of_message[index] += delta.text
        else:
            index += 1
    assert text_of_message == [m.content for m in parser.messages]


def test_every_chunking_of_one_token_at_a_time(completions, reference_messages):
    for name, ids in completions.items():
        parser = StreamParser()
        assert _run(parser, [[i] for i in ids])[-1].message == reference_messages[name][-1]
        assert parser.messages == reference_messages[name]


def test_tool_call_event(completions):
    parser = StreamParser()
    call = _run(parser, [completions["tool call"]])[-1]
    assert call.kind is DeltaKind.TOOL_CALL
    assert call.tool_name == "get_weather"
    assert call.recipient == "functions.get_weather"
    assert call.content_type == "<|constrain|>json"
    assert json.loads(call.tool_arguments) == {"city": "Paris", "unit": "celsius"}
    assert parser.done  # <|call|> ends the turn


@pytest.mark.parametrize("name,done", [("final only", True), ("analysis then final", True),
                                       ("cut off mid-content", False)])
def test_done_only_after_return_or_call(completions, name, done):
    parser = StreamParser()
    _run(parser, [completions[name]])
    assert parser.done is done


def test_end_keeps_the_turn_open(tokenizer):
    parser = StreamParser()
    parser.feed(tokenizer.encode("<|channel|>analysis<|message|>Hmm.<|end|>", allow_special=True))
    assert not parser.done and len(parser.messages) == 1
    # A cut-off right after <|start|> shows nothing and invents no message.
    assert parser.feed([200006]) == [] and parser.finish() == []
    assert len(parser.messages) == 1 and parser.raw_text == ""


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 201087).filter(lambda i: i != 200008), max_size=120),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_output_without_structure_streams_as_raw_text(tokenizer, ids, cuts):
    # Without <|message|> no header can complete, so the whole output must come back raw.
    parser = StreamParser()
    deltas = _run(parser, _chunks(ids, cuts))
    assert all(d.kind is DeltaKind.TEXT and d.raw and d.channel is None for d in deltas)
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids) == parser.raw_text
    assert parser.messages == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(0, 201087), st.sampled_from([200002, 200003, 200005, 200006, 200007,
                                                                       200008, 200012, 173781, 17196])),
                    max_size=120),
       cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_arbitrary_ids_never_raise(ids, cuts):
    parser = StreamParser()
    deltas = _run(parser, _chunks(ids, cuts))
    for message in parser.messages:
        assert message.role == "assistant" and message.channel in ("analysis", "commentary", "final")
    if parser.is_raw:
        assert parser.raw_text and deltas[-1].raw


def test_random_output_streams_from_the_first_chunk(tokenizer):
    parser = StreamParser()
    first = parser.feed(tokenizer.encode("Lorem ipsum"))
    assert [(d.raw, d.text) for d in first] == [(True, "Lorem ipsum")]
    assert [d.text for d in parser.feed(tokenizer.encode(" dolor<|end|>", allow_special=True))] == [" dolor<|end|>"]


@pytest.mark.parametrize("completion,parsed,raw", [
    # Garbage where <|start|> must come: the first message stands, the rest is raw.
    ("<|channel|>final<|message|>Hi<|end|>random words", 1, "random words"),
    # A user turn is not something the assistant may write.
    ("<|channel|>final<|message|>Hi<|end|><|start|>user<|message|>Me<|end|>", 1, "<|start|>user<|message|>Me<|end|>"),
    # A channel that does not exist.
    ("<|channel|>bogus<|message|>x<|end|>", 0, "<|channel|>bogus<|message|>x<|end|>"),
    # A stop token inside a header.
    ("<|channel|>final<|end|>tail", 0, "<|channel|>final<|end|>tail"),
    # A header cut off by the length limit is shown rather than swallowed.
    ("<|channel|>fin", 0, "<|channel|>fin"),
    # A header that never reaches <|message|>.
    ("<|channel|>" + "word " * MAX_HEADER_TOKENS, 0, "<|channel|>" + "word " * MAX_HEADER_TOKENS),
])
def test_broken_structure_switches_to_raw(tokenizer, completion, parsed, raw):
    for chunk_size in (1, 3, 1000):
        ids = tokenizer.encode(completion, allow_special=True)
        parser = StreamParser()
        deltas = _run(parser, [ids[i:i + chunk_size] for i in range(0, len(ids), chunk_size)])
        assert len(parser.messages) == parsed
        assert parser.is_raw and parser.raw_text == raw
        assert "".join(d.text for d in deltas if d.raw) == raw


def test_long_header_goes_raw_before_the_end(tokenizer):
    parser = StreamParser()
    deltas = parser.feed(tokenizer.encode("<|channel|>" + "word " * (MAX_HEADER_TOKENS + 5), allow_special=True))
    assert deltas and deltas[0].raw


def test_feed_after_finish_is_an_error(tokenizer):
    parser = StreamParser()
    parser.finish()
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed([1])


class _CountingTokenizer(HarmonyTokenizer):
    decoded_ids = 0

    def decode_bytes(self, ids):
        ids = list(ids)
        self.decoded_ids += len(ids)
        return super().decode_bytes(ids)


def test_cost_per_chunk_does_not_grow_with_history(tokenizer):
    counting = _CountingTokenizer(tokenizer._encoding)
    body = tokenizer.encode("word " * 3000)
    ids = tokenizer.encode("<|channel|>final<|message|>", allow_special=True) + body + [200002]
    parser = StreamParser(counting)
    for token in ids:
        parser.feed([token])
    parser.finish()
    assert parser.messages[0].content == "word " * 3000
    assert counting.decoded_ids <= len(ids) + 10  # each id decoded about once, not once per chunk


# Building blocks of output that is harmony, nearly harmony, or broken in one place.
_ROLES = st.sampled_from(["assistant", "assistant", "user", ""])
_HEADERS = st.sampled_from([
    "<|channel|>final", "<|channel|>analysis", "<|channel|>commentary",
    "<|channel|>commentary to=functions.get_weather <|constrain|>json", " to=functions.f<|channel|>commentary json",
    "<|channel|>bogus", "", "<|channel|>final<|end|>", "<|channel|>final<|start|>", "<|channel|>", "hello"])
_CONTENTS = st.sampled_from(["Hi 😀", '{"a": 1}', "𓀀 世界", "", "x<|start|>y<|channel|>", "<|constrain|>"])
_STOPS = st.sampled_from(["<|end|>", "<|end|>", "<|return|>", "<|call|>", ""])
_JUNK = st.sampled_from(["", "", "", "junk", "<|end|>", "<|message|>", "<|start|>"])
NEAR_HARMONY = st.lists(st.tuples(_ROLES, _HEADERS, st.booleans(), _CONTENTS, _STOPS, _JUNK), max_size=4).map(
    lambda messages: "".join(
        ("<|start|>" + role if index else "") + header + ("<|message|>" if has_body else "") + content + stop + junk
        for index, (role, header, has_body, content, stop, junk) in enumerate(messages)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=NEAR_HARMONY, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_near_harmony_output_agrees_with_openai_harmony_or_goes_raw(tokenizer, harmony_encoding, text, cuts):
    ids = tokenizer.encode(text, allow_special=True)
    parser = StreamParser()
    deltas = _run(parser, _chunks(ids, cuts))
    if parser.is_raw:
        assert deltas[-1].raw
        return
    if ids[-2:-1] in ([200002], [200007], [200012]) and ids[-1] == 200006:
        ids = ids[:-1]  # openai-harmony rejects a bare <|start|> at the end; we just show nothing for it
    if not ids:
        assert parser.messages == [] and deltas == []
        return
    assert parser.messages == _reference_parse(harmony_encoding, ids)
