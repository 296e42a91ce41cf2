"""Keep the serving path off the cores a replica's engine binds its compute threads to.

vLLM's CPU build binds its worker's threads to cores of their own (VLLM_CPU_OMP_THREADS_BIND; its
"auto" keeps one core of a small box for everything else), but nothing keeps everything else off
those cores: the front door, Ray's daemons, the Serve controller and the replica actors float over
every core and preempt the engine in the middle of a step. On a 2-core box, moving them to the
core vLLM left free made the engine's steps regular: 3-15% more tokens/s at 32 streams and ~1 ms
off the first token at concurrency 1 (docs/performance.md, "The serving path off the engine's
cores").

`gptoss-cluster serve` runs an EngineCoreKeeper: every PERIOD_S it reads /proc below its own
process, finds the Serve replicas' engine processes (every process below a replica actor), the
cores their threads are bound to (any affinity narrower than the cores `serve` started with), and
takes those cores out of the affinity of every other thread in its tree, itself included. Nothing
changes where no engine binds its threads (the torch engine, GPU engines), where it binds every
core, or on other nodes (their processes are not below `serve`).
"""

from __future__ import annotations

import logging
import os
import threading

from cluster.procfs import descendants, process_table, serve_replicas, threads

log = logging.getLogger(__name__)

PERIOD_S = 5.0  # new Ray workers and replicas are taken in within this


def _affinity(tid: int) -> set[int] | None:
    try:
        return os.sched_getaffinity(tid)
    except OSError:  # the thread has ended
        return None


def engine_processes(root: int, table: dict) -> set[int]:
    """Every process below the Serve replica actors below `root`: their engines' processes."""
    replicas = serve_replicas(root, table)
    return set().union(*(descendants(pid, table) for pid in replicas)) if replicas else set()


def bound_cores(pids: set[int], allowed: set[int]) -> set[int]:
    """The cores that threads of `pids` are bound to: every affinity narrower than `allowed`."""
    cores: set[int] = set()
    for pid in pids:
        for tid in threads(pid):
            affinity = _affinity(tid)
            if affinity is not None and affinity < allowed:
                cores |= affinity
    return cores


def keep_off(root: int, allowed: set[int]) -> tuple[set[int], int]:
    """One pass: the engine's bound cores below `root`, and how many other threads of `root`'s tree
    were moved off them (to what was left of their affinity, else to the free cores)."""
    table = process_table()
    engine = engine_processes(root, table)
    cores = bound_cores(engine, allowed)
    free = allowed - cores
    if not cores or not free:
        return cores, 0
    moved = 0
    for pid in ({root} | descendants(root, table)) - engine:
        for tid in threads(pid):
            affinity = _affinity(tid)
            if affinity is None or not affinity & cores:
                continue
            try:
                os.sched_setaffinity(tid, (affinity - cores) or free)
                moved += 1
            except OSError:  # ended meanwhile, or not ours to move
                continue
    return cores, moved


class EngineCoreKeeper:
    """A daemon thread of `serve` running keep_off over its own tree every PERIOD_S until stop()."""

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.period_s = period_s
        self.allowed = os.sched_getaffinity(0)
        self.engine_cores: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-core-keeper", daemon=True)

    def start(self) -> "EngineCoreKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.period_s + 5.0)

    def _run(self) -> None:
        root = os.getpid()
        while True:
            try:
                cores, moved = keep_off(root, self.allowed)
            except OSError as err:  # /proc unreadable: say so once and stop trying
                log.warning("cannot keep the serving path off the engine's cores: %s", err)
                return
            if cores != self.engine_cores and cores and moved:
                log.info("serving path kept off the engine's cores %s (it runs on %s)",
                         _cpu_list(cores), _cpu_list(self.allowed - cores))
            self.engine_cores = cores
            if self._stop.wait(self.period_s):
                return


def _cpu_list(cores: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cores))


def unpin_for_engine() -> None:
    """Give the calling thread every core of the box again before it starts an engine, so that the
    engine's processes (they inherit this thread's affinity) bind their threads as on a fresh box,
    not within the free cores an EngineCoreKeeper moved this replica's process to."""
    try:
        cores = os.sched_getaffinity(1)  # init's: the cores this container or machine has
    except OSError:
        cores = set(range(os.cpu_count() or 1))
    try:
        os.sched_setaffinity(0, cores)
    except OSError:
        pass
