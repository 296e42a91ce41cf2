"""ModelInfo: what a replica reports about the model it serves (GetModelInfo, validation limits).

`model_info_for` is the one place a replica's ModelInfo is built, whatever its engine, so that
GetModelInfo says the same thing however the cluster was started (`serve`, `frontdoor`, Helm).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.config import ClusterConfig
from cluster.engine.request import ModelLimits
from cluster.serving.model_store import preset_model_name

if TYPE_CHECKING:  # the front door imports this module; it never loads a model
    from cluster.engine.protocol import Engine
    from cluster.model.config import GptOssConfig


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
    expert_parallel_size: int = 1  # ranks one replica's experts are split over
    tensor_parallel_size: int = 1  # ranks its attention heads are split over
    gpus_per_replica: float = 0.0
    default_max_tokens: int = 0  # max_tokens of a request that leaves it unset
    # Requests one replica holds at once (its batch plus its waiting queue, within Serve's
    # max_ongoing_requests); 0: unknown. The front door refuses what no routable replica has room for.
    max_active_requests: int = 0
    resumes_constrained: bool = False  # a migrated constrained stream continues its grammar (Engine)

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


def parallel_layout(config: ClusterConfig) -> tuple[int, int, float]:
    """(expert-parallel ranks, tensor-parallel ranks, GPUs) of one replica, as the builder places it."""
    serving = config.serving
    if config.engine.kind == "vllm":
        v = config.engine.vllm
        world = v.tensor_parallel_size * v.data_parallel_size
        return (world if v.enable_expert_parallel else 1), v.tensor_parallel_size, float(world if serving.num_gpus else 0)
    if config.engine.kind == "torch":
        # One bundle per rank, each with serving.num_gpus; every rank holds a share of the experts
        # and of the attention heads (cluster/parallel/sharding.py).
        ep = config.parallel.ep_size
        return ep, ep, serving.num_gpus * ep
    return 1, 1, serving.num_gpus


def model_info_for(config: ClusterConfig, engine: Engine, checkpoint: Path | None = None,
                   model_config: GptOssConfig | None = None) -> ModelInfo:
    """What a replica running `engine` reports. `checkpoint` and `model_config` describe the
    weights it loaded (both None for the model-free echo engine)."""
    ep, tp, gpus = parallel_layout(config)
    preset = "" if config.model.path or checkpoint is None else config.model.preset
    if checkpoint is None:
        name, quantization, dtype = config.model.name or config.engine.kind, "none", "none"
    else:
        name = config.model.name or (preset_model_name(preset) if preset else checkpoint.name)
        quantization, dtype = checkpoint_quantization(checkpoint), config.model.dtype
    return ModelInfo(
        model_name=name, preset=preset,
        vocab_size=engine.limits.vocab_size, context_length=engine.limits.context_length,
        num_layers=model_config.num_hidden_layers if model_config else 0,
        num_experts=model_config.num_local_experts if model_config else 0,
        experts_per_token=model_config.num_experts_per_tok if model_config else 0,
        quantization=quantization, dtype=dtype, engine=config.engine.kind, replicas=config.serving.replicas,
        supports_logprobs=engine.supports_logprobs,
        resumes_constrained=getattr(engine, "resumes_constrained", False),  # False: the safe answer
        expert_parallel_size=ep, tensor_parallel_size=tp, gpus_per_replica=gpus,
        default_max_tokens=config.engine.default_max_tokens, max_active_requests=replica_capacity(config))


def replica_capacity(config) -> int:
    """Requests one replica holds at once: its engine's batch and waiting queue, within Serve's
    max_ongoing_requests. 0 (no cap in the front door) when serving.max_queued_requests is -1:
    the operator asked Serve to queue without bound, so the front door refuses nothing for room."""
    if config.serving.max_queued_requests == -1:
        return 0
    e = config.engine
    batch = (e.vllm.max_num_seqs or e.max_num_seqs) if e.kind == "vllm" else e.max_num_seqs
    return min(batch + e.max_waiting_requests, config.serving.max_ongoing_requests)
