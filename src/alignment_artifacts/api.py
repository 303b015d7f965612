"""The Python API: the pipeline in a few calls, with models kept loaded across calls.

A thin facade: resolving requests lives in ``resolve``, steering in ``steering``, running the
model in ``models.generation``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import collect_activations
from .analysis.directions import DirectionSet
from .errors import UserError
from .models import DEFAULT_MODEL, GenerationConfig, LoadedModel, generate, load_model
from .prompts import resolve_prompts
from .resolve import (
    config_path,
    default_direction_layer,
    get_directions,
    resolve_config,
    resolve_steering,
    stored_config,
)
from .steering import SteeringConfig, SteeringHandle

_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


def get_model(model: str | LoadedModel | None = None, device: str = "auto", dtype: str = "auto",
              **kwargs: Any) -> LoadedModel:
    """A loaded model, reusing one already loaded in this process."""
    if isinstance(model, LoadedModel):
        return model
    name = model or DEFAULT_MODEL
    key = (name, device, str(dtype))
    if key not in _MODELS:
        _MODELS[key] = load_model(name, device=device, dtype=dtype, **kwargs)
    return _MODELS[key]


@contextlib.contextmanager
def steer(loaded: LoadedModel, config: SteeringConfig | None = None, directions: DirectionSet | None = None,
          **options: Any) -> Iterator[SteeringHandle]:
    """Context manager around any forward or ``generate`` call: steering on inside, off after."""
    steering = resolve_steering(loaded, config or SteeringConfig(**options), directions)
    with steering.apply(loaded) as handle:
        yield handle


@dataclass
class SuppressionResult:
    prompt: str
    baseline: str | None
    steered: str
    interventions: dict[str, int]
    config: dict[str, Any]
    model: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def suppress_prompt(prompt: str, model: str | LoadedModel | None = None, mode: str = "auto",
                    scale: float | None = None, compare: bool = True, system: str | None = None,
                    generation: GenerationConfig | None = None, config: SteeringConfig | None = None,
                    write: Callable[[str], Any] | None = None, progress: bool = False,
                    **options: Any) -> SuppressionResult:
    """Answer one prompt with steering on (and, by default, without it for comparison).

    ``config`` replaces ``mode``, ``scale`` and ``options``; ``scale`` None is the mode's default
    (for ``auto``, the stored one). ``write``: stream both answers through it, each under a title.
    """
    loaded = get_model(model)
    steering = resolve_steering(loaded, config or SteeringConfig(mode=mode, scale=scale, **options),
                                progress=progress)
    generation = generation or GenerationConfig(max_tokens=128)
    timings: dict[str, float] = {}
    baseline = None
    if compare:
        started = time.perf_counter()
        baseline = _answer(loaded, prompt, generation, system, write, f"unmodified ({loaded.info.name})")
        timings["baseline"] = round(time.perf_counter() - started, 2)
    c = steering.config
    layers = c.layers if c.layers is not None else "default"
    title = f"steered: mode={c.mode} scale={c.scale:g} layers={layers} direction_layer={c.direction_layer}"
    started = time.perf_counter()
    with steering.apply(loaded) as handle:
        steered = _answer(loaded, prompt, generation, system, write, title)
    timings["steered"] = round(time.perf_counter() - started, 2)
    return SuppressionResult(prompt, baseline, steered, handle.interventions(), c.to_json(), loaded.info.name,
                             timings)


def _answer(loaded: LoadedModel, prompt: str, generation: GenerationConfig, system: str | None,
            write: Callable[[str], Any] | None, title: str) -> str:
    if write is not None:
        bar = "-" * 100
        write(f"{bar}\n{title}\n{bar}\n")
    text = generate(loaded, [prompt], generation, system=system, stream=write is not None, write=write).texts[0]
    if write is not None:
        write("\n\n")
    return text


class AlignmentArtifacts:
    """Object-style API that keeps models, directions and analyses across calls."""

    def __init__(self, device: str = "auto", dtype: str = "auto"):
        self.device, self.dtype = device, dtype

    def model(self, name: str | LoadedModel | None = None) -> LoadedModel:
        return get_model(name, self.device, self.dtype)

    def analyze_artifacts(self, model_name: str | LoadedModel | None = None, prompts: str | None = None,
                          site: str = "mlp_out", position: str = "last", progress: bool = True, **kwargs: Any) -> Any:
        from .analysis import analyze

        loaded = self.model(model_name)
        store = collect_activations(loaded, resolve_prompts(prompts), sites=[site], positions=[position],
                                    progress=progress)
        return analyze(store, site=site, position=position, progress=progress, **kwargs)

    def suppress_and_generate(self, prompt: str, model_name: str | None = None, scale: float | None = None,
                              mode: str = "auto", categories: list[str] | None = None,
                              target_layers: list[int] | None = None, temperature: float = 0.0,
                              max_tokens: int = 128, repetition_penalty: float = 1.0, compare: bool = True,
                              **options: Any) -> SuppressionResult:
        generation = GenerationConfig(max_tokens=max_tokens, temperature=temperature,
                                      repetition_penalty=repetition_penalty, seed=options.pop("seed", None))
        return suppress_prompt(prompt, self.model(model_name), mode=mode, scale=scale, compare=compare,
                               generation=generation, categories=categories, layers=target_layers, **options)

    def steer(self, model: str | LoadedModel | None = None, **options: Any) -> Any:
        return steer(self.model(model), **options)


def check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise UserError("The prompt is empty. Pass the text to send to the model.")
    return prompt


__all__ = ["AlignmentArtifacts", "SuppressionResult", "check_prompt", "config_path", "default_direction_layer",
           "get_directions", "get_model", "resolve_config", "resolve_steering", "steer", "stored_config",
           "suppress_prompt"]
