"""The search step: the space of configurations, its seed points, the screening scores, and the study.

A trial is screened with one-forward-pass proxies on training prompts the direction was not
computed from:

* refusal: the mean probability of a refusal-opening first token on harmful prompts;
* cost: first-token KL on ordinary prompts plus *collateral* KL on the borderline prompts the
  unmodified model answers (by the same proxy). A per-prompt gate that lets borderline prompts
  through is charged for them; KL on plainly ordinary prompts alone cannot see that.

The space stops where the unconditional recipe already removes refusals: clamp caps from the
ordinary mean upwards and scales up to 1.3. Caps below the ordinary mean or scales near 2 steer
every prompt hard; earlier searches chose them behind a gate because KL on ordinary prompts
could not see what they did to borderline ones.

A gate decides where to steer, not how much: a gated trial is the plain recipe behind a gate, and
only the gate is searched. Behind a gate a weaker intervention costs nothing the screening sees,
and what it costs on harmful prompts the judge cannot see either (on the builtin Qwen a gated clamp
at scale 0.54, level 0.08 left 28 of 72 unseen harmful prompts not complied by a blind hand count,
the plain recipe 16, where the judge agreed with the hand labels at kappa 0.075). And unseen harmful
prompts sit lower on the direction than the search's own (``UNSEEN_HARMFUL_PLACE``), so screening
lets a harmful prompt through a gate only with that margin, and counts one it misses as refused.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..analysis.directions import DirectionSet
from ..cache import cache_dir
from ..errors import UserError
from ..evaluation import first_logits, kl_divergence, refusal_log_odds, refusal_opening_ids
from ..evaluation.passes import last_token_states
from ..models.loading import LoadedModel
from ..steering import MODES, Steering, SteeringConfig, gate_passes, gate_places
from ..steering.modes import ModeSpec, Param

# Ablation alone by default: a clamp removes the direction only above its cap, which turns refusals into
# evasions that the first-token proxy scores as removed and the judge cannot tell from answers. On the builtin
# Qwen a 30-minute run chose an ungated clamp (scale 1.27, level 0.36) at 0.37x the plain recipe's collateral
# KL that left 34 of 72 unseen harmful prompts not complied by a blind hand count, the plain recipe 14.
DEFAULT_MODES = ("ablate",)
SPACE_VERSION = 2  # part of a study's key: 2 put gates in front of the plain recipe only (1: behind any hooked mode)
# where the search stops short of a knob's allowed range (see the module docstring), and each mode's scale
SEARCH_RANGES = {"clamp_level": (0.0, 0.8)}
SCALES = {"clamp": (0.5, 1.3)}
ABLATION_SCALE = (0.3, 1.2)  # beyond ~1.2 ablation flips the projection's sign, and KL on unseen prompts jumps
GATE_LEVELS = (0.0, 0.6)  # where a gate may sit between the ordinary (0) and sensitive (1) means
# Screening lets a harmful prompt through a gate only if it would pass at this share of its place on the
# scale (0 ordinary mean, 1 sensitive mean): a gate is only as good as the lowest harmful prompts it lets
# through, and unseen ones sit lower. On the builtin Qwen's splits (bench/gate_margins.py) the 5th percentile
# of the 39 harmful validation prompts' places was 0.67-0.92x the 32 search prompts' at gate layers 14-24
# (the medians 0.52-0.62x); a gate at layer 14, level 0.5 let 31 of the 32 through but 64 of 72 from a third set.
UNSEEN_HARMFUL_PLACE = 0.75


def param_range(param: Param) -> tuple[float, float] | None:
    """The range a mode's knob is searched over: the search's own, else the table's (if finite)."""
    if param.name in SEARCH_RANGES:
        return SEARCH_RANGES[param.name]
    return None if param.low is None or param.high is None else (param.low, param.high)


def searchable(spec: ModeSpec) -> bool:
    """Ablations of the refusal direction (not the additive ones) whose knobs all have a range to search."""
    return spec.refusal_direction and not spec.control_vector and all(param_range(p) for p in spec.params)


