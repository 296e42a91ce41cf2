"""The serving path kept off the engine's cores (cluster/serving/engine_cores.py), on a real process
tree shaped like `serve`'s: a root (the `serve` process) with a daemon below it (like Ray's raylet)
and a replica actor process (titled ServeReplica, as Ray titles it) whose engine process binds its
threads to core 0, as vLLM's CPU worker does, and keeps one thread on every core, as vLLM's engine
core does. Real affinities, set and read by the kernel; vLLM itself is in the vLLM tier
(tests/vllm_tier/test_plain_vllm_comparison.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.procfs import descendants, threads
from cluster.serving.engine_cores import keep_off

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to keep apart")

ALL = frozenset(os.sched_getaffinity(0))
CORE = min(ALL)

# The daemon and the engine start a second thread; every process waits for stdin to close.
IDLE = "import sys, threading; threading.Thread(target=sys.stdin.read, daemon=True).start(); sys.stdin.read()"
ENGINE = f"""
import os, sys, threading
bound = {{{CORE}}}
os.sched_setaffinity(0, bound)                       # the worker's compute threads: one core
threading.Thread(target=sys.stdin.read, daemon=True).start()
free = threading.Thread(target=lambda: (os.sched_setaffinity(0, {set(ALL)!r}), sys.stdin.read()), daemon=True)
free.start()                                         # and a thread on every core, as the engine core's
print("bound", flush=True)
sys.stdin.read()
"""
REPLICA = f"""
import subprocess, sys
engine = subprocess.Popen([sys.executable, "-c", {ENGINE!r}], stdin=sys.stdin, stdout=subprocess.PIPE, text=True)
engine.stdout.readline()
print("ready", engine.pid, flush=True)
sys.stdin.read()
"""
ROOT = f"""
import subprocess, sys
daemon = subprocess.Popen([sys.executable, "-c", {IDLE!r}, "raylet"], stdin=sys.stdin)
replica = subprocess.Popen([sys.executable, "-c", {REPLICA!r}, "ray::ServeReplica:gptoss:GptOssModel"],
                           stdin=sys.stdin, stdout=subprocess.PIPE, text=True)
print(replica.stdout.readline().strip(), daemon.pid, replica.pid, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def tree():
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _, engine, daemon, replica = root.stdout.readline().split()
        yield {"root": root.pid, "daemon": int(daemon), "replica": int(replica), "engine": int(engine)}
    finally:
        root.stdin.close()
        root.wait(timeout=30)


def affinities(pid: int) -> list[frozenset[int]]:
    return sorted((frozenset(os.sched_getaffinity(tid)) for tid in threads(pid)), key=sorted)


def test_every_other_thread_of_the_tree_leaves_the_engines_bound_core(tree):
    assert descendants(tree["root"]) >= {tree["daemon"], tree["replica"], tree["engine"]}
    free = ALL - {CORE}
    cores, moved = keep_off(tree["root"], set(ALL))
    assert cores == {CORE}
    serving_path = [tree["root"], tree["daemon"], tree["replica"]]
    assert moved == sum(len(threads(pid)) for pid in serving_path) >= 4
    for pid in serving_path:
        assert affinities(pid) == [free] * len(threads(pid)), pid
    # the engine's own threads are its business: the bound ones stay bound, the free one stays free
    assert affinities(tree["engine"]) == sorted([frozenset({CORE})] * 2 + [ALL], key=sorted)
    # a second pass finds nothing left to move
    assert keep_off(tree["root"], set(ALL)) == ({CORE}, 0)


def test_nothing_moves_where_no_engine_binds_its_threads(tree):
    """The torch engine and GPU engines bind nothing: no core is the engine's, every thread stays."""
    before = {pid: affinities(pid) for pid in tree.values()}
    assert keep_off(tree["daemon"], set(ALL)) == (set(), 0)  # a tree with no replica below it
    os.sched_setaffinity(tree["engine"], set(ALL))  # the engine's main thread no longer bound...
    for tid in threads(tree["engine"]):
        os.sched_setaffinity(tid, set(ALL))  # ...nor any other: an engine that binds nothing
    assert keep_off(tree["root"], set(ALL)) == (set(), 0)
    for pid in (tree["root"], tree["daemon"], tree["replica"]):
        assert affinities(pid) == before[pid]


def test_an_engine_bound_to_every_core_leaves_nothing_to_move_to(tree):
    """Where the engine binds every core the box has, the rest keeps running everywhere."""
    cores, moved = keep_off(tree["root"], {CORE})  # as if the box had one core, the engine's
    assert (cores, moved) == (set(), 0)  # {CORE} is not narrower than the box: not a binding
    for tid in threads(tree["root"]):
        assert os.sched_getaffinity(tid) == set(ALL)


def test_a_replica_starts_its_engine_on_every_core_again():
    """A replica process the keeper moved to the free cores gives its engine every core back, so
    vLLM's auto binding sees the whole box (it binds within the cores it inherits)."""
    code = f"""
import os
from cluster.serving.engine_cores import unpin_for_engine
os.sched_setaffinity(0, {set(ALL - {CORE})!r})
unpin_for_engine()
print(sorted(os.sched_getaffinity(0)))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(os.sched_getaffinity(1)))


KEEPER = """
import os, time
from cluster.serving.engine_cores import EngineCoreKeeper
keeper = EngineCoreKeeper(period_s=0.2).start()
deadline = time.monotonic() + 30
while not keeper.engine_cores and time.monotonic() < deadline:
    time.sleep(0.05)
keeper.stop()
print(sorted(keeper.engine_cores), sorted(os.sched_getaffinity(0)), keeper._thread.is_alive(), flush=True)
"""


def test_the_keeper_runs_over_the_tree_of_its_own_process_and_stops():
    """EngineCoreKeeper, as `serve` runs it: in the root of the tree, every period_s, until stop()."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    root = subprocess.Popen([sys.executable, "-c", ROOT.replace("sys.stdin.read()\n", "") + KEEPER],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        root.stdout.readline()  # the tree is up
        assert root.stdout.readline().strip() == f"{[CORE]} {sorted(ALL - {CORE})} False"
    finally:
        root.stdin.close()
        root.wait(timeout=30)
