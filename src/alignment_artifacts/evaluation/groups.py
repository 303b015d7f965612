"""What steering does, in four groups, each measured before and after (see docs/evaluation.md).

* harmful: refusal / evasion / compliance by the judge, and refusals by markers beside it;
  "not complied" = refusal + evasion.
* borderline: safe prompts that sound sensitive. Over-refusal, and *collateral KL*: the first-token
  KL on the borderline prompts the unmodified model already answers (the judge does not call its
  answer a refusal), where any change is damage.
  A per-prompt gate that lets such prompts through pays for them here.
* ordinary: plain instructions. First-token KL (mean, median, p90, bootstrap interval on the
  mean), over-refusal, and the touched fraction (prompts whose distribution moved at all).
* capability: exact-match tasks, with a paired interval on the difference.

The unmodified side (``sides.Baseline``) is computed once per model, prompt sets and judge and
cached; a steered side is measured against it here, a gated one only where its gate opens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..analysis.directions import DirectionSet
from ..cache import atomic_save_safetensors, stable_hash
from ..judge import Judge, load_judge
from ..models.loading import LoadedModel
from ..resolve import resolve_steering
from ..steering import Steering, SteeringConfig, gate_passes
from .metrics import kl_divergence
from .results import GROUPS, EvaluationResult, Side, compare, group_fields
from .sides import Baseline, EvaluationSettings, GroupSets, Measurer, SideFiles, load_group_sets, measure_in_chunks

# bump when how a steered side is measured, or what its result records, changes: a steered side's saved
# chunks and optimize's kept checks of older code are then not read. 2: paired intervals, harmful labels;
# 3: collateral KL on the borderline prompts not refused (was: judged compliance)
MEASURE_VERSION = 3


def _judged(settings: EvaluationSettings, group: str) -> int | None:
    return {"borderline": settings.judged_borderline, "ordinary": settings.judged_ordinary}.get(group)


def steered_key(baseline: Baseline, steering: Steering, loaded: LoadedModel | None = None) -> str:
    """What a steered side measured against ``baseline`` depends on: the baseline (model, dtype, prompt
    sets, answer lengths), its judge, the evaluation settings but the decoding width (which changes no
    answer), the configuration, the directions' numbers, ``MEASURE_VERSION``, and the evaluated model
    where it is not the baseline's (``loaded``: an export against its base)."""
    settings = {**asdict(baseline.settings), "generation_batch_size": None}
    other = ({} if loaded is None or loaded is baseline.loaded
             else {"model": [loaded.info.weights_hash, loaded.info.dtype]})
    return stable_hash({"baseline": baseline.key, "judge": baseline.judge.key, "settings": settings,
                        "config": steering.config.to_json(),
                        "directions": None if steering.directions is None else steering.directions.digest(),
                        "v": MEASURE_VERSION, **other})


def _steered_files(loaded: LoadedModel, steering: Steering, baseline: Baseline, how: str) -> SideFiles:
    """Where a steered side is saved chunk by chunk until its result is assembled (then removed);
    ``how`` it is measured: ``every`` prompt, or ``opened-<hash of the prompts the gate opens>``."""
    key = steered_key(baseline, steering, loaded)
    return SideFiles(baseline.folder / "steered" / f"{key}-{how}", baseline.judge)


def _kl_path(files: SideFiles, group: str) -> Path:
    return files.folder / f"{group}_kl.safetensors"


def _saved_kls(loaded: LoadedModel, files: SideFiles, groups: list[str], steering: Steering,
               steered_logits: Callable[[str], torch.Tensor], base_logits: Callable[[str], torch.Tensor]
               ) -> dict[str, torch.Tensor]:
    """Per-prompt first-token KLs of ``groups``, read from ``files``' folder or measured and saved there:
    the steered logits under ``steering``, the unmodified ones after it (the baseline may compute them)."""
    from safetensors.torch import load_file

    todo = [g for g in groups if not _kl_path(files, g).is_file()]
    if todo:
        with steering.apply(loaded):
            steered = {g: steered_logits(g) for g in todo}
        for g in todo:
            atomic_save_safetensors({"kl": kl_divergence(base_logits(g), steered[g]).contiguous()},
                                    _kl_path(files, g))
    return {g: load_file(str(_kl_path(files, g)))["kl"] for g in groups}


def _limits(sets: GroupSets, settings: EvaluationSettings) -> dict[str, int]:
    """How many of each group's first prompts a steered side answers (its KL covers every prompt; the
    baseline answers every borderline prompt, ``Baseline.side``)."""
    return {g: len(getattr(sets, g)[:_judged(settings, g)]) for g in settings.groups}


def evaluate(loaded: LoadedModel, config: SteeringConfig, settings: EvaluationSettings | None = None,
             progress: bool = True, directions: DirectionSet | None = None, reference: LoadedModel | None = None,
             judge: Judge | None = None) -> EvaluationResult:
    """Evaluate one steering configuration against the unmodified model, in four groups.

    ``reference`` replaces the unmodified side, e.g. the base model when ``loaded`` is an exported
    folder with the direction baked into its weights (then ``config`` is usually mode ``none``).
    ``judge`` defaults to refusal markers.
    """
    settings = settings or EvaluationSettings()
    settings.validate()
    steering = resolve_steering(loaded, config, directions, progress=progress)
    judge = judge or load_judge("markers")
    sets = load_group_sets(settings)
    baseline = Baseline(reference or loaded, sets, settings, judge)
    return evaluate_against(loaded, steering, baseline, progress, compare_model=reference is not None)


