"""Workloads: what each benchmark request asks for.

A `Workload` maps a request index to a `RequestSpec`, deterministically from a seed, so the same
command sends the same requests. Two sources:
  * options (`SyntheticWorkload`): prompt and output lengths as a fixed value or a uniform range
    ("128" or "64:256"), optional shared-prefix groups (request i belongs to group i % groups and
    starts with that group's prefix), optional session ids (request i gets "session-<i % n>");
  * a JSONL file (`JsonlWorkload`), one request per line, cycled when more requests are sent than
    lines. Keys: `prompt_token_ids` (list) or `prompt_len` (int) or `prompt` (text, Chat only) or
    `messages` ([{"role", "content"}], Chat only); `max_tokens` (int, else the --output-len
    option); `session_id` (string, optional).

Synthetic Generate prompts are random ordinary-text token ids; synthetic Chat prompts are words
that are one o200k token each, so a prompt of n words is about n tokens (plus harmony's framing).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

APIS = ("generate", "chat", "openai-chat", "responses", "completions")
# APIs whose prompts are token ids (the others take chat messages); the last three are the HTTP API's.
TOKEN_APIS = ("generate", "completions")
HTTP_APIS = ("openai-chat", "responses", "completions")
# How the load generator reads a gRPC API's streams: grpc.aio, or one stream at a time on one thread
# (cluster/bench/blocking_client.py). The HTTP APIs are always read with aiohttp.
CLIENTS = ("asyncio", "blocking")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Synthetic Generate prompts draw from ordinary-text ids (o200k_harmony's special ids start at 199998).
TEXT_TOKEN_RANGE = (1000, 100_000)
_WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "his", "red", "ball", "in", "park")


class WorkloadError(ValueError):
    """A workload option or JSONL line is invalid; the message names it."""


@dataclass(frozen=True)
class IntRange:
    """A length: `low` when low == high, else uniform in [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int, name: str) -> "IntRange":
        """'128' -> 128..128, '64:256' -> 64..256; both ends >= 1."""
        try:
            if isinstance(text, int):
                low = high = text
            elif ":" in text:
                a, b = text.split(":", 1)
                low, high = int(a), int(b)
            else:
                low = high = int(text)
        except ValueError:
            raise WorkloadError(f"{name}: expected N or LOW:HIGH, got {text!r}") from None
        if low < 1 or high < low:
            raise WorkloadError(f"{name}: need 1 <= LOW <= HIGH, got {text!r}")
        return cls(low, high)

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2


@dataclass(frozen=True)
class RequestSpec:
    """One request: token ids (Generate) or messages (Chat), how many tokens to generate."""

    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    session_id: str | None = None


class SyntheticWorkload:
    def __init__(self, *, api: str, prompt_len: IntRange, output_len: IntRange, prefix_groups: int = 0,
                 prefix_len: int = 0, sessions: int = 0, seed: int = 0) -> None:
        if api not in APIS:
            raise WorkloadError(f"api: must be one of {', '.join(APIS)}, got {api!r}")
        if prefix_groups < 0 or sessions < 0 or prefix_len < 0:
            raise WorkloadError("prefix-groups, prefix-len and sessions must be >= 0")
        if prefix_groups and prefix_len < 1:
            raise WorkloadError("prefix-len: must be >= 1 when prefix-groups is set")
        if prefix_groups and prompt_len.low <= prefix_len:
            raise WorkloadError(f"prompt-len: every prompt must be longer than prefix-len {prefix_len}, "
                                f"got {prompt_len.low}")
        self.api = api
        self.prompt_len = prompt_len
        self.output_len = output_len
        self.prefix_groups = prefix_groups
        self.prefix_len = prefix_len if prefix_groups else 0
        self.sessions = sessions
        self.seed = seed

    def _units(self, rng: random.Random, n: int) -> list:
        if self.api in TOKEN_APIS:
            return [rng.randrange(*TEXT_TOKEN_RANGE) for _ in range(n)]
        return [rng.choice(_WORDS) for _ in range(n)]

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(self.seed * 1_000_003 + index)
        length = self.prompt_len.draw(rng)
        prefix: list = []
        if self.prefix_groups:
            group = index % self.prefix_groups
            prefix = self._units(random.Random(f"prefix-{self.seed}-{group}"), self.prefix_len)
        body = prefix + self._units(rng, length - len(prefix))
        session = f"session-{index % self.sessions}" if self.sessions else None
        max_tokens = self.output_len.draw(rng)
        if self.api in TOKEN_APIS:
            return RequestSpec(max_tokens=max_tokens, prompt_token_ids=tuple(body), session_id=session)
        return RequestSpec(max_tokens=max_tokens, messages=(("user", " ".join(body)),), session_id=session)

    def describe(self) -> dict:
        return {"source": "options", "api": self.api, "prompt_len": [self.prompt_len.low, self.prompt_len.high],
                "output_len": [self.output_len.low, self.output_len.high], "prefix_groups": self.prefix_groups,
                "prefix_len": self.prefix_len, "sessions": self.sessions, "seed": self.seed}


