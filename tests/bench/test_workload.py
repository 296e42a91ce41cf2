"""Workload parsing: lengths, synthetic requests (prefix groups, sessions) and JSONL files."""

from __future__ import annotations

import json

import pytest

from cluster.bench.workload import IntRange, JsonlWorkload, SyntheticWorkload, WorkloadError


def test_int_range_parses_a_value_or_a_range():
    assert IntRange.parse("128", "x") == IntRange(128, 128)
    assert IntRange.parse("32:128", "x") == IntRange(32, 128)
    assert IntRange.parse(7, "x").mean == 7
    for bad in ("0", "a", "10:5", "3:x", "-1:4"):
        with pytest.raises(WorkloadError, match="--output-len"):
            IntRange.parse(bad, "--output-len")


def test_synthetic_generate_requests_are_deterministic_and_within_ranges():
    w = SyntheticWorkload(api="generate", prompt_len=IntRange(10, 20), output_len=IntRange(32, 128), seed=3)
    again = SyntheticWorkload(api="generate", prompt_len=IntRange(10, 20), output_len=IntRange(32, 128), seed=3)
    specs = [w.request(i) for i in range(200)]
    assert specs == [again.request(i) for i in range(200)]
    assert all(10 <= len(s.prompt_token_ids) <= 20 and 32 <= s.max_tokens <= 128 for s in specs)
    assert {len(s.prompt_token_ids) for s in specs} == set(range(10, 21))  # the whole range is used
    assert all(1000 <= t < 100_000 for s in specs for t in s.prompt_token_ids)
    assert specs != [SyntheticWorkload(api="generate", prompt_len=IntRange(10, 20), output_len=IntRange(32, 128),
                                       seed=4).request(i) for i in range(200)]


def test_prefix_groups_share_a_prefix_and_sessions_cycle():
    w = SyntheticWorkload(api="generate", prompt_len=IntRange(12, 12), output_len=IntRange(4, 4),
                          prefix_groups=3, prefix_len=8, sessions=2)
    specs = [w.request(i) for i in range(9)]
    prefixes = [s.prompt_token_ids[:8] for s in specs]
    assert prefixes[0] == prefixes[3] == prefixes[6]
    assert len({prefixes[0], prefixes[1], prefixes[2]}) == 3
    assert specs[0].prompt_token_ids[8:] != specs[3].prompt_token_ids[8:]  # only the prefix is shared
    assert [s.session_id for s in specs[:4]] == ["session-0", "session-1", "session-0", "session-1"]


def test_synthetic_chat_requests_are_user_messages_of_n_words():
    w = SyntheticWorkload(api="chat", prompt_len=IntRange(30, 30), output_len=IntRange(8, 8),
                          prefix_groups=2, prefix_len=10)
    a, b, c = (w.request(i) for i in range(3))
    assert a.messages[0][0] == "user" and len(a.messages[0][1].split()) == 30
    assert a.messages[0][1].split()[:10] == c.messages[0][1].split()[:10] != b.messages[0][1].split()[:10]


@pytest.mark.parametrize("kwargs, message", [
    ({"api": "complete"}, "api"),
    ({"prefix_groups": 2, "prefix_len": 0}, "prefix-len"),
    ({"prefix_groups": 2, "prefix_len": 16}, "longer than prefix-len"),
    ({"sessions": -1}, ">= 0"),
])
def test_synthetic_rejects_bad_options(kwargs, message):
    options = {"api": "generate", "prompt_len": IntRange(16, 16), "output_len": IntRange(4, 4)} | kwargs
    with pytest.raises(WorkloadError, match=message):
        SyntheticWorkload(**options)


def write(tmp_path, lines):
    path = tmp_path / "w.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_generate_workload(tmp_path):
    path = write(tmp_path, [{"prompt_token_ids": [1, 2, 3], "max_tokens": 5, "session_id": "s1"},
                            "", {"prompt_len": 7}])
    w = JsonlWorkload(path, api="generate", output_len=IntRange(9, 9))
    assert len(w) == 2
    first, second, third = (w.request(i) for i in range(3))
    assert (first.prompt_token_ids, first.max_tokens, first.session_id) == ((1, 2, 3), 5, "s1")
    assert len(second.prompt_token_ids) == 7 and second.max_tokens == 9 and second.session_id is None
    assert third == first  # the file is cycled


def test_jsonl_chat_workload(tmp_path):
    path = write(tmp_path, [{"prompt": "hello there"},
                            {"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"}], "max_tokens": 3}])
    w = JsonlWorkload(path, api="chat", output_len=IntRange(4, 4))
    assert w.request(0).messages == (("user", "hello there"),)
    assert w.request(1).messages == (("system", "be brief"), ("user", "hi")) and w.request(1).max_tokens == 3


@pytest.mark.parametrize("api, line, message", [
    ("generate", "{not json", ":1: not JSON"),
    ("generate", [1, 2], ":1: expected a JSON object"),
    ("generate", {"max_tokens": 3}, ":1: give exactly one of"),
    ("generate", {"prompt_len": 3, "prompt": "x"}, ":1: give exactly one of"),
    ("generate", {"prompt_token_ids": []}, "non-empty list"),
    ("generate", {"prompt_token_ids": [1, -2]}, "non-empty list"),
    ("generate", {"prompt": "hi"}, "needs a chat API"),
    ("chat", {"prompt_token_ids": [1]}, "needs --api generate"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "role one of"),
    ("generate", {"prompt_len": 0}, "prompt_len must be"),
    ("generate", {"prompt_len": 4, "max_tokens": 0}, "max_tokens must be"),
    ("generate", {"prompt_len": 4, "session_id": 7}, "session_id must be"),
])
def test_jsonl_errors_name_the_line(tmp_path, api, line, message):
    path = write(tmp_path, [line])
    with pytest.raises(WorkloadError, match=message.replace("(", r"\(")) as info:
        JsonlWorkload(path, api=api, output_len=IntRange(4, 4))
    assert str(path) in str(info.value)


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(WorkloadError, match="No such file"):
        JsonlWorkload(tmp_path / "nope.jsonl", api="generate", output_len=IntRange(4, 4))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(WorkloadError, match="no requests"):
        JsonlWorkload(tmp_path / "empty.jsonl", api="generate", output_len=IntRange(4, 4))
