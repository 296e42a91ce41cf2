"""`gptoss-cluster tiny train | eval`: train gpt-oss-tiny from scratch, or score it on held-out chats."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("tiny", help="train or evaluate gpt-oss-tiny, the small trained harmony model",
                                   description=__doc__)
    commands = parser.add_subparsers(dest="tiny_command", required=True, metavar="ACTION")

    from cluster.tiny.train import TrainSettings

    d = TrainSettings()
    train = commands.add_parser("train", help="train from scratch on CPU and write the artifact and a loss plot")
    train.add_argument("--seed", type=int, default=d.seed, help=f"training seed (default {d.seed})")
    train.add_argument("--samples", type=int, default=d.samples, help=f"curriculum samples (default {d.samples})")
    train.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    train.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                       help=f"padded tokens per step (default {d.batch_tokens})")
    train.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    train.add_argument("--qat", type=float, default=d.qat,
                       help=f"last fraction of the steps trained against MXFP4-rounded experts (default {d.qat})")
    train.add_argument("--threads", type=int, default=d.threads, help=f"torch threads (default {d.threads})")
    train.add_argument("--dwell-steps", type=int, default=d.dwell_steps,
                       help=f"steps after the decay that dwell on {', '.join(dict(d.dwell_shares))} "
                            f"(default {d.dwell_steps}; 0: none)")
    train.add_argument("--dwell-shares", type=_shares, default=d.dwell_shares, metavar="SKILL=SHARE,...",
                       help="each dwell skill's part of the dwell's data (default "
                            f"{','.join(f'{k}={v}' for k, v in d.dwell_shares)})")
    train.add_argument("--dwell-from", metavar="MAIN_STATE",
                       help="run only the dwell, from the main_state.pt an earlier run of the same settings "
                            "wrote (it ends where the whole run would); refused for other main settings")
    train.add_argument("--out", default="tiny-train", help="directory for loss.png and train_log.json")
    train.add_argument("--artifact", help="where to write the weights (default: the packaged artifact)")
    train.set_defaults(func=_train)
    register_eval(commands)


def _shares(text: str) -> tuple[tuple[str, float], ...]:
    from cluster.tiny.curriculum import SKILLS

    shares = []
    for item in text.split(","):
        skill, _, share = item.partition("=")
        if skill not in SKILLS:
            raise argparse.ArgumentTypeError(f"{skill!r} is not a skill (one of {', '.join(SKILLS)})")
        try:
            shares.append((skill, float(share)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the share must be a number, as in count=0.3") from None
    if not 0 < sum(share for _, share in shares) < 1:
        raise argparse.ArgumentTypeError("the shares must add up to less than 1 (the rest is the curriculum)")
    return tuple(shares)


def _train(args: argparse.Namespace) -> int:
    from cluster.tiny.train import OtherMainState, TrainSettings, train

    settings = TrainSettings(seed=args.seed, samples=args.samples, steps=args.steps, batch_tokens=args.batch_tokens,
                             lr=args.lr, qat=args.qat, threads=args.threads, dwell_steps=args.dwell_steps,
                             dwell_shares=args.dwell_shares)
    try:
        summary = train(settings, Path(args.out), artifact=Path(args.artifact) if args.artifact else None,
                        dwell_from=Path(args.dwell_from) if args.dwell_from else None)
    except (OtherMainState, FileNotFoundError) as err:
        print(f"gptoss-cluster tiny train: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def register_eval(commands) -> None:
    from cluster.tiny.curriculum import EVAL_SEED

    ev = commands.add_parser("eval", help="score the model on held-out chats (table and one JSON line)")
    source = ev.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="HF checkpoint directory (default: the packaged gpt-oss-tiny)")
    source.add_argument("--artifact", help="a trained artifact file (from `tiny train --artifact`)")
    source.add_argument("--float-state", help="the unquantized weights training saved (float_state.pt)")
    ev.add_argument("--samples", type=int, default=600, help="held-out conversations (default 600)")
    ev.add_argument("--seed", type=int, default=EVAL_SEED,
                    help=f"the held-out set's seed (default {EVAL_SEED}, the one reported; another one draws "
                         "a development set to choose training settings on)")
    ev.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ev.add_argument("--cache-dir", default="~/.cache/gptoss-cluster", help="where the checkpoint is rebuilt")
    ev.add_argument("--show-failures", type=int, default=5, help="print this many wrong completions")
    ev.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import tempfile
    import time

    import torch

    from cluster.model.checkpoint import load_model
    from cluster.model.trained import build_trained_checkpoint
    from cluster.tiny import evaluate

    torch.set_num_threads(args.threads)
    tmp = None
    if args.float_state:
        model = evaluate.model_from_float_state(Path(args.float_state))
        source = args.float_state
    else:
        if args.checkpoint:
            path = Path(args.checkpoint)
        elif args.artifact:
            tmp = tempfile.TemporaryDirectory()
            path = build_trained_checkpoint("gpt-oss-tiny", tmp.name, artifact=Path(args.artifact))
        else:
            from cluster.serving.model_store import ensure_preset_checkpoint

            path = ensure_preset_checkpoint("gpt-oss-tiny", Path(args.cache_dir).expanduser())
        model = load_model(path, dtype=torch.float32)
        source = str(path)
    start = time.time()
    samples = evaluate.eval_samples(args.samples, seed=args.seed, **_trained_on(args))
    scored = evaluate.run_eval(model, samples)
    summary = evaluate.summarize(scored)
    summary.update(source=source, eval_seed=args.seed, eval_s=round(time.time() - start, 1))
    for s, r in [(s, r) for s, r in zip(samples, scored) if not r.exact][: args.show_failures]:
        print(f"[{r.skill}/{r.effort}] asked {s.messages[-1].content!r}, "
              f"expected {s.call or s.final!r}, got {r.completion!r}")
    print(evaluate.table(summary))
    print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _trained_on(args: argparse.Namespace) -> dict:
    """What the model trained on (recorded in its artifact), to keep eval disjoint from it:
    eval_samples' train_samples, train_seed and dwell."""
    from cluster.model.trained import ARTIFACTS, read_artifact, _sidecar_sha256
    from cluster.tiny.train import TrainSettings

    path = Path(args.artifact) if args.artifact else ARTIFACTS["gpt-oss-tiny"]
    try:
        _, _, metadata = read_artifact(path, _sidecar_sha256(path))
        training = metadata["training"]
    except Exception:  # no artifact to read (e.g. --float-state of a run in progress): the defaults
        d = TrainSettings()
        training = {"samples": d.samples, "seed": d.seed, "dwell_samples": d.dwell_samples}
    return {"train_samples": int(training["samples"]), "train_seed": int(training.get("seed", 0)),
            "dwell": {skill: int(n) for skill, n in training.get("dwell_samples", {}).items()}}
