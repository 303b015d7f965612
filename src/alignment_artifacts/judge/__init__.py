"""Judges that label an answer to a prompt as refusal, evasion or compliance.

Four backends behind one protocol (``Judge``): ``markers`` (the keyword rule for refusals;
a loop is its only evasion), a local causal LM read from its logits (``lm.ModelJudge``), an
OpenAI-compatible endpoint (``remote.EndpointJudge``), and ``relevance:MODEL``, which calls an answer
an evasion when its request explains little of it (``relevance.RelevanceJudge``); ``markers+X``
cascades markers into any of them (``base.CascadeJudge``). ``load_judge`` picks one from what the
user typed. See docs/judge.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import UserError, closest
from .base import LABELS, CascadeJudge, Judge, MarkersJudge, Verdict
from .calibrate import CalibrationResult, calibrate

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_judge(spec: str | None = None, *, url: str | None = None, model_name: str | None = None,
               reuse: Any = None, device: str = "auto", dtype: str = "auto", batch_size: int = 16) -> Judge:
    """The judge ``spec`` names: "markers" (default), a model (builtin, folder, GGUF, hub id), "relevance:"
    and a model, or ``url``.

    ``reuse``: a model the caller already holds (usually the one it evaluates). It judges when ``spec``
    names it, rather than a second copy in memory; any other spec loads its own model. No steering
    hooks may be active while a reused model judges.
    """
    if spec is not None and spec.startswith("markers+"):
        second = spec.removeprefix("markers+")
        if not second:
            raise UserError("--judge markers+ needs a second judge after the '+', e.g. "
                            "markers+qwen2.5-coder-1.5b-instruct (or --judge markers+endpoint with --judge-url).")
        return CascadeJudge(load_judge(second, url=url, model_name=model_name, reuse=reuse, device=device,
                                       dtype=dtype, batch_size=batch_size))
    if spec is not None and spec.startswith("relevance:"):
        name = spec.removeprefix("relevance:")
        if not name or url is not None:
            raise UserError(f"--judge {spec}: relevance reads the log-probabilities of every answer token, so it "
                            "needs a local model after 'relevance:', e.g. relevance:qwen2.5-coder-1.5b-instruct "
                            "(an endpoint does not return them for the prompt side).")
        from .relevance import RelevanceJudge

        return RelevanceJudge(_local_model(name, reuse, device, dtype), batch_size)
    if url is not None:
        if spec not in (None, "markers", "endpoint"):
            raise UserError(f"Both --judge {spec} and --judge-url {url} were given; pass one of them.")
        from .remote import EndpointJudge

        return EndpointJudge(url, model_name, batch_size=batch_size)
    if model_name is not None:
        raise UserError("--judge-model names the model at an endpoint; pass --judge-url with it.")
    if spec is None or spec == "markers":
        return MarkersJudge()
    from .lm import ModelJudge

    return ModelJudge(_local_model(spec, reuse, device, dtype), batch_size)


def _local_model(spec: str, reuse: Any, device: str, dtype: str) -> Any:
    """``reuse`` when ``spec`` names it, else the model ``spec`` names, loaded."""
    from ..models import BUILTINS, load_model, loaded_from

    if reuse is not None and loaded_from(spec, reuse):
        return reuse
    if spec in BUILTINS or Path(spec).expanduser().exists() or _HUB_ID.match(spec):
        return load_model(spec, device=device, dtype=dtype)
    raise UserError(f"Unknown judge '{spec}'.{closest(spec, ['markers', *BUILTINS])} Use markers (the keyword rule), "
                    f"a builtin model ({', '.join(BUILTINS)}), a local model folder or .gguf file, a hub id such as "
                    "Qwen/Qwen2.5-7B-Instruct, relevance:MODEL (an evasion judge that asks no question), or "
                    "--judge-url URL for an OpenAI-compatible server.")


__all__ = ["LABELS", "CalibrationResult", "CascadeJudge", "Judge", "MarkersJudge", "Verdict", "calibrate", "load_judge"]
