"""The bare floor: a minimal grpc.aio gptoss.v1 server, no Ray, one message per token.

`python -m cluster.bench.floor --port 0 --token-rate R` prints `listening HOST:PORT` once it
serves. Generate streams max_tokens chunks of one token each (the prompt's ids echoed), the first
at once and then paced at R tokens/s per stream (0: unpaced), then a `complete` message. When the
box cannot keep up, tokens are sent as fast as it can (there is nothing to coalesce into).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc

from cluster.frontdoor.ports import NO_REUSEPORT
from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc


def paced_tokens(prompt, n: int) -> list[int]:
    """The tokens every overhead target streams: the prompt's ids, cycled."""
    ids = list(prompt) or [13]
    return [ids[i % len(ids)] for i in range(n)]


async def paced_responses(request: pb.GenerateRequest, tokens_per_s: float) -> AsyncIterator[pb.GenerateResponse]:
    """The anchors' Generate: one message per token at `tokens_per_s` (0: as fast as possible), then `complete`."""
    n = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
    start = time.monotonic()
    for i, token in enumerate(paced_tokens(request.prompt_token_ids, n)):
        if tokens_per_s:
            wait = start + i / tokens_per_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        yield pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=[token]))
    yield pb.GenerateResponse(complete=pb.GenerateComplete(
        finish_reason=pb.FINISH_REASON_LENGTH,
        usage=pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=n)))


class FloorServicer(pb_grpc.InferenceServicer):
    def __init__(self, tokens_per_s: float) -> None:
        self._tokens_per_s = tokens_per_s

    async def Generate(self, request: pb.GenerateRequest, context):
        async for response in paced_responses(request, self._tokens_per_s):
            yield response


async def serve(host: str, port: int, tokens_per_s: float) -> None:
    server = grpc.aio.server(options=[NO_REUSEPORT])
    pb_grpc.add_InferenceServicer_to_server(FloorServicer(tokens_per_s), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-rate", type=float, default=1000.0, help="tokens/s per stream (0: unpaced)")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.token_rate))


if __name__ == "__main__":
    main()
