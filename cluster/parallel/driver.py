"""GroupDriver: rank 0 of an expert-parallel group, the engine runner's forward.

It sends each message of the protocol (protocol.py, where the invariants are) and then does its
own part, one message at a time; a keepalive thread fills idle time with NOOPs.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from cluster.model.paged import PagedBatch
from cluster.parallel.expert_map import ExpertPlacement
from cluster.parallel.protocol import NOOP, PLACE, STEP, STOP, encode_batch, encode_placements, send_message
from cluster.parallel.runtime import ShardRuntime

log = logging.getLogger(__name__)


class GroupDriver:
    """Rank 0: sends each message to the group, then does its own part. Thread-safe; one message at a time.

    Use as the engine runner's forward: `driver(batch) -> hidden states` (the runner unembeds). A
    keepalive thread sends NOOP when no message went out for `keepalive_s`, so idle workers never hit the collective timeout.
    """

    def __init__(self, runtime: ShardRuntime, keepalive_s: float = 1.0, rebalancer=None):
        self.runtime = runtime
        self.rebalancer = rebalancer  # rebalance.Rebalancer: consulted before each step
        self.rebalances: list = []  # RebalanceResult of each placement applied
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False
        self.error: BaseException | None = None
        self._keepalive_s = keepalive_s
        self._thread = threading.Thread(target=self._keepalive, name="ep-keepalive", daemon=True)
        self._thread.start()

    def _send(self, op: int, payload: torch.Tensor | None = None) -> None:
        if self.error is not None:
            raise RuntimeError("the expert-parallel group failed earlier") from self.error
        try:
            send_message(self.runtime.comm, op, payload, self.runtime.device)
        except BaseException as err:
            self.error = err
            raise
        self._last = time.monotonic()

    @torch.inference_mode()
    def __call__(self, batch: PagedBatch) -> torch.Tensor:
        with self._lock:
            if self.rebalancer is not None:
                planned = self.rebalancer.maybe_plan(self.runtime.placements)
                if planned is not None:  # between steps: every rank switches before this step
                    self._send(PLACE, encode_placements(planned[0]))
                    self.runtime.apply_placements(planned[0])
                    self.rebalances.append(planned[1])
            self._send(STEP, encode_batch(batch))
            try:
                return self.runtime.execute(batch)
            except BaseException as err:  # a peer died mid-collective: the group is unusable
                self.error = err
                raise

    def apply_placements(self, placements: list[ExpertPlacement]) -> int:
        """Between steps: every rank switches to `placements` (experts move by point-to-point sends)."""
        with self._lock, torch.inference_mode():
            self._send(PLACE, encode_placements(placements))
            return self.runtime.apply_placements(placements)

    def _keepalive(self) -> None:
        while not self._closed:
            time.sleep(self._keepalive_s / 4)
            if self._closed or self.error is not None:
                return
            if time.monotonic() - self._last < self._keepalive_s:
                continue
            with self._lock:
                if self._closed or time.monotonic() - self._last < self._keepalive_s:
                    continue
                try:
                    self._send(NOOP)
                except BaseException:
                    log.exception("expert-parallel keepalive failed; the group is down")
                    return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.error is None:
                try:
                    self._send(STOP)
                except BaseException:
                    pass
        self.runtime.close()
