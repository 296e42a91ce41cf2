"""Loading maps the safetensors bytes instead of copying them (safetensors' safe_open maps the file and
get_tensor returns views of it), and never writes through to the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cluster.model.checkpoint import hugepages, load_model


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


def _resident_file_pages_kb(path: Path) -> int:
    """This process's resident kB of the mappings of files under `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not hugepages.available(), reason="the kernel offers no transparent huge pages here")
def test_hugepage_weights_are_2mb_aligned_copies_and_decode_the_same(checkpoint_dir):
    """With hugepages, the tensors of 2 MB and more (tiny's 25 MB embedding and unembedding) leave the
    file's mapping for 2 MB-aligned anonymous copies, the mapped pages stop counting as resident, and
    the model decodes exactly as the mapped one."""
    path = checkpoint_dir("tiny", True)
    shards = {str(f.resolve()) for f in path.glob("*.safetensors")}
    mapped = load_model(path, dtype=torch.bfloat16)
    copied = load_model(path, dtype=torch.bfloat16, hugepages=True)
    for big in (copied.embedding.weight, copied.unembedding.weight):
        assert big.numel() * big.element_size() >= hugepages.MIN_BYTES
        assert _backing_file(big) is None and big.data_ptr() % hugepages.PAGE == 0
    small = copied.blocks[0].mlp.down_scales  # under 2 MB: still the file's pages
    assert small.numel() < hugepages.MIN_BYTES and _backing_file(small) in shards
    assert torch.equal(copied.unembedding.weight, mapped.unembedding.weight)

    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(copied(ids, copied.new_cache(4)), mapped(ids, mapped.new_cache(4)))
    del mapped
    # what stays resident of the files is the small tensors' pages, not the 2 x 25 MB copied away
    assert _resident_file_pages_kb(path) * 1024 < hugepages.MIN_BYTES * 4
