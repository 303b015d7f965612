"""The HTTP side: OpenAI-compatible routes around the batching engine, and starting the server.

The event loop never touches the model. A request is validated here, its directions prepared in
a thread (a first use may collect activations), and it is queued for the engine, whose worker
reports tokens back through an asyncio queue; the handler only waits, streams and enforces the
deadline. A client that times out or disconnects cancels its job, and the engine frees its row.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..models.chat import format_chat
from ..models.thinking import SWITCH, ThinkingFormat, thinking_format
from ..resolve import resolve_config
from ..steering import SteeringConfig
from .engine import Engine
from .guard import Guard
from .jobs import Event, Job, Result
from .reasoning import ChatChunks, chat_message
from .schemas import (
    LOOPBACK_HOSTS,
    PER_ROW,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DirectionsFor,
    SamplingRequest,
    ServerLimits,
    as_api_error,
    chat_parts,
    check_common,
    steering_for,
    stop_strings,
    thinking_request,
    timed_out,
    validation_error,
)

DEFAULT_LIMITS = ServerLimits()
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class Server:
    """Request handling around one Engine: admission, deadlines, disconnects and response shapes."""

    def __init__(self, loaded: Any, default_config: SteeringConfig, directions_for: DirectionsFor,
                 limits: ServerLimits, thinking: str = "auto"):
        self.thinking = thinking_format(loaded.tokenizer, thinking)  # --thinking on a non-thinker fails here
        # a bad default fails at start, not on the first request
        resolve_config(loaded, default_config).spec.require_hooks(PER_ROW)
        self.default, self.limits = default_config, limits
        self.engine = Engine(loaded, directions_for, limits)
        self.model_id: str = loaded.info.name
        self.created = int(time.time())
        self.pending = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, limits.max_pending),
                                                              thread_name_prefix="prepare")

    def job(self, body: SamplingRequest, max_tokens: int | None, render: Callable[[Any], str]) -> Job:
        """Validate everything that needs no model, so bad requests never wait for the engine."""
        generation = check_common(body, max_tokens, self.limits)
        steering = steering_for(self.default, body.steering, self.limits.allow_direction_overrides)
        try:
            steering = resolve_config(self.engine.loaded, steering)
        except UserError as exc:
            raise ApiError(str(exc), param="steering", code="invalid_steering") from exc
        return Job(render, generation, steering, stop_strings(body.stop),
                   prompt_param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                   max_tokens_given=max_tokens is not None)

    def chat_thinking(self, body: ChatCompletionRequest) -> ThinkingFormat:
        """A chat request's thinking: the server's switch (``--thinking``), or the request's."""
        mode = thinking_request(body.chat_template_kwargs)
        try:
            return self.thinking if mode is None else thinking_format(self.engine.loaded.tokenizer, mode)
        except UserError as exc:
            raise ApiError(f"chat_template_kwargs.{SWITCH}={str(mode == 'on').lower()}: {exc}",
                           param=f"chat_template_kwargs.{SWITCH}") from exc

    def chat_render(self, body: ChatCompletionRequest, thinking: ThinkingFormat | None = None
                    ) -> Callable[[Any], str]:
        """The prompt text of a chat request, rendered with its thinking (default: ``chat_thinking``'s)."""
        prompt, system, history = chat_parts(body.messages)
        kwargs = (thinking or self.chat_thinking(body)).kwargs
        return lambda tokenizer: format_chat(tokenizer, prompt, system, history, template_kwargs=kwargs)

    async def events(self, job: Job, request: Request | None = None) -> AsyncGenerator[Event, None]:
        """The job's events until ``done`` or ``error`` (a timeout is an error event). Ending early (a
        disconnect, seen through ``request`` or by the stream's cancellation) cancels the job."""
        if self.pending >= self.limits.max_pending:
            yield Event("error", error=ApiError(f"The server is busy ({self.pending} requests in progress); retry "
                                                "shortly.", status=429, code="rate_limit_exceeded",
                                                kind="rate_limit_error"))
            return
        self.pending += 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called by the engine's worker thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening
                job.cancel.set()

        job.emit = emit
        deadline = loop.time() + self.limits.request_timeout
        try:
            prepared = asyncio.ensure_future(loop.run_in_executor(self.executor, self.engine.prepare, job))
            try:
                await asyncio.wait_for(asyncio.shield(prepared), self.limits.request_timeout)
            except TimeoutError:
                yield Event("error", error=timed_out(self.limits.request_timeout))
                return
            except Exception as exc:
                yield Event("error", error=exc)
                return
            self.engine.submit(job)
            checked = [loop.time()]
            while True:
                event = await self._next(queue, deadline, request, checked)
                yield event
                if event.kind in ("done", "error"):
                    return
        finally:
            job.cancel.set()  # a no-op for a finished job; else the engine drops its row at the next step
            self.pending -= 1

    async def _next(self, queue: asyncio.Queue[Event], deadline: float, request: Request | None,
                    checked: list[float]) -> Event:
        """The next event, a timeout, or (every DISCONNECT_POLL_S, if ``request``) the client's disconnect."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now >= deadline:
                return Event("error", error=timed_out(self.limits.request_timeout))
            if request is not None and now - checked[0] >= DISCONNECT_POLL_S:
                checked[0] = now
                if await request.is_disconnected():
                    return Event("error", error=ApiError("The client closed the connection.", status=499,
                                                         code="client_closed_request"))
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(queue.get(), min(deadline - now, DISCONNECT_POLL_S))

    async def complete(self, job: Job, request: Request) -> Result:
        async with contextlib.aclosing(self.events(job, request)) as events:
            async for event in events:
                if event.kind == "error":
                    assert event.error is not None
                    raise event.error
                if event.kind == "done" and event.result is not None:
                    return event.result
        raise RuntimeError("The engine ended a job without a result.")

    async def stream(self, job: Job) -> AsyncGenerator[Event, None]:
        """Start generating now; fail before the first byte is sent if the request is bad."""
        events = self.events(job)
        first = await anext(events)
        if first.kind == "error":
            await events.aclose()
            assert first.error is not None
            raise first.error
        return events


def _usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _steering_summary(config: SteeringConfig, result: Result) -> dict[str, Any]:
    return {"mode": config.mode, "scale": config.scale, "layers": config.layers,
            "interventions": result.interventions}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _response(server: Server, job: Job, result: Result, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": server.model_id, "choices": [{"index": 0, **choice, "logprobs": None,
                                                   "finish_reason": result.finish_reason}],
            "usage": _usage(result), "steering": _steering_summary(job.steering, result)}


async def _sse_stream(events: AsyncGenerator[Event, None], head: dict[str, Any],
                      choice: Callable[[str, str | None], dict], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunk objects as server-sent events, ending with ``data: [DONE]``."""
    async with contextlib.aclosing(events):  # closing it (a disconnect) cancels the job
        async for event in events:
            if event.kind == "delta":
                yield _sse({**head, "choices": [choice(event.text, None)]})
            elif event.kind == "done" and event.result is not None:
                yield _sse({**head, "choices": [choice("", event.result.finish_reason)]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event.result)})
            elif event.kind == "error" and event.error is not None:
                yield _sse(as_api_error(event.error).body())
    yield _sse("[DONE]")


