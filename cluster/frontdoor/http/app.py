"""The ASGI app of the OpenAI-compatible API (a route table, no framework: every route is the
same Exchange) and the uvicorn server that runs it on the front door's event loop, beside grpc.aio.

Every route is one Exchange: admission as for a gRPC call (request id, drain, API key from
`Authorization: Bearer`, tenant budget; Admission reads the HTTP headers as call metadata), the
route's body, and errors through errors.status_for -> errors.http_error. While a route runs,
the exchange watches the connection: a client that goes away cancels the route, which closes
the replica stream exactly as a cancelled gRPC call does. An `x-request-timeout` header
(seconds) is the call's deadline, as grpc-timeout is for gRPC. Responses carry x-request-id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
import time
import urllib.parse
from typing import AsyncIterator, Awaitable, Callable

import grpc

from cluster.frontdoor import errors
from cluster.frontdoor.admission import Admission
from cluster.frontdoor.call import REQUEST_ID, CallInfo
from cluster.frontdoor.http import background, chat, completions, responses
from cluster.frontdoor.http.fields import parse_json
from cluster.frontdoor.http.store import ResponseStore
from cluster.frontdoor.ports import PortUnavailable
from cluster.frontdoor.call_record import CallRecord
from cluster.frontdoor.conversion import Violations
from cluster.frontdoor.servicer import InferenceServicer
from cluster.serving.model_info import ModelInfo

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20  # the gRPC side's message limit
TIMEOUT_HEADER = "x-request-timeout"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]


class HttpContext:
    """What Admission and the servicer's request builders read of a gRPC context, for HTTP."""

    def __init__(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None = None) -> None:
        self._metadata = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
        self._client = client
        self.deadline: float | None = None
        timeout = dict(self._metadata).get(TIMEOUT_HEADER)
        self.timeout_problem = None
        if timeout is not None:
            try:
                seconds = float(timeout)
                if not 0 < seconds < 1e9:
                    raise ValueError
                self.deadline = time.monotonic() + seconds
            except ValueError:
                self.timeout_problem = errors.FieldError(TIMEOUT_HEADER, f"must be a positive number of seconds, "
                                                                         f"got {timeout!r}")

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        """The client's address in grpc's form ("ipv4:127.0.0.1:5555", "ipv6:[::1]:5555")."""
        if not self._client:
            return ""
        host, port = self._client[0], self._client[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    async def send_initial_metadata(self, metadata) -> None:
        return None  # x-request-id rides on every HTTP response's headers


class Stream:
    """A route's streamed answer: SSE events, and how to say an error after they started."""

    def __init__(self, events: AsyncIterator[bytes], error_event: Callable[[dict], bytes]) -> None:
        self.events = events
        self.error_event = error_event


class LastWrite(bytes):
    """The write that ends a streamed answer: its usage, then [DONE] or response.completed."""


def sse(data: dict | str, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


async def drained(events: AsyncIterator[tuple], feed: Callable[[object], None]):
    """Run a call that does not stream to its end: each item's output (the servicer's chat_events
    or generate_events) goes to `feed`; returns the complete the last item carries."""
    async with contextlib.aclosing(events):
        async for output, complete in events:
            if output is not None:
                feed(output)
            if complete is not None:
                return complete
    raise RuntimeError("the call's events ended without their complete")


async def sse_writes(first: tuple, events: AsyncIterator[tuple], write: Callable[[object, object], bytes],
                     closing: Callable[[object], Awaitable[bytes]], head: bytes = b"") -> AsyncIterator[bytes]:
    """A streamed call's SSE bytes, one write per item of `events` (`first` already taken from it),
    however many SSE events that item made: `head` before the first item's, `write(output, complete)`
    for each item, and after the last one's (it carries the complete) `await closing(complete)`."""
    async with contextlib.aclosing(events):
        output, complete = first
        while True:
            data = head + write(output, complete)
            head = b""
            if complete is not None:
                yield LastWrite(data + await closing(complete))
                return
            if data:
                yield data
            output, complete = await events.__anext__()


class OpenAIApi:
    """The routes, over the gRPC servicer's core."""

    def __init__(self, servicer: InferenceServicer, admission: Admission, info: ModelInfo,
                 store: ResponseStore) -> None:
        self.servicer = servicer
        self.admission = admission
        self.info = info
        self.store = store
        self.model = info.model_name
        self.created = int(time.time())
        self.background = background.BackgroundResponses(store)
        # (HTTP method, path pattern) -> (the route's metric label, its body); a plain table rather
        # than a framework router: every route runs the same Exchange, and a request costs less.
        self.routes = [
            ("POST", re.compile(r"/v1/chat/completions"), "/v1/chat/completions", self.chat_completions),
            ("POST", re.compile(r"/v1/responses"), "/v1/responses", self.create_response),
            ("GET", re.compile(r"/v1/responses/(?P<response_id>[^/]+)"), "/v1/responses/{id}", self.get_response),
            ("DELETE", re.compile(r"/v1/responses/(?P<response_id>[^/]+)"), "/v1/responses/{id}",
             self.delete_response),
            ("POST", re.compile(r"/v1/responses/(?P<response_id>[^/]+)/cancel"), "/v1/responses/{id}/cancel",
             self.cancel_response),
            ("POST", re.compile(r"/v1/completions"), "/v1/completions", self.completions),
            ("GET", re.compile(r"/v1/models"), "/v1/models", self.list_models),
            ("GET", re.compile(r"/v1/models/(?P<model_id>.+)"), "/v1/models/{id}", self.get_model),
        ]

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI app."""
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        path = scope["path"].rstrip("/") or "/"
        allowed = []
        for method, pattern, label, body in self.routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method == scope["method"]:
                await Exchange(self, label, body, match.groupdict())(scope, receive, send)
                return
            allowed.append(method)
        status = 405 if allowed else 404
        message = f"{scope['method']} {scope['path']} is not a route of this API"
        data = json.dumps({"error": {"message": message, "type": "not_found_error" if status == 404 else
                                     "invalid_request_error", "param": None, "code": None}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if allowed:
            headers.append((b"allow", ", ".join(allowed).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def close(self) -> None:
        await self.background.close()

    # ── helpers the routes share ──

    def check_model(self, body: object) -> str:
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str):
            raise errors.FieldError("model", "is required (a string)" if model is None else "must be a string")
        if model != self.model:
            raise errors.NotFoundError("MODEL_NOT_FOUND", "model", f"model: {model!r} is not served here "
                                                                   f"(GET /v1/models lists {self.model!r})")
        return self.model

    async def primed(self, events: AsyncIterator) -> tuple[object, AsyncIterator]:
        """The first item of `events` (so errors before the first token are HTTP errors) and the rest."""
        try:
            first = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        return first, events

    async def _completion(self, stream: bool, output: chat.ChatOutput | completions.CompletionsOutput,
                          events: AsyncIterator[tuple], head: bytes = b""):
        """A chat completion's or completion's answer: the one object, or streamed, its chunks
        (after `head`) ending with [DONE]."""
        if not stream:
            return output.completion(await drained(events, output.feed))
        first, events = await self.primed(events)

        def write(item, complete) -> bytes:
            return b"".join(sse(chunk) for chunk in output.chunks(item, complete))

        async def done(complete) -> bytes:
            return sse("[DONE]")

        return Stream(sse_writes(first, events, write, done, head), lambda error: sse(error) + sse("[DONE]"))

    # ── routes ──

    async def chat_completions(self, x: "Exchange"):
        model = self.check_model(x.json)
        call = chat.read_chat(x.json, self.info, x.call, x.context, model)
        call = dataclasses.replace(call, internal=self.servicer.fit_to_tenant(x.call, call.internal, "messages"))
        output = chat.ChatOutput(call)
        events = self.servicer.chat_events(call.internal, call.stops, False, x.call, x.context, x.bookkeeping)
        return await self._completion(call.stream, output, events, sse(output.first_chunk()))

    async def create_response(self, x: "Exchange"):
        model = self.check_model(x.json)
        call = await responses.read_responses(x.json, self.info, x.call, x.context, model, self.store)
        call = dataclasses.replace(call, internal=self.servicer.fit_to_tenant(x.call, call.internal, "input"))
        output = responses.ResponsesOutput(call)
        events = self.servicer.chat_events(call.internal, (), False, x.call, x.context, x.bookkeeping)

        async def finish(complete) -> dict:
            final = output.response("completed", complete)
            if call.store:
                await self.store.put(x.call.tenant, call.id, output.record(final))
            return final

        if call.background:
            return await self._background(x, output, events)
        if not call.stream:
            complete = await drained(events, output.feed)
            output.turn.finish()
            return await finish(complete)
        first, events = await self.primed(events)

        def sse_events(events: list[dict]) -> bytes:
            return b"".join(sse(event, event["type"]) for event in events)

        async def closing(complete) -> bytes:
            await finish(complete)
            return sse_events(output.closing(complete))

        def write(deltas, complete) -> bytes:
            return sse_events(output.events(deltas, complete is not None))

        return Stream(sse_writes(first, events, write, closing, head=sse_events(output.opening())),
                      self._error_event(output))

    @staticmethod
    def _error_event(output: responses.ResponsesOutput) -> Callable[[dict], bytes]:
        def error_event(error: dict) -> bytes:
            body = error["error"]
            return sse({"type": "error", "sequence_number": output._sequence, "code": body["code"],
                        "message": body["message"], "param": body["param"]}, "error")
        return error_event

    async def _background(self, x: "Exchange", output: responses.ResponsesOutput, events: AsyncIterator):
        """Run the response detached from this exchange, which answers at once (or, streamed,
        follows its events: a client that goes away stops following, not the response)."""
        deadline_s = x.context.time_remaining()

        async def body(run: background.BackgroundRun) -> None:
            try:
                outcome = await background.respond(run, events, self.store, x.call.tenant, sse, deadline_s)
                x.bookkeeping.code = grpc.StatusCode[outcome]
            finally:
                x.release()
        try:
            run = await self.background.start(x.call.tenant, output, body)
        except BaseException:
            await events.aclose()
            raise
        x.detached = True
        if output.call.stream:
            return Stream(run.follow(), self._error_event(output))
        return output.response("in_progress")

    async def _stored(self, x: "Exchange") -> dict:
        response_id = x.path_params["response_id"]
        record = await self.store.get(x.call.tenant, response_id)
        if record is None:
            raise errors.NotFoundError("RESPONSE_NOT_FOUND", "response_id", f"no stored response {response_id!r}")
        return record

    async def get_response(self, x: "Exchange"):
        record = await self._stored(x)
        run = self.background.runs.get((x.call.tenant, record["response"]["id"]))
        query = urllib.parse.parse_qs(x.query)
        if query.get("stream", [""])[-1].lower() == "true":
            if not record["response"].get("background"):
                raise errors.FieldError("stream", "only a background response can be streamed again")
            if run is None:
                if record["response"]["status"] not in background.ENDED:
                    raise errors.FieldError("stream", "this response runs on another front door: poll it, or "
                                                      "stream it from the front door that runs it")
                raise errors.FieldError("stream", f"the response is {record['response']['status']}: its events "
                                                  f"are gone; poll it")
            after = query.get("starting_after", ["-1"])[-1]
            if not after.lstrip("-").isdigit():
                raise errors.FieldError("starting_after", f"must be an integer, got {after!r}")
            return Stream(run.follow(int(after)), self._error_event(run.output))
        if run is not None:
            return run.output.response("in_progress")  # its output so far
        return record["response"]

    async def delete_response(self, x: "Exchange"):
        response_id = x.path_params["response_id"]
        if not await self.store.delete(x.call.tenant, response_id):
            raise errors.NotFoundError("RESPONSE_NOT_FOUND", "response_id", f"no stored response {response_id!r}")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    async def cancel_response(self, x: "Exchange"):
        response = (await self._stored(x))["response"]
        if not response.get("background"):
            raise errors.FieldError("response_id", "only a background response can be cancelled (cancel a streamed "
                                                   "response by closing its connection)")
        return await self.background.cancel(x.call.tenant, response)

    async def completions(self, x: "Exchange"):
        call = completions.read_completions(x.json, self.info, x.call, x.context, self.check_model(x.json))
        call = dataclasses.replace(call, internal=self.servicer.fit_to_tenant(x.call, call.internal, "prompt"))
        output = completions.CompletionsOutput(call)
        events = self.servicer.generate_events(call.internal, call.stops, True, x.call, x.context, x.bookkeeping)
        return await self._completion(call.stream, output, events)

    def _model(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "gptoss-cluster",
                "context_length": self.info.context_length}

    async def list_models(self, x: "Exchange"):
        return {"object": "list", "data": [self._model()]}

    async def get_model(self, x: "Exchange"):
        if x.path_params["model_id"] != self.model:
            raise errors.NotFoundError("MODEL_NOT_FOUND", "model", f"model {x.path_params['model_id']!r} is not "
                                                                   f"served here")
        return self._model()


# The routes that run the model: their calls are billed like gRPC's Generate and Chat.
GENERATING_ROUTES = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/completions"})


class Answered(Exception):
    """An exchange whose error is answered (Exchange._fail) ends with this."""


class Exchange:
    """One HTTP request through admission, its route, and the one error mapping (an ASGI app)."""

    def __init__(self, api: OpenAIApi, method: str, body: Callable[["Exchange"], Awaitable],
                 path_params: dict) -> None:
        self.api = api
        self.method = method
        self.body = body
        self.path_params = path_params
        self.json: object = None
        self.call: CallInfo | None = None
        self.context: HttpContext | None = None
        self.bookkeeping: CallRecord | None = None
        self.query = ""
        self._started = False
        self._disconnected = False

    async def __call__(self, scope, receive, send) -> None:
        self.context = HttpContext(scope["headers"], scope.get("client"))
        self.query = scope.get("query_string", b"").decode("latin-1")
        self._send = send
        watcher = None
        call = self.api.servicer.call_context(self.method, self.context, api="http",
                                              billed=self.method in GENERATING_ROUTES,
                                              problem=self.context.timeout_problem, answer=self._fail)
        try:
            async with call as (self.call, self.bookkeeping):
                if scope["method"] == "POST":
                    violations = Violations()
                    raw = await self._read_body(receive)
                    self.json = parse_json(raw, violations) if raw.strip() else {}
                    violations.raise_any()
                watcher = asyncio.get_running_loop().create_task(self._watch(receive, asyncio.current_task()))
                async with asyncio.timeout(self.context.time_remaining()):
                    result = await self.body(self)
                    if isinstance(result, Stream):
                        await self._stream(result)
                    else:
                        await self._answer(200, result)
        except Answered:
            pass
        except asyncio.CancelledError:
            if not self._disconnected:
                raise
            asyncio.current_task().uncancel()  # the client went away: nothing left to answer
        finally:
            if watcher is not None:
                watcher.cancel()

    @property
    def detached(self) -> bool:
        """A background response took the call over: it releases it (call_context does not)."""
        return self.bookkeeping.detached

    @detached.setter
    def detached(self, value: bool) -> None:
        self.bookkeeping.detached = value

    def release(self) -> None:
        """The call ended: out of flight, counted, billed."""
        self.bookkeeping.release()

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._disconnected = True
                raise asyncio.CancelledError()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise errors.FieldError("body", f"must be at most {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _watch(self, receive, task: asyncio.Task) -> None:
        """Cancel the route when the client goes away (uvicorn reports it at once)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._disconnected = True
                task.cancel()
                return

    def _headers(self, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(REQUEST_ID.encode(), self.call.request_id.encode())]
        for key, value in (extra or {}).items():
            headers.append((key.encode(), value.encode()))
        return headers

    async def _answer(self, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self._started = True
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"application/json"),
                                      (b"content-length", str(len(data)).encode())] + self._headers(extra)})
        await self._send({"type": "http.response.body", "body": data})

    async def _stream(self, stream: Stream) -> None:
        self._error_event = stream.error_event
        async with contextlib.aclosing(stream.events) as events:
            self._started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS + self._headers()})
            async for data in events:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})
                if isinstance(data, LastWrite) and not self._disconnected:
                    # the client has the whole answer: one that leaves now ends an answered call
                    self.bookkeeping.answered = True
        await self._send({"type": "http.response.body", "body": b""})

    async def _fail(self, call: CallInfo, context: HttpContext, status: errors.RpcError) -> None:
        """Answer a call that failed: an error body, or mid-stream an error event that ends it.
        Raises Answered, ending the exchange as grpc's abort ends a call."""
        self.call = call
        answer = errors.http_error(status)
        if self._disconnected:
            raise Answered()
        if not self._started:
            await self._answer(answer.status, answer.body, answer.headers)
            raise Answered()
        with contextlib.suppress(Exception):  # mid-stream: say it in the stream's own form, then end it
            await self._send({"type": "http.response.body", "body": self._error_event(answer.body), "more_body": True})
            await self._send({"type": "http.response.body", "body": b""})
        raise Answered()


# ───────────────────────────────────────── the server ─────────────────────────────────────────

class HttpServer:
    """uvicorn on the running event loop (no thread, no signal handlers of its own)."""

    def __init__(self, app, host: str, port: int) -> None:
        import uvicorn

        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without
        # it the first event after the headers waits out the client's delayed ACK (~40 ms).
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                     socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            raise PortUnavailable("frontdoor.http_port", host, port, err.strerror or str(err)) from None
        self._socket.listen(2048)
        self._socket.setblocking(False)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_keep_alive=30, timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._app = app
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        config = self._server.config
        if not config.loaded:
            config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._task = asyncio.get_running_loop().create_task(self._server.main_loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        await self._app.close()  # its background responses record themselves cancelled
        self._task = None
        await self._server.shutdown(sockets=[self._socket])
        self._socket.close()
