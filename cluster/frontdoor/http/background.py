"""Background responses (POST /v1/responses with background: true): the response runs as a task of
its own, detached from the HTTP exchange that created it, which answers at once (status
in_progress). The store holds the response while it runs (the response only) and its outcome
(completed, incomplete, failed or cancelled, with the conversation a follow-up continues).

The front door that runs a response keeps its event log, so a stream (stream: true, or GET
/v1/responses/{id}?stream=true&starting_after=N) follows or resumes it there. A cancel reaches the
run directly when it lands on the same front door, else through the store (Redis pub/sub), and
answers once the run recorded itself cancelled; a run whose front door is gone is recorded
cancelled by the one that received the cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Awaitable, Callable

from cluster.frontdoor import errors
from cluster.frontdoor.http.responses import ResponsesOutput
from cluster.frontdoor.http.store import ResponseStore

log = logging.getLogger(__name__)

ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})
CANCEL_WAIT_S = 5.0  # how long a cancel waits for the run (wherever it is) to record itself cancelled


class BackgroundRun:
    """One background response this front door runs: its output, its events (SSE, one per
    sequence number) and its task."""

    def __init__(self, output: ResponsesOutput) -> None:
        self.output = output
        self.events: list[bytes] = []
        self.ended = False
        self.task: asyncio.Task | None = None
        self._grew = asyncio.Event()

    def add(self, events: list[bytes]) -> None:
        self.events += events
        self._grew.set()
        self._grew = asyncio.Event()

    def end(self) -> None:
        self.ended = True
        self._grew.set()

    async def follow(self, starting_after: int = -1) -> AsyncIterator[bytes]:
        """The events after sequence number `starting_after`, as they come, until the run ends."""
        sent = max(0, starting_after + 1)
        while True:
            grew = self._grew
            if sent < len(self.events):
                data, sent = b"".join(self.events[sent:]), len(self.events)
                yield data
            elif self.ended:
                return
            else:
                await grew.wait()


class BackgroundResponses:
    """The background responses of this front door, and their cancels from any front door."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self.runs: dict[tuple[str, str], BackgroundRun] = {}
        self._watching = False

    async def start(self, tenant: str, output: ResponsesOutput,
                    body: Callable[[BackgroundRun], Awaitable[None]]) -> BackgroundRun:
        """Record the response in_progress and run body(run) detached; cancels of it are heard
        from here on."""
        if not self._watching:
            await self.store.watch_cancels(self._cancel_here)
            self._watching = True
        await self.store.put(tenant, output.call.id, {"response": output.response("in_progress")})
        run = self.runs[(tenant, output.call.id)] = BackgroundRun(output)

        async def detached() -> None:
            try:
                await body(run)
            finally:
                run.end()
                self.runs.pop((tenant, output.call.id), None)
        run.task = asyncio.get_running_loop().create_task(detached())
        return run

    def _cancel_here(self, tenant: str, response_id: str) -> None:
        run = self.runs.get((tenant, response_id))
        if run is not None and run.task is not None:
            run.task.cancel()

    async def cancel(self, tenant: str, response: dict) -> dict:
        """Cancel a background response wherever it runs; the response as it ended."""
        response_id = response["id"]
        if response["status"] in ENDED:
            return response  # cancelling an ended response changes nothing
        run = self.runs.get((tenant, response_id))
        if run is not None:
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)
        else:
            await self.store.publish_cancel(tenant, response_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while True:
            record = await self.store.get(tenant, response_id)
            if record is None:
                raise errors.NotFoundError("RESPONSE_NOT_FOUND", "response_id", f"no stored response {response_id!r}")
            if record["response"]["status"] in ENDED:
                return record["response"]
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        log.warning("background response %s: no front door answered its cancel; recording it cancelled", response_id)
        record["response"]["status"] = "cancelled"
        await self.store.put(tenant, response_id, record)
        return record["response"]

    async def close(self) -> None:
        """Cancel the runs still going (each records itself cancelled)."""
        tasks = [run.task for run in self.runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_WAIT_S)


async def respond(run: BackgroundRun, events: AsyncIterator, store: ResponseStore, tenant: str,
                  sse: Callable[[dict, str], bytes], deadline_s: float | None) -> str:
    """Generate a background response into its event log and store its outcome, whatever it is;
    returns the outcome (a gRPC status code name, for the call's bookkeeping)."""
    output = run.output
    outcome = "OK"
    try:
        async with asyncio.timeout(deadline_s), contextlib.aclosing(events):
            run.add([sse(event, event["type"]) for event in output.opening()])
            async for deltas, complete in events:
                run.add([sse(event, event["type"]) for event in output.events(deltas, complete is not None)])
                if complete is not None:
                    closing = output.closing(complete)
                    final = closing[-1]["response"]
                    break
            else:
                raise RuntimeError("the replica stream ended without its completion")
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # cancelled on purpose: what is left is recording it
        outcome, final, closing = "CANCELLED", output.response("cancelled"), []
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, as the client polls for it
        status = errors.status_for(err, request_id=output.call.id)
        outcome, final = status.code.name, output.response("failed")
        body = errors.http_error(status).body["error"]
        final["error"] = {"code": body["code"] or body["type"], "message": body["message"]}
        closing = output.failure(final)
    try:
        await store.put(tenant, output.call.id, output.record(final))
    except Exception as err:  # noqa: BLE001 - nobody waits on this task to hear it
        log.warning("background response %s: outcome %s not stored: %s", output.call.id, final["status"], err)
    run.add([sse(event, event["type"]) for event in closing])
    return outcome
