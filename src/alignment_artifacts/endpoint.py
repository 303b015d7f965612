"""A small client for OpenAI-compatible HTTP endpoints: JSON over POST/GET with retries.

Standard library only (urllib), so judging or evaluating through a remote model adds no
dependency. Transient failures (connection refused or reset, timeouts, HTTP 429 and 5xx, a reply
that is not JSON, as a proxy under load may send) are retried with exponential backoff; anything
else fails at once. Every failure is a ``UserError`` that names the URL and the
command-line option that set it, because the fix is nearly always on the user's side (start the
server, fix the URL, set the key). The API key comes from the environment, never from argv, where
other users of the machine could read it.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .errors import UserError

API_KEY_VARIABLES = ("ALIGNMENT_ARTIFACTS_API_KEY", "OPENAI_API_KEY")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpSettings:
    timeout: float = 60.0  # seconds per request
    retries: int = 4  # attempts after the first
    backoff: float = 0.5  # seconds before the first retry, doubling after each


class EndpointError(UserError):
    """An endpoint failed; ``status`` is the HTTP status when the server answered at all."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def api_key_from_env() -> str | None:
    """The first of ALIGNMENT_ARTIFACTS_API_KEY, OPENAI_API_KEY that is set and non-empty."""
    for name in API_KEY_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def base_url(url: str) -> str:
    """``http://host/v1`` from either that or ``http://host/v1/chat/completions``."""
    clean = url.strip().rstrip("/")
    if not clean.startswith(("http://", "https://")):
        raise UserError(f"'{url}' is not an http(s) URL. Pass the server's base URL, e.g. http://127.0.0.1:8000/v1.")
    return clean.removesuffix("/chat/completions")


def request_json(url: str, body: dict[str, Any] | None = None, *, settings: HttpSettings = HttpSettings(),
                 api_key: str | None = None, option: str = "--judge-url") -> Any:
    """POST ``body`` (GET when None) and return the decoded JSON reply, retrying transient failures."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    failure, garbled = "", False  # garbled: the last reply was not JSON (a wrong URL, or a proxy under load)
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(settings.backoff * 2 ** (attempt - 1))
        request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=settings.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code not in RETRY_STATUSES:
                raise EndpointError(_status_message(url, exc.code, detail, option), exc.code) from None
            failure, garbled = f"HTTP {exc.code}{': ' + detail if detail else ''}", False
            continue
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            failure = "timed out" if isinstance(reason, TimeoutError) else str(reason) or type(reason).__name__
            garbled = False
            continue
        try:
            return json.loads(raw)
        except ValueError:
            failure, garbled = f"an answer that is not JSON: {raw[:120].decode(errors='replace')!r}", True
    fix = (f"{option} must point at an OpenAI-compatible API (usually ending in /v1)" if garbled
           else f"Check that the server is running and reachable at that address, or fix {option}")
    raise EndpointError(f"{url} failed {settings.retries + 1} times (last: {failure}). {fix}.")


def listed_model(base: str, settings: HttpSettings, api_key: str | None, option: str = "--judge-url",
                 model_option: str = "--judge-model") -> str:
    """The model the server at ``base`` lists, when it lists exactly one (else ``model_option`` must name one)."""
    reply = request_json(f"{base}/models", settings=settings, api_key=api_key, option=option)
    try:
        names = [str(entry["id"]) for entry in reply["data"]]
    except (KeyError, TypeError):
        names = []
    if len(names) != 1:
        listed = f"it lists {', '.join(names)}" if names else "its /models list is empty or unreadable"
        raise EndpointError(f"Pass {model_option} NAME to choose the model at {base} ({listed}).")
    return names[0]


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read()[:300].decode(errors="replace").strip()
    except OSError:
        return ""


def _status_message(url: str, status: int, detail: str, option: str) -> str:
    keys = f"{API_KEY_VARIABLES[0]} (or {API_KEY_VARIABLES[1]})"
    fix = {401: f"Set the API key in {keys}", 403: f"Check the API key in {keys}",
           404: f"Check {option} (the base URL, usually ending in /v1) and the model name"}
    return (f"{url} answered HTTP {status}{': ' + detail if detail else ''}. "
            f"{fix.get(status, 'Check the request the server rejected')}.")