SEARCH_MODES = tuple(name for name, spec in MODES.items() if searchable(spec))


def layer_weights(n_layers: int, centre: float, width: float, floor: float) -> dict[int, float]:
    """A triangular kernel over layers: 1 at the centre, falling to ``floor`` at ``width`` away."""
    return {layer: floor + (1 - floor) * max(0.0, 1 - abs(layer - centre) / width) for layer in range(n_layers)}


def config_from_params(params: dict[str, Any], n_layers: int, loaded: LoadedModel,
                       default_mode: str = "ablate", default_variant: str = "mean_diff") -> SteeringConfig:
    """The steering configuration a trial's parameters describe (scale names are per mode; the mode's
    own knobs go by their field names)."""
    mode = params.get("mode", default_mode)
    weights = layer_weights(n_layers, params["kernel_centre"], params["kernel_width"], params["kernel_floor"])
    scale = params.get(f"{mode}_scale", params.get("scale", 1.0))
    gated = bool(params.get("gated"))
    knobs = {p.name: params[p.name] for p in MODES[mode].params if p.name in params}
    return SteeringConfig(mode=mode, scale=scale, direction_layer=params["direction_layer"], layer_weights=weights,
                          direction_variant=params.get("direction_variant", default_variant),
                          gate_layer=params["gate_layer"] if gated else None,
                          gate_level=params["gate_level"] if gated else 0.0,
                          model_id=loaded.info.name, weights_hash=loaded.info.weights_hash, **knobs)


