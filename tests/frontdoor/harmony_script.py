"""A TEST stand-in for the model replicas that answers in REAL harmony, rendered by openai-harmony:
analysis -> final, or analysis -> a function call when the prompt declares functions and does not
yet hold a tool result. It replaces the Serve handle (no Ray, no model: until a trained demo model
exists, random weights never speak harmony), so the front door's gRPC and HTTP paths, parsing,
tool calls, counting and cancellation run for real around it.

The final answer repeats the last user message and counts the user turns it saw ("You said: hi.
(user turns: 2)"), so a test can tell that earlier turns were rendered into the prompt. Run as a
module it serves a front door on this script (for tests that need separate processes):
`python -m tests.frontdoor.harmony_script CONFIG_JSON [HANDLE_KWARGS_JSON]` prints `READY <http_port> <grpc_port>
<metrics_port>` and serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

import openai_harmony as oh

from cluster.engine.request import FinishReason, TokenChunk
from cluster.harmony.tokenizer import RETURN_ID, load_tokenizer
from cluster.serving.model_info import ModelInfo

INFO = ModelInfo(model_name="gpt-oss-scripted", preset="", vocab_size=201088, context_length=8192, num_layers=1,
                 num_experts=1, experts_per_token=1, quantization="none", dtype="float32", engine="scripted",
                 replicas=1)
REASONING = "The user wants an answer. Let me think about it briefly."
CALL_REASONING = "I should call get_weather for Paris."
CALL_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
_USER = re.compile(r"<\|start\|>user<\|message\|>(.*?)<\|end\|>", re.S)
_TOOL_RESULT = re.compile(r"<\|start\|>functions\.\w+ to=assistant<\|channel\|>commentary<\|message\|>(.*?)<\|end\|>",
                          re.S)


def _render(message: oh.Message) -> list[int]:
    return load_tokenizer()._encoding.render(message)


def _assistant(content: str, channel: str, recipient: str | None = None) -> oh.Message:
    message = oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel(channel)
    if recipient is not None:
        message = message.with_recipient(recipient).with_content_type("<|constrain|>json")
    return message


def completion_for(prompt_ids) -> list[int]:
    """The scripted turn for a rendered prompt (it ends with <|start|>assistant)."""
    prompt = load_tokenizer().decode(prompt_ids)
    users = _USER.findall(prompt)
    last_turn = prompt[prompt.rfind("<|start|>user"):]
    results = _TOOL_RESULT.findall(last_turn)
    calls = "namespace functions" in prompt and "get_weather" in prompt and not results
    first = _render(_assistant(CALL_REASONING if calls else REASONING, "analysis"))
    if calls:
        second = _render(_assistant(CALL_ARGUMENTS, "commentary", "functions.get_weather"))  # ends with <|call|>
    else:
        said = f"The tool said: {results[-1]}" if results else f"You said: {users[-1] if users else ''}"
        second = _render(_assistant(f"{said}. (user turns: {len(users)})", "final"))[:-1] + [RETURN_ID]
    return first[2:] + second  # the prompt already holds the first <|start|>assistant


class ScriptedResponse:
    """Stands in for a DeploymentResponseGenerator: yields chunks, records cancel()."""

    def __init__(self, chunks, delay_s: float = 0.0) -> None:
        self.chunks, self.delay_s = chunks, delay_s
        self.cancelled = asyncio.Event()
        self.finished = False
        self.yielded = 0  # chunks handed to the front door so far

    def cancel(self) -> None:
        self.cancelled.set()

    async def __aiter__(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.delay_s)
            if self.cancelled.is_set():
                return
            self.yielded += 1
            yield chunk
        self.finished = True


class HarmonyScriptHandle:
    """The DeploymentHandle surface the front door uses: generate.remote, model_info.remote, options.

    chunk_tokens: tokens per chunk (0: the whole turn in one chunk); delay_s before each chunk;
    endless: after the turn, keep streaming filler so a test can cancel mid-stream."""

    app_name, deployment_name = "scripted", "HarmonyScript"  # the labels of the front door's stream metrics

    def __init__(self, chunk_tokens: int = 3, delay_s: float = 0.0, cached_tokens: int = 0,
                 endless: bool = False) -> None:
        self.requests, self.responses = [], []
        self.app_name, self.deployment_name = "scripted", "ScriptedReplica"  # as a DeploymentHandle names them
        self.chunk_tokens, self.delay_s, self.cached_tokens, self.endless = chunk_tokens, delay_s, cached_tokens, endless
        handle = self

        class _Generate:
            def remote(self, request):
                handle.requests.append(request)
                handle.responses.append(ScriptedResponse(handle.chunks_for(request), handle.delay_s))
                return handle.responses[-1]

        class _ModelInfo:
            async def remote(self):
                return INFO

        self.generate, self.model_info = _Generate(), _ModelInfo()

    def options(self, **kwargs):
        return self

    def chunks_for(self, request) -> list[TokenChunk]:
        ids = completion_for(request.prompt_token_ids)
        if self.endless:
            ids = ids[:-1] + load_tokenizer().encode(" and more") * 5000
        limit = request.sampling.max_tokens
        finish = FinishReason.STOP
        if limit is not None and limit < len(ids):
            ids, finish = ids[:limit], FinishReason.LENGTH
        size = self.chunk_tokens or len(ids)
        pieces = [ids[i:i + size] for i in range(0, len(ids), size)]
        cached = min(self.cached_tokens, len(request.prompt_token_ids) - 1)
        chunks = [TokenChunk(tuple(p), cached_prompt_tokens=cached) for p in pieces[:-1]]
        chunks.append(TokenChunk(tuple(pieces[-1]), finish, prompt_tokens=len(request.prompt_token_ids),
                                 completion_tokens=len(ids), cached_prompt_tokens=cached))
        return chunks


async def _serve(config_json: str, handle_json: str = "{}") -> None:
    from prometheus_client import CollectorRegistry

    from cluster.config import load_config
    from cluster.frontdoor.server import FrontdoorServer
    from cluster.metrics import FrontdoorMetrics

    overrides = json.loads(config_json)
    config = load_config(None, overrides=overrides).frontdoor
    server = FrontdoorServer(HarmonyScriptHandle(**json.loads(handle_json)), config, FrontdoorMetrics(CollectorRegistry()), bind_to_loop=False)
    await server.start()
    print(f"READY {server.http_port} {server.grpc_port} {server.metrics_port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0.5)


if __name__ == "__main__":
    asyncio.run(_serve(*sys.argv[1:3]))


class ThreadedFrontdoor:
    """A FrontdoorServer over a HarmonyScriptHandle on its own event loop in a thread, so tests use
    the official (synchronous) SDKs against it."""

    def __init__(self, handle: HarmonyScriptHandle, config, api_keys=None) -> None:
        import threading

        from prometheus_client import CollectorRegistry

        from cluster.frontdoor.server import FrontdoorServer
        from cluster.metrics import FrontdoorMetrics

        self.handle = handle
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="frontdoor", daemon=True)
        self.thread.start()
        self.server = FrontdoorServer(handle, config, FrontdoorMetrics(CollectorRegistry()), api_keys=api_keys,
                                     bind_to_loop=False)  # a scripted handle: no Serve router to bind
        self.call(self.server.start())

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def base_url(self) -> str:
        return self.server.http_url + "/v1"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """The front door's /metrics, scraped over HTTP: {(name, sorted labels): value}."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10).read()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text.decode()) for s in family.samples}

    def settled_metrics(self, timeout_s: float = 10.0) -> dict[tuple[str, tuple], float]:
        """/metrics once no call is in flight. A call is counted when its handler returns, which
        is just after the client read the last byte of its answer: a scrape at once can miss it."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = self.metrics()
            busy = sum(v for (name, _), v in snapshot.items() if name == "gptoss_frontdoor_requests_in_flight")
            if not busy or time.monotonic() > deadline:
                return snapshot
            time.sleep(0.02)

    def close(self) -> None:
        self.call(self.server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
