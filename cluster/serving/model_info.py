"""ModelInfo: what a replica reports about the model it serves (GetModelInfo, validation limits)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.engine.request import ModelLimits


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    preset: str  # "" for a checkpoint given by path
    vocab_size: int
    context_length: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    quantization: str  # "mxfp4" or "none", as stored on disk
    dtype: str  # compute dtype of the loaded weights
    engine: str
    replicas: int
    supports_logprobs: bool = False  # the engine fills TokenChunk.logprobs when asked
    # Requests one replica holds at once (its batch plus its waiting queue, within Serve's
    # max_ongoing_requests); 0: unknown. The front door refuses what no routable replica has room for.
    max_active_requests: int = 0
    # max_tokens of a request that leaves it unset (0: unknown); a migrated stream continues to it.
    default_max_tokens: int = 0

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(vocab_size=self.vocab_size, context_length=self.context_length)


def checkpoint_quantization(checkpoint_dir: Path) -> str:
    """"mxfp4" when the HF config.json declares MXFP4 experts, else "none"."""
    config_file = Path(checkpoint_dir) / "config.json"
    if not config_file.exists():
        return "none"
    quant = json.loads(config_file.read_text()).get("quantization_config") or {}
    return "mxfp4" if str(quant.get("quant_method", "")).lower() == "mxfp4" else "none"
