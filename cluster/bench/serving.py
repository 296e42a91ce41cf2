"""`gptoss-cluster bench serving`: load a running endpoint and report what operators size with.

Closed loop (`--concurrency N`) or open loop (`--rate R`, or `--rate R1,R2,...` for a sweep),
Generate or Chat over gRPC, or the OpenAI-compatible HTTP API (openai-chat, responses,
completions; server-sent events over keep-alive connections), a workload from options or `--workload FILE.jsonl`. Prints a table per run
(with a progress bar on a terminal while it runs), writes every figure and per-request record to
`--json`, a latency-vs-load PNG for a sweep to `--plot`, and ends with one JSON line of the
summary figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from cluster.bench.flags import add_token_lengths
from cluster.bench.workload import APIS, CLIENTS

API_KEY_ENV = "GPTOSS_API_KEY"


def add_parser(commands) -> None:
    p = commands.add_parser("serving", help="gRPC load generator: closed/open loop, latency percentiles, goodput",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="HOST:PORT of the endpoint (the HTTP port for the HTTP APIs)")
    p.add_argument("--api", choices=APIS, default="generate",
                   help="what to load: the gRPC RPCs generate or chat, or the HTTP API's openai-chat "
                        "(/v1/chat/completions), responses (/v1/responses) or completions (default generate)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 8)")
    load.add_argument("--rate", help="open loop: Poisson arrivals per second; a comma list sweeps the rates")
    p.add_argument("--num-requests", type=int, help="requests per run (default 100 when --duration is not given)")
    p.add_argument("--duration", type=float, help="seconds per run to keep sending (in-flight requests finish)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up requests before each run, not counted (default 0)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline per request in seconds (default 300)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", metavar="FILE.jsonl", help="requests from a JSONL file (see cluster/bench/workload.py)")
    add_token_lengths(w, prompt="128", output="128")
    w.add_argument("--prefix-groups", type=int, default=0, help="groups of requests sharing a prompt prefix")
    w.add_argument("--prefix-len", type=int, default=0, help="tokens of each group's shared prefix")
    w.add_argument("--sessions", type=int, default=0, help="session ids to spread requests over (x-session-id)")
    w.add_argument("--seed", type=int, default=0,
                   help="seed of the workload, the arrivals and, when sampling, each request's sampling seed "
                        "(default 0)")
    s = p.add_argument_group("sampling (the same on every --api)")
    s.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the requested output lengths, ignoring stop tokens, as vLLM's "
                        "`vllm bench serve --ignore-eos` (default on here, off in vLLM's tool); "
                        "--no-ignore-eos lets stop tokens end streams early")
    s.add_argument("--honor-stop", dest="ignore_eos", action="store_false", help=argparse.SUPPRESS)  # old name
    s.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 is greedy (default 0)")
    s.add_argument("--top-p", type=float, help="nucleus sampling in (0, 1] (default: not sent, the server's 1)")
    c = p.add_argument_group("connection")
    c.add_argument("--tls", action="store_true", help="connect with TLS")
    c.add_argument("--ca-cert", help="PEM CA bundle for --tls (default: system roots)")
    c.add_argument("--client-cert", help="PEM client certificate (mutual TLS)")
    c.add_argument("--client-key", help="PEM client key (mutual TLS)")
    c.add_argument("--server-name", help="TLS server name to verify, if not the target's host")
    c.add_argument("--api-key", help=f"sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    c.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra call metadata")
    c.add_argument("--channels", type=int, default=1, help="gRPC connections to spread streams over (default 1)")
    c.add_argument("--client", choices=CLIENTS, default="asyncio",
                   help="gRPC client: asyncio (grpc.aio, default) or blocking (--concurrency 1 only: each "
                        "message read on one thread, fewer client wake-ups in first-token times)")
    c.add_argument("--max-in-flight", type=int, help="open loop safety cap (arrivals then wait: no longer open)")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", action="append", metavar="KEY=MS",
                   help="latency objective(s) for goodput: ttft_ms, tpot_ms, itl_ms, e2e_ms (e.g. ttft_ms=500)")
    o.add_argument("--json", dest="json_path", metavar="FILE", help="write all figures and per-request records")
    o.add_argument("--plot", metavar="FILE.png", help="PNG of latency against load for a rate sweep (matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"gptoss-cluster bench serving: {message}", file=sys.stderr)
    return 2


def _metadata(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata: expected KEY=VALUE, got {item!r}")
        out.append((key.strip().lower(), value))
    return tuple(out)


def _progress(total: int | None, quiet: bool, desc: str):
    """A tqdm bar on stderr when it is a terminal; None otherwise."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=0.25, leave=False)


