"""Loading maps the safetensors bytes instead of copying them (safetensors' safe_open maps the file and
get_tensor returns views of it), and never writes through to the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cluster.model.checkpoint import load_model


def _backing_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s bytes, or None for anonymous memory."""
    address = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) >= 6 and fields[5].startswith("/") else None
    return None


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_weights_kept_as_stored_are_the_files_pages(checkpoint_dir):
    path = checkpoint_dir("tiny-small-vocab", True)
    before = _digest(path)
    model = load_model(path, dtype=torch.bfloat16)  # the checkpoint's dtype: nothing needs converting
    shards = {str(f.resolve()) for f in path.glob("*.safetensors")}
    # the packed experts (most of a real checkpoint) and bf16 weights stored whole: no second copy in
    # memory (q, k and v are joined into one matrix at load, a copy of theirs)
    for t in (model.blocks[0].mlp.gate_up_blocks, model.blocks[-1].mlp.down_scales, model.unembedding.weight,
              model.embedding.weight):
        assert _backing_file(t) in shards

    ids = torch.tensor([[1, 2, 3]])
    first = model(ids, model.new_cache(4))
    with torch.no_grad():  # copy-on-write: the model changes, the file does not
        model.blocks[0].mlp.gate_up_blocks.zero_()
        model.unembedding.weight.mul_(2)
    assert not torch.equal(model(ids, model.new_cache(4)), first)
    assert _digest(path) == before
    again = load_model(path, dtype=torch.bfloat16)
    assert torch.equal(again(ids, again.new_cache(4)), first)
