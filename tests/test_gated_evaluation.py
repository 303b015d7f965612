"""A gated configuration is measured where its gate opens: the numbers of measuring every prompt
under the live gate, with the judge asked only about the answers the gate changed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from alignment_artifacts.api import get_directions, resolve_config
from alignment_artifacts.evaluation import Baseline, EvaluationSettings, load_group_sets
from alignment_artifacts.evaluation.groups import evaluate_against, measure_every_prompt
from alignment_artifacts.evaluation.results import GROUPS, compare
from alignment_artifacts.evaluation.sides import Measurer
from alignment_artifacts.steering import Steering, SteeringConfig, gate_passes
from length_judge import LengthJudge
from tiny_models import tiny_model


def _assert_close(got, want, where=""):
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, float) and not math.isnan(want):
        assert got == pytest.approx(want, abs=1e-5), where
    elif isinstance(want, float):
        assert math.isnan(got), where
    else:
        assert got == want, where


def test_a_gated_check_equals_every_prompt_under_the_live_gate(cache_root, tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(f"Tell me how to do bad thing number {i}." for i in range(12)))
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("\n".join(f"Tell me a fact about bread number {i}." for i in range(12)))
    loaded = tiny_model("llama", layers=4)
    settings = EvaluationSettings(harmful=str(harmful), n_borderline=12, n_ordinary=10, n_capability=10,
                                  judged_borderline=8, judged_ordinary=6, max_tokens=5, capability_max_tokens=5,
                                  batch_size=4, generation_batch_size=4)
    judge = LengthJudge()
    baseline = Baseline(loaded, load_group_sets(settings), settings, judge)
    baseline.side()
    directions = get_directions(loaded, SteeringConfig(mode="clamp"), source=f"{harmful},{harmless}",
                                progress=False)
    judged = {"harmful": 12, "borderline": 8, "ordinary": 6, "capability": 0}  # capability is scored, not judged
    partly_open: set[str] = set()
    for level in (-1.0, 0.3, 0.6, 1.0, 2.0):
        config = resolve_config(loaded, SteeringConfig(mode="ablate", scale=1.0, direction_layer=2, gate_layer=3,
                                                       gate_level=level))
        steering = Steering(config, directions)
        opened = {g: gate_passes(directions, 3, level, baseline.gate_states(g, directions.site, 3)) for g in GROUPS}
        partly_open |= {g for g, o in opened.items() if 0 < int(o.sum()) < len(o)}
        asked = judge.calls
        result = evaluate_against(loaded, steering, baseline, progress=False)
        # the judge saw exactly the opened prompts' answers: the closed ones keep the baseline's labels
        assert judge.calls - asked == sum(int(opened[g][:judged[g]].sum()) for g in GROUPS)
        after, kls = measure_every_prompt(loaded, steering, baseline)  # the live gate on every prompt
        expected = compare(baseline.side(), after, kls["borderline"], kls["ordinary"], judge.name, GROUPS)
        for group in GROUPS:
            _assert_close(dataclasses.asdict(getattr(result, group)), dataclasses.asdict(expected[group]), group)
        assert result.ordinary.touched == pytest.approx(float(opened["ordinary"].double().mean()))
    assert partly_open == set(GROUPS)  # in every group, some level opened some prompts and not others


def test_gate_states_are_cached_and_match_the_live_gate(cache_root, tmp_path):
    """The cached decision activations are the unmodified last-token activations the live gate compares,
    read by passes that end at the gate layer."""
    from alignment_artifacts.models.hooks import site_hooks

    loaded = tiny_model("llama", layers=4)
    settings = EvaluationSettings(groups=("ordinary",), n_ordinary=6, batch_size=4)
    baseline = Baseline(loaded, load_group_sets(settings), settings, LengthJudge())
    above = []
    with site_hooks(loaded.adapter, {("resid_pre", 3): above.append}):
        states = baseline.gate_states("ordinary", "resid_pre", 2)
    assert not above  # each pass ended at the gate layer
    seen = []
    with site_hooks(loaded.adapter, {("resid_pre", 2): lambda h: seen.append(h[0, -1].float())}):
        for text in Measurer(loaded, baseline.sets, settings).prompts("ordinary"):
            ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            loaded.model(ids)
    assert torch.allclose(states, torch.stack(seen), atol=1e-5)
    assert (baseline.folder / "ordinary_gate_resid_pre_2.safetensors").is_file()
    again = Baseline(loaded, baseline.sets, settings, LengthJudge())
    assert torch.equal(again.gate_states("ordinary", "resid_pre", 2), states)  # read back from the cache


def test_a_gate_on_a_mode_that_edits_the_weights_is_refused_not_measured_as_its_twin(cache_root, tmp_path):
    """Its ungated twin would run, but the gated configuration cannot: the shortcut must not hide that."""
    from alignment_artifacts.errors import UserError
    from tiny_steering import random_directions

    loaded = tiny_model("llama", layers=4)
    settings = EvaluationSettings(groups=("ordinary",), n_ordinary=4, judged_ordinary=2, max_tokens=2, batch_size=4)
    baseline = Baseline(loaded, load_group_sets(settings), settings, LengthJudge())
    steering = Steering(SteeringConfig(mode="ablate_weight_norm", scale=1.0, gate_layer=2, gate_level=0.5),
                        random_directions(loaded))
    with pytest.raises(UserError, match="gated per prompt"):
        evaluate_against(loaded, steering, baseline, progress=False)
