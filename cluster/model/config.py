"""`GptOssConfig`: the shape of a gpt-oss model, named exactly as in the HF `config.json`.

Loading a real checkpoint's config is a plain unpack of its JSON. The original (reference
implementation) layout keeps its own, shorter `original/config.json`; `from_original_dict` and
`to_original_dict` map between the two.

Presets (`PRESETS`, `GptOssConfig.from_preset(name)`):

- `gpt-oss-120b`, `gpt-oss-20b`: the published models.
- `tiny`: 4 layers, hidden 64, 8 experts top-4, window 8, and the REAL vocabulary (201088), so
  the real o200k_harmony tokenizer works with it (random weights, for tests needing exact shapes).
- `tiny-vllm`: `tiny` with head_dim 32, the smallest head vLLM's CPU attention runs.
- `gpt-oss-tiny`: the shape of the trained gpt-oss-tiny (cluster/tiny); 4 layers, hidden 128, 8
  experts top-2, window 128. `gptoss-cluster serve` serves the trained weights by default.
- `tiny-small-vocab`: a different shape for tests (3 layers, hidden 96, 6 query heads over 2 kv
  heads, 4 experts top-2, window 16, vocab 1024). Token ids must stay below 1024.

The tiny presets keep the real architecture; only sizes shrink. Their sliding window is short so
tests exercise it with short prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _default_rope_scaling() -> dict[str, Any]:
    return {
        "rope_type": "yarn",
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        # The reference ramps over the exact (fractional) correction range. transformers defaults to
        # True when a config omits it, so configs we write always name it (and loading warns if absent).
        "truncate": False,
    }


@dataclass
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert; gate_up has 2x this many rows
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64  # not hidden_size / heads: 64 * 64 = 4096 != 2880
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling: dict[str, Any] = field(default_factory=_default_rope_scaling)
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    max_position_embeddings: int = 131072
    layer_types: list[str] | None = None  # None: sliding on even layers, full on odd
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    eos_token_id: int = 200002  # <|return|>
    pad_token_id: int = 199999  # <|endoftext|>

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
            ]
        self.rope_scaling = {**_default_rope_scaling(), **(self.rope_scaling or {})}
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a gpt-oss model."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GptOssConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("GptOssConfig.num_attention_heads must be a multiple of num_key_value_heads, got "
                             f"{self.num_attention_heads} and {self.num_key_value_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"GptOssConfig.num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                             f"num_local_experts ({self.num_local_experts})")
        if self.head_dim % 2:
            raise ValueError(f"GptOssConfig.head_dim must be even for RoPE, got {self.head_dim}")
        # MXFP4 blocks run 32 wide along each expert matrix's input dimension.
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ValueError(f"GptOssConfig.{name} must be a multiple of 32 (MXFP4 block), got "
                                 f"{getattr(self, name)}")
        if self.sliding_window is None or self.sliding_window < 1:
            raise ValueError(f"GptOssConfig.sliding_window must be >= 1, got {self.sliding_window!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"GptOssConfig.layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ValueError(f"GptOssConfig.layer_types has unknown types {sorted(bad)}")
        if self.rope_scaling.get("rope_type", "yarn") != "yarn":
            raise ValueError(f"GptOssConfig.rope_scaling.rope_type must be 'yarn', got {self.rope_scaling['rope_type']!r}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"GptOssConfig.{name} ({value}) must be a token id below vocab_size "
                                 f"({self.vocab_size})")
        if self.tie_word_embeddings:
            raise ValueError("GptOssConfig.tie_word_embeddings must be false: gpt-oss unembedding is its own matrix")

    # ---- presets -------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> GptOssConfig:
        try:
            kwargs = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
        return cls(**copy.deepcopy(kwargs))

    def with_vocab_size(self, vocab_size: int) -> GptOssConfig:
        """This shape with another vocabulary; eos/pad ids that would fall outside it move to its
        top (eos the last id, pad the one before), as the small-vocabulary preset has them."""
        ids = {}
        if not 0 <= self.eos_token_id < vocab_size or not 0 <= self.pad_token_id < vocab_size:
            ids = {"eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 2}
        return dataclasses.replace(self, vocab_size=vocab_size, **ids)

    # ---- HF config.json ------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GptOssConfig:
        data = dict(data)
        # transformers >= 5 writes `rope_parameters` (rope_theta inside) where 4.x wrote rope_scaling.
        if "rope_parameters" in data and "rope_scaling" not in data:
            rope = dict(data.pop("rope_parameters") or {})
            if "rope_theta" in rope:
                data.setdefault("rope_theta", rope.pop("rope_theta"))
            data["rope_scaling"] = rope
        rope = data.get("rope_scaling") or {}
        if "truncate" not in rope:
            log.warning("config.json's rope parameters do not name `truncate`; using %s as OpenAI's reference "
                        "does (transformers would use True for such a config)", _default_rope_scaling()["truncate"])
        if "num_local_experts" not in data and "num_experts" in data:
            data["num_local_experts"] = data["num_experts"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> GptOssConfig:
        """Read an HF `config.json` or an original-layout `config.json` (told apart by its keys)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if "model_type" not in data and "experts_per_token" in data and "num_local_experts" not in data:
            return cls.from_original_dict(data)
        return cls.from_hf_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self, *, mxfp4: bool = False) -> dict[str, Any]:
        """The HF `config.json` contents; with `mxfp4`, the quantization_config transformers reads."""
        data: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            **self.to_dict(),
            "experts_per_token": self.num_experts_per_tok,
            "initial_context_length": self.rope_scaling["original_max_position_embeddings"],
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "output_router_logits": False,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }
        if mxfp4:
            data["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            }
        return data

    # ---- original (reference implementation) config.json ---------------------------------------

    def to_original_dict(self) -> dict[str, Any]:
        """The reference's `ModelConfig` fields; anything it does not name keeps its gpt-oss default."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.rope_scaling["original_max_position_embeddings"],
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling["factor"],
            "rope_ntk_alpha": self.rope_scaling["beta_slow"],
            "rope_ntk_beta": self.rope_scaling["beta_fast"],
        }

    @classmethod
    def from_original_dict(cls, data: dict[str, Any]) -> GptOssConfig:
        rope = _default_rope_scaling()
        rope.update(
            factor=float(data.get("rope_scaling_factor", rope["factor"])),
            original_max_position_embeddings=int(data.get("initial_context_length", 4096)),
            beta_slow=float(data.get("rope_ntk_alpha", rope["beta_slow"])),
            beta_fast=float(data.get("rope_ntk_beta", rope["beta_fast"])),
        )
        renamed = {"num_experts": "num_local_experts", "experts_per_token": "num_experts_per_tok"}
        known = {f.name for f in fields(cls)}
        kwargs = {renamed.get(k, k): v for k, v in data.items()}
        kwargs = {k: v for k, v in kwargs.items() if k in known}
        kwargs["rope_scaling"] = rope
        # The format names no special ids: the defaults, moved inside a smaller vocabulary.
        vocab_size = kwargs.pop("vocab_size", cls.vocab_size)
        return cls(**kwargs).with_vocab_size(vocab_size)

    # ---- sizes from shapes (no weights allocated) ----------------------------------------------

    def expert_matrix_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-layer expert weights as [E, out, in] (the MXFP4 row layout)."""
        e, h, i = self.num_local_experts, self.hidden_size, self.intermediate_size
        return {"gate_up": (e, 2 * i, h), "down": (e, h, i)}

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of one layer (prefixed `layer.`) and the model-level ones."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        e, i = self.num_local_experts, self.intermediate_size
        return {
            "embed": (self.vocab_size, h),
            "unembed": (self.vocab_size, h),
            "norm": (h,),
            "layer.attn_norm": (h,),
            "layer.qkv.weight": (q + 2 * kv, h),
            "layer.qkv.bias": (q + 2 * kv,),
            "layer.sinks": (self.num_attention_heads,),
            "layer.out.weight": (h, q),
            "layer.out.bias": (h,),
            "layer.mlp_norm": (h,),
            "layer.router.weight": (e, h),
            "layer.router.bias": (e,),
            "layer.gate_up.weight": (e, 2 * i, h),
            "layer.gate_up.bias": (e, 2 * i),
            "layer.down.weight": (e, h, i),
            "layer.down.bias": (e, h),
        }

    def num_parameters(self, *, active: bool = False) -> int:
        """Total parameters, or with `active` those one token's compute touches: top-k of the experts,
        and no embedding table (a lookup, not a matmul), as OpenAI counts them."""
        total = 0
        for name, shape in self.parameter_shapes().items():
            n = math.prod(shape)
            if active and name == "embed":
                continue
            if active and name.startswith("layer.") and name.split(".")[1] in ("gate_up", "down"):
                n = n // self.num_local_experts * self.num_experts_per_tok
            total += n * (self.num_hidden_layers if name.startswith("layer.") else 1)
        return total

    def checkpoint_bytes(self, *, mxfp4: bool = True) -> int:
        """Tensor bytes on disk: bf16 everywhere, expert matrices as MXFP4 (4.25 bits) when `mxfp4`."""
        total = 0
        for name, shape in self.parameter_shapes().items():
            n = math.prod(shape)
            if mxfp4 and name.endswith(("gate_up.weight", "down.weight")):
                size = n // 2 + n // 32  # two fp4 per byte + one E8M0 scale per 32 values
            else:
                size = 2 * n
            total += size * (self.num_hidden_layers if name.startswith("layer.") else 1)
        return total

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# The tiny architecture the CPU tests build (random weights); the other small presets are it with changes.
_TINY: dict[str, Any] = dict(
    vocab_size=201088, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_local_experts=8, num_experts_per_tok=4, sliding_window=8, max_position_embeddings=4096,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "tiny": _TINY,
    # `tiny` with head_dim 32: vLLM's CPU attention kernels take head sizes 32, 64, 80, ... only,
    # so the vLLM tests and `bench engine --against vllm` use this shape (for both engines).
    "tiny-vllm": {**_TINY, "head_dim": 32},
    # The trained model (cluster/tiny, weights in cluster/model/assets): the tiny architecture at the
    # size two CPU cores train in minutes; head_dim 32 so vLLM's CPU attention runs it too.
    "gpt-oss-tiny": {**_TINY, "hidden_size": 128, "intermediate_size": 128, "head_dim": 32,
                     "num_experts_per_tok": 2, "sliding_window": 128},
    "tiny-small-vocab": {**_TINY, "vocab_size": 1024, "hidden_size": 96, "intermediate_size": 128,
                         "num_hidden_layers": 3, "num_attention_heads": 6, "num_local_experts": 4,
                         "num_experts_per_tok": 2, "sliding_window": 16, "eos_token_id": 1023, "pad_token_id": 1022},
}
