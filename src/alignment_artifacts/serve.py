"""An OpenAI-compatible HTTP server whose answers are steered, per request if asked.

Concurrency design. Steering works by installing forward hooks on the one shared model, so two
requests that overlap in time would see each other's hooks. Correctness comes first: one
``threading.Lock`` serialises everything that touches the model or the tokenizer (installing
hooks, tokenising, decoding, removing hooks). Directions a request needs for the first time are
prepared before it takes that lock: the collection behind them takes the lock one batch at a
time, so other requests keep being answered meanwhile. Generation runs in worker
threads so the event loop stays free to accept requests, stream tokens and reject bad input; a
streaming request holds the lock for its whole generation and hands tokens to the SSE response
through a queue. Throughput is therefore that of one request at a time; a future batched
scheduler could run requests with identical steering together in one batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .analysis.directions import DirectionSet
from .errors import CacheError, UserError
from .models.generation import (
    GenerationConfig,
    context_length,
    encode_batch,
    format_chat,
    generate_ids,
    stop_token_ids,
)
from .resolve import resolve_config
from .steering import PARAMS, Steering, SteeringConfig, SteeringHandle, mode_spec

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DIRECTION_FIELDS = ("source", "direction_site", "direction_position", "categories", "pca_components")
SERVER_ONLY_FIELDS = ("model_id", "weights_hash", "notes")

# directions_for(config, model_lock): called outside the model lock; any use of the model inside holds model_lock
DirectionsFor = Callable[[SteeringConfig, contextlib.AbstractContextManager[Any]], DirectionSet | None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may cost, so a local server cannot be made to hang or swap."""

    max_request_bytes: int = 1 << 20
    max_tokens: int = 1024  # cap on max_tokens / max_completion_tokens
    default_max_tokens: int = 256  # when a request gives none
    max_prompt_tokens: int = 4096
    max_pending: int = 64  # requests admitted at once (one generates, the rest queue); beyond: 429
    allow_direction_overrides: bool = False  # let requests pick direction sources (costly first use)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host header check (DNS rebinding); None: any
    request_timeout: float = 600.0  # seconds from admission to the last token; then 504 and the job is cancelled


