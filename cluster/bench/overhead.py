"""`gptoss-cluster bench overhead`: what our serving path costs, against two anchors, in one run.

Three servers run side by side, each its own process (two of them with their own local Ray), and
ours is measured twice, over gRPC and over its OpenAI-compatible HTTP API:
  * floor       python -m cluster.bench.floor: a minimal grpc.aio server, no Ray, one message per token;
  * serve-proxy python -m cluster.bench.serve_proxy: Ray Serve's built-in gRPC proxy in front of a
                Serve deployment streaming one message per token;
  * ours        gptoss-cluster serve with `engine.kind: echo`: our front door -> DeploymentHandle ->
                ModelReplica -> the echo test engine (which coalesces ready tokens into chunks), with the
                Serve settings our serve applies itself (serving/handles.py, serving/builder.py);
  * ours_http   the same server through POST /v1/completions (token-id prompts, SSE), the HTTP twin of
                Generate: an aiohttp client over keep-alive connections, the same front door core.
All three stream the same tokens at the same pace (the first at once, then --token-rate tokens/s
per stream). This process is the load generator (the same one as `bench serving`), a gRPC client
apart from every server. Each round measures every target, closed loop at --concurrency for
--duration seconds, then at concurrency 1 for TTFT; the median over rounds counts, so background
load on a shared box hits all three alike. Our token count is checked against the front door's
/metrics. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from cluster.bench.flags import add_rounds, add_token_lengths

TARGETS = ("floor", "serve_proxy", "ours", "ours_http")
GOALS = {"tokens_per_s_ratio_vs_floor": 0.5, "tokens_per_s_ratio_vs_serve_proxy": 10.0, "ttft_c1_added_ms": 2.0,
         "http_tokens_per_s_ratio_vs_grpc": 0.7, "http_ttft_c1_added_ms_vs_grpc": 1.0}


def add_parser(commands) -> None:
    p = commands.add_parser("overhead", help="tokens/s and TTFT: our path vs a bare grpc.aio floor and Serve's "
                                             "gRPC proxy", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--token-rate", type=float, default=1000.0,
                   help="tokens/s per stream every server produces (default 1000; 0: unpaced)")
    add_rounds(p, concurrency=64, rounds=3, startup_timeout=240.0, servers_start="together")
    add_token_lengths(p, prompt="16", output="32:128", output_counts="tokens per stream")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (default 5)")
    p.add_argument("--chunk-interval-ms", type=float, default=10.0,
                   help="our replica's least time between chunks of a stream (default 10)")
    p.add_argument("--serve-throughput-optimized", action="store_true",
                   help="run both Ray Serve servers with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Serve's own knob; "
                        "default: the Serve proxy with Serve's defaults, ours with its own defaults)")
    p.set_defaults(func=run)


def _log(message: str) -> None:
    print(f"overhead: {message}", file=sys.stderr, flush=True)


class ServerProcess:
    """A server subprocess that prints a ready line; its other output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, ready_prefix: str, log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     start_new_session=True)
        self._ready_prefix = ready_prefix
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.ready_line: str | None = None

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            self._lines.put(line.strip())
        self._lines.put(None)

    def wait_ready(self, deadline: float) -> str:
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or (line == "" and time.monotonic() >= deadline):
                raise RuntimeError(f"{self.name} did not start (see {self.log_path})")
            if line.startswith(self._ready_prefix):
                self.ready_line = line
                return line

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (each server shuts down cleanly, Ray included), then wait for the processes it
        leaves in its session to end too, so that the next server never shares the box with them."""
        from cluster.bench.processes import end_session

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        exited = time.monotonic()
        killed = end_session(self.proc.pid, timeout)  # start_new_session: the server leads its session
        if killed:
            print(f"{self.name}: {len(killed)} of its processes outlived it by {timeout:.0f} s and were killed",
                  file=sys.stderr, flush=True)
        elif time.monotonic() - exited > 1.0:
            print(f"{self.name}: its last processes ended {time.monotonic() - exited:.1f} s after it",
                  file=sys.stderr, flush=True)
        self._log.close()


def _scrape_completion_tokens(metrics_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gptoss_frontdoor_completion_tokens_total":
                total += sample.value
    return total


def run(args: argparse.Namespace) -> int:
    import tempfile

    from cluster.bench.loadgen import Connection, LoadPlan, run_load
    from cluster.bench.report import summarize
    from cluster.bench.workload import IntRange, SyntheticWorkload

    lengths = dict(prompt_len=IntRange.parse(args.prompt_len, "--prompt-len"),
                   output_len=IntRange.parse(args.output_len, "--output-len"), seed=1)
    workload = SyntheticWorkload(api="generate", **lengths)
    http_workload = SyntheticWorkload(api="completions", **lengths)  # the same token ids
    repo_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    # Ray workers and the servers import this checkout's `cluster`, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    serve_env = dict(env)
    if args.serve_throughput_optimized:
        serve_env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    ours_env = dict(serve_env, GPTOSS_ENGINE_KIND="echo", GPTOSS_ENGINE_ECHO_TOKENS_PER_S=str(args.token_rate),
                    GPTOSS_ENGINE_CHUNK_INTERVAL_MS=str(args.chunk_interval_ms),
                    GPTOSS_ENGINE_MAX_ACTIVE_REQUESTS="4096", GPTOSS_SERVING_MAX_ONGOING_REQUESTS="1024",
                    GPTOSS_SERVING_MAX_QUEUED_REQUESTS="-1", GPTOSS_FRONTDOOR_MAX_CONCURRENT_RPCS="4096",
                    GPTOSS_SERVING_APP_NAME="gptoss-echo-bench")
    py = sys.executable
    rate = str(args.token_rate)
    log_dir = Path(tempfile.mkdtemp(prefix="gptoss-overhead-"))
    servers: dict[str, ServerProcess] = {}
    started = time.monotonic()
    try:
        _log(f"starting the three servers (logs in {log_dir}) ...")
        servers["floor"] = ServerProcess("floor", [py, "-m", "cluster.bench.floor", "--token-rate", rate],
                                         env, "listening ", log_dir)
        servers["serve_proxy"] = ServerProcess("serve_proxy", [py, "-m", "cluster.bench.serve_proxy",
                                                               "--token-rate", rate], serve_env, "listening ", log_dir)
        servers["ours"] = ServerProcess("ours", [py, "-m", "cluster", "serve", "--grpc-port", "0", "--http-port", "0",
                                                 "--metrics-port", "0"], ours_env, "gptoss-cluster: serving", log_dir)
        deadline = time.monotonic() + args.startup_timeout
        targets = {name: s.wait_ready(deadline) for name, s in servers.items()}
        # "gptoss-cluster: serving echo | gRPC H:P | HTTP http://H:P | metrics URL"
        targets["ours_http"] = targets["ours"].split("HTTP http://")[1].split()[0]
        targets["floor"] = targets["floor"].split()[1]
        targets["serve_proxy"] = targets["serve_proxy"].split()[1]
        ours_line = targets["ours"]
        targets["ours"] = ours_line.split("gRPC ")[1].split()[0]
        metrics_url = ours_line.split("metrics ")[1].strip()
        _log(f"servers up in {time.monotonic() - started:.0f} s: {targets}")

        metadata = {"serve_proxy": (("application", "serve-proxy"),)}
        results: dict[str, dict[str, list[dict]]] = {t: {"load": [], "c1": []} for t in TARGETS}
        client_tokens = 0
        before = _scrape_completion_tokens(metrics_url)
        for round_no in range(1, args.rounds + 1):
            for name in TARGETS:
                connection = Connection(target=targets[name], metadata=metadata.get(name, ()))
                api, load_workload = ("completions", http_workload) if name == "ours_http" else ("generate", workload)
                load = run_load(connection, load_workload, LoadPlan(
                    api=api, concurrency=args.concurrency, duration_s=args.duration, warmup_requests=args.concurrency,
                    timeout_s=120.0, seed=round_no))
                c1 = run_load(connection, load_workload, LoadPlan(
                    api=api, concurrency=1, num_requests=args.c1_requests, warmup_requests=5, timeout_s=60.0,
                    seed=round_no))
                s_load, s_c1 = summarize(load.records), summarize(c1.records)
                results[name]["load"].append(s_load)
                results[name]["c1"].append(s_c1)
                if name in ("ours", "ours_http"):  # one front door: its /metrics counts both APIs
                    client_tokens += sum(r.output_tokens for res in (load, c1) for r in res.records + res.warmup)
                _log(f"round {round_no}/{args.rounds} {name:<11} c={args.concurrency}: "
                     f"{s_load['output_token_throughput']:8.0f} tok/s, {s_load['failed']} failed | c=1 TTFT p50 "
                     f"{s_c1['ttft_ms']['p50']:.2f} ms")
        server_tokens = _scrape_completion_tokens(metrics_url) - before
    finally:
        for server in servers.values():
            server.stop()

    def med(name: str, kind: str, pick) -> float:
        return statistics.median(pick(s) for s in results[name][kind])

    tok = {n: med(n, "load", lambda s: s["output_token_throughput"]) for n in TARGETS}
    ttft = {n: med(n, "c1", lambda s: s["ttft_ms"]["p50"]) for n in TARGETS}
    e2e = {n: med(n, "c1", lambda s: s["e2e_ms"]["p50"]) for n in TARGETS}
    per_message = {n: med(n, "load", lambda s: s["output_tokens"] / max(1, s["output_messages"])) for n in TARGETS}
    failed = {n: sum(s["failed"] for kind in ("load", "c1") for s in results[n][kind]) for n in TARGETS}
    figures = {
        "tokens_per_s_ratio_vs_floor": round(tok["ours"] / tok["floor"], 3),
        "tokens_per_s_ratio_vs_serve_proxy": round(tok["ours"] / tok["serve_proxy"], 3),
        "ttft_c1_added_ms": round(ttft["ours"] - ttft["floor"], 3),
        "http_tokens_per_s_ratio_vs_grpc": round(tok["ours_http"] / tok["ours"], 3),
        "http_ttft_c1_added_ms_vs_grpc": round(ttft["ours_http"] - ttft["ours"], 3),
    }
    print(f"overhead: {args.rounds} rounds, median shown; {args.concurrency} streams of {args.output_len} tokens "
          f"at {args.token_rate:g} tokens/s per stream, {args.duration:g} s per throughput run, loopback")
    anchor = ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (--serve-throughput-optimized), for the Serve proxy and ours"
              if args.serve_throughput_optimized else "Ray Serve's defaults for the Serve proxy; ours as "
              "`gptoss-cluster serve` runs by default")
    print(f"overhead: settings: {anchor}")
    print(f"{'target':<12} {'tokens/s':>10} {'tokens/msg':>11} {'TTFT c=1 p50 ms':>16} {'E2E c=1 p50 ms':>15} "
          f"{'failed':>7}")
    for n in TARGETS:
        print(f"{n:<12} {tok[n]:>10.0f} {per_message[n]:>11.2f} {ttft[n]:>16.2f} {e2e[n]:>15.2f} {failed[n]:>7}")
    agreement = abs(client_tokens - server_tokens) / server_tokens if server_tokens else float("nan")
    print(f"ours (gRPC and HTTP): {client_tokens} tokens received, front door /metrics counted {server_tokens:.0f} "
          f"(difference {100 * agreement:.3f}%)")
    for key, goal in GOALS.items():
        at_most = "ttft" in key
        ok = figures[key] <= goal if at_most else figures[key] >= goal
        print(f"{key:<36} {figures[key]:>9.3f}   goal {'<=' if at_most else '>='} {goal:g}: "
              f"{'met' if ok else 'NOT met'}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"args": vars(args) | {"func": None}, "figures": figures, "tokens_per_s": tok,
                       "ttft_c1_p50_ms": ttft, "runs": results, "client_tokens": client_tokens,
                       "server_tokens": server_tokens}, f, default=str)
    print(json.dumps(figures))
    return 0 if not any(failed.values()) else 1
