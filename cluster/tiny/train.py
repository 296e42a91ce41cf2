"""Train gpt-oss-tiny from scratch on the curriculum, on CPU, and write its compact artifact.

The model is the project's own `GptOssModel` (cluster/model), so training runs the exact layers
the engine serves. Only the vocabulary rows the curriculum uses are trained: the model trains with
a vocabulary of those U rows plus one constant logit log(V - U), which is exactly the
log-sum-exp of the V - U untrained rows, each held at zero (logit 0). The full 201088-way softmax
is therefore computed exactly at the cost of a U-way one. Loss is on the assistant's tokens only.

With `qat` > 0, the last `qat` fraction of the steps is quantization-aware: the experts' forward pass
sees their weights rounded to MXFP4 (what the served model runs), while the gradient updates the
float weights as if the rounding were not there (straight-through). By default the last tenth of the
steps, the end of the decay, train so: what the served model computes is then what was trained, for
about 0.06 s more per step while on. A tenth takes up the rounding (float and MXFP4 weights score
alike) as a fifth did, in half the extra time; docs/gpt-oss-tiny.md has what each measured.

With `dwell_steps` > 0, training ends by dwelling on its weakest skills (reversing, upper-casing
and counting words): after the decay, a fresh optimizer runs `dwell_steps` more steps at a lower peak rate,
decayed again to a tenth, on the curriculum plus extra conversations of those skills drawn from
their own seed, each skill making up its `dwell_shares` part of the data (60% in all by default).
Dwelling inside the decay did not do this (docs/gpt-oss-tiny.md, "Dwelling on reversals").

Every `snapshot_every` steps and at the end, a copy of the weights with its experts rounded to MXFP4
is written as the artifact (`cluster/model/trained.py` reads it), which keeps only what training
made: the used rows, their ids, and the other weights in bf16 / MXFP4. The unquantized weights go
to float_state.pt beside the loss plot, for `tiny eval --float-state`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from cluster.harmony import CALL_ID, END_ID, MESSAGE_ID, START_ID, load_tokenizer
from cluster.model import mxfp4
from cluster.model.attention import KVCache
from cluster.model.config import GptOssConfig
from cluster.model.trained import ARTIFACTS, write_artifact
from cluster.model.transformer import GptOssModel
from cluster.tiny import curriculum

PRESET = "gpt-oss-tiny"


@dataclasses.dataclass
class TrainSettings:
    seed: int = 1  # with seed 0, this curriculum learned to copy too late (docs/gpt-oss-tiny.md)
    samples: int = 60_000
    steps: int = 13_000
    batch_tokens: int = 2048  # padded tokens per step
    lr: float = 3e-3  # peak, held after warmup until the decay
    warmup: int = 60
    decay: float = 0.5  # the last fraction of the steps decays the rate linearly to a tenth
    qat: float = 0.1  # the last fraction of the steps trains against MXFP4-rounded experts
    snapshot_every: int = 500  # write the artifact (and plot) every this many steps, and at the end
    weight_decay: float = 0.01
    threads: int = 2  # this machine kind's cores
    dwell_steps: int = 4_000  # after the decay, steps on data richer in the `dwell_shares` skills (0: none)
    # of the dwell's data: the extra conversations of each skill
    dwell_shares: tuple[tuple[str, float], ...] = (("reverse", 0.15), ("upper", 0.15), ("count", 0.3))
    dwell_lr: float = 1e-3  # the dwell's peak rate (a fresh optimizer), decayed linearly to a tenth

    @property
    def dwell_samples(self) -> dict[str, int]:
        """Extra conversations of each dwell skill beside the curriculum's `samples`, which make up
        the rest of the dwell's data."""
        if not self.dwell_steps:
            return {}
        rest = 1.0 - sum(share for _, share in self.dwell_shares)
        return {skill: round(self.samples * share / rest) for skill, share in self.dwell_shares}

    @property
    def main(self) -> dict:
        """The settings the main steps depend on (the dwell's and the snapshots' left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if not k.startswith("dwell_") and k != "snapshot_every"}

    @property
    def qat_from(self) -> int:
        """The first step trained against MXFP4-rounded experts."""
        return round(self.steps * (1.0 - self.qat))


def encode(samples: list[curriculum.Sample]) -> list[tuple[list[int], list[int]]]:
    """(prompt + completion ids, the positions whose token is trained) per sample."""
    out = []
    for s in samples:
        prompt = s.prompt_ids()
        ids = prompt + s.completion_ids()
        out.append((ids, earlier_answers(prompt) + list(range(len(prompt), len(ids)))))
    return out


def earlier_answers(prompt: list[int]) -> list[int]:
    """Positions of the assistant's own words in the prompt: the content of earlier assistant
    messages, and the <|end|>/<|call|> closing an analysis or a tool call. The closing <|end|> of an
    earlier final is left out (the model must end its own final with <|return|>), and so are the
    headers (earlier turns' analysis is dropped from the prompt, so their final headers follow
    <|start|>assistant directly, which the model must not learn)."""
    (assistant,), (final,) = (load_tokenizer().encode(word) for word in ("assistant", "final"))
    positions: list[int] = []
    i = 0
    while i < len(prompt) - 2:  # the prompt ends with the open <|start|>assistant of the reply
        if prompt[i] == START_ID and prompt[i + 1] == assistant:
            body = prompt.index(MESSAGE_ID, i) + 1
            close = next(j for j in range(body, len(prompt)) if prompt[j] in (END_ID, CALL_ID))
            keep_close = final not in prompt[i:body]
            positions += range(body, close + 1 if keep_close else close)
            i = close
        i += 1
    return positions


def batches(data: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length (little padding), each at most `batch_tokens` padded tokens."""
    order = sorted(range(len(data)), key=lambda i: (len(data[i][0]), rng.random()))
    out, current, longest = [], [], 0
    for i in order:
        n = len(data[i][0])
        if current and max(longest, n) * (len(current) + 1) > batch_tokens:
            out.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        out.append(current)
    return out


