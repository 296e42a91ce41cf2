"""`gptoss-cluster bench experts`: expert parallelism on this box, ratios measured in one run.

1. Throughput: the batching engine (EngineCore) decodes the same greedy workload at ep_size 1 and
   ep_size 2 (rank 0 here, rank 1 a Ray actor; gloo forms the group, the per-step collectives run
   in shared memory, parallel/shm_collectives.py). Runs alternate; each side's best run counts. On
   2 cores no speed-up is expected: the ratio is the collectives' cost. ep1 and rank 0 get
   `--threads` torch threads, rank 1 `--worker-threads`; rank 0 runs its layers on the workers'
   count too and only its unembedding and sampling on its own (group.ShardRuntime). Idle OpenMP
   threads of both ranks sleep (OMP_WAIT_POLICY=PASSIVE, set here before torch loads and in
   workers.WORKER_ENV): spinning ones take the core the other rank needs. That also slows ep1 in
   this process, while a real ep_size 1 replica keeps OpenMP's defaults (spinning gained ep1 ~30%
   at 2 threads on the 2-core box), so ep1 runs twice: in this process, and in a fresh process
   started without OMP_WAIT_POLICY. The headline ratio is against the faster ep1; the same-process
   one is kept.
2. Bytes per decode step per layer: bytes every rank sent, over K decode steps: its process's
   writes (Linux /proc/<pid>/io wchar: gloo's socket writes; minus the same idle interval's) plus
   the bytes it copied into the shared-memory segment (no socket counter sees those), against the
   minimum for the all-reduce combine: two SUM all-reduces of [T, H] per layer, each of which must
   move at least 2 (N - 1) T H b bytes in total (reduce-scatter + all-gather bound).
3. Combine choice: at the same small batch, two real processes (a gloo group) time one layer's
   collectives (a) all-reduce after attention and after the MoE (head-split attention, replicated
   tokens), with gloo's all_reduce, with the pairwise gloo exchange (group.Collectives' fallback),
   and in shared memory (as the group runs on one node), and (b) all-to-all dispatch + combine
   with token counts first (data-parallel attention, as DeepEP), on gloo. Bytes as in 2.

The last line is one JSON object: ep2_over_ep1_throughput (against the best ep1),
ep2_over_ep1_same_process, bytes_per_step_over_minimum, and the details. No GPU figures unless
run where CUDA is available (not measured in this version).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def add_parser(commands) -> None:
    p = commands.add_parser("experts", help="expert parallelism: ep2/ep1 tokens/s, collective bytes, combine choice",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--sequences", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per sequence (default 32)")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default 8)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side (default 3)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of this process: ep1, and rank 0 of ep2 (default 2, capped at the cores)")
    p.add_argument("--worker-threads", type=int, default=1,
                   help="torch threads of rank 1, and of rank 0's layers (default 1)")
    p.add_argument("--cache-dir", default=None, help="checkpoint cache (default: a temp dir)")
    p.set_defaults(func=run)


def _workload(vocab: int, n: int, prompt_len: int, new_tokens: int, tag: str):
    import torch

    from cluster.engine.sequence import SamplingSettings, Sequence

    g = torch.Generator().manual_seed(0)
    settings = SamplingSettings(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    return [Sequence(f"{tag}{i}", torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), settings)
            for i in range(n)]


def _timed(core, seqs) -> tuple[float, int]:
    from cluster.engine.core import run_to_completion

    t0 = time.perf_counter()
    out = run_to_completion(core, seqs)
    return time.perf_counter() - t0, sum(len(v) for v in out.values())


def _ep1_fresh_proc(conn, path: str, threads: int, engine_kwargs: dict, workload: tuple) -> None:
    """ep_size 1 in its own process, started with OpenMP's defaults as an ep_size 1 replica runs:
    one timed run per message from the parent, so its runs alternate with the parent's."""
    import torch

    from cluster.config import EngineConfig
    from cluster.engine.core import EngineCore
    from cluster.model.checkpoint import load_model

    torch.set_num_threads(threads)
    core = EngineCore(load_model(path), EngineConfig(**engine_kwargs))
    conn.send({"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads()})
    while (tag := conn.recv()) is not None:
        seqs = _workload(*workload, tag)
        dt, n = _timed(core, seqs)
        conn.send((n / dt, [list(s.output_token_ids) for s in seqs]))
    conn.close()


def start_ep1_fresh(path: str, threads: int, engine_kwargs: dict, workload: tuple):
    """Spawn `_ep1_fresh_proc` without OMP_WAIT_POLICY in its environment; returns (process, pipe, its hello)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_ep1_fresh_proc, args=(child, path, threads, engine_kwargs, workload), daemon=True)
    saved = os.environ.pop("OMP_WAIT_POLICY", None)  # the child inherits the environment at start
    try:
        proc.start()
    finally:
        if saved is not None:
            os.environ["OMP_WAIT_POLICY"] = saved
    child.close()
    if not parent.poll(300):
        proc.kill()
        raise RuntimeError("the fresh ep1 process did not start within 300 s")
    return proc, parent, parent.recv()


def _combine_proc(rank: int, world: int, port: int, tokens: int, hidden: int, top_k: int, experts: int,
                  iters: int, queue) -> None:
    """One rank of the combine comparison: per-layer collective time and bytes written, both designs."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from cluster.parallel.collectives import Collectives
    from cluster.parallel.shm_collectives import join_shm
    from cluster.parallel.workers import io_write_bytes

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden)
    route = torch.randint(0, experts, (tokens, top_k), generator=g)  # synthetic routing
    owner = route // (experts // world)  # contiguous placement

    def all_reduce_layer():
        a = x.clone()
        dist.all_reduce(a)  # after attention (head-split)
        b = x.clone()
        dist.all_reduce(b)  # after the MoE

    pairwise = Collectives(rank, world, pairwise=True)

    def pairwise_layer():  # the two all-reduces as the group runs them on gloo across nodes
        pairwise.all_reduce(x.clone())
        pairwise.all_reduce(x.clone())

    shm = Collectives(rank, world, pairwise=True)
    shm.use_shm(join_shm(store, rank, world, timeout_s=30.0))
    if shm.shm is None:
        raise RuntimeError("this host cannot run the shared-memory collectives (see shm_collectives.available)")

    def shm_layer():  # the two all-reduces as the group runs them on one node
        shm.all_reduce(x.clone())
        shm.all_reduce(x.clone())

    local = x[: tokens // world]  # data-parallel attention: each rank owns T / N tokens
    local_owner = owner[: tokens // world]

    def all_to_all_layer():
        # a token goes once to each distinct rank holding one of its chosen experts
        dests = [sorted(set(row.tolist())) for row in local_owner]
        send_counts = torch.tensor([sum(r in d for d in dests) for r in range(world)])
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        rows = [i for r in range(world) for i, d in enumerate(dests) if r in d]
        send = local[rows]
        recv = torch.empty(int(recv_counts.sum()), hidden)
        dist.all_to_all_single(recv, send, recv_counts.tolist(), send_counts.tolist())  # dispatch
        back = torch.empty_like(send)
        dist.all_to_all_single(back, recv, send_counts.tolist(), recv_counts.tolist())  # combine

    designs = (("all_reduce", all_reduce_layer), ("all_reduce_pairwise", pairwise_layer),
               ("all_reduce_shm", shm_layer), ("all_to_all", all_to_all_layer))
    times: dict[str, list[float]] = {name: [] for name, _ in designs}
    written: dict[str, int] = {name: 0 for name, _ in designs}
    block = max(1, iters // 8)
    for _ in range(20):
        for _, fn in designs:
            fn()
    for _ in range(8):  # interleaved blocks: background load on a shared box hits both designs alike
        for name, fn in designs:
            dist.barrier()
            w0, s0, t0 = io_write_bytes(), shm.shm_bytes, time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t0) / block)
            written[name] += io_write_bytes() - w0 + shm.shm_bytes - s0
    result = {name: {"us_per_layer": 1e6 * statistics.median(times[name]),
                     "bytes_sent_per_layer": written[name] / (8 * block)} for name, _ in designs}
    queue.put((rank, result))
    shm.shm.close()
    dist.destroy_process_group()


def measure_combines(tokens: int, hidden: int, top_k: int, experts: int, world: int = 2, iters: int = 300) -> dict:
    import torch.multiprocessing as mp

    from cluster.sockets import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_combine_proc, args=(r, world, port, tokens, hidden, top_k, experts, iters, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
    out = {}
    for name in ("all_reduce", "all_reduce_pairwise", "all_reduce_shm", "all_to_all"):
        out[name] = {
            "us_per_layer": round(max(results[r][name]["us_per_layer"] for r in results), 1),
            "bytes_sent_per_layer": sum(results[r][name]["bytes_sent_per_layer"] for r in results),
        }
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("warning: torch was loaded before the bench could set OMP_WAIT_POLICY=PASSIVE", file=sys.stderr)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
    import ray
    import torch

    from cluster.config import EngineConfig
    from cluster.engine.core import EngineCore
    from cluster.model.checkpoint import load_model
    from cluster.parallel.workers import ep_forward_factory
    from cluster.serving.model_store import ensure_preset_checkpoint

    threads = max(1, min(args.threads, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="gtbench")
    path = ensure_preset_checkpoint(args.preset, Path(cache))
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        started = True
    engine_kwargs = dict(block_size=16, max_num_seqs=args.sequences, max_num_batched_tokens=256,
                         kv_cache_memory_mib=16)
    engine = EngineConfig(**engine_kwargs)
    ep1_model = load_model(path)
    vocab = ep1_model.config.vocab_size
    L, H = ep1_model.config.num_hidden_layers, ep1_model.config.hidden_size
    workload = (vocab, args.sequences, args.prompt_len, args.new_tokens)
    fresh_proc, fresh, fresh_hello = start_ep1_fresh(str(path), threads, engine_kwargs, workload)
    ep1 = EngineCore(ep1_model, engine)
    groups = []
    ep2 = EngineCore(load_model(path), engine, ep_forward_factory(str(path), 2, model=load_model(path),
                                                                  on_start=groups.append,
                                                                  torch_threads=args.worker_threads))
    group = groups[0]
    try:
        runs = {"ep1": [], "ep1_fresh": [], "ep2": []}
        tokens_out = {}
        for i in range(args.runs + 1):  # the first round warms up
            for name, core in (("ep1", ep1), ("ep1_fresh", None), ("ep2", ep2)):
                tag = f"{name}-{i}-"
                if core is None:
                    fresh.send(tag)
                    rate, tokens_out[name] = fresh.recv()
                else:
                    seqs = _workload(*workload, tag)
                    dt, n = _timed(core, seqs)
                    rate, tokens_out[name] = n / dt, [list(s.output_token_ids) for s in seqs]
                if i:
                    runs[name].append(rate)
        fresh.send(None)
        fresh_proc.join(30)
        same_tokens = tokens_out["ep1"] == tokens_out["ep2"] == tokens_out["ep1_fresh"]
        best = {k: max(v) for k, v in runs.items()}

        # bytes per decode step: prefill first, then count K decode steps at batch T
        seqs = _workload(*workload, "bytes-")
        for s in seqs:
            ep2.add_request(s)
        ep2.step()  # the prompts (one chunk each)
        K = args.new_tokens // 2
        before, shm_before, t0 = group.io_write_bytes(), group.shm_bytes(), time.perf_counter()
        for _ in range(K):
            ep2.step()
        busy, after, shm_after = time.perf_counter() - t0, group.io_write_bytes(), group.shm_bytes()
        time.sleep(busy)
        idle = [b - a for a, b in zip(after, group.io_write_bytes())]
        while ep2.has_unfinished():
            ep2.step()
        # other writers (logs) can make the idle interval write more than the busy one: not below 0
        socket_moved = max(0, sum(b - a for a, b in zip(before, after)) - sum(idle))
        shm_moved = sum(b - a for a, b in zip(shm_before, shm_after))
        moved = socket_moved + shm_moved
        T, N = args.sequences, 2
        minimum = 2 * (2 * (N - 1) * T * H * 4)  # two fp32 [T, H] all-reduces per layer
        per_layer = moved / (K * L)
    finally:
        if fresh_proc.is_alive():
            fresh_proc.kill()
        group.shutdown()
        if started:
            ray.shutdown()
    combines = measure_combines(args.sequences, H, ep1_model.config.num_experts_per_tok,
                                ep1_model.config.num_local_experts)
    ep1_best = max(("ep1", "ep1_fresh"), key=best.get)
    ratio = best["ep2"] / best[ep1_best]
    same_process_ratio = best["ep2"] / best["ep1"]
    omp = os.environ.get("OMP_WAIT_POLICY")
    fresh_omp = fresh_hello["omp_wait_policy"]
    described = {"ep1": f"same process, OMP_WAIT_POLICY={omp}",
                 "ep1_fresh": f"fresh process, OMP_WAIT_POLICY={fresh_omp}" if fresh_omp else
                 "fresh process, OpenMP defaults (OMP_WAIT_POLICY unset)"}
    print(f"{args.preset}: {args.sequences} sequences x {args.new_tokens} tokens, greedy, float32; torch threads: "
          f"ep1 same process {threads}, ep1 fresh process {fresh_hello['threads']}, "
          f"ep2 rank 0 {threads} (its layers {args.worker_threads}) + rank 1 {args.worker_threads}")

    def runs_of(name):
        return ", ".join(f"{v:.0f}" for v in runs[name])

    print(f"  ep1 {described['ep1']}: {best['ep1']:.1f} tok/s (runs {runs_of('ep1')})")
    print(f"  ep1 {described['ep1_fresh']}: {best['ep1_fresh']:.1f} tok/s (runs {runs_of('ep1_fresh')})")
    print(f"  ep2 (OMP_WAIT_POLICY={omp} on both ranks): {best['ep2']:.1f} tok/s (runs {runs_of('ep2')})")
    print(f"  ep2/ep1 {ratio:.3f} against the best ep1, {described[ep1_best]}; {same_process_ratio:.3f} against "
          f"ep1 in the same process; same greedy tokens: {same_tokens}")
    print(f"  decode step at T={T}: {per_layer:.0f} B sent per layer (all ranks: "
          f"{socket_moved / (K * L):.0f} B socket writes + {shm_moved / (K * L):.0f} B copied into shared memory) "
          f"vs minimum {minimum} B for two all-reduces of [T, H] fp32 -> {per_layer / minimum:.2f}x")
    for name, c in combines.items():
        print(f"  combine {name:19s}: {c['us_per_layer']:.0f} us per layer, {c['bytes_sent_per_layer']:.0f} B sent "
              f"(socket writes + shared-memory copies)")
    median_ep1 = max(statistics.median(runs["ep1"]), statistics.median(runs["ep1_fresh"]))
    print(json.dumps({
        "ep2_over_ep1_throughput": round(ratio, 4),
        "ep2_over_ep1_same_process": round(same_process_ratio, 4),
        "bytes_per_step_over_minimum": round(per_layer / minimum, 4),
        "ep1_best": {"ep1": "same_process", "ep1_fresh": "fresh_process"}[ep1_best],
        "ep1_tokens_per_s": round(best[ep1_best], 2), "ep2_tokens_per_s": round(best["ep2"], 2),
        "ep1_same_process_tokens_per_s": round(best["ep1"], 2),
        "ep1_fresh_process_tokens_per_s": round(best["ep1_fresh"], 2),
        "ep1_same_process_runs": [round(v, 2) for v in runs["ep1"]],
        "ep1_fresh_process_runs": [round(v, 2) for v in runs["ep1_fresh"]],
        "ep2_runs": [round(v, 2) for v in runs["ep2"]],
        "median_ratio": round(statistics.median(runs["ep2"]) / median_ep1, 4),
        "omp_wait_policy": {"ep1_same_process": omp, "ep1_fresh_process": fresh_hello["omp_wait_policy"],
                            "ep2": omp},
        "same_greedy_tokens": same_tokens,
        "bytes_per_decode_step_per_layer": round(per_layer, 1), "minimum_bytes_per_layer": minimum,
        "bytes_per_decode_step_per_layer_by_path": {"socket_writes": round(socket_moved / (K * L), 1),
                                                    "shm_copies": round(shm_moved / (K * L), 1)},
        "decode_batch": T, "threads": {"ep1_same_process": threads, "ep1_fresh_process": fresh_hello["threads"],
                    "ep2_rank0": threads, "ep2_rank0_layers": args.worker_threads,
                    "ep2_rank1": args.worker_threads},
        "combine": combines, "gpu": "not measured (no GPU in this run)",
    }))
    return 0
