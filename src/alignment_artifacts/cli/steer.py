"""Answers, with and without steering: ``generate``, ``suppress``, ``chat``.

The steering path: the flags become an unresolved ``SteeringConfig`` (``common.steering_request``);
``api.suppress_prompt`` and ``api.resolve_steering`` resolve it and apply it around generation.
Each command's flags come first (``add_*``), then the command (``cmd_*``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import UserError
from .common import add_common, add_generation, add_model, add_steering, emit, generation, load, steering_request

if TYPE_CHECKING:
    from ..models import LoadedModel
    from ..steering import SteeringConfig


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message")
    add_model(p)
    add_generation(p)
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end instead of streaming")
    add_common(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..api import check_prompt
    from ..models import generate
    from ..models.thinking import thinking_format

    prompt = check_prompt(args.prompt)
    loaded = load(args)
    config = generation(args)
    stream = not args.json and not args.no_stream
    started = time.perf_counter()
    out = generate(loaded, [prompt], config, system=args.system, stream=stream)
    elapsed = time.perf_counter() - started
    if stream:
        print()
    tokens = len(out.tokens[0])
    split = thinking_format(loaded.tokenizer, config.thinking, config.thinking_budget).split(out.texts[0])
    emit(args, {"model": loaded.info.name, "prompt": prompt, "answer": split.answer, "thinking": split.thinking,
                "thinking_finished": split.finished, "tokens": tokens,
                "seconds": round(elapsed, 2), "load_seconds": loaded.info.load_seconds},
         None if stream else out.texts[0])
    if args.verbose:
        print(f"{tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tok/s); model load "
              f"{loaded.info.load_seconds:.2f} s", file=sys.stderr)
    return 0


def add_suppress(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message")
    add_model(p)
    add_steering(p)
    add_generation(p)
    p.add_argument("--categories", help="directions from these categories only (comma-separated)")
    p.add_argument("--no-compare", action="store_true", help="skip the unmodified answer")
    add_common(p)


def cmd_suppress(args: argparse.Namespace) -> int:
    from ..api import check_prompt, suppress_prompt

    prompt = check_prompt(args.prompt)
    loaded = load(args)
    write = None if args.json else _write_stdout
    result = suppress_prompt(prompt, loaded, config=steering_request(args, loaded), compare=not args.no_compare,
                             system=args.system, generation=generation(args), write=write, progress=not args.json)
    counts = result.interventions
    if write is not None:
        print(f"interventions: {sum(counts.values())} positions changed across {len(counts)} hooked sites")
    emit(args, {"model": loaded.info.name, "prompt": prompt, "baseline": result.baseline, "steered": result.steered,
                "config": result.config, "interventions": counts})
    return 0


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def add_chat(p: argparse.ArgumentParser) -> None:
    add_model(p)
    add_steering(p)
    add_generation(p, max_tokens=256)
    add_common(p)


@dataclass
class _Chat:
    """What the slash commands change: the steering, whether it is on, and the conversation so far."""

    config: SteeringConfig
    enabled: bool = True
    history: list[dict[str, str]] = field(default_factory=list)


def cmd_chat(args: argparse.Namespace) -> int:
    import contextlib

    from ..api import resolve_config, resolve_steering
    from ..models import generate

    loaded = load(args)
    request = steering_request(args, loaded)
    chat = _Chat(resolve_config(loaded, request))
    config = generation(args)
    print("Chat with steering. Commands: /mode MODE, /scale S, /off, /on, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input(f"[{chat.config.mode if chat.enabled else 'off'} {chat.config.scale:g}] you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line.startswith("/"):
            if not _slash_command(line[1:], chat, loaded, request):
                return 0
            continue
        steering = resolve_steering(loaded, chat.config) if chat.enabled else None
        print("model> ", end="", flush=True)
        try:
            with steering.apply(loaded) if steering is not None else contextlib.nullcontext():
                answer = generate(loaded, [line], config, system=args.system, stream=True,
                                  history=chat.history).texts[0]
        except UserError as exc:  # e.g. the conversation outgrew the context: keep the session
            print(f"\nerror: {exc} (/reset starts a new conversation)", file=sys.stderr)
            continue
        print()
        chat.history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]


def _slash_command(line: str, chat: _Chat, loaded: LoadedModel, request: SteeringConfig) -> bool:
    """Apply one chat command (the text after '/'); False for /quit."""
    from dataclasses import replace

    from ..api import resolve_config
    from ..steering import MODES

    command, _, value = line.partition(" ")
    if command in ("quit", "exit"):
        return False
    if command == "off":
        chat.enabled = False
    elif command == "on":
        chat.enabled = True
    elif command == "reset":
        chat.history.clear()
    elif command == "mode" and value in MODES:
        chat.config = resolve_config(loaded, replace(request, mode=value, scale=None))
    elif command == "scale":
        try:
            config = replace(chat.config, scale=float(value))
            config.validate(loaded.adapter.n_layers)
            chat.config = config  # a bad scale leaves the steering as it was
        except (ValueError, UserError) as exc:
            print(f"bad scale: {exc}", file=sys.stderr)
    else:
        print(f"unknown command; modes: {', '.join(MODES)}", file=sys.stderr)
    return True