def collate(data, idx: list[int], to_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs [B, T], targets [B, T] (row ids), loss mask [B, T] (the assistant's tokens only)."""
    T = max(len(data[i][0]) for i in idx) - 1
    inputs = torch.zeros(len(idx), T, dtype=torch.long)
    targets = torch.zeros(len(idx), T, dtype=torch.long)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    for b, i in enumerate(idx):
        ids, trained = data[i]
        rows = to_row[torch.tensor(ids)]
        n = len(ids) - 1
        inputs[b, :n], targets[b, :n] = rows[:-1], rows[1:]
        mask[b, torch.tensor(trained) - 1] = True  # position p - 1 predicts token p
    return inputs, targets, mask


def logits_with_rest(model: GptOssModel, inputs: torch.Tensor, rest: float) -> torch.Tensor:
    """[B, T, U + 1]: the U used rows' logits and log(V - U), the untrained rows' log-sum-exp."""
    B, T = inputs.shape
    cache = KVCache(model.config, T, B, torch.float32, "cpu")
    cos, sin = model.rope.tables(0, T, torch.float32)
    x = model.run_blocks(inputs, cos, sin, cache.layers(0))
    logits = F.linear(model.norm(x), model.unembedding.weight)
    return torch.cat((logits, logits.new_full((B, T, 1), rest)), dim=-1)


DWELL_WARMUP = 50  # the dwell's warmup steps (it starts a fresh optimizer)


def learning_rate(step: int, settings: TrainSettings) -> float:
    """The main steps' schedule, then the dwell's: a short warmup, and a linear decay to a tenth."""
    if step < settings.steps:
        return settings.lr * learning_rate_factor(step, settings)
    k = step - settings.steps
    return settings.dwell_lr * (1.0 - 0.9 * k / settings.dwell_steps) * min(1.0, (k + 1) / DWELL_WARMUP)


def learning_rate_factor(step: int, settings: TrainSettings) -> float:
    """Warmup, then constant, then a linear decay to 0.1 over the last `decay` of the steps."""
    decay_from = settings.steps * (1.0 - settings.decay)
    if step >= decay_from:
        return 1.0 - 0.9 * (step - decay_from) / max(1.0, settings.steps - decay_from)
    return min(1.0, (step + 1) / settings.warmup)


def init_weights(model: GptOssModel, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    H = model.config.hidden_size
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.scale"):
                p.fill_(1.0)
            elif name.endswith(("bias", "sinks")):
                p.zero_()
            elif name == "embedding.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * (0.5 if "out" in name or "down" in name else 1.0))
    model.unembedding.weight.data.mul_(H**0.5 * 0.02)


EXPERT_MATRICES = ("gate_up_weight", "down_weight")  # of each block's MoE: what the artifact stores in MXFP4


def rounded_to_mxfp4(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with every value rounded to the nearest MXFP4 one (still dense floats, no gradient)."""
    return mxfp4.unpack(*mxfp4.pack(weight), weight.dtype)


def quantize_experts_(model: GptOssModel) -> None:
    """Round every expert matrix to the nearest MXFP4 values, in place."""
    with torch.no_grad():
        for block in model.blocks:
            for name in EXPERT_MATRICES:
                weight = getattr(block.mlp, name)
                weight.copy_(rounded_to_mxfp4(weight))


class _RoundedToMXFP4(torch.nn.Module):
    """Straight-through MXFP4: the forward pass sees the rounded weight, the gradient reaches the float one."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (rounded_to_mxfp4(weight) - weight).detach()


def round_experts_in_forward(model: GptOssModel) -> None:
    """From now on, every expert matrix is seen rounded to MXFP4; the optimizer keeps its parameters."""
    for block in model.blocks:
        for name in EXPERT_MATRICES:
            parametrize.register_parametrization(block.mlp, name, _RoundedToMXFP4())


def float_state(model: GptOssModel) -> dict[str, torch.Tensor]:
    """The float weights under their plain names, rounded in the forward pass or not."""
    return {re.sub(r"parametrizations\.(\w+)\.original$", r"\1", k): v.detach().clone()
            for k, v in model.state_dict().items()}


def train(settings: TrainSettings, out_dir: Path, *, artifact: Path | None = None, progress: bool = True,
          dwell_from: Path | None = None) -> dict:
    """Train; write loss.png, train_log.json and the artifact; return a summary. The weights at the
    end of the main steps go to main_state.pt; given one as `dwell_from`, only the dwell runs, and
    ends with the weights a whole run of the same settings ends with (the dwell starts afresh)."""
    from tqdm import tqdm

    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    main_state = _main_state(dwell_from, settings) if dwell_from is not None else None  # before the rendering
    data, dwell_data, vocab_ids = _render(settings, progress)
    full = GptOssConfig.from_preset(PRESET)
    to_row = torch.full((full.vocab_size,), -1, dtype=torch.long)
    to_row[torch.tensor(vocab_ids)] = torch.arange(len(vocab_ids))
    rest = math.log(full.vocab_size - len(vocab_ids))
    model, losses = _model_at_start(settings, full, vocab_ids, main_state)
    opt = _optimizer(model, settings)
    rng = random.Random(settings.seed)
    plan: list[list[int]] = []
    render_s = time.time() - t0
    total = settings.steps + settings.dwell_steps
    bar = tqdm(range(len(losses), total), desc="training gpt-oss-tiny", disable=not progress)
    smooth = _smoothed(None, losses)
    for step in bar:
        if step == settings.qat_from:
            round_experts_in_forward(model)
        if step == settings.steps:  # the dwell: its own data, batch order and optimizer
            if main_state is None:  # a dwell run started from this state: nothing new to save
                _save_main_state(model, settings, vocab_ids, losses, out_dir)
            data, plan, rng, opt = dwell_data, [], random.Random(settings.seed + 1), _optimizer(model, settings)
        if not plan:
            plan = batches(data, settings.batch_tokens, rng)
            rng.shuffle(plan)
        inputs, targets, mask = collate(data, plan.pop(), to_row)
        lr = learning_rate(step, settings)
        for group in opt.param_groups:
            group["lr"] = lr
        with parametrize.cached():  # round each expert matrix once per step, not at every read
            logits = logits_with_rest(model, inputs, rest)
            loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append((step, loss.item()))
        smooth = _smoothed(smooth, losses[-1:])
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.1e}")
        done = step + 1
        if done == total or done % settings.snapshot_every == 0:
            train_s = time.time() - t0 - render_s
            summary = _save(model, vocab_ids, full, artifact or ARTIFACTS[PRESET], out_dir, losses,
                            {**dataclasses.asdict(settings), "steps_done": done, "final_loss": round(smooth, 5),
                             "used_rows": len(vocab_ids), "dwell_samples": settings.dwell_samples},
                            {"render_s": round(render_s, 1), "train_s": round(train_s, 1)})
            bar.write(json.dumps(summary))
    return summary


class OtherMainState(ValueError):
    """`--dwell-from` named the main steps of other settings or another curriculum."""


def _main_state(path: Path, settings: TrainSettings) -> dict:
    """The main steps' end state `tiny train` saved, refused unless they ran with `settings`."""
    saved = torch.load(path)
    if saved["settings"] != settings.main:
        differ = {k: v for k, v in settings.main.items() if saved["settings"].get(k) != v}
        raise OtherMainState(f"{path}: the main steps of other settings ({differ}); train from scratch with these")
    return saved


def _model_at_start(settings: TrainSettings, full: GptOssConfig, vocab_ids: list[int],
                    saved: dict | None) -> tuple[GptOssModel, list[tuple[int, float]]]:
    """The model to train and the losses of the steps already done: freshly initialised and none,
    or the main steps' end state and their losses (`saved`, from main_state.pt)."""
    # the training model's vocabulary is the used rows; its special-token ids are never read
    model = GptOssModel(dataclasses.replace(full, vocab_size=len(vocab_ids), eos_token_id=0, pad_token_id=0))
    model.train()
    if saved is None:
        init_weights(model, settings.seed)
        return model, []
    if saved["vocab_ids"].tolist() != vocab_ids:
        raise OtherMainState("the main steps' end state is of another curriculum (its rows differ); "
                             "train from scratch with this one")
    model.load_state_dict(saved["state"])
    if settings.qat_from < settings.steps:  # else the loop's first step starts the rounding
        round_experts_in_forward(model)
    return model, saved["losses"]


def _save_main_state(model: GptOssModel, settings: TrainSettings, vocab_ids: list[int],
                     losses: list[tuple[int, float]], out_dir: Path) -> None:
    torch.save({"settings": settings.main, "vocab_ids": torch.tensor(vocab_ids), "state": float_state(model),
                "losses": losses}, out_dir / "main_state.pt")


def _smoothed(smooth: float | None, losses: list[tuple[int, float]]) -> float | None:
    """The loss shown and recorded: an exponential mean over the steps, continued by `losses`."""
    for _, value in losses:
        smooth = value if smooth is None else 0.95 * smooth + 0.05 * value
    return smooth


def _render(settings: TrainSettings, progress: bool) -> tuple[list, list, list[int]]:
    """The main steps' data, the dwell's (the same plus the extra conversations of its skill) and
    the vocabulary ids the curriculum uses, which are the rows trained."""
    from tqdm import tqdm

    samples = curriculum.generate(settings.samples, curriculum.TRAIN_SEED + settings.seed)
    data = encode(tqdm(samples, desc="rendering curriculum", disable=not progress, leave=False))
    vocab_ids = sorted({t for ids, _ in data for t in ids})
    extra = curriculum.of_skills(settings.dwell_samples, curriculum.DWELL_SEED + settings.seed)
    known = set(vocab_ids)  # an extra conversation that needs a row the curriculum does not is left out
    dwell_data = data + [d for d in encode(tqdm(extra, desc="rendering the dwell's conversations",
                                                disable=not progress, leave=False))
                         if known.issuperset(d[0])]
    return data, dwell_data, vocab_ids


def _optimizer(model: GptOssModel, settings: TrainSettings) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))


def _save(model: GptOssModel, vocab_ids: list[int], config: GptOssConfig, artifact: Path, out_dir: Path,
          losses: list[tuple[int, float]], training: dict, timings: dict) -> dict:
    """Write the artifact of the weights as they are now (experts rounded to MXFP4 on a copy), the
    unquantized weights (float_state.pt, to measure what MXFP4 costs), the log and the loss plot."""
    state = float_state(model)
    torch.save({"vocab_ids": torch.tensor(vocab_ids), "state": state}, out_dir / "float_state.pt")
    quantized = GptOssModel(model.config)
    quantized.load_state_dict(state)
    quantize_experts_(quantized)
    info = write_artifact(quantized, torch.tensor(vocab_ids), config, artifact, training=training)
    summary = {**training, **timings, **info}  # timings stay out of the artifact: same run, same bytes
    (out_dir / "train_log.json").write_text(json.dumps({"summary": summary, "losses": losses}) + "\n")
    _plot(losses, out_dir / "loss.png")
    return summary


def _plot(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*losses)
    k = 25
    smooth = [sum(values[max(0, i - k):i + 1]) / len(values[max(0, i - k):i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, values, alpha=0.3, label="per step")
    ax.plot(steps, smooth, label=f"mean of {k + 1}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per assistant token)")
    ax.set_title("gpt-oss-tiny training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
