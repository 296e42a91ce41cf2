"""POST /v1/completions: a raw prompt in, the legacy completions shapes out.

The request becomes the same internal GenerateRequest a gRPC Generate with a text prompt does
(conversion.build_generate_request, Generate's default stop set); the servicer's generate_events
stream becomes one `text_completion` object or its chunks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from cluster.engine.request import GenerateRequest
from cluster.frontdoor.conversion import Violations, build_generate_request, encode_prompt_text
from cluster.frontdoor.http import chat
from cluster.frontdoor.http.fields import Fields, read_sampling, read_stops, renamed
from cluster.frontdoor.http.turn import new_id
from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb

UNSUPPORTED = ("echo", "suffix", "best_of")
LOGPROB_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@dataclass
class CompletionsCall:
    internal: GenerateRequest
    stops: tuple[str, ...]
    model: str
    stream: bool
    include_usage: bool
    top_logprobs: int | None


def read_prompt(fields: Fields) -> list[int]:
    """`prompt`: a string, an array of token ids, or an array of one string."""
    value = fields.get("prompt", (str, list), required=True)
    if isinstance(value, str):
        return encode_prompt_text(value, "prompt", fields.violations)
    if isinstance(value, list):
        if value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return list(value)
        if len(value) == 1 and isinstance(value[0], str):
            return encode_prompt_text(value[0], "prompt[0]", fields.violations)
        fields.violations.add("prompt", "must be a string, an array of token ids, or an array of one string")
    return []


def read_completions(body: object, info, call, context, model: str) -> CompletionsCall:
    violations = Violations()
    fields = Fields(body, violations)
    prompt = read_prompt(fields)
    for key in UNSUPPORTED:
        if fields.body.get(key) not in (None, False, 1):
            violations.add(key, "is not supported")
    top = fields.get("logprobs", int)
    stops = read_stops(fields)
    sampling = read_sampling(fields, info, max_tokens_keys=("max_tokens",), logprobs=top, logprobs_field="logprobs")
    # Generate's default stop set, as for the raw prompt of a gRPC Generate: every message end.
    sampling = dataclasses.replace(sampling, stop_token_ids=load_tokenizer().message_end_ids)
    stream = bool(fields.get("stream", bool, False))
    options = fields.object("stream_options")
    include_usage = bool(options.get("include_usage", bool, False)) if options is not None else False
    try:
        internal = build_generate_request(prompt, sampling, info, call, context, violations,
                                          prompt_field="prompt", sampling_prefix="")
    except Exception as err:  # noqa: BLE001 - re-raised with the request's own field names
        raise renamed(err, {}) from None
    return CompletionsCall(internal, tuple(stops), model, stream, include_usage, top)


class CompletionsOutput:
    """generate_events' chunks as `text_completion` objects."""

    def __init__(self, call: CompletionsCall) -> None:
        self.call = call
        self.id, self.created = new_id("cmpl"), int(time.time())
        self._text: list[str] = []
        self._logprobs = {key: [] for key in LOGPROB_KEYS}

    def body(self, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.call.model,
                "system_fingerprint": None, "choices": [choice]}

    def logprobs_of(self, chunk: pb.GenerateChunk | None) -> dict | None:
        if self.call.top_logprobs is None or chunk is None:
            return None
        content = chat.logprobs_content(chunk.logprobs)
        return {"tokens": [c["token"] for c in content], "token_logprobs": [c["logprob"] for c in content],
                "top_logprobs": [{t["token"]: t["logprob"] for t in c["top_logprobs"]} for c in content],
                "text_offset": []}

    @staticmethod
    def finish_reason(complete: pb.GenerateComplete) -> str:
        return chat.FINISH.get(complete.finish_reason, "stop")

    @staticmethod
    def usage(complete: pb.GenerateComplete) -> dict:
        u = chat.usage(complete)
        del u["completion_tokens_details"]
        return u

    def feed(self, chunk: pb.GenerateChunk) -> None:
        """Keep a chunk for the one answer of a call that does not stream."""
        self._text.append(chunk.text)
        more = self.logprobs_of(chunk)
        if more:
            for key in LOGPROB_KEYS:
                self._logprobs[key] += more[key]

    def completion(self, complete: pb.GenerateComplete) -> dict:
        logprobs = self._logprobs if self.call.top_logprobs is not None else None
        return {**self.body("".join(self._text), self.finish_reason(complete), logprobs), "usage": self.usage(complete)}

    def chunks(self, chunk: pb.GenerateChunk | None, complete: pb.GenerateComplete | None) -> list[dict]:
        """The streamed objects for one item of generate_events."""
        out = [self.body(chunk.text, None, self.logprobs_of(chunk))] if chunk is not None and chunk.text else []
        if complete is not None:
            out.append(self.body("", self.finish_reason(complete)))
            if self.call.include_usage:
                out.append({**self.body("", None), "choices": [], "usage": self.usage(complete)})
        return out