def _event_stream(events: AsyncGenerator[Event, None], head: dict[str, Any], choice: Callable[[str, str | None], dict],
                  options: dict[str, bool] | None) -> StreamingResponse:
    include_usage = bool((options or {}).get("include_usage"))
    return StreamingResponse(_sse_stream(events, head, choice, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def create_app(loaded: Any, default_config: SteeringConfig, directions_for: DirectionsFor,
               api_key: str | None = None, limits: ServerLimits = DEFAULT_LIMITS, thinking: str = "auto") -> FastAPI:
    """The FastAPI app; ``directions_for(config, model_lock)`` is called outside the model lock, memoised per
    source. ``thinking``: the chat template's thinking switch (``--thinking``) for requests that do not set it."""
    server = Server(loaded, default_config, directions_for, limits, thinking)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.engine.close()
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="alignment-artifacts", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, limits=limits)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "pending": server.pending, **server.engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "alignment-artifacts"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        thinking = server.chat_thinking(body)  # thinking: the answer's <think> block goes to reasoning_content
        job = server.job(body, body.max_completion_tokens or body.max_tokens, server.chat_render(body, thinking))
        if not body.stream:
            result = await server.complete(job, request)
            message = chat_message(result.text, thinking)
            return JSONResponse(_response(server, job, result, "chat.completion", {"message": message}))
        events = await server.stream(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": server.model_id}
        return _event_stream(events, head, ChatChunks(thinking), body.stream_options)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError("'prompt' must be one non-empty string.", param="prompt")
        text = prompts[0]
        job = server.job(body, body.max_tokens, lambda tokenizer: text)
        if not body.stream:
            result = await server.complete(job, request)
            return JSONResponse(_response(server, job, result, "text_completion", {"text": result.text}))
        events = await server.stream(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        return _event_stream(events, head, choice, body.stream_options)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure leaves as an OpenAI error body; bad input is a 4xx, never a 500."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(str(exc.detail), status=exc.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        return as_api_error(exc).response()


# Running ------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _config(app: FastAPI, log_level: str, **options: Any) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5, **options)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ServerThread:
    """A uvicorn server on an already-bound socket in a daemon thread (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.app = app
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(_config(app, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The server did not start.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


def serve(loaded: Any, default_config: SteeringConfig, directions_for: DirectionsFor, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None,
          limits: ServerLimits = DEFAULT_LIMITS, thinking: str = "auto") -> None:
    """Serve until interrupted. Directions for the default config are loaded first, so errors show now."""
    import uvicorn

    if not is_loopback(host):
        if limits.allowed_hosts == LOOPBACK_HOSTS:
            limits = replace(limits, allowed_hosts=None)
        if not api_key:
            print(f"Warning: serving on {host} without --api-key: anyone who can reach this port can use the model.")
    app = create_app(loaded, default_config, directions_for, api_key=api_key, limits=limits, thinking=thinking)
    config = resolve_config(loaded, default_config)
    app.state.server.engine.directions(config)
    print(f"Serving {loaded.info.name} (steering: {config.mode}, scale {config.scale}"
          + (f", thinking {thinking}" if thinking != "auto" else "") + ") at "
          f"http://{_url_host(host)}:{port}/v1"
          + ("  (API key required)" if api_key else ""), flush=True)
    uvicorn.Server(_config(app, "info", host=host, port=port)).run()


