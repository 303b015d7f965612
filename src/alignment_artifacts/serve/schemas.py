"""What the server accepts and how it reports errors: request bodies, limits, validation.

Everything here runs on the event loop without the model: a bad request is refused before it
waits for the batching engine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..analysis.directions import DirectionSet, check_variant
from ..errors import CacheError, UserError
from ..models.generation import GenerationConfig
from ..models.thinking import SWITCH
from ..steering import PARAMS, SteeringConfig, mode_spec

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DIRECTION_FIELDS = ("source", "direction_site", "direction_position", "categories", "pca_components",
                    "direction_variant", "benign_components")
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
    max_pending: int = 64  # requests admitted at once (decoding or queued); beyond: 429
    max_batch: int = 16  # rows decoded together in one forward pass; later requests queue for a free row
    allow_direction_overrides: bool = False  # let requests pick direction sources (costly first use)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host header check (DNS rebinding); None: any
    request_timeout: float = 600.0  # seconds from admission to the last token; then 504 and the job is cancelled

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise UserError(f"max_batch must be at least 1 (got {self.max_batch}); 1 decodes one request at a time.")


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


def timed_out(seconds: float) -> ApiError:
    return ApiError(f"The request did not finish within this server's limit of {seconds:g} s and was cancelled. "
                    "Ask for fewer tokens, or retry when the server is less busy.", status=504, code="timeout",
                    kind="server_error")


def validation_error(exc: RequestValidationError) -> ApiError:
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
    direction_variant: str | None = None
    benign_components: int | None = None


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


class SamplingRequest(_Strict):
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


class ChatCompletionRequest(SamplingRequest):
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
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's field; only the thinking switch is taken

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        bad += [name for name in ("logprobs", "top_logprobs", "tools") if getattr(self, name) not in (None, 0, [])]
        if self.tool_choice not in (None, "none", "auto"):
            bad.append("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            bad.append("response_format")
        return bad


class CompletionRequest(SamplingRequest):
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


def check_common(body: SamplingRequest, max_tokens: int | None, limits: ServerLimits) -> GenerationConfig:
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


def stop_strings(stop: str | list[str] | None) -> list[str]:
    values = [stop] if isinstance(stop, str) else list(stop or [])
    if len(values) > 4 or any(not value for value in values):
        raise ApiError("'stop' takes up to 4 non-empty strings.", param="stop")
    return values


PER_ROW = "steer each request of a shared batch on its own (serve)"


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
                mode_spec(value).require_hooks(PER_ROW)
            elif name in PARAMS:
                PARAMS[name].check(value)
            elif name == "direction_variant":
                check_variant(value)
        except UserError as exc:
            raise ApiError(str(exc), param=f"steering.{name}", code="invalid_steering") from exc
    if given.get("mode", default.mode) != default.mode and "scale" not in given:
        given["scale"] = None  # another mode without a scale: that mode's default (auto: the stored one)
    return replace(default, **given)


def thinking_request(kwargs: dict[str, Any] | None) -> str | None:
    """The ``--thinking`` mode a request's ``chat_template_kwargs`` asks for: on, off, or None (the server's).

    Only the thinking switch passes: other template variables could change the prompt in ways the
    server does not check (tools, roles), so they are refused rather than silently ignored.
    """
    for name, value in (kwargs or {}).items():
        if name != SWITCH:
            raise ApiError(f"chat_template_kwargs.{name} is not supported; this server takes only {SWITCH} "
                           "(true or false).", param=f"chat_template_kwargs.{name}", code="unsupported_value")
        if not isinstance(value, bool):
            raise ApiError(f"chat_template_kwargs.{SWITCH} must be true or false (got {value!r}).",
                           param=f"chat_template_kwargs.{SWITCH}")
    if not kwargs or SWITCH not in kwargs:
        return None
    return "on" if kwargs[SWITCH] else "off"


def chat_parts(messages: Sequence[ChatMessage]) -> tuple[str, str | None, list[dict[str, str]]]:
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
