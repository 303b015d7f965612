"""The ``alignment-artifacts`` command: a thin layer over the API, one subcommand per stage.

How a command runs: ``main`` parses the arguments with the parser ``build_parser`` assembles from
``COMMANDS``, points the cache at ``--cache-dir`` and calls the command. A command turns its flags
into the API's values with ``common`` (``load``: the model; ``prompt_set``; ``generation``;
``steering_request``: an unresolved ``SteeringConfig``; ``judge``), calls the API (``api``,
``resolve`` and the stage's package), and prints the result with ``common.emit``: text, or JSON
under ``--json``. A ``UserError`` becomes one ``error:`` line on stderr and its exit code (2 unless
it says otherwise); Ctrl-C exits 130.

The modules follow the pipeline: ``collect`` (models, prompts, collect, analyze, report),
``steer`` (generate, suppress, chat), ``evaluate`` (evaluate, judge, optimize), ``deploy``
(export, serve). Each holds a command's flags (``add_*``) next to the command (``cmd_*``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import __version__
from ..errors import UserError
from . import collect, deploy, evaluate, steer


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The subcommands, in the order `--help` lists them.
COMMANDS: dict[str, Command] = {
    "models": Command("list builtin models with installed/cached status", collect.add_models, collect.cmd_models),
    "generate": Command("answer a prompt with the plain model", steer.add_generate, steer.cmd_generate),
    "prompts": Command("list builtin prompt sets or validate a prompt file", collect.add_prompts_command,
                       collect.cmd_prompts),
    "collect": Command("collect pooled activations for a prompt set (cached, resumable)", collect.add_collect,
                       collect.cmd_collect),
    "analyze": Command("directions, effect sizes, held-out separability, permutation tests", collect.add_analyze,
                       collect.cmd_analyze),
    "report": Command("analysis as one self-contained HTML report", collect.add_report, collect.cmd_report),
    "suppress": Command("answer a prompt with and without steering, side by side", steer.add_suppress,
                        steer.cmd_suppress),
    "chat": Command("interactive multi-turn chat with steering (/mode, /scale, /off, /on)", steer.add_chat,
                    steer.cmd_chat),
    "evaluate": Command("four groups before and after: harmful, borderline, ordinary, capability",
                        evaluate.add_evaluate, evaluate.cmd_evaluate),
    "judge": Command("calibrate a judge (refusal / evasion / compliance) on labelled answers",
                     evaluate.add_judge_command, evaluate.cmd_judge),
    "optimize": Command("search steering settings (Optuna, refusals vs KL) and store the best",
                        evaluate.add_optimize, evaluate.cmd_optimize),
    "export": Command("bake a configuration into weights, or write a control vector / vectors", deploy.add_export,
                      deploy.cmd_export),
    "serve": Command("OpenAI-compatible HTTP server with per-request steering", deploy.add_serve,
                     deploy.cmd_serve),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignment-artifacts",
        description="Measure and steer the directions that safety training leaves in a model's activations. "
                    "Layers are 0-based decoder-block indices everywhere.")
    parser.add_argument("--version", action="version", version=f"alignment-artifacts {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    from ..cache import set_cache_root
    from ..models.loading import quiet_transformers

    set_cache_root(getattr(args, "cache_dir", None))
    quiet_transformers()
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # a line for the user, no source
    try:
        return COMMANDS[args.command].run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted; finished work is cached and a rerun continues from there.", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "build_parser", "main"]