# Errors -----------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error reported to the client in OpenAI's format."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = "invalid_value", kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def as_api_error(exc: BaseException) -> ApiError:
    """How a failure reaches the client: its own mistakes as 4xx, the server's faults as 5xx without paths."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, CacheError):
        log.error("cache error while serving a request: %s", exc)
        return ApiError("The server could not use its cache for this request; its log names the file and the fix.",
                        status=500, code="server_cache_error", kind="server_error")
    if isinstance(exc, UserError):
        return ApiError(str(exc))
    log.error("request failed", exc_info=exc)
    return ApiError("Generation failed on the server; see its log.", status=500, code=None, kind="server_error")


def _timed_out(seconds: float) -> ApiError:
    return ApiError(f"The request did not finish within this server's limit of {seconds:g} s and was cancelled. "
                    "Ask for fewer tokens, or retry when the server is less busy.", status=504, code="timeout",
                    kind="server_error")


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as OpenAI reports it: which parameter, and why."""
    errors = exc.errors()
    if not errors:
        return ApiError("The request is invalid.")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(f"The request body is not valid JSON: {detail}.", param=None, code="invalid_json")
    if kind == "extra_forbidden":
        return ApiError(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return ApiError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if param is None:
        return ApiError("The request body must be a JSON object (send Content-Type: application/json).",
                        code="invalid_json")
    return ApiError(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param)


# Request bodies -----------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SteeringOverride(_Strict):
    """Per-request steering: any field given here replaces the server default for this request only."""

    mode: str | None = None
    scale: float | None = None
    layers: list[int] | None = None
    site: str | None = None
    categories: list[str] | None = None
    proximity_threshold: float | None = None
    distance_threshold: float | None = None
    decay_rate: float | None = None
    pca_components: int | None = None
    clamp_level: float | None = None
    direction_layer: int | None = None
    gate_layer: int | None = None
    gate_level: float | None = None
    layer_weights: dict[int, float] | None = None
    source: str | None = None
    direction_site: str | None = None
    direction_position: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


class _SamplingRequest(_Strict):
    """Fields shared by both endpoints; the ignored ones are accepted only at their neutral values."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    steering: SteeringOverride | None = None

    def unsupported(self) -> list[str]:
        """Names of fields set to something this server cannot honour."""
        return [name for name in ("presence_penalty", "frequency_penalty", "logit_bias")
                if getattr(self, name) not in (None, 0, {})]


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [name for name in ("logprobs", "top_logprobs", "tools") if getattr(self, name) not in (None, 0, [])]
        if self.tool_choice not in (None, "none", "auto"):
            bad.append("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            bad.append("response_format")
        return bad


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [name for name in ("echo", "logprobs", "suffix") if getattr(self, name) not in (None, 0, "")]
        if self.best_of not in (None, 1):
            bad.append("best_of")
        return bad


# Turning a request into a job ------------------------------------------------------------------------


def _check_common(body: _SamplingRequest, max_tokens: int | None, limits: ServerLimits) -> GenerationConfig:
    """The generation settings, or an ApiError naming the first parameter the server cannot honour."""
    unsupported = body.unsupported()
    if unsupported:
        name = unsupported[0]
        raise ApiError(f"'{name}' is not supported by this server (got {getattr(body, name)!r}); leave it unset"
                       + (" or 0." if name.endswith("penalty") else "."), param=name, code="unsupported_value")
    if body.n not in (None, 1):
        raise ApiError(f"Only n=1 is supported (got n={body.n}); send separate requests for more answers.",
                       param="n", code="unsupported_value")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(f"max_tokens={max_tokens} is above this server's cap of {limits.max_tokens}.",
                       param="max_tokens")
    return GenerationConfig(max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens),
                            temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p,
                            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed)


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    values = [stop] if isinstance(stop, str) else list(stop or [])
    if len(values) > 4 or any(not value for value in values):
        raise ApiError("'stop' takes up to 4 non-empty strings.", param="stop")
    return values


def steering_for(default: SteeringConfig, override: SteeringOverride | None,
                 allow_direction_overrides: bool) -> SteeringConfig:
    """The server default with the request's fields replaced; unresolved (``auto`` stays ``auto``)."""
    if override is None:
        return default
    given = override.model_dump(exclude_none=True)
    if not allow_direction_overrides:
        fixed = [name for name in DIRECTION_FIELDS if name in given]
        if fixed:
            raise ApiError(f"steering.{fixed[0]} chooses which directions are computed (possibly minutes of work) "
                           "and is fixed by the server; start the server with the setting you need.",
                           param=f"steering.{fixed[0]}", code="unsupported_value")
    for name, value in given.items():  # the mode table says which modes and values exist
        try:
            if name == "mode":
                mode_spec(value)
            elif name in PARAMS:
                PARAMS[name].check(value)
        except UserError as exc:
            raise ApiError(str(exc), param=f"steering.{name}", code="invalid_steering") from exc
    if given.get("mode", default.mode) != default.mode and "scale" not in given:
        given["scale"] = None  # another mode without a scale: that mode's default (auto: the stored one)
    return replace(default, **given)


def _chat_parts(messages: Sequence[ChatMessage]) -> tuple[str, str | None, list[dict[str, str]]]:
    """(last user message, system prompt, earlier turns), the arguments of ``format_chat``."""
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        if message.tool_calls or message.function_call or message.audio:
            raise ApiError("Tool calls and audio are not supported.", param=f"messages.{index}",
                           code="unsupported_value")
        content = message.content
        text = content if isinstance(content, str) else "".join(part.text for part in content or [])
        if message.role in ("system", "developer"):
            system.append(text)
        else:
            turns.append({"role": message.role, "content": text})
    if not turns or turns[-1]["role"] != "user":
        raise ApiError("The last message must have role 'user': the model answers it.", param="messages")
    if not turns[-1]["content"].strip():
        raise ApiError("The last user message is empty.", param="messages")
    return turns[-1]["content"], "\n\n".join(system) or None, turns[:-1]


# Generation ------------------------------------------------------------------------------------------


class _Halt(Exception):
    """Raised from the per-step callback to end decoding early (stop string, end token, cancel)."""


@dataclass
class Event:
    kind: Literal["ready", "delta", "done", "error"]
    text: str = ""
    result: Result | None = None
    error: BaseException | None = None


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    interventions: int


@dataclass
class Job:
    render: Callable[[Any], str]  # tokenizer -> the exact prompt text
    generation: GenerationConfig
    steering: SteeringConfig
    stop: list[str]
    prompt_param: str = "messages"  # what an error about the prompt points at
    max_tokens_given: bool = True  # False: the server default, shortened to fit the context
    emit: Callable[[Event], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class TextTracker:
    """Turns sampled ids into text deltas and decides when (and why) decoding stops."""

    def __init__(self, tokenizer: Any, stop_ids: Sequence[int], job: Job):
        self.tokenizer, self.stop_ids, self.job = tokenizer, set(stop_ids), job
        self.ids: list[int] = []
        self.text, self.sent, self.steps, self.finish = "", 0, 0, "length"
        self.cut = False

    def __call__(self, token: torch.Tensor) -> None:
        if self.job.cancel.is_set():
            raise _Halt
        self.steps += 1
        value = int(token[0])
        if value in self.stop_ids:
            self.finish = "stop"
            raise _Halt
        self.ids.append(value)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return
        self.text = text
        hits = [i for i in (text.find(stop, max(0, self.sent - len(stop))) for stop in self.job.stop) if i >= 0]
        if hits:
            self.text, self.finish, self.cut = text[:min(hits)], "stop", True
            self._send(len(self.text))
            raise _Halt
        self._send(len(text) - _held_back(text, self.job.stop))

    def close(self) -> None:
        """Send what was held back (a stop-string prefix that never completed, a partial character)."""
        if not self.cut:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._send(len(self.text))

    def _send(self, upto: int) -> None:
        if upto > self.sent and self.job.emit is not None:
            self.job.emit(Event("delta", self.text[self.sent:upto]))
        self.sent = max(self.sent, upto)


class Engine:
    """Owns the model lock: every use of the model or tokenizer happens inside ``run``."""

    def __init__(self, loaded: Any, directions_for: DirectionsFor, limits: ServerLimits):
        self.loaded, self.directions_for, self.limits = loaded, directions_for, limits
        self.lock = threading.Lock()  # the model
        self.preparing = threading.Lock()  # one direction preparation at a time
        self.stop_ids = stop_token_ids(loaded.model, loaded.tokenizer)
        self.context = context_length(loaded.model)
        self._directions: dict[tuple[Any, ...], DirectionSet | None] = {}

    def directions(self, config: SteeringConfig) -> DirectionSet | None:
        """Directions for a resolved config, memoised per source (they only depend on these fields).

        Called without the model lock: a first use may collect activations for a minute, taking
        the lock one batch at a time, while other requests keep running.
        """
        if config.mode == "none" or config.scale == 0:
            return None
        key = (config.resolved_source(), config.resolved_direction_site(), config.resolved_direction_position(),
               tuple(config.categories or ()), config.pca_components)
        if key not in self._directions:
            with self.preparing:
                if key not in self._directions:
                    self._directions[key] = self.directions_for(config, self.lock)
        return self._directions[key]

    def run(self, job: Job) -> Result:
        """Generate one answer with the job's (resolved) steering; blocks while another request runs."""
        loaded, tokenizer = self.loaded, self.loaded.tokenizer
        directions = self._prepare(job.steering)
        with self.lock, contextlib.ExitStack() as stack:
            if job.cancel.is_set():  # timed out while waiting
                raise _timed_out(self.limits.request_timeout)
            handle = self._steer(stack, job.steering, directions)
            ids, mask = encode_batch(tokenizer, [self._render(job)], loaded.device)
            prompt_tokens = int(ids.shape[1])
            self._fit_context(job, prompt_tokens)
            if job.emit is not None:
                job.emit(Event("ready"))
            tracker = TextTracker(tokenizer, self.stop_ids, job)
            with contextlib.suppress(_Halt):
                generate_ids(loaded.model, ids, mask, job.generation, self.stop_ids, on_step=tracker,
                             pad_id=tokenizer.pad_token_id or 0)
            tracker.close()
            interventions = handle.total()
        return Result(tracker.text, tracker.finish, prompt_tokens, tracker.steps, interventions)

    def _fit_context(self, job: Job, prompt_tokens: int) -> None:
        """Refuse prompts the model cannot hold; shorten a defaulted max_tokens to what is left."""
        if not 0 < prompt_tokens <= self.limits.max_prompt_tokens:
            raise ApiError(f"The prompt has {prompt_tokens} tokens; this server takes 1 to "
                           f"{self.limits.max_prompt_tokens}.", param=job.prompt_param,
                           code="context_length_exceeded")
        room = self.context - prompt_tokens if self.context else job.generation.max_tokens
        if job.generation.max_tokens <= room:
            return
        if job.max_tokens_given or room < 1:
            raise ApiError(f"The prompt ({prompt_tokens} tokens) plus max_tokens ({job.generation.max_tokens}) "
                           f"exceeds the model's context of {self.context} tokens; lower max_tokens or shorten "
                           "the prompt.", param="max_tokens", code="context_length_exceeded")
        job.generation = replace(job.generation, max_tokens=room)

    def _prepare(self, config: SteeringConfig) -> DirectionSet | None:
        """The directions ``config`` needs; a setting they cannot be made for is a 400, a cache fault a 500."""
        try:
            return self.directions(config)
        except CacheError:
            raise
        except UserError as exc:
            raise ApiError(str(exc), param="steering", code="invalid_steering") from exc

    def _steer(self, stack: contextlib.ExitStack, config: SteeringConfig,
               directions: DirectionSet | None) -> SteeringHandle:
        """Install the hooks (removed when ``stack`` closes); a config the directions cannot serve is a 400."""
        try:
            return stack.enter_context(Steering(config, directions).apply(self.loaded))
        except UserError as exc:
            raise ApiError(str(exc), param="steering", code="invalid_steering") from exc

    def _render(self, job: Job) -> str:
        try:
            return job.render(self.loaded.tokenizer)
        except TemplateError as exc:
            raise UserError(f"The model's chat template rejected these messages: {exc}") from exc

    def run_streaming(self, job: Job) -> None:
        """``run`` that reports its outcome through ``job.emit`` instead of returning or raising."""
        assert job.emit is not None
        try:
            result = self.run(job)
        except Exception as exc:
            job.emit(Event("error", error=exc))
            return
        job.emit(Event("done", result=result))


# The application ---------------------------------------------------------------------------------------


def _error_bytes(error: ApiError) -> bytes:
    return json.dumps(error.body()).encode()


def _host_name(header: str) -> str:
    """The Host header without its port ('[::1]:8000' -> '[::1]')."""
    if header.startswith("["):
        return header[:header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware run before routing: Host check, API key, and a body-size cap read as it streams in."""

    def __init__(self, app: Any, api_key: str | None, limits: ServerLimits):
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._check_headers(scope["path"], headers)
        if error is not None:
            await self._reject(send, error)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if size > self.limits.max_request_bytes:
                await self._reject(send, self._too_large())
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _check_headers(self, path: str, headers: dict[str, str]) -> ApiError | None:
        allowed = self.limits.allowed_hosts
        host = _host_name(headers.get("host", ""))
        if allowed is not None and host not in allowed:
            return ApiError(f"Host '{host}' is not served here (DNS-rebinding protection).", code="invalid_host")
        if self.api_key and path != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ApiError("Incorrect or missing API key: send 'Authorization: Bearer KEY'.", status=401,
                                code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_request_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(f"The request body is larger than this server's limit of {self.limits.max_request_bytes} "
                        "bytes.", status=413, code="request_too_large")

    @staticmethod
    async def _reject(send: Callable[[Any], Awaitable[None]], error: ApiError) -> None:
        body = _error_bytes(error)
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _usage(result: Result) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def _steering_summary(config: SteeringConfig, result: Result) -> dict[str, Any]:
    return {"mode": config.mode, "scale": config.scale, "layers": config.layers,
            "interventions": result.interventions}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Server:
    """Request handling around one Engine: admission, threading and response shapes."""

    def __init__(self, loaded: Any, default_config: SteeringConfig, directions_for: DirectionsFor,
                 limits: ServerLimits):
        resolve_config(loaded, default_config)  # a bad default fails at start, not on the first request
        self.default, self.limits = default_config, limits
        self.engine = Engine(loaded, directions_for, limits)
        self.model_id: str = loaded.info.name
        self.created = int(time.time())
        self.pending = 0
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, limits.max_pending),
                                                              thread_name_prefix="generate")

    def job(self, body: _SamplingRequest, max_tokens: int | None, render: Callable[[Any], str]) -> Job:
        """Validate everything that needs no model, so bad requests never wait for the lock."""
        generation = _check_common(body, max_tokens, self.limits)
        steering = steering_for(self.default, body.steering, self.limits.allow_direction_overrides)
        try:
            steering = resolve_config(self.engine.loaded, steering)
        except UserError as exc:
            raise ApiError(str(exc), param="steering", code="invalid_steering") from exc
        return Job(render, generation, steering, _stop_strings(body.stop),
                   prompt_param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                   max_tokens_given=max_tokens is not None)

    def _submit(self, fn: Callable[[Job], Any], job: Job) -> asyncio.Future[Any]:
        if self.pending >= self.limits.max_pending:
            raise ApiError(f"The server is busy ({self.pending} requests in progress); retry shortly.", status=429,
                           code="rate_limit_exceeded", kind="rate_limit_error")
        self.pending += 1
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, job)
        future.add_done_callback(self._release)
        return future

    def _release(self, future: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # a request that timed out has nobody left to read its outcome

    async def complete(self, job: Job) -> Result:
        future = self._submit(self.engine.run, job)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.limits.request_timeout)
        except TimeoutError:
            job.cancel.set()  # the worker stops at its next token (or before it starts)
            raise _timed_out(self.limits.request_timeout) from None

    async def _next(self, queue: asyncio.Queue[Event], job: Job, deadline: float) -> Event:
        """The job's next event, or a timeout error (cancelling the job) once the deadline has passed."""
        try:
            return await asyncio.wait_for(queue.get(), max(0.0, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            job.cancel.set()
            return Event("error", error=_timed_out(self.limits.request_timeout))

    async def stream(self, job: Job) -> AsyncIterator[Event]:
        """Start generating now; fail before the first byte is sent if the request is bad."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening
                job.cancel.set()

        job.emit = emit
        deadline = loop.time() + self.limits.request_timeout
        self._submit(self.engine.run_streaming, job)
        first = await self._next(queue, job, deadline)
        if first.kind == "error":
            assert first.error is not None
            raise first.error

        async def events() -> AsyncIterator[Event]:
            try:
                while True:
                    event = await self._next(queue, job, deadline)
                    yield event
                    if event.kind in ("done", "error"):
                        return
            finally:
                job.cancel.set()

        return events()


def _chat_response(server: Server, job: Job, result: Result) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result), "steering": _steering_summary(job.steering, result)}


def _completion_response(server: Server, job: Job, result: Result) -> dict[str, Any]:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_id,
            "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result), "steering": _steering_summary(job.steering, result)}


async def _sse_stream(events: AsyncIterator[Event], head: dict[str, Any], choice: Callable[[str, str | None], dict],
                      include_usage: bool) -> AsyncIterator[str]:
    """OpenAI chunk objects as server-sent events, ending with ``data: [DONE]``."""
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


def create_app(loaded: Any, default_config: SteeringConfig, directions_for: DirectionsFor,
               api_key: str | None = None, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The FastAPI app; ``directions_for(config, model_lock)`` is called outside the model lock, memoised per
    source."""
    server = Server(loaded, default_config, directions_for, limits)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="alignment-artifacts", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, limits=limits)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, "pending": server.pending}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "alignment-artifacts"}]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> JSONResponse | StreamingResponse:
        prompt, system, history = _chat_parts(body.messages)
        job = server.job(body, body.max_completion_tokens or body.max_tokens,
                         lambda tokenizer: format_chat(tokenizer, prompt, system, history))
        if not body.stream:
            return JSONResponse(_chat_response(server, job, await server.complete(job)))
        events = await server.stream(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": server.model_id}
        started = [False]

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {} if finish else {"content": text}
            if not started[0]:
                delta["role"], started[0] = "assistant", True
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        return _event_stream(events, head, choice, body.stream_options)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> JSONResponse | StreamingResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1 or not prompts[0]:
            raise ApiError("'prompt' must be one non-empty string.", param="prompt")
        text = prompts[0]
        job = server.job(body, body.max_tokens, lambda tokenizer: text)
        if not body.stream:
            return JSONResponse(_completion_response(server, job, await server.complete(job)))
        events = await server.stream(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_id}

        def choice(text: str, finish: str | None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        return _event_stream(events, head, choice, body.stream_options)

    return app


def _event_stream(events: AsyncIterator[Event], head: dict[str, Any], choice: Callable[[str, str | None], dict],
                  options: dict[str, bool] | None) -> StreamingResponse:
    include_usage = bool((options or {}).get("include_usage"))
    return StreamingResponse(_sse_stream(events, head, choice, include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


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
        return _validation_error(exc).response()

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
          limits: ServerLimits = ServerLimits()) -> None:
    """Serve until interrupted. Directions for the default config are loaded first, so errors show now."""
    import uvicorn

    if not is_loopback(host):
        if limits.allowed_hosts == LOOPBACK_HOSTS:
            limits = replace(limits, allowed_hosts=None)
        if not api_key:
            print(f"Warning: serving on {host} without --api-key: anyone who can reach this port can use the model.")
    app = create_app(loaded, default_config, directions_for, api_key=api_key, limits=limits)
    config = resolve_config(loaded, default_config)
    app.state.server.engine.directions(config)
    print(f"Serving {loaded.info.name} (steering: {config.mode}, scale {config.scale}) at "
          f"http://{_url_host(host)}:{port}/v1"
          + ("  (API key required)" if api_key else ""), flush=True)
    uvicorn.Server(_config(app, "info", host=host, port=port)).run()


__all__ = ["ApiError", "ServerLimits", "ServerThread", "SteeringOverride", "create_app", "serve", "steering_for"]
