"""An OpenAI-compatible HTTP server whose answers are steered, per request if asked.

Read top to bottom: ``schemas`` (what a request may say, limits, errors), ``jobs`` (one request as
the engine sees it), ``batch`` (rows decoding together, steering confined to its rows),
``engine`` (the worker that owns the model and batches requests), ``guard`` (checks before
routing), ``reasoning`` (a thinking answer split into ``content`` and ``reasoning_content``) and
``app`` (routes, streaming, deadlines, starting the server).
"""

from .app import ServerThread, create_app, is_loopback, serve
from .engine import Engine
from .schemas import SERVER_ONLY_FIELDS, ApiError, ServerLimits, SteeringOverride, steering_for

__all__ = ["SERVER_ONLY_FIELDS", "ApiError", "Engine", "ServerLimits", "ServerThread", "SteeringOverride",
           "create_app", "is_loopback", "serve", "steering_for"]
