"""`gptoss-cluster bench TARGET`: the micro-benchmarks of cluster/bench/, one subcommand each.

Each bench module adds its own subcommand (`add_parser`); they are imported here only, so the
CLI's other commands never load them (grpc, transformers and vLLM are imported when a bench runs).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from cluster.bench import engine, experts, model, overhead, roofline, serving, vllm_serving

    parser = subparsers.add_parser("bench", help="micro-benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="TARGET")
    for bench in (model, serving, overhead, engine, experts, roofline, vllm_serving):
        bench.add_parser(commands)
