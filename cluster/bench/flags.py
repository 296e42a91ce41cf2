"""Flags that more than one benchmark takes, each defined once. What differs from one benchmark to
the next - the default, what a number counts there - is a parameter."""

from __future__ import annotations

import argparse


def add_token_lengths(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, prompt: str, output: str,
                      output_counts: str = "tokens to generate") -> None:
    """--prompt-len and --output-len: N tokens, or LOW:HIGH drawn uniformly (read with
    cluster.bench.workload.IntRange.parse); `output_counts` says what --output-len counts here."""
    p.add_argument("--prompt-len", default=prompt, help=f"prompt tokens: N or LOW:HIGH (default {prompt})")
    p.add_argument("--output-len", default=output, help=f"{output_counts}: N or LOW:HIGH (default {output})")


def add_rounds(p: argparse.ArgumentParser, *, concurrency: int, rounds: int, startup_timeout: float,
               servers_start: str) -> None:
    """The flags of a benchmark that starts the servers it compares and measures them in rounds, each
    a throughput run at --concurrency and a run at concurrency 1, the median over rounds counting:
    --concurrency, --c1-requests, --rounds, --startup-timeout (`servers_start`: "together" or "one
    after the other", which the timeout is for) and --json."""
    p.add_argument("--concurrency", type=int, default=concurrency,
                   help=f"streams in flight in each throughput run (default {concurrency})")
    p.add_argument("--c1-requests", type=int, default=60, help="requests of each concurrency-1 run (default 60)")
    p.add_argument("--rounds", type=int, default=rounds,
                   help=f"rounds, each over every server in turn; the median counts (default {rounds})")
    waits_for = "the servers, started together" if servers_start == "together" else "each server"
    p.add_argument("--startup-timeout", type=float, default=startup_timeout,
                   help=f"seconds to wait for {waits_for} (default {startup_timeout:g})")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write every run's summary here")
