"""The group protocol: how rank 0 drives ranks 1..N-1 of one expert-parallel replica, and its invariants.

Rank 0 lives in the Serve replica beside the scheduler (driver.py); ranks 1..N-1 are worker actors
(workers.py) running `worker_loop` (runtime.py). Every collective is driven by rank 0's per-step
metadata, sent as ONE broadcast (in shared memory when the ranks share a node, else
torch.distributed) of a fixed-size int64 message (a second one only when a payload outgrows it):

    [HEADER] op, payload length, 0...   then the first MESSAGE - HEADER payload values
    [n - (MESSAGE - HEADER)] the rest of the payload (second broadcast, only for big payloads)

The payload is the encoded PagedBatch or a placement. ops:
    STEP   run the forward on the batch: two SUM all-reduces per layer
    NOOP   keepalive, so an idle worker's wait never reaches the collective timeout
    PLACE  new expert placement: experts move between ranks with point-to-point sends
    STOP   leave the loop

Invariants (what keeps N processes from deadlocking or diverging):
1. Every rank runs the same collectives in the same order. Only rank 0 decides what happens next,
   and it says so in a message before it does its own part; ranks 1..N-1 never act on their own.
2. One message at a time: the driver's lock covers a message and rank 0's own part of it (a step's
   forward, a placement's expert moves), so the keepalive thread can never interleave a NOOP
   broadcast with a step's all-reduces.
3. A placement changes only between two steps (PLACE is its own message, before the STEP), and
   every rank switches to it before the next step: the experts a step routes to are where all
   ranks think they are.
4. A rank that sees a collective fail stops using the group (the driver keeps the error and refuses
   further messages): a peer died mid-collective and the group's order is lost.
5. Only rank 0 unembeds and samples: the workers' batches carry no logits rows, and every
   collective of a step comes before the unembedding.
6. No Ray call happens per step or per layer: Ray starts the actors and the process group; tensors
   move over torch.distributed or shared memory only.
"""

from __future__ import annotations

import torch

from cluster.model.paged import PagedBatch
from cluster.parallel.collectives import Collectives
from cluster.parallel.expert_map import ExpertPlacement

STEP, NOOP, PLACE, STOP = 1, 2, 3, 4
HEADER = 8
# int64 values per metadata broadcast. A decoding sequence takes ~6 values plus its block tables,
# so a decode step of the bench's 8 short sequences (~110) is one broadcast; prefill chunks and
# big batches add a second. On CPU a broadcast costs gloo's latency far more than its 2 KiB.
MESSAGE = 256


def send_message(comm: Collectives, op: int, payload: torch.Tensor | None, device: torch.device) -> None:
    """Rank 0: broadcast one message (one broadcast, two when the payload outgrows MESSAGE)."""
    n = 0 if payload is None else payload.numel()
    message = torch.zeros(MESSAGE, dtype=torch.long)
    message[0], message[1] = op, n
    fits = min(n, MESSAGE - HEADER)
    if fits:
        message[HEADER:HEADER + fits] = payload[:fits]
    comm.broadcast(message.to(device))
    if n > fits:
        comm.broadcast(payload[fits:].contiguous().to(device))


def recv_message(comm: Collectives, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Ranks 1..N-1: the next message's op and payload (None when it has none)."""
    message = torch.empty(MESSAGE, dtype=torch.long, device=device)
    comm.broadcast(message)
    op, n = int(message[0]), int(message[1])
    if not n:
        return op, None
    first = message[HEADER:HEADER + n]
    if n <= MESSAGE - HEADER:
        return op, first
    rest = torch.empty(n - (MESSAGE - HEADER), dtype=torch.long, device=device)
    comm.broadcast(rest)
    return op, torch.cat((first, rest))


def encode_batch(batch: PagedBatch) -> torch.Tensor:
    """A PagedBatch as one int64 tensor (lengths first, then every field)."""
    S, B, R, G = len(batch.input_ids), len(batch.context_lens), len(batch.logits_indices), len(batch.block_tables)
    widths = [t.shape[1] for t in batch.block_tables]
    parts = [torch.tensor([S, B, R, G, *widths]), batch.input_ids.cpu(), batch.positions.cpu(),
             torch.tensor(batch.query_start), torch.tensor(batch.context_lens)]
    parts += [s.cpu() for s in batch.slot_mapping] + [t.cpu().flatten() for t in batch.block_tables]
    parts.append(batch.logits_indices.cpu())
    return torch.cat([p.to(torch.long) for p in parts])


def decode_batch(t: torch.Tensor, device: torch.device | str) -> PagedBatch:
    t = t.cpu()
    S, B, R, G = t[:4].tolist()
    widths = t[4:4 + G].tolist()
    pos = 4 + G

    def take(n: int) -> torch.Tensor:
        nonlocal pos
        out = t[pos:pos + n]
        pos += n
        return out

    input_ids, positions = take(S), take(S)
    query_start, context_lens = take(B + 1).tolist(), take(B).tolist()
    slot_mapping = [take(S).to(device) for _ in range(G)]
    block_tables = [take(B * w).view(B, w).to(device) for w in widths]
    logits_indices = take(R)
    return PagedBatch(input_ids.to(device), positions.to(device), query_start, context_lens, slot_mapping,
                      block_tables, logits_indices.to(device))


def encode_placements(placements: list[ExpertPlacement]) -> torch.Tensor:
    values = [len(placements), placements[0].num_ranks, placements[0].num_experts]
    for p in placements:
        for slots in p.slots:
            values += [len(slots), *slots]
    return torch.tensor(values, dtype=torch.long)


def decode_placements(t: torch.Tensor) -> list[ExpertPlacement]:
    values = t.tolist()
    L, N, E = values[:3]
    pos, out = 3, []
    for _ in range(L):
        slots = []
        for _ in range(N):
            n = values[pos]
            slots.append(tuple(values[pos + 1:pos + 1 + n]))
            pos += 1 + n
        out.append(ExpertPlacement(E, tuple(slots)))
    return out
