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
    c = config
    H, D, E, I, V = c.hidden_size, c.head_dim, c.num_local_experts, c.intermediate_size, c.vocab_size
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    hf = layout == "hf"
    entries = [
        TensorEntry("embedding.weight", ("model.embed_tokens.weight" if hf else "embedding.weight",), ((V, H),)),
        TensorEntry("unembedding.weight", ("lm_head.weight" if hf else "unembedding.weight",), ((V, H),)),
        TensorEntry("norm.scale", ("model.norm.weight" if hf else "norm.scale",), ((H,),)),
    ]
    for n in range(c.num_hidden_layers):
        p = f"blocks.{n}."
        if hf:
            a, m = f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
            entries += [
                TensorEntry(p + "attn_norm.scale", (f"model.layers.{n}.input_layernorm.weight",), ((H,),)),
                TensorEntry(p + "mlp_norm.scale", (f"model.layers.{n}.post_attention_layernorm.weight",), ((H,),)),
                *(
                    TensorEntry(p + f"attn.qkv.{kind}", tuple(a + f"{x}_proj.{kind}" for x in "qkv"),
                           tuple((rows, H) if kind == "weight" else (rows,) for rows in (q, kv, kv)),
                           join=lambda ts: torch.cat(ts, dim=0),
                           split=lambda t: list(t.split((q, kv, kv), dim=0)))
                    for kind in ("weight", "bias")
                ),
                TensorEntry(p + "attn.out.weight", (a + "o_proj.weight",), ((H, q),)),
                TensorEntry(p + "attn.out.bias", (a + "o_proj.bias",), ((H,),)),
                TensorEntry(p + "attn.sinks", (a + "sinks",), ((c.num_attention_heads,),)),
                TensorEntry(p + "mlp.router.weight", (m + "router.weight",), ((E, H),)),
                TensorEntry(p + "mlp.router.bias", (m + "router.bias",), ((E,),)),
                TensorEntry(p + "mlp.gate_up_bias", (m + "experts.gate_up_proj_bias",), ((E, 2 * I),)),
                TensorEntry(p + "mlp.down_bias", (m + "experts.down_proj_bias",), ((E, H),)),
            ]
            names = {"gate_up": m + "experts.gate_up_proj", "down": m + "experts.down_proj"}
            sep = "_"
        else:
            a, m = f"block.{n}.attn.", f"block.{n}.mlp."
            entries += [
                TensorEntry(p + "attn_norm.scale", (a + "norm.scale",), ((H,),)),
                TensorEntry(p + "mlp_norm.scale", (m + "norm.scale",), ((H,),)),
                TensorEntry(p + "attn.qkv.weight", (a + "qkv.weight",), ((q + 2 * kv, H),)),
                TensorEntry(p + "attn.qkv.bias", (a + "qkv.bias",), ((q + 2 * kv,),)),
                TensorEntry(p + "attn.out.weight", (a + "out.weight",), ((H, q),)),
                TensorEntry(p + "attn.out.bias", (a + "out.bias",), ((H,),)),
                TensorEntry(p + "attn.sinks", (a + "sinks",), ((c.num_attention_heads,),)),
                TensorEntry(p + "mlp.router.weight", (m + "gate.weight",), ((E, H),)),
                TensorEntry(p + "mlp.router.bias", (m + "gate.bias",), ((E,),)),
                TensorEntry(p + "mlp.gate_up_bias", (m + "mlp1_bias",), ((E, 2 * I),)),
                TensorEntry(p + "mlp.down_bias", (m + "mlp2_bias",), ((E, H),)),
            ]
            names = {"gate_up": m + "mlp1_weight", "down": m + "mlp2_weight"}
            sep = "."
        for proj, (rows, cols) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            if mx:
                entries += [
                    TensorEntry(p + f"mlp.{proj}_blocks", (names[proj] + sep + "blocks",), ((E, rows, cols // 32, 16),),
                           packed=True),
                    TensorEntry(p + f"mlp.{proj}_scales", (names[proj] + sep + "scales",), ((E, rows, cols // 32),),
                           packed=True),
                ]
            elif hf:  # transformers holds dense experts as [E, in, out]
                entries.append(TensorEntry(p + f"mlp.{proj}_weight", (names[proj],), ((E, cols, rows),),
                                      join=_transposed, split=_transpose_out))
            else:
                entries.append(TensorEntry(p + f"mlp.{proj}_weight", (names[proj],), ((E, rows, cols),)))
    return entries
