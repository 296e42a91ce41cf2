"""The front door's own clients of the vLLM engine cores of replicas on its node.

A replica with a vLLM engine (serving.frontdoor_engine_client) publishes, beside its direct-stream
address, a slot for one more client of its engine core (cluster/engine/vllm_shared.py). The first
time this front door sees such a replica, and the slot is on this node, it claims the slot and
attaches a client of its own (it reads the model's config and connects: well under a second). The
first attachment of a process imports vLLM (seconds) and runs on the caller's thread, the event loop:
imports in a second thread next to the loop's own imports have deadlocked (Python's module locks)
and left half-imported modules behind. It happens when the front door first sees its replicas, at
start; later ones (a replica restarted or added) import nothing new and run in a thread. From
then on, a request the router sends to that replica is handed to its engine core from here
(EngineStream): the same routing, in-flight accounting, deadline
and cancellation as the direct stream, one process fewer on every token's way. Until the client is
ready, for replicas on other nodes, and for a slot another process took, requests take the direct
stream as before.

The client is shut down when its replica leaves the routable set; its engine core's death fails its
streams (EngineDead), which the front door resumes elsewhere as for a lost replica.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import AsyncIterator

from cluster.engine.request import GenerateRequest, TokenChunk
from cluster.serving.deadline import timed_until_deadline

log = logging.getLogger(__name__)

ENGINE_CLIENT_KEY = "engine_client"  # replica metadata: a vllm_shared.ClientSlot
_attached_before = False  # whether this process attached once (vLLM and what attaching imports are loaded)


class EngineClients:
    """Attached engine clients by the direct-stream address of their replica."""

    def __init__(self) -> None:
        self._engines: dict[str, object] = {}  # address -> VllmEngine
        self._offered: set[str] = set()
        self._lock = threading.Lock()

    def get(self, address: str):
        return self._engines.get(address)

    def offer(self, address: str, metadata: dict) -> None:
        """Attach, in a thread, to the engine core the replica at `address` offers, if that slot is
        on this node and not taken; once per replica."""
        entry = metadata.get(ENGINE_CLIENT_KEY) if isinstance(metadata, dict) else None
        if entry is None or address in self._offered:
            return
        self._offered.add(address)
        from cluster.engine.vllm_shared import ClientSlot

        slot = ClientSlot.from_metadata(entry)
        if slot is None or not slot.is_local() or not slot.claim():
            return
        global _attached_before
        if not _attached_before:
            _attached_before = True
            self._attach(address, slot)
            # Importing vLLM leaves ~600k long-lived objects that each full collection would walk again,
            # holding the loop and every stream on it: out of the collector's reach, as the front
            # door's start-up heap is (frontdoor/server.py, freeze_startup_heap).
            gc.collect()
            gc.freeze()
            return
        threading.Thread(target=self._attach, args=(address, slot), name="vllm-attach", daemon=True).start()

    def _attach(self, address: str, slot) -> None:
        from cluster.engine.vllm_engine import VllmEngine

        started = time.monotonic()
        try:
            engine = VllmEngine.attach(slot)
        except Exception as err:  # the replica's engine stays reachable through the direct stream
            log.warning("front door not attached to the vLLM engine core of replica %s: %s", address, err)
            return
        with self._lock:
            gone = address not in self._offered
            if not gone:
                self._engines[address] = engine
        if gone:  # the replica left while we attached
            engine.shutdown()
            return
        log.info("front door attached to the vLLM engine core (pid %d) of replica %s in %.1f s",
                 slot.engine_pid, address, time.monotonic() - started)

    def retain(self, addresses: set[str]) -> None:
        """Shut down the clients of replicas no longer routable (their running streams fail as lost)."""
        with self._lock:
            self._offered &= addresses
            gone = [self._engines.pop(a) for a in list(self._engines) if a not in addresses]
        for engine in gone:
            engine.shutdown()

    def close(self) -> None:
        self.retain(set())


class EngineStream:
    """One request's chunks straight from an attached engine client; `cancel()` aborts it."""

    def __init__(self, engine, request: GenerateRequest) -> None:
        self._chunks = timed_until_deadline(engine.generate(request), request.deadline_s)
        self._closing: asyncio.Task | None = None

    def cancel(self) -> None:
        # The consumer stopped reading (or went away): closing the generator aborts the request in vLLM.
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        try:
            await self._chunks.aclose()
        except RuntimeError:  # still being read: the reader's own cancellation closes it
            pass

    def __aiter__(self) -> AsyncIterator[TokenChunk]:
        return self._chunks
