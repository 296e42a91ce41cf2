"""GenerateStream: a Generate call's generated token ids -> GenerateChunk messages.

The raw-prompt counterpart of chat_stream.ChatStream. Token ids pass through as they are; when
the call asks for text, or has stop sequences to match on it, each token is decoded on its own so
that a stop sequence ends the stream at the exact token that completed it (the chunk then holds
the tokens up to that one and the text up to the stop sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.frontdoor.stops import StopMatcher
from cluster.harmony.tokenizer import load_tokenizer
from gptoss.v1 import inference_pb2 as pb


class GenerateStream:
    def __init__(self, stops: Sequence[str] = (), send_text: bool = False) -> None:
        self._matcher = StopMatcher(stops) if stops else None
        self._decoder = load_tokenizer().stream_decoder() if (stops or send_text) else None
        self._send_text = send_text
        self.completion_tokens = 0
        self.finished = False

    @property
    def stop_sequence(self) -> str | None:
        return self._matcher.matched if self._matcher is not None else None

    def feed(self, token_ids: Sequence[int], logprobs: Sequence[pb.TokenLogprob] = (), *,
             last: bool = False) -> pb.GenerateChunk | None:
        """The chunk for the next tokens (None when it would be empty); `logprobs`, when given,
        has one entry per token. `last`: the replica's final chunk, so text held back is flushed.
        After a stop sequence or the last chunk, `finished` is true."""
        ids: list[int] = []
        text = ""
        for token in token_ids:
            if self.stop_sequence is not None:
                break  # the tokens after a stop sequence are never shown or counted
            ids.append(token)
            if self._decoder is not None:
                text += self._shown(self._decoder.push([token]))
        self.finished = last or self.stop_sequence is not None
        if self.finished and self._decoder is not None and self.stop_sequence is None:
            text += self._shown(self._decoder.flush())
            if self._matcher is not None:
                text += self._matcher.flush()
        self.completion_tokens += len(ids)
        if not ids and not text:
            return None
        return pb.GenerateChunk(token_ids=ids, text=text if self._send_text else "", logprobs=logprobs[:len(ids)])

    def _shown(self, piece: str) -> str:
        return self._matcher.feed(piece) if self._matcher is not None else piece
