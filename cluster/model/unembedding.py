"""After the unembedding: the greedy pick from vocabulary logits, shared by the plain decode loop
(generate.py) and the engine's sampler so both break ties the same way.

(The engine's fast unembedding kernel lives in cluster/engine/unembedding.py; the model's own
`unembedding` is an nn.Linear whose forward takes the bf16 CPU kernel at batch 1, kernels/bf16_cpu.py.)
"""

from __future__ import annotations

import torch


def argmax_rows(logits: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """logits [S, V] -> [S] long, exactly `logits.argmax(-1)` (the first index of each row's maximum).

    torch's argmax is a scalar loop on CPU while amax is vectorized: over a 201088-wide row the
    maxima of 1024-wide blocks, then an argmax inside each row's first best block, cost about a
    fifth (32 rows: 1.8 -> 0.4 ms, measured). NaN wins in both, as in torch.argmax.
    """
    S, V = logits.shape
    if V < 16 * block:
        return logits.argmax(dim=-1)
    nb = V // block
    maxima = logits[:, : nb * block].unflatten(1, (nb, block)).amax(dim=-1)  # [S, nb]
    if nb * block < V:
        maxima = torch.cat((maxima, logits[:, nb * block :].amax(dim=-1, keepdim=True)), dim=1)  # [S, nb+1]
    best = maxima.argmax(dim=-1)  # [S] first block holding the row's maximum
    # The last block may run past V: clamped columns repeat the row's last logit *after* it, so
    # the first occurrence is unchanged.
    cols = (best.unsqueeze(1) * block + torch.arange(block, device=logits.device)).clamp_(max=V - 1)  # [S, block]
    return logits.gather(1, cols).argmax(dim=-1) + best * block
