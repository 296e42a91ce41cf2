"""The group's gloo collectives in real processes: the pairwise SUM all-reduce and the step message."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from cluster.parallel.group import HEADER, MESSAGE, STEP, Collectives, GroupDriver, _recv_message, free_port

WORLD = 3
PAYLOAD_SIZES = (0, 5, MESSAGE - HEADER, MESSAGE - HEADER + 1, 3 * MESSAGE)


def _rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    comm = Collectives(rank, WORLD, pairwise=True)
    t = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))
    comm.all_reduce(t)
    runtime = SimpleNamespace(device=torch.device("cpu"), comm=comm)
    received = []
    for n in PAYLOAD_SIZES:
        if rank == 0:  # the driver's framing, without its keepalive thread
            driver = SimpleNamespace(error=None, runtime=runtime, _last=0.0)
            GroupDriver._send(driver, STEP, torch.arange(n, dtype=torch.long) if n else None)
        else:
            op, payload = _recv_message(runtime)
            received.append((op, None if payload is None else payload.tolist()))
    queue.put((rank, t, received, comm.broadcast_calls))
    dist.destroy_process_group()


def test_pairwise_all_reduce_is_bitwise_equal_on_every_rank_and_messages_survive_framing():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {rank: (t, received, calls) for rank, t, received, calls in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(30)

    parts = [torch.randn(8, 64, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]
    expected = parts[0] + parts[1] + parts[2]  # rank order
    for rank in range(WORLD):
        assert torch.equal(results[rank][0], expected), rank

    sent = [(STEP, None if n == 0 else list(range(n))) for n in PAYLOAD_SIZES]
    for rank in range(1, WORLD):
        assert results[rank][1] == sent
    # one broadcast per message, two for the payloads that outgrow one
    assert results[0][2] == len(PAYLOAD_SIZES) + sum(n > MESSAGE - HEADER for n in PAYLOAD_SIZES)
