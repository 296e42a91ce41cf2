"""A burst of Generate streams from a process of its own (so the client's threads do not share
the front door's interpreter): `python -m tests.faults.burst_client TARGET N MAX_TOKENS`, all N
started at once on one asyncio loop; prints one JSON line per call: status, seconds to its
status, tokens received, and which google.rpc details a refusal carried."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import grpc
from google.rpc import error_details_pb2, status_pb2

from gptoss.v1 import inference_pb2 as pb
from gptoss.v1 import inference_pb2_grpc as pb_grpc

DETAILS = {"RetryInfo": error_details_pb2.RetryInfo, "ErrorInfo": error_details_pb2.ErrorInfo,
           "RequestInfo": error_details_pb2.RequestInfo}


def _details(err: grpc.aio.AioRpcError) -> dict:
    raw = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    found = {}
    for detail in status_pb2.Status.FromString(raw).details if raw else ():
        for name, kind in DETAILS.items():
            message = kind()
            if detail.Unpack(message):
                found[name] = (message.retry_delay.ToTimedelta().total_seconds() if name == "RetryInfo"
                               else message.reason if name == "ErrorInfo" else message.request_id)
    return found


async def _one(stub, prompt: list[int], max_tokens: int, start: asyncio.Event) -> dict:
    await start.wait()
    began = time.monotonic()
    tokens = 0
    try:
        async for response in stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(
                max_tokens=max_tokens, ignore_stop=True)), timeout=120):
            tokens += len(response.chunk.token_ids)
        return {"status": "OK", "took_s": time.monotonic() - began, "tokens": tokens}
    except grpc.aio.AioRpcError as err:
        return {"status": err.code().name, "took_s": time.monotonic() - began, "tokens": tokens,
                "details": _details(err)}


async def main(target: str, n: int, max_tokens: int) -> None:
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        stub = pb_grpc.InferenceStub(channel)
        start = asyncio.Event()
        calls = [asyncio.ensure_future(_one(stub, [rng.randrange(1000, 100_000) for _ in range(8)], max_tokens, start))
                 for _ in range(n)]
        await asyncio.sleep(0.2)
        start.set()
        for result in await asyncio.gather(*calls):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