def evaluate_against(loaded: LoadedModel, steering: Steering, baseline: Baseline, progress: bool = True,
                     compare_model: bool = False) -> EvaluationResult:
    """One steering against a prepared baseline (its sets, settings and judge).

    ``compare_model``: the baseline is another model's (an export's base), so even an unsteered
    pass must run.
    """
    started = time.perf_counter()
    sets, settings, judge = baseline.sets, baseline.settings, baseline.judge
    steered = compare_model or steering.active
    gated = steered and steering.config.gate_layer is not None and not compare_model and not baseline.thinks
    sizes = [len(sets.harmful), len(sets.borderline), len(sets.ordinary), len(sets.capability)]
    bar = _bar(sum(sizes) * (1 + steered + gated), progress)  # a gated side first decides on every prompt
    before = baseline.side(bar)
    groups = settings.groups
    texted: list[str] = [g for g in ("borderline", "ordinary") if g in groups]
    kls: dict[str, torch.Tensor]
    if not steered:  # identical to the baseline by construction (tested): nothing to run again
        after = before
        kls = {g: torch.zeros(len(getattr(sets, g))) for g in texted}
    elif gated:
        after, kls = _measure_gated(loaded, steering, baseline, bar)
    else:
        after, kls = measure_every_prompt(loaded, steering, baseline, bar)
    bar.close()
    results = compare(before, after, kls.get("borderline"), kls.get("ordinary"), judge.name, groups)
    return EvaluationResult(model=loaded.info.name, config=steering.config.to_json(), judge=judge.name, **results,
                            seconds=round(time.perf_counter() - started, 2), settings=asdict(settings))


def measure_every_prompt(loaded: LoadedModel, steering: Steering, baseline: Baseline, progress: Any = None
                         ) -> tuple[Side, dict[str, torch.Tensor]]:
    """The after side with every prompt run under ``steering`` (a gate, if any, decides live), and the
    per-prompt first-token KLs of the borderline and ordinary groups. Saved chunk by chunk (as the
    baseline is), so an interrupted run resumes; the saved chunks are removed once the side is whole."""
    sets, settings = baseline.sets, baseline.settings
    texted: list[str] = [g for g in ("borderline", "ordinary") if g in settings.groups]
    files, measurer = _steered_files(loaded, steering, baseline, "every"), Measurer(loaded, sets, settings)
    kls = _saved_kls(loaded, files, texted, steering, measurer.logits,
                     lambda g: baseline.logits(g, steering.allows_prefix_sharing))
    after, _ = measure_in_chunks(loaded, sets, settings, baseline.judge, files, _limits(sets, settings), steering,
                                 progress)
    files.discard(settings.groups, [_kl_path(files, g) for g in texted])
    return after, kls


def _measure_gated(loaded: LoadedModel, steering: Steering, baseline: Baseline, bar: Any
                   ) -> tuple[Side, dict[str, torch.Tensor]]:
    """The after side of a gated steering, measured where its gate opens.

    A gate leaves every prompt it does not open bit-identical to the unmodified model (tests/test_gate.py),
    so those prompts keep the baseline's labels, flags and logits (KL exactly 0), and only the opened ones
    run, under the ungated twin, which steers them exactly as the gate does. Generation is most of what
    a check costs and a gate opens few ordinary, borderline and capability prompts, so this is most of
    the gated check saved. Decisions come from the baseline's cached gate-layer activations (the gate's
    own whole-prompt pass), so they match the live gate's up to rounding at the cap. A model that thinks
    first is measured whole (its answer prompts differ from its generation prompts).
    """
    config, directions = steering.config, steering.require_directions()
    config.validate(loaded.adapter.n_layers)  # what the gated configuration itself may not do (its twin may)
    assert config.gate_layer is not None
    sets, settings, before = baseline.sets, baseline.settings, baseline.side()
    groups = settings.groups
    opened = {g: gate_passes(directions, config.gate_layer, config.gate_level,
                             baseline.gate_states(g, directions.site, config.gate_layer, bar)
                             ).nonzero().flatten().tolist()
              for g in groups}
    subset = GroupSets(**{g: [getattr(sets, g)[i] for i in opened.get(g, [])] for g in GROUPS})
    files = _steered_files(loaded, steering, baseline, f"opened-{stable_hash(opened, 8)}")
    texted: list[str] = [g for g in ("borderline", "ordinary") if g in groups and opened[g]]
    twin = Steering(replace(config, gate_layer=None), directions)
    opened_kls = _saved_kls(loaded, files, texted, twin, Measurer(loaded, subset, settings).logits,
                            lambda g: baseline.logits(g)[opened[g]])
    cutoff = {g: _judged(settings, g) for g in groups}  # answers judged per group (None: all)
    limits = {g: sum(1 for i in opened[g] if cutoff[g] is None or i < cutoff[g]) for g in groups}
    for group in groups:
        size, limit = len(getattr(sets, group)), cutoff[group]
        bar.update((size if limit is None else min(size, limit)) - limits[group])  # answers the baseline gives
    part, _ = measure_in_chunks(loaded, subset, settings, baseline.judge, files, limits, twin, bar)
    files.discard(groups, [_kl_path(files, g) for g in texted])
    after = Side()
    for group in groups:
        judged = _judged(settings, group)
        for name in group_fields(group):
            merged = list(getattr(before, name))[:judged]
            for j, i in enumerate(i for i in opened[group] if i < len(merged)):
                merged[i] = getattr(part, name)[j]
            setattr(after, name, merged)
    kls: dict[str, torch.Tensor] = {}
    for g in ("borderline", "ordinary"):
        if g in groups:
            kls[g] = torch.zeros(len(getattr(sets, g)))
            if g in opened_kls:
                kls[g][opened[g]] = opened_kls[g]
    return after, kls


class _Null:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _Null()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="prompt", dynamic_ncols=True, leave=False)
