"""The group's CPU collectives in real processes: the pairwise gloo SUM all-reduce, the shared-memory
all-reduce and broadcast, and the step message framed over either."""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from cluster.parallel.collectives import Collectives
from cluster.parallel.protocol import HEADER, MESSAGE, STEP, recv_message, send_message
from cluster.sockets import free_port

WORLD = 3
PAYLOAD_SIZES = (0, 5, MESSAGE - HEADER, MESSAGE - HEADER + 1, 3 * MESSAGE)
SLOT_BYTES = 1024  # small slots: the bigger messages below go in several chunks
ROUNDS = 300  # back-to-back broadcast + all_reduce pairs


def _join(rank: int, port: int, shm: bool, timeout_s: float = 30.0):
    import torch.distributed as dist

    from cluster.parallel.shm_collectives import join_shm

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=30))
    comm = Collectives(rank, WORLD, pairwise=True)
    if shm:
        comm.use_shm(join_shm(store, rank, WORLD, timeout_s, slot_bytes=SLOT_BYTES))
        assert comm.shm is not None
    return comm


def _round_values(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round i's broadcast (rank 0's) and all_reduce input (rank's); sizes vary around the slot size."""
    g = torch.Generator().manual_seed(1000 * i + rank)
    n = 1 + (i * 37) % 700  # up to 2.7 slots of float32
    return torch.randint(0, 1 << 40, (1 + (i * 11) % 300,), generator=g), torch.randn(n, generator=g)


def _rank(rank: int, port: int, queue, shm: bool) -> None:
    import torch.distributed as dist

    comm = _join(rank, port, shm)
    # The engine's steps run in inference mode and the driver's keepalive outside it: both must work,
    # in this order too (the segment's cached views must not become inference tensors).
    with torch.inference_mode():
        ones, message = torch.ones(4), torch.arange(3) if rank == 0 else torch.zeros(3, dtype=torch.long)
        comm.all_reduce(ones)
        comm.broadcast(message)
        assert torch.equal(ones, torch.full((4,), float(WORLD))) and torch.equal(message, torch.arange(3))
    broadcasts_before = comm.broadcast_calls
    t = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))
    comm.all_reduce(t)
    received = []
    for n in PAYLOAD_SIZES:
        if rank == 0:  # the driver's framing, without its keepalive thread
            send_message(comm, STEP, torch.arange(n, dtype=torch.long) if n else None, torch.device("cpu"))
        else:
            op, payload = recv_message(comm, torch.device("cpu"))
            received.append((op, None if payload is None else payload.tolist()))
    framing_broadcasts = comm.broadcast_calls - broadcasts_before
    rounds = []
    for i in range(ROUNDS if shm else 0):  # alternating ops with no pause: a reused slot would show
        message, mine = _round_values(i, rank)
        if rank != 0:
            message = torch.zeros_like(message)
        comm.broadcast(message)
        comm.all_reduce(mine)
        rounds.append((message, mine))
    segment = comm.shm.seg.path if shm else None
    # plain pickle: the tensors travel by value, not as shared storage that dies with this process
    queue.put(pickle.dumps((rank, t, received, framing_broadcasts, rounds, segment, comm.shm_bytes)))
    if shm:
        comm.shm.close()
    dist.destroy_process_group()


def _run(shm: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue, shm)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {out[0]: out[1:] for out in (pickle.loads(queue.get(timeout=120)) for _ in procs)}
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    return results


@pytest.mark.parametrize("shm", [False, True], ids=["gloo_pairwise", "shared_memory"])
def test_all_reduce_is_bitwise_equal_on_every_rank_and_messages_survive_framing(shm):
    results = _run(shm)

    parts = [torch.randn(8, 64, generator=torch.Generator().manual_seed(r)) for r in range(WORLD)]
    expected = parts[0] + parts[1] + parts[2]  # rank order
    for rank in range(WORLD):
        assert torch.equal(results[rank][0], expected), rank

    sent = [(STEP, None if n == 0 else list(range(n))) for n in PAYLOAD_SIZES]
    for rank in range(1, WORLD):
        assert results[rank][1] == sent
    # one broadcast per message, two for the payloads that outgrow one
    assert results[0][2] == len(PAYLOAD_SIZES) + sum(n > MESSAGE - HEADER for n in PAYLOAD_SIZES)

    if shm:
        for i in range(ROUNDS):
            message = _round_values(i, 0)[0]
            inputs = [_round_values(i, r)[1] for r in range(WORLD)]
            total = inputs[0] + inputs[1] + inputs[2]
            for rank in range(WORLD):
                got_message, got_sum = results[rank][3][i]
                assert torch.equal(got_message, message), (i, rank)
                assert torch.equal(got_sum, total), (i, rank)
        # rank 0 unlinks the file once every rank has mapped it: nothing is left in /dev/shm
        assert not os.path.exists(results[0][4])
        # every rank counts the bytes it copies in: all_reduce inputs (all ranks), broadcasts (rank 0)
        assert all(results[r][5] > 0 for r in range(WORLD)) and results[0][5] > results[1][5]


PEER_TIMEOUT_S = 60.0


def _rank_that_loses_a_peer(rank: int, port: int, queue) -> None:
    comm = _join(rank, port, shm=True, timeout_s=PEER_TIMEOUT_S)
    t = torch.ones(4)
    comm.all_reduce(t)
    if rank == WORLD - 1:
        os._exit(0)  # leaves without a word, as a killed worker does
    t0 = time.monotonic()
    try:
        comm.all_reduce(t)
        queue.put((rank, "returned", time.monotonic() - t0))
    except RuntimeError as err:
        queue.put((rank, str(err), time.monotonic() - t0))


def test_shared_memory_collective_raises_soon_when_a_peer_exits():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_that_loses_a_peer, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    outcomes = dict((rank, (msg, dt)) for rank, msg, dt in (queue.get(timeout=120) for _ in range(WORLD - 1)))
    for p in procs:
        p.join(30)
    for rank in range(WORLD - 1):
        message, waited = outcomes[rank]
        assert f"rank {WORLD - 1}" in message and "exited" in message, message
        # The liveness check, not the timeout, ended the wait (a bound relative to that timeout, which
        # holds on a loaded box too: the check notices a dead peer within milliseconds).
        assert waited < PEER_TIMEOUT_S / 10, waited


@pytest.mark.parametrize("nodes, shared", [(("node-a", "node-a"), True), (("node-a", "node-b"), False)])
def test_ranks_share_memory_only_when_ray_places_them_on_one_node(nodes, shared):
    """Two Ray nodes on one host see the same /dev/shm; the node ids, not the file system, decide."""
    import threading

    import torch.distributed as dist

    from cluster.parallel.shm_collectives import available, join_shm

    if not available():
        pytest.skip("no shared-memory collectives on this platform")
    store, got = dist.HashStore(), {}
    threads = [threading.Thread(target=lambda r: got.update({r: join_shm(store, r, 2, 5.0, node=nodes[r])}), args=(r,))
               for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [got[r] is not None for r in range(2)] == [shared, shared]
    for comm in got.values():
        if comm is not None:
            comm.close()