@dataclass(frozen=True)
class Space:
    """Where trials may go, for a model of ``n_layers`` blocks."""

    n_layers: int
    modes: tuple[str, ...]
    gate: bool
    variants: tuple[str, ...] = ("mean_diff",)  # direction variants (a search parameter when more than one)

    @property
    def direction_layers(self) -> range:
        return range(max(1, round(0.25 * self.n_layers)), min(self.n_layers - 1, round(0.85 * self.n_layers)) + 1)

    @property
    def gate_layers(self) -> range:
        return range(round(0.5 * self.n_layers), min(self.n_layers - 1, round(0.85 * self.n_layers)) + 1)

    def gated(self, mode: str) -> bool:
        """Whether trials of ``mode`` may be gated: with gates, those of the plain recipe's mode (a gated
        trial is the plain recipe behind a gate; module docstring)."""
        return self.gate and mode == self.plain_recipe()["mode"]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """A trial's parameters (Optuna's define-by-run): a gate alone for a gated trial."""
        mode = trial.suggest_categorical("mode", list(self.modes)) if len(self.modes) > 1 else self.modes[0]
        if self.gated(mode) and trial.suggest_categorical("gated", [False, True]):
            gates = self.gate_layers
            return {"mode": mode, "gated": True, "gate_layer": trial.suggest_int("gate_layer", gates[0], gates[-1]),
                    "gate_level": trial.suggest_float("gate_level", *GATE_LEVELS)}
        layers = self.direction_layers
        params: dict[str, Any] = {"mode": mode,
                                  "direction_layer": trial.suggest_int("direction_layer", layers[0], layers[-1])}
        if len(self.variants) > 1:
            params["direction_variant"] = trial.suggest_categorical("direction_variant", list(self.variants))
        params[f"{mode}_scale"] = trial.suggest_float(f"{mode}_scale", *SCALES.get(mode, ABLATION_SCALE))
        for param in MODES[mode].params:
            bounds = param_range(param)
            assert bounds is not None, param.name  # a searchable mode's knobs all have one
            low, high = bounds
            params[param.name] = (trial.suggest_int(param.name, int(low), int(high)) if param.integer
                                  else trial.suggest_float(param.name, low, high))
        params.update(kernel_centre=trial.suggest_float("kernel_centre", 0, self.n_layers - 1),
                      kernel_width=trial.suggest_float("kernel_width", 2, self.n_layers),
                      kernel_floor=trial.suggest_float("kernel_floor", 0.0, 1.0))
        return params

    def config(self, params: dict[str, Any], loaded: LoadedModel) -> SteeringConfig:
        """The configuration a trial of this space describes (a gated one: the plain recipe behind its gate)."""
        if params.get("gated"):
            params = {**self.plain_recipe(), **params}
        return config_from_params(params, self.n_layers, loaded, self.modes[0], self.variants[0])

    def plain_recipe(self) -> dict[str, Any]:
        """Full ablation at scale 1 with the direction of the layer at 60% depth, on every layer."""
        n = self.n_layers
        return {"mode": "ablate", "ablate_scale": 1.0, "direction_layer": self.depth(0.6), "kernel_centre": n / 2,
                "kernel_width": float(n), "kernel_floor": 1.0}

    def depth(self, fraction: float, layers: range | None = None) -> int:
        """The layer at ``fraction`` of the model's depth, inside ``layers`` (default: the direction layers)."""
        layers = layers or self.direction_layers
        return min(max(round(fraction * self.n_layers), layers[0]), layers[-1])

    @property
    def seed_gate_layers(self) -> list[int]:
        """Where the seed points' gates sit: at 50% and at 75% depth."""
        return list(dict.fromkeys(self.depth(f, self.gate_layers) for f in (0.5, 0.75)))

    def seeds(self, gate_levels: dict[int, float] | None = None) -> list[dict[str, Any]]:
        """Known starting points, in the order a short budget should try them: clamps sketching the
        trade-off (levels 0.3, 0.2 and 0.4 with the direction at 80% depth, 0.3 at 60% where that is
        another layer), then the plain recipe (full ablation with the 60% direction), with gates also
        behind a gate at each of ``seed_gate_layers``, and each other ablation at scale 1; all with the
        first direction variant, and each mode's first point with every other variant. ``gate_levels``:
        each seed gate layer's level (``Scorer.margin_level``: the cheapest the screening allows there
        without a refusal more), needed where a mode is gated.

        The deeper direction comes first because it tells what the model refuses from what merely
        sounds sensitive better: on the builtin Qwen's training splits (a hand scan of 20 settings,
        2026-12-03), clamps with the 60%-depth direction left 2.3x the plain recipe's refusal proxy at
        level 0.4 and more collateral KL than it at 0.2, while with the 79-82% directions level 0.4 cost
        0.28-0.29x its collateral KL at 1.0-1.3x its refusal proxy, and level 0.2 a fifth to a quarter of its
        refusal proxy at the same collateral.
        """
        flat = {k: v for k, v in self.plain_recipe().items() if k not in ("mode", "ablate_scale")}
        ungated = lambda mode: {"gated": False} if self.gated(mode) else {}  # noqa: E731
        deep, mid = self.depth(0.8), self.depth(0.6)
        points = ((deep, 0.3), (deep, 0.2), (deep, 0.4)) + (((mid, 0.3),) if mid != deep else ())
        clamps = [{"clamp_scale": 1.0, "clamp_level": level, "direction_layer": layer} for layer, level in points]
        seeds = {mode: clamps if mode == "clamp" else [{f"{mode}_scale": 1.0, **ungated(mode)}] for mode in self.modes}
        tag = lambda mode: {"mode": mode} if len(self.modes) > 1 else {}  # noqa: E731
        variant = lambda v: {"direction_variant": v} if len(self.variants) > 1 else {}  # noqa: E731
        levels = gate_levels or {}
        gated = {mode: [{**tag(mode), "gated": True, "gate_layer": layer, "gate_level": levels[layer]}
                        for layer in self.seed_gate_layers] if self.gated(mode) else [] for mode in self.modes}
        return ([point for mode in self.modes
                 for point in [{**tag(mode), **variant(self.variants[0]), **flat, **params} for params in seeds[mode]]
                 + gated[mode]]
                + [{**tag(mode), **variant(v), **flat, **seeds[mode][0]} for v in self.variants[1:]
                   for mode in self.modes])


