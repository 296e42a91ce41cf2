"""The front door -> replica hop alone, per kind of direct stream (serving.replica_stream).

A replica's real DirectStreamServer (TLS, its self-signed certificate) runs in a child process
with an engine that answers at once: one chunk per request, or `--chunks` chunks; this process is
the front door's real client (DirectStreamClient / MultiplexedClient). Requests go one at a time,
`--gap-ms` apart (as at concurrency 1, where each request finds both processes idle), and each
reports the time from `open` to its first chunk and to its end. The CPU seconds (utime + stime) of
both processes over each kind's run are read from /proc. Kinds alternate over `--rounds`.

    python scripts/replica_hop.py [--requests 300] [--gap-ms 10] [--chunks 1] [--rounds 2]

Prints a line per kind and round, and last one JSON line of medians with each kind's first-chunk
p50 and CPU per request against the per_request stream's. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time

KINDS = ("per_request", "multiplexed", "socket")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _replica(kind: str, chunks: int, pipe) -> None:
    from cluster.engine.request import FinishReason, TokenChunk
    from cluster.serving.direct_stream import DirectStreamServer, DirectStreamTls

    async def generate(request):
        for i in range(chunks):
            yield TokenChunk((i,), FinishReason.LENGTH if i == chunks - 1 else None, completion_tokens=i + 1)

    async def main():
        server = DirectStreamServer(generate, full=lambda: False, kind=kind)
        pipe.send(await server.start("127.0.0.1", DirectStreamTls.self_signed("127.0.0.1")))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop
        await server.stop(0)

    asyncio.run(main())


async def _load(kind: str, metadata: dict, args) -> tuple[list[float], list[float]]:
    from cluster.engine.request import GenerateRequest, SamplingParams
    from cluster.serving.direct_stream import DirectAddress, DirectStreamClient
    from cluster.serving.multiplexed_stream import MultiplexedClient

    target = DirectAddress.from_metadata(metadata)
    channels = DirectStreamClient()
    client = channels if kind == "per_request" else MultiplexedClient(channels)
    first, whole = [], []
    try:
        while not client.ready(target):
            await asyncio.sleep(0.01)
        for _ in range(args.requests):
            await asyncio.sleep(args.gap_ms / 1000)
            request = GenerateRequest(prompt_token_ids=tuple(range(256)), sampling=SamplingParams(max_tokens=args.chunks))
            started = time.perf_counter()
            stream = aiter(client.open(target, request))
            await anext(stream)
            first.append(time.perf_counter() - started)
            async for _chunk in stream:
                pass
            whole.append(time.perf_counter() - started)
    finally:
        if client is not channels:
            await client.close()
        await channels.close()
    return first, whole


def _run(kind: str, args) -> dict:
    context = multiprocessing.get_context("spawn")
    pipe, child_end = context.Pipe()
    replica = context.Process(target=_replica, args=(kind, args.chunks, child_end), daemon=True)
    replica.start()
    metadata = pipe.recv()
    cpu = (_cpu_s(os.getpid()), _cpu_s(replica.pid))
    first, whole = asyncio.run(_load(kind, metadata, args))
    front_door_cpu, replica_cpu = _cpu_s(os.getpid()) - cpu[0], _cpu_s(replica.pid) - cpu[1]
    pipe.send("stop")
    replica.join(30)
    first.sort()
    return {"kind": kind, "first_chunk_p50_ms": round(statistics.median(first) * 1e3, 3),
            "first_chunk_p90_ms": round(first[int(0.9 * len(first))] * 1e3, 3),
            "whole_p50_ms": round(statistics.median(whole) * 1e3, 3),
            "front_door_cpu_ms_per_request": round(front_door_cpu / args.requests * 1e3, 3),
            "replica_cpu_ms_per_request": round(replica_cpu / args.requests * 1e3, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--gap-ms", type=float, default=10.0)
    p.add_argument("--chunks", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for round_ in range(args.rounds):
        for kind in (KINDS if round_ % 2 == 0 else KINDS[::-1]):
            result = _run(kind, args)
            runs[kind].append(result)
            print(json.dumps({"round": round_ + 1, **result}), flush=True)
    medians = {kind: {key: round(statistics.median(r[key] for r in results), 3) for key in results[0] if key != "kind"}
               for kind, results in runs.items()}
    base = medians["per_request"]
    summary = {kind: {**m, "first_chunk_p50_ratio_vs_per_request": round(m["first_chunk_p50_ms"] / base["first_chunk_p50_ms"], 3)}
               for kind, m in medians.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