def _clean(value):
    """JSON without NaN: NaN -> null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from cluster.bench.loadgen import Connection, LoadPlan, run_load
    from cluster.bench.report import format_sweep, format_table, parse_slo, record_to_json, summarize
    from cluster.bench.workload import IntRange, JsonlWorkload, SyntheticWorkload, WorkloadError

    try:
        output_len = IntRange.parse(args.output_len, "--output-len")
        if args.workload:
            workload = JsonlWorkload(args.workload, api=args.api, output_len=output_len, seed=args.seed)
        else:
            workload = SyntheticWorkload(api=args.api, prompt_len=IntRange.parse(args.prompt_len, "--prompt-len"),
                                         output_len=output_len, prefix_groups=args.prefix_groups,
                                         prefix_len=args.prefix_len, sessions=args.sessions, seed=args.seed)
        slo = parse_slo(args.goodput)
        metadata = _metadata(args.metadata)
        rates = [float(r) for r in args.rate.split(",")] if args.rate else [None]
    except (WorkloadError, ValueError) as err:
        return _fail(str(err))
    if args.plot and len(rates) < 2:
        return _fail("--plot needs a rate sweep (--rate R1,R2,...)")
    connection = Connection(target=args.target, tls=args.tls, ca_cert=args.ca_cert, client_cert=args.client_cert,
                            client_key=args.client_key, server_name=args.server_name,
                            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, metadata=metadata,
                            channels=max(1, args.channels))
    num_requests = 100 if args.num_requests is None and args.duration is None else args.num_requests
    runs = []
    for rate in rates:
        concurrency = None if rate is not None else (args.concurrency or 8)
        try:
            plan = LoadPlan(api=args.api, concurrency=concurrency, rate=rate, num_requests=num_requests,
                            duration_s=args.duration, warmup_requests=args.warmup, timeout_s=args.timeout,
                            ignore_stop=args.ignore_eos, max_in_flight=args.max_in_flight,
                            seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                            client=args.client).check()
        except ValueError as err:
            return _fail(str(err))
        title = f"{args.api} @ {f'{rate:g} req/s (open loop)' if rate else f'concurrency {concurrency}'}"
        bar = _progress(num_requests, args.quiet, title)
        result = run_load(connection, workload, plan, on_done=(lambda _r, b=bar: b.update(1)) if bar else None)
        if bar is not None:
            bar.close()
        summary = summarize(result.records, slo=slo, target_rate=rate)
        summary["mode"] = "open" if rate else "closed"
        summary["concurrency"] = concurrency
        summary["warmup"] = {"requests": len(result.warmup),
                             "output_tokens": sum(r.output_tokens for r in result.warmup),
                             "failed": sum(1 for r in result.warmup if not r.ok)}
        runs.append((summary, result))
        if not args.quiet:
            print(format_table(summary, f"{args.target} · {title}"), flush=True)
    summaries = [s for s, _ in runs]
    if len(runs) > 1 and not args.quiet:
        print("── sweep " + "─" * 60)
        print(format_sweep(summaries))
    if args.json_path:
        doc = {"target": args.target, "api": args.api, "client": args.client, "workload": workload.describe(),
               "sampling": {"temperature": args.temperature, "top_p": args.top_p, "ignore_eos": args.ignore_eos,
                            "seed": args.seed if args.temperature else None},
               "runs": [dict(summary=s, started_unix=res.started_unix, records=[record_to_json(r) for r in res.records])
                        for s, res in runs]}
        with open(args.json_path, "w") as f:
            json.dump(_clean(doc), f)
    if args.plot:
        from cluster.bench.plot import plot_sweep

        try:
            plot_sweep(summaries, args.plot, title=f"{args.target} · {args.api}")
        except ImportError as err:
            print(f"gptoss-cluster bench serving: {err}", file=sys.stderr)
    print(json.dumps(_clean(summaries[0] if len(summaries) == 1 else {"runs": summaries})))
    return 0 if any(s["completed"] for s in summaries) else 1