@dataclass
class Score:
    refusal: float  # mean refusal-opening probability on harmful prompts
    kl_ordinary: float
    kl_collateral: float  # on the borderline prompts the unmodified model answers
    odds: torch.Tensor  # per harmful prompt: refusal log-odds
    opened: float = 1.0  # fraction of the ordinary and borderline prompts steered (a gate's pass rate)

    @property
    def cost(self) -> float:
        return self.kl_ordinary + self.kl_collateral


class Scorer:
    """Proxy scores of a configuration on the search prompts (chat-formatted).

    A gated configuration steers exactly as its ungated twin on the prompts its gate lets through
    and leaves the others bit-identical (tested in the steering tests), so a gated trial is scored
    as that: the twin on the prompts that pass, the unmodified model on the rest; harmful prompts pass
    only with the margin of ``gate_level``, and one that does not counts as refused. The gate's
    decisions come from the unmodified model's last-token activations, captured once per group.
    ``directions`` holds one set per direction variant, all from the same prompts and site; a
    configuration is scored with its own variant's.
    """

    def __init__(self, loaded: LoadedModel, harmful: list[str], ordinary: list[str], borderline: list[str],
                 batch_size: int, directions: dict[str, DirectionSet], gate_layers: range):
        self.loaded, self.batch, self.directions, self.gate_layers = loaded, batch_size, directions, gate_layers
        self.texts = {"harmful": harmful, "ordinary": ordinary, "borderline": borderline}
        self.opening = refusal_opening_ids(loaded.tokenizer)
        self.base = {name: first_logits(loaded, texts, batch_size) for name, texts in self.texts.items()}
        self.base_odds = refusal_log_odds(self.base["harmful"], self.opening)
        self.base_refusal = float(torch.sigmoid(self.base_odds).mean())
        # the borderline prompts the unmodified model answers, i.e. does not refuse (first-token proxy of the
        # set validation measures collateral KL on): any change there is damage
        self.answered = (refusal_log_odds(self.base["borderline"], self.opening) < 0).nonzero().flatten().tolist()
        self._last: dict[str, dict[int, torch.Tensor]] = {}

    def score(self, config: SteeringConfig) -> Score:
        directions = self.directions[config.direction_variant]
        rows = {name: None if config.gate_layer is None else
                self._passing(name, config.gate_layer, self.gate_level(name, config.gate_level), directions)
                for name in self.texts}
        # a harmful prompt a gate misses counts as refused: unsteered, it gets what the unmodified model does, and
        # that the search prompts a gate misses are ones the model seldom refuses need not hold on unseen prompts
        odds = self.base_odds.clone() if config.gate_layer is None else torch.full_like(self.base_odds, math.inf)
        kls = {name: torch.zeros(len(texts)) for name, texts in self.texts.items()}
        with Steering(replace(config, gate_layer=None), directions).apply(self.loaded):
            for name, texts in self.texts.items():
                picked = list(range(len(texts))) if rows[name] is None else rows[name]
                if not picked:
                    continue
                logits = first_logits(self.loaded, [texts[i] for i in picked], self.batch)
                if name == "harmful":
                    odds[picked] = refusal_log_odds(logits, self.opening)
                else:
                    kls[name][picked] = kl_divergence(self.base[name][picked], logits)
        collateral = kls["borderline"][self.answered]
        texted = ("ordinary", "borderline")
        opened = 1.0 if config.gate_layer is None else \
            sum(len(rows[n] or []) for n in texted) / max(1, sum(len(self.texts[n]) for n in texted))
        return Score(refusal=float(torch.sigmoid(odds).mean()), kl_ordinary=float(kls["ordinary"].mean()),
                     kl_collateral=float(collateral.mean()) if len(self.answered) else 0.0, odds=odds, opened=opened)

    def margin_level(self, layer: int, variant: str) -> float:
        """The highest gate level (on a 0.01 grid inside ``GATE_LEVELS``) at which screening lets every harmful
        search prompt through a gate at ``layer``. At one layer the refusal proxy is the plain recipe's up to
        there and rises past it (a missed prompt counts as refused), while cost falls as the level rises: so
        this is the cheapest gate there that refuses no more, the point a short search should start from."""
        directions = self.directions[variant]
        lowest = float(gate_places(directions, layer, self._states("harmful")[layer]).min())
        level = math.floor(100 * UNSEEN_HARMFUL_PLACE * lowest - 1e-9) / 100  # strictly below: a gate passes "above"
        return min(max(level, GATE_LEVELS[0]), GATE_LEVELS[1])

    @staticmethod
    def gate_level(group: str, level: float) -> float:
        """The level a prompt of ``group`` must pass in screening: a harmful prompt's, as if it sat at
        ``UNSEEN_HARMFUL_PLACE`` of its place (the scale is linear, so that is ``level`` divided by it)."""
        return level / UNSEEN_HARMFUL_PLACE if group == "harmful" else level

    def _states(self, name: str) -> dict[int, torch.Tensor]:
        """The unmodified last-token activations of a group at every candidate gate layer (captured once)."""
        if name not in self._last:
            site = next(iter(self.directions.values())).site
            self._last[name] = last_token_states(self.loaded, self.texts[name], site, list(self.gate_layers),
                                                 self.batch)
        return self._last[name]

    def _passing(self, name: str, layer: int, level: float, directions: DirectionSet) -> list[int]:
        return gate_passes(directions, layer, level, self._states(name)[layer]).nonzero().flatten().tolist()


