"""CPU seconds per 1000 streamed tokens of the serving path (issue 24), on this machine.

Starts `gptoss-cluster serve` with the echo engine (no model: the replica's engine work is next to
nothing, so what is measured is the serving path), loads it with `gptoss-cluster bench serving`
(Generate, 256-token prompts, exactly 128 output tokens; 32 warm-up requests, then 256 requests at
32 streams and 20 at concurrency 1), and reads the CPU time (utime + stime, all threads) of the
`serve` process (front door + Ray driver) and of the replica actor from /proc/<pid>/stat around
each run; an idle 10 s comes first as the baseline.

    python scripts/cpu_per_token.py [ECHO_TOKENS_PER_S]   (default 100: one token per 10 ms chunk)

Prints one JSON line per measurement. Linux only; stops the server it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from cluster.bench.processes import cpu_s
from cluster.procfs import serve_replicas
from cluster.sockets import free_port

OUTPUT_LEN = 128


def main() -> None:
    port = free_port()
    env = dict(os.environ, GPTOSS_ENGINE_KIND="echo", GPTOSS_FRONTDOOR_GRPC_PORT=str(port),
               GPTOSS_FRONTDOOR_METRICS_PORT=str(free_port()), GPTOSS_FRONTDOOR_HTTP_PORT=str(free_port()),
               GPTOSS_ENGINE_ECHO_TOKENS_PER_S=sys.argv[1] if len(sys.argv) > 1 else "100",
               GPTOSS_RAY_NUM_CPUS="2", GPTOSS_CACHE_DIR=tempfile.mkdtemp(prefix="gptoss-cpu-"),
               GPTOSS_SERVING_MAX_ONGOING_REQUESTS="128")
    serve = subprocess.Popen([sys.executable, "-m", "cluster", "serve"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in serve.stdout:
            if "gptoss-cluster: serving" in line:
                break
        else:
            raise SystemExit("serve exited before serving")
        front = [serve.pid]
        replica = serve_replicas(serve.pid)
        bench = [sys.executable, "-m", "cluster", "bench", "serving", "--target", f"127.0.0.1:{port}",
                 "--api", "generate", "--prompt-len", "256", "--output-len", str(OUTPUT_LEN), "--quiet"]
        subprocess.run(bench + ["--concurrency", "32", "--num-requests", "32"], check=True, capture_output=True)
        idle = (cpu_s(front), cpu_s(replica))
        time.sleep(10)
        print(json.dumps({"idle_10s_frontdoor_cpu_s": round(cpu_s(front) - idle[0], 2),
                          "idle_10s_replica_cpu_s": round(cpu_s(replica) - idle[1], 2)}), flush=True)
        for concurrency, requests in ((32, 256), (1, 20)):
            before = (cpu_s(front), cpu_s(replica))
            out = subprocess.run(bench + ["--concurrency", str(concurrency), "--num-requests", str(requests)],
                                 check=True, capture_output=True, text=True).stdout
            front_s, replica_s = cpu_s(front) - before[0], cpu_s(replica) - before[1]
            summary = json.loads(out.strip().splitlines()[-1])
            tokens = summary["output_tokens"]
            print(json.dumps({"concurrency": concurrency, "output_tokens": tokens,
                              "output_tokens_per_s": round(summary["output_token_throughput"], 1),
                              "frontdoor_cpu_s_per_1k_tokens": round(front_s / tokens * 1000, 3),
                              "replica_cpu_s_per_1k_tokens": round(replica_s / tokens * 1000, 3)}), flush=True)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()


if __name__ == "__main__":
    main()
