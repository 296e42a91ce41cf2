"""One vLLM engine core, two front ends: the replica's AsyncLLM and a front door's on the same node.

A request through a replica crosses three processes: the front door, the replica (its AsyncLLM:
input and output processing) and vLLM's engine core. `vllm serve` has two: its API server is the
engine core's client itself. vLLM lets several processes be clients of one engine core (its
`--api-server-count`): each has its own pair of ZMQ sockets, whose addresses the engine core learns
when it starts, and the core sends each request's outputs to the client that sent it. So a replica
starts its engine core with one client more than it uses (`launch`), and publishes that slot
(`ClientSlot`) in its replica metadata; a front door on the same node attaches an AsyncLLM of its
own to it (`attach`) and streams from the engine core directly, one process fewer on every token's
way. The replica's own client still serves the Serve handle and the direct stream.

What the extra client changes, and how it is kept right:
- Engine death: a client vLLM did not start does not watch the engine's processes. The replica's
  client is handed the process manager, so vLLM's own monitor fails its requests (EngineDeadError)
  as it does for an engine it started; the front door's client is failed the same way by `Watch`,
  which polls the engine core's pid (same node, same pid namespace: the slot's hostname and
  directory prove it).
- Load signals: the engine core sends each step's scheduler statistics (running, waiting, KV use,
  prefix-cache counts) to one client only: the first that has outputs in that step. The front
  door's client therefore writes what it saw (its VllmEngine's EngineStats, with the time of its
  last scheduler report) to `stats.json` in the slot's directory twice a second; the replica merges
  it into its own (`merge`), so routing, autoscaling and the replica's metrics count every request.
- One attachment per engine: the engine core sends its "ready" message to each client address once,
  at start; a second client binding the same address would wait for it forever. A front door claims
  the slot (`claim` file, O_EXCL) before it attaches; a slot claimed once is never attached again.
- A front door that dies leaves its requests running in the engine to their max_tokens (no client
  to abort them), their outputs queued unread; nothing blocks (vLLM's sockets have no high-water mark).

Only for an engine whose clients talk to it over IPC sockets: one data-parallel rank, no Ray
executor (vllm_engine.py decides).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cluster.engine.protocol import EngineStats
from cluster.procfs import alive

log = logging.getLogger(__name__)

STATS_FILE = "stats.json"
CLAIM_FILE = "claim"
WATCH_PERIOD_S = 0.25
STATS_EVERY = 2  # watch periods between two writes of the front door's stats
STATS_FRESH_S = 5.0  # an older stats file (its writer gone) is ignored
READY_TIMEOUT_S = 30  # the engine core answers a new client at once when it is alive


@dataclass(frozen=True)
class ClientSlot:
    """Where a front door attaches to a replica's engine core (published in replica metadata)."""

    input_address: str
    output_address: str
    index: int
    count: int
    engine_pid: int
    hostname: str
    directory: str  # the replica's directory for this engine: the claim and the stats file
    engine_args: dict[str, Any]  # vLLM's, as the replica started the engine core with them
    engine_config: dict[str, Any]  # the replica's engine section (EngineConfig), for VllmEngine

    def to_metadata(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> "ClientSlot | None":
        try:
            return cls(**metadata) if metadata else None
        except TypeError:  # a replica of another version
            return None

    def is_local(self) -> bool:
        """Whether this process runs on the slot's node: same host name, and the directory exists."""
        return self.hostname == socket.gethostname() and os.path.isdir(self.directory)

    def claim(self) -> bool:
        """Take the slot for this process; False when it was ever taken (by anyone, this one included)."""
        try:
            fd = os.open(Path(self.directory) / CLAIM_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def vllm_config_for(engine_args: dict[str, Any]):
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    return AsyncEngineArgs(**engine_args).create_engine_config(UsageContext.ENGINE_CONTEXT)


def launch(vllm_config, engine_args: dict[str, Any], engine_config: dict[str, Any], stat_loggers: list,
           extra_clients: int):
    """Start the engine core for 1 + `extra_clients` clients and this process's AsyncLLM as client 0.
    Returns (AsyncLLM, the extra clients' slots, the directory to remove at shutdown)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.utils import EngineZmqAddresses, get_engine_zmq_bind_addresses, launch_core_engines
    from vllm.v1.executor import Executor

    count = 1 + extra_clients
    bind = get_engine_zmq_bind_addresses(vllm_config, count)
    addresses = EngineZmqAddresses(inputs=list(bind.inputs), outputs=list(bind.outputs))
    with launch_core_engines(vllm_config, Executor.get_class(vllm_config), True, addresses) as started:
        pass  # leaving the block waits for the engine core's start-up handshake (the model is loaded)
    manager = started.engine_manager
    llm = AsyncLLM.from_vllm_config(vllm_config, stat_loggers=stat_loggers, disable_log_stats=True,
                                    client_addresses={"input_address": addresses.inputs[0],
                                                      "output_address": addresses.outputs[0]},
                                    client_count=count, client_index=0)
    # vLLM's own monitor then fails this client's requests and stops the engine, as for an engine it started.
    llm.engine_core.resources.engine_manager = manager
    llm.engine_core.start_engine_core_monitor()
    directory = tempfile.mkdtemp(prefix="gptoss-engine-")
    pid = manager.processes[0].pid
    slots = [ClientSlot(addresses.inputs[i], addresses.outputs[i], i, count, pid, socket.gethostname(), directory,
                        dict(engine_args), dict(engine_config)) for i in range(1, count)]
    return llm, slots, directory


def attach(slot: ClientSlot, stat_loggers: list):
    """This process's AsyncLLM as `slot`'s client (the slot must be claimed: see ClientSlot.claim)."""
    os.environ["VLLM_ENGINE_READY_TIMEOUT_S"] = str(READY_TIMEOUT_S)  # this process starts no engine
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_vllm_config(vllm_config_for(slot.engine_args), stat_loggers=stat_loggers,
                                     disable_log_stats=True,
                                     client_addresses={"input_address": slot.input_address,
                                                       "output_address": slot.output_address},
                                     client_count=slot.count, client_index=slot.index)


def remove_directory(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


class Watch:
    """The front door's thread beside an attached client: fails the client once the engine core's
    process is gone, and writes the client's stats for the replica every STATS_EVERY periods."""

    def __init__(self, llm, slot: ClientSlot, stats: Callable[[], tuple[EngineStats, float]]) -> None:
        self._llm = llm
        self._slot = slot
        self._stats = stats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-engine-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(WATCH_PERIOD_S):
            if not alive(self._slot.engine_pid):
                log.warning("vLLM engine core (pid %d) is gone: failing this front door's streams from it",
                            self._slot.engine_pid)
                core = self._llm.engine_core
                core.resources.engine_dead = True
                core.shutdown()
                return
            ticks += 1
            if ticks % STATS_EVERY == 0:
                write_stats(self._slot.directory, *self._stats())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * WATCH_PERIOD_S + 1)


def write_stats(directory: str, stats: EngineStats, scheduler_at: float) -> None:
    """Replace `directory`/stats.json with `stats` (atomically: the replica never reads half a file)."""
    payload = json.dumps({"written_at": time.time(), "scheduler_at": scheduler_at,
                          "stats": dataclasses.asdict(dataclasses.replace(stats, expert_load=None))})
    try:
        tmp = Path(directory) / f".{STATS_FILE}.{os.getpid()}"
        tmp.write_text(payload)
        os.replace(tmp, Path(directory) / STATS_FILE)
    except OSError:  # the replica removed its directory: it is stopping
        pass


def read_stats(directory: str) -> tuple[EngineStats, float] | None:
    """(the front door's stats, the time of its last scheduler report), or None: none, or stale."""
    try:
        data = json.loads((Path(directory) / STATS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if time.time() - data["written_at"] > STATS_FRESH_S:
        return None
    return EngineStats(**data["stats"]), data["scheduler_at"]


def merge(own: EngineStats, own_scheduler_at: float, other: EngineStats, other_scheduler_at: float) -> EngineStats:
    """The engine's stats over both clients: request counts add up; the scheduler's view (running,
    waiting in vLLM, KV use) is whichever client got the latest scheduler report."""
    latest = own if own_scheduler_at >= other_scheduler_at else other
    active = own.active_requests + other.active_requests
    return EngineStats(
        active_requests=active,
        requests_total=own.requests_total + other.requests_total,
        finished_total=own.finished_total + other.finished_total,
        cancelled_total=own.cancelled_total + other.cancelled_total,
        failed_total=own.failed_total + other.failed_total,
        tokens_generated_total=own.tokens_generated_total + other.tokens_generated_total,
        running_requests=latest.running_requests,
        waiting_requests=max(latest.waiting_requests, active - latest.running_requests),
        kv_blocks_used=latest.kv_blocks_used, kv_blocks_total=own.kv_blocks_total,
        prefix_cache_queried_tokens_total=own.prefix_cache_queried_tokens_total
        + other.prefix_cache_queried_tokens_total,
        prefix_cache_hit_tokens_total=own.prefix_cache_hit_tokens_total + other.prefix_cache_hit_tokens_total,
        preemptions_total=own.preemptions_total + other.preemptions_total,
        generation_tokens_per_s=own.generation_tokens_per_s + other.generation_tokens_per_s,
        expert_load=own.expert_load,
    )
