"""The HTTP side (Starlette): routes, API key, body limits, server-sent events, and the
hand-off between the event loop and the engine thread.

Every failure a client can cause becomes a 4xx with an OpenAI error object; anything
else a 500 with one, and the server goes on. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..answer import ChatOutput, prepare_chat, prepare_completion
from ..errors import DecodeError, InvalidArgumentError, LlamaError
from . import protocol
from .engine import Engine, Event, Failed, Finished, Job, Piece, QueueFullError
from .metrics import render_metrics

logger = logging.getLogger(__name__)


def _error_response(error: protocol.RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _as_request_error(error: BaseException) -> protocol.RequestError:
    """An engine or preparation failure, as the client should see it."""
    if isinstance(error, protocol.RequestError):
        return error
    if isinstance(error, QueueFullError):
        return protocol.RequestError(str(error), status=503, kind="server_error", code="queue_full")
    if isinstance(error, DecodeError):  # the model computed NaN / Inf, or llama.cpp failed: not the client's doing
        return protocol.RequestError(str(error), status=500, kind="server_error")
    if isinstance(error, LlamaError):  # a bad argument, or llama.cpp rejected the template, schema or grammar
        return protocol.RequestError(str(error))
    logger.error("request failed", exc_info=error)
    return protocol.RequestError("internal error: see the server log", status=500, kind="server_error")


class _Inbox:
    """A job's events on the event loop. Pieces already waiting come out as one: under load
    the loop then writes a chunk per batch of tokens rather than per token (the engine
    thread needs the GIL too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._held: Optional[Event] = None

    def put(self, event: Event) -> None:
        """From the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone (shutdown)

    async def next(self, request: Request, job: Job) -> Optional[Event]:
        """The job's next event; None if the client went away (the job is then cancelled)."""
        if self._held is not None:
            event, self._held = self._held, None
            return event
        while True:
            try:
                event = await asyncio.wait_for(self._queue.get(), timeout=0.5)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return None
        if not isinstance(event, Piece):
            return event
        texts = [event.text]
        while not self._queue.empty():
            following = self._queue.get_nowait()
            if not isinstance(following, Piece):
                self._held = following
                break
            texts.append(following.text)
        return Piece("".join(texts))


class _Api:
    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str], limits: protocol.Limits) -> None:
        self.engine, self.model_name, self.limits = engine, model_name, limits
        self._key = api_key.encode() if api_key else None
        self.created = int(time.time())
        self.http_requests: dict[tuple[str, int], int] = {}

    # -- helpers ------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise protocol.RequestError("invalid API key: send 'Authorization: Bearer <key>'", status=401,
                                        code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > limit):
            raise protocol.RequestError(f"the request body is larger than {limit} bytes", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise protocol.RequestError(f"the request body is larger than {limit} bytes", status=413)
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError) as error:
            raise protocol.RequestError(f"the request body is not valid JSON: {error}") from None

    # -- routes -------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if not self.engine.alive:
            return JSONResponse({"status": "error", "message": "the engine thread stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pyllama_mtp",
             "meta": {"n_ctx_slot": self.engine.slot_ctx, "parallel": self.engine.parallel,
                      "mtp": self.engine.mtp, "n_draft_max": self.engine.n_draft_max}}]})

    async def metrics(self, request: Request) -> Response:
        self.authorize(request)
        body, content_type = render_metrics(self.engine, self.http_requests)
        return Response(body, media_type=content_type)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        self.authorize(request)
        body = await self.read_json(request)
        parsed = protocol.parse_generation(body, chat=chat, model_name=self.model_name,
                                           n_draft_max=self.engine.n_draft_max, limits=self.limits)
        model = self.engine.model
        try:  # templates, tokenizer and schema compilation: off the event loop
            prompt = await run_in_threadpool(prepare_chat if chat else prepare_completion, model, **parsed.prepare)
        except (LlamaError, TypeError, ValueError) as error:
            raise protocol.RequestError(str(error)) from None
        events = _Inbox(asyncio.get_running_loop())
        job = Job(prompt, parsed.max_tokens, parsed.sampling, parsed.n_draft, events.put,
                  cache_prompt=parsed.cache_prompt)
        try:
            self.engine.submit(job)
        except (QueueFullError, InvalidArgumentError) as error:
            raise _as_request_error(error) from None
        try:
            # Wait for the first event before answering: a request the engine refuses
            # (a grammar llama.cpp cannot compile) still gets its 4xx.
            first = await events.next(request, job)
        except BaseException:
            job.cancel()
            raise
        if isinstance(first, Failed):
            raise _as_request_error(first.error)
        request_id = protocol.new_id(chat)
        chat_output = ChatOutput(prompt.rendered) if chat and prompt.rendered is not None else None
        if parsed.stream:
            return StreamingResponse(self._stream(first, events, request, job, request_id, chat_output, parsed),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._collect(first, events, request, job, request_id, chat_output)

    async def _collect(self, event: Optional[Event], events: _Inbox, request: Request, job: Job,
                       request_id: str, chat_output: Optional[ChatOutput]) -> Response:
        text = []
        try:
            while isinstance(event, Piece):
                text.append(event.text)
                event = await events.next(request, job)
        except BaseException:
            job.cancel()
            raise
        if event is None:
            return Response(status_code=499)  # nobody is listening
        if isinstance(event, Failed):
            raise _as_request_error(event.error)
        assert isinstance(event, Finished)
        extra = {"usage": protocol.usage_json(event.usage), "timings": event.timings}
        if chat_output is None:
            choices = [protocol.text_choice("".join(text), event.finish_reason)]
            return JSONResponse(protocol.envelope(request_id, self.model_name, False, chunk=False, choices=choices,
                                                  **extra))
        chat_output.text = "".join(text)
        final = chat_output.finish(event.finish_reason, event.usage)
        choices = [protocol.chat_choice(message=protocol.message_json(final.message or {}),
                                        finish_reason=final.finish_reason)]
        return JSONResponse(protocol.envelope(request_id, self.model_name, True, chunk=False, choices=choices,
                                              **extra))

    async def _stream(self, event: Optional[Event], events: _Inbox, request: Request, job: Job,
                      request_id: str, chat_output: Optional[ChatOutput],
                      parsed: protocol.GenerationRequest) -> AsyncIterator[str]:
        chat = chat_output is not None

        def sse(choices: list, **extra: Any) -> str:
            payload = protocol.envelope(request_id, self.model_name, chat, chunk=True, choices=choices, **extra)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield sse([protocol.chat_choice(delta={"role": "assistant", "content": ""})])
            while isinstance(event, Piece):
                if chat_output is None:
                    yield sse([protocol.text_choice(event.text)])
                else:
                    delta = chat_output.push(event.text)
                    if delta is not None:
                        yield sse([protocol.chat_choice(delta=_delta_json(delta.content, delta.reasoning_content))])
                event = await events.next(request, job)
            if event is None:
                return
            if isinstance(event, Failed):
                error = _as_request_error(event.error)
                yield f"data: {json.dumps(error.body())}\n\n"
                return
            assert isinstance(event, Finished)
            if chat_output is None:
                yield sse([protocol.text_choice("", event.finish_reason)], timings=event.timings)
            else:
                final = chat_output.finish(event.finish_reason, event.usage)
                delta = _delta_json(final.content, final.reasoning_content)
                calls = protocol.message_json(final.message or {}).get("tool_calls")
                if calls:
                    delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
                if delta:
                    yield sse([protocol.chat_choice(delta=delta)])
                yield sse([protocol.chat_choice(delta={}, finish_reason=final.finish_reason)], timings=event.timings)
            if parsed.include_usage:
                yield sse([], usage=protocol.usage_json(event.usage))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # no-op for a finished job; frees the slot of a client that left


def _delta_json(content: str, reasoning: str) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = content
    if reasoning:
        delta["reasoning_content"] = reasoning
    return delta


def create_app(engine: Engine, *, model_name: str, api_key: Optional[str] = None,
               limits: Optional[protocol.Limits] = None) -> Starlette:
    """The ASGI application over a running :class:`Engine` (serve it with any ASGI server)."""
    api = _Api(engine, model_name, api_key, limits or protocol.Limits())

    async def request_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, protocol.RequestError)
        return _error_response(error)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return _error_response(protocol.RequestError(str(error.detail), status=error.status_code,
                                                     code="not_found" if error.status_code == 404 else None))

    async def server_error(request: Request, error: Exception) -> Response:
        return _error_response(_as_request_error(error))

    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    known = {route.path for route in routes}
    app = Starlette(routes=routes, middleware=[Middleware(_CountRequests, counts=api.http_requests, known=known)],
                    exception_handlers={protocol.RequestError: request_error, HTTPException: http_error,
                                        Exception: server_error})
    app.state.engine = engine
    return app


class _CountRequests:
    """ASGI middleware: HTTP responses by path (known routes only) and status, for /metrics."""

    def __init__(self, app: Any, counts: dict, known: set) -> None:
        self.app, self.counts, self.known = app, counts, known

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def tap(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tap)
        finally:
            path = scope.get("path", "")
            key = (path if path in self.known else "other", status)
            self.counts[key] = self.counts.get(key, 0) + 1
