"""The name map of gpt-oss checkpoints: every tensor of `GptOssModel` and where it lives on disk.

Two layouts, both safetensors, both as OpenAI publishes them:

- "hf" (the repository root): `config.json` (with `quantization_config: {"quant_method": "mxfp4"}`
  when the experts are MXFP4), `model-0000i-of-0000n.safetensors` shards and
  `model.safetensors.index.json`. Names `model.layers.N.self_attn.q_proj.weight`, ...,
  `model.layers.N.mlp.experts.gate_up_proj_blocks`. Dense experts are stored transposed, as
  transformers holds them: gate_up_proj [E, H, 2I], down_proj [E, I, H].
- "original" (the `original/` folder): the reference implementation's `config.json` and
  `model.safetensors` with names `block.N.attn.qkv.weight`, `block.N.mlp.mlp1_weight.blocks`, ...

Every model tensor has one `TensorEntry` here that says which checkpoint tensors make it and how
they are split or transposed on the way to disk, so the writer (random_writer.py) and the loader
(loader.py) cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cluster.model.config import GptOssConfig

LAYOUTS = ("hf", "original", "both")
HF_INDEX = "model.safetensors.index.json"


class CheckpointError(Exception):
    """A checkpoint cannot be read or written as asked; the message names the file and tensor."""


def is_mxfp4_tensor(name: str) -> bool:
    """Whether a checkpoint tensor name (either layout) holds MXFP4 blocks."""
    return name.endswith(("_blocks", ".blocks"))


@dataclass(frozen=True)
class TensorEntry:
    """One model tensor (`param`) and the checkpoint tensors (`names`, `shapes`) it is made of.

    `join` builds the model tensor from the checkpoint ones; `split` is its inverse, for writing.
    """

    param: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    packed: bool = False  # uint8 MXFP4 blocks or scales, not floats
    join: Callable[[list[torch.Tensor]], torch.Tensor] = lambda ts: ts[0]
    split: Callable[[torch.Tensor], list[torch.Tensor]] = lambda t: [t]


def _transposed(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0].transpose(-1, -2)


def _transpose_out(t: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(-1, -2).contiguous()]


def tensor_layout(config: GptOssConfig, layout: str, mx: bool) -> list[TensorEntry]:
    """Every tensor of a checkpoint in `layout` ("hf" or "original"), with or without MXFP4 experts."""
    H, V = config.hidden_size, config.vocab_size
    hf = layout == "hf"
    entries = [
        TensorEntry("embedding.weight", ("model.embed_tokens.weight" if hf else "embedding.weight",), ((V, H),)),
        TensorEntry("unembedding.weight", ("lm_head.weight" if hf else "unembedding.weight",), ((V, H),)),
        TensorEntry("norm.scale", ("model.norm.weight" if hf else "norm.scale",), ((H,),)),
    ]
    for n in range(config.num_hidden_layers):
        entries += _layer_entries(config, n, hf) + _expert_entries(config, n, hf, mx)
    return entries


def _stored_layer(n: int, hf: bool) -> str:
    """The prefix of layer n's tensor names on disk."""
    return f"model.layers.{n}." if hf else f"block.{n}."


def _layer_tensors(c: GptOssConfig) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """A layer's non-expert tensors that each layout stores one to one, in checkpoint order:
    (ours under `blocks.N.`, HF under `model.layers.N.`, original under `block.N.`, shape).
    q/k/v, one tensor of ours and of the original layout but three in HF, go after the norms."""
    H, E, I = c.hidden_size, c.num_local_experts, c.intermediate_size
    q = c.num_attention_heads * c.head_dim
    return [
        ("attn_norm.scale", "input_layernorm.weight", "attn.norm.scale", (H,)),
        ("mlp_norm.scale", "post_attention_layernorm.weight", "mlp.norm.scale", (H,)),
        ("attn.out.weight", "self_attn.o_proj.weight", "attn.out.weight", (H, q)),
        ("attn.out.bias", "self_attn.o_proj.bias", "attn.out.bias", (H,)),
        ("attn.sinks", "self_attn.sinks", "attn.sinks", (c.num_attention_heads,)),
        ("mlp.router.weight", "mlp.router.weight", "mlp.gate.weight", (E, H)),
        ("mlp.router.bias", "mlp.router.bias", "mlp.gate.bias", (E,)),
        ("mlp.gate_up_bias", "mlp.experts.gate_up_proj_bias", "mlp.mlp1_bias", (E, 2 * I)),
        ("mlp.down_bias", "mlp.experts.down_proj_bias", "mlp.mlp2_bias", (E, H)),
    ]


def _layer_entries(c: GptOssConfig, n: int, hf: bool) -> list[TensorEntry]:
    """Layer n's non-expert tensors in the HF layout (`hf`) or the original one."""
    p, stored = f"blocks.{n}.", _stored_layer(n, hf)
    one_to_one = [TensorEntry(p + ours, (stored + (hf_name if hf else original),), (shape,))
                  for ours, hf_name, original, shape in _layer_tensors(c)]
    return one_to_one[:2] + _qkv_entries(c, n, hf) + one_to_one[2:]


def _qkv_entries(c: GptOssConfig, n: int, hf: bool) -> list[TensorEntry]:
    """Layer n's fused q/k/v weight and bias: three tensors each in HF, one in the original layout."""
    H, D = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    p, stored = f"blocks.{n}.attn.qkv.", _stored_layer(n, hf)
    if not hf:
        return [TensorEntry(p + "weight", (stored + "attn.qkv.weight",), ((q + 2 * kv, H),)),
                TensorEntry(p + "bias", (stored + "attn.qkv.bias",), ((q + 2 * kv,),))]
    return [
        TensorEntry(p + kind, tuple(stored + f"self_attn.{x}_proj.{kind}" for x in "qkv"),
                    tuple((rows, H) if kind == "weight" else (rows,) for rows in (q, kv, kv)),
                    join=lambda ts: torch.cat(ts, dim=0),
                    split=lambda t: list(t.split((q, kv, kv), dim=0)))
        for kind in ("weight", "bias")
    ]


def _expert_entries(c: GptOssConfig, n: int, hf: bool, mx: bool) -> list[TensorEntry]:
    """Layer n's expert matrices: MXFP4 (blocks, scales) pairs, or dense ([E, in, out] in HF, as
    transformers holds them; [E, out, in] in the original layout)."""
    H, E, I = c.hidden_size, c.num_local_experts, c.intermediate_size
    p, sep, stored = f"blocks.{n}.", "_" if hf else ".", _stored_layer(n, hf) + "mlp."
    entries = []
    # (ours, HF stem, original stem, [out, in])
    for proj, hf_stem, original_stem, (rows, cols) in (("gate_up", "experts.gate_up_proj", "mlp1_weight", (2 * I, H)),
                                                        ("down", "experts.down_proj", "mlp2_weight", (H, I))):
        name = stored + (hf_stem if hf else original_stem)
        if mx:
            entries += [
                TensorEntry(p + f"mlp.{proj}_blocks", (name + sep + "blocks",), ((E, rows, cols // 32, 16),),
                            packed=True),
                TensorEntry(p + f"mlp.{proj}_scales", (name + sep + "scales",), ((E, rows, cols // 32),),
                            packed=True),
            ]
        elif hf:
            entries.append(TensorEntry(p + f"mlp.{proj}_weight", (name,), ((E, cols, rows),),
                                       join=_transposed, split=_transpose_out))
        else:
            entries.append(TensorEntry(p + f"mlp.{proj}_weight", (name,), ((E, rows, cols),)))
    return entries