@dataclass
class Searched:
    """What a search left: its Optuna study, the trials that finished, and their Pareto front."""

    study: Any
    complete: list[Any]
    pareto: list[Any]  # by refusal proxy, lowest first
    plain_refusal: float | None = None  # the plain recipe's refusal proxy, where the study scored it (a seed)


def run_search(loaded: LoadedModel, space: Space, scorer: Scorer, *, key: str, trials: int, timeout: float,
               seed: int, resume: bool, progress: bool, study: Any = None) -> Searched:
    """Minimise (refusal proxy, cost) over ``space`` until ``trials`` trials of the study have finished or
    ``timeout`` seconds have passed; a fresh study starts from the space's seed points. ``study``: one this
    process already searched, continued as it is (reopening it would restart its sampler's random stream)."""
    variant = space.variants[0]
    gated = any(space.gated(mode) for mode in space.modes)
    seeds = space.seeds({layer: scorer.margin_level(layer, variant) for layer in space.seed_gate_layers}
                        if gated else None)
    study = study or open_study(loaded, key, seed, resume, n_startup=len(seeds) + 4)

    def objective(trial: Any) -> tuple[float, float]:
        score = scorer.score(space.config(space.suggest(trial), loaded))
        trial.set_user_attr("kl_ordinary", score.kl_ordinary)
        trial.set_user_attr("kl_collateral", score.kl_collateral)
        trial.set_user_attr("opened", score.opened)
        return score.refusal, score.cost

    done = len([t for t in study.trials if t.state.name == "COMPLETE"])
    remaining = max(0, trials - done)
    if remaining:
        if not done:
            for trial_params in seeds:
                study.enqueue_trial(trial_params)
        study.optimize(objective, n_trials=remaining, timeout=timeout, show_progress_bar=progress,
                       gc_after_trial=False)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError("No trial finished within the time budget; raise --timeout.")
    plain = space.config(space.plain_recipe(), loaded)
    plain_refusal = next((t.values[0] for t in complete if space.config(t.params, loaded) == plain), None)
    return Searched(study, complete, sorted(study.best_trials, key=lambda t: t.values[0]), plain_refusal)


def open_study(loaded: LoadedModel, key: str, seed: int, resume: bool, n_startup: int) -> Any:
    """The model's study for ``key`` in Optuna's SQLite storage: resumed, or started afresh."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = cache_dir("studies")
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{folder / (loaded.info.name.replace('/', '--') + '.db')}"
    name = f"{loaded.info.name}-{key}"
    if not resume:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=n_startup)
    return optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                               sampler=sampler, load_if_exists=True)
