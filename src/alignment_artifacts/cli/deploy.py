"""Shipping a steering: ``export`` (weights, GGUF, control vectors) and ``serve`` (an HTTP server).

Each command's flags come first (``add_*``), then the command (``cmd_*``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UserError
from .common import (
    add_common,
    add_model,
    add_steering,
    add_thinking,
    emit,
    load,
    steering_config,
    steering_request,
)


def add_export(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_steering(p)
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "gguf-control-vector", "vectors"],
                   help="hf (weights with the direction baked in), gguf (the same, rewritten from the model's "
                        "GGUF file), gguf-control-vector (llama.cpp), vectors")
    p.add_argument("--gguf-type", default="auto",
                   help="--format gguf: type of the rewritten tensors, auto (the source's where the gguf package "
                        "can write it, else Q8_0), or e.g. Q8_0, F16, F32")
    p.add_argument("--out", required=True, help="output folder or file")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    add_common(p)


def cmd_export(args: argparse.Namespace) -> int:
    from ..api import resolve_steering
    from ..export import export

    loaded = load(args)
    steering = resolve_steering(loaded, steering_request(args, loaded), progress=not args.json)
    path = export(loaded, steering, args.out, format=args.format, force=args.force, gguf_type=args.gguf_type)
    emit(args, {"format": args.format, "path": str(path), "config": steering.config.to_json()},
         f"exported {args.format} to {path}")
    return 0


def add_serve(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_steering(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, local only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, queueing included, before it is cancelled with HTTP 504 "
                        "(default 600)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together in one batch (default 16); later ones join as rows free up")
    add_thinking(p, budget=False)  # a request's max_tokens counts its thinking, as OpenAI's do
    add_common(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..api import resolve_steering
    from ..serve import ServerLimits, serve

    if args.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1 (got {args.max_batch}); 1 serves one request at a time.")
    loaded = load(args)
    config = steering_config(args, loaded)

    def directions_for(request_config: Any, model_lock: Any) -> Any:
        return resolve_steering(loaded, request_config, progress=False, model_lock=model_lock).directions

    limits = ServerLimits(max_tokens=args.max_tokens_limit, request_timeout=args.request_timeout,
                          max_batch=args.max_batch)
    try:
        serve(loaded, config, directions_for, host=args.host, port=args.port, api_key=args.api_key, limits=limits,
              thinking=args.thinking)
    except KeyboardInterrupt:  # uvicorn re-raises the signal after its clean shutdown: a normal stop
        print("server stopped", file=sys.stderr)
    return 0