class JsonlWorkload:
    def __init__(self, path: str | Path, *, api: str, output_len: IntRange, seed: int = 0) -> None:
        if api not in APIS:
            raise WorkloadError(f"api: must be one of {', '.join(APIS)}, got {api!r}")
        self.path = str(path)
        self.api = api
        self.output_len = output_len
        self.seed = seed
        self._lines: list[dict] = []
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise WorkloadError(f"{path}: {err.strerror or err}") from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkloadError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not isinstance(item, dict):
                raise WorkloadError(f"{path}:{number}: expected a JSON object")
            self._check(item, f"{path}:{number}")
            self._lines.append(item)
        if not self._lines:
            raise WorkloadError(f"{path}: no requests in the file")

    def _check(self, item: dict, where: str) -> None:
        sources = [k for k in ("prompt_token_ids", "prompt_len", "prompt", "messages") if k in item]
        if len(sources) != 1:
            raise WorkloadError(f"{where}: give exactly one of prompt_token_ids, prompt_len, prompt, messages")
        key = sources[0]
        value = item[key]
        if key == "prompt_token_ids":
            if not (isinstance(value, list) and value and all(isinstance(t, int) and t >= 0 for t in value)):
                raise WorkloadError(f"{where}: prompt_token_ids must be a non-empty list of token ids")
            if self.api not in TOKEN_APIS:
                raise WorkloadError(f"{where}: prompt_token_ids needs --api generate or completions "
                                    f"({self.api} takes text)")
        elif key == "prompt_len":
            if not (isinstance(value, int) and value >= 1):
                raise WorkloadError(f"{where}: prompt_len must be an integer >= 1")
        elif key == "prompt":
            if not isinstance(value, str) or not value:
                raise WorkloadError(f"{where}: prompt must be a non-empty string")
        else:
            if not (isinstance(value, list) and value and all(
                    isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)
                    for m in value)):
                raise WorkloadError(f"{where}: messages must be a list of {{role, content}} with role one of "
                                    f"{', '.join(CHAT_ROLES)}")
        if key in ("prompt", "messages") and self.api in TOKEN_APIS:
            raise WorkloadError(f"{where}: {key} needs a chat API (--api chat, openai-chat or responses; "
                                f"{self.api} takes token ids or prompt_len)")
        if "max_tokens" in item and not (isinstance(item["max_tokens"], int) and item["max_tokens"] >= 1):
            raise WorkloadError(f"{where}: max_tokens must be an integer >= 1")
        if "session_id" in item and not isinstance(item["session_id"], str):
            raise WorkloadError(f"{where}: session_id must be a string")

    def __len__(self) -> int:
        return len(self._lines)

    def request(self, index: int) -> RequestSpec:
        item = self._lines[index % len(self._lines)]
        rng = random.Random(self.seed * 1_000_003 + index)
        max_tokens = item.get("max_tokens") or self.output_len.draw(rng)
        session = item.get("session_id")
        if "prompt_token_ids" in item:
            return RequestSpec(max_tokens=max_tokens, prompt_token_ids=tuple(item["prompt_token_ids"]),
                               session_id=session)
        if "prompt_len" in item:
            n = item["prompt_len"]
            if self.api in TOKEN_APIS:
                ids = tuple(rng.randrange(*TEXT_TOKEN_RANGE) for _ in range(n))
                return RequestSpec(max_tokens=max_tokens, prompt_token_ids=ids, session_id=session)
            text = " ".join(rng.choice(_WORDS) for _ in range(n))
            return RequestSpec(max_tokens=max_tokens, messages=(("user", text),), session_id=session)
        if "prompt" in item:
            return RequestSpec(max_tokens=max_tokens, messages=(("user", item["prompt"]),), session_id=session)
        messages = tuple((m["role"], m["content"]) for m in item["messages"])
        return RequestSpec(max_tokens=max_tokens, messages=messages, session_id=session)

    def describe(self) -> dict:
        return {"source": self.path, "api": self.api, "lines": len(self._lines),
                "output_len": [self.output_len.low, self.output_len.high], "seed": self.seed}
