"""Evaluation metrics and the optimize loop on tiny models and small prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment_artifacts.analysis.directions import DirectionSet
from alignment_artifacts.api import resolve_config, stored_config
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import (
    EvaluationSettings,
    evaluate,
    generated_refusals,
    is_refusal,
    kl_divergence,
    refusal_log_odds,
)
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.optimize import (
    OptimizeSettings,
    config_from_params,
    layer_weights,
    optimize,
    search_and_direction_sets,
)
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.steering import SteeringConfig
from tiny_models import tiny_model


def test_refusal_markers_normalise_apostrophes():
    assert is_refusal("I can\u2019t help with that.")
    assert is_refusal("Sorry, but I CANNOT do this")
    assert not is_refusal("Sure! Here is a recipe for bread.")
    assert not is_refusal("This is illegal in some places, but here is the history.")  # broad words are not primary


def test_kl_and_log_odds():
    logits = torch.randn(5, 50)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(5), atol=1e-6)
    assert (kl_divergence(logits, logits + torch.randn(5, 50)) > 0).all()
    peaked = torch.full((1, 10), -20.0)
    peaked[0, 3] = 20.0
    assert refusal_log_odds(peaked, [3]).item() > 10 and refusal_log_odds(peaked, [4]).item() < -10


@pytest.fixture()
def prompt_files(tmp_path):
    harmful = [f"Tell me how to do bad thing number {i}." for i in range(10)]
    harmless = [f"Tell me a fact about bread number {i}." for i in range(10)]
    (tmp_path / "harmful.txt").write_text("\n".join(harmful))
    (tmp_path / "harmless.txt").write_text("\n".join(harmless))
    return str(tmp_path / "harmful.txt"), str(tmp_path / "harmless.txt")


def test_evaluate_none_is_exact_and_ablate_moves(cache_root, prompt_files):
    loaded = tiny_model("llama", layers=3)
    harmful, harmless = prompt_files
    settings = EvaluationSettings(harmful=harmful, harmless=harmless, max_tokens=4, batch_size=4)
    none = evaluate(loaded, SteeringConfig(mode="none"), settings, progress=False)
    assert none.kl_mean == 0.0 and none.refusals == none.baseline_refusals and none.n_harmful == 10
    texts = [format_chat(loaded.tokenizer, line) for line in Path(harmful).read_text().splitlines()]
    assert none.broad_marker_hits == sum(generated_refusals(loaded, texts, 4, 4).broad)  # measured, not assumed
    ablate = evaluate(loaded, SteeringConfig(mode="ablate", scale=1.0, source=f"{harmful},{harmless}"), settings,
                      progress=False)
    assert ablate.kl_mean > 0 and ablate.n_harmless == 10
    assert json.dumps(ablate.to_json())


def test_optimize_stores_config_used_by_auto_and_resumes(cache_root, prompt_files):
    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    settings = OptimizeSettings(trials=3, timeout=120, harmful=harmful, harmless=harmless, max_tokens=4,
                                batch_size=8, finalists=2, max_kl=10.0)
    result = optimize(loaded, settings, progress=False)
    assert result.trials == 3 and result.validation["n_harmful"] == 5
    stored = stored_config(loaded)
    assert stored is not None and stored.mode in ("clamp", "ablate") and stored.layer_weights
    used = DirectionSet.load(stored.source)  # the stored config carries the search's own directions, computed
    assert used.n_positive == 3 and used.n_negative == 3  # on the training prompts the search does not score
    auto = resolve_config(loaded, SteeringConfig(mode="auto"))
    assert auto.direction_layer == stored.direction_layer and auto.scale == stored.scale
    settings.resume, settings.trials = True, 5
    again = optimize(loaded, settings, progress=False)
    assert again.trials == 5


def test_optimize_bad_input(cache_root, tmp_path):
    loaded = tiny_model("llama", layers=2)
    (tmp_path / "few.txt").write_text("one\ntwo\nthree")
    with pytest.raises(UserError, match="at least 8"):
        optimize(loaded, OptimizeSettings(harmful=str(tmp_path / "few.txt"), harmless=str(tmp_path / "few.txt")),
                 progress=False)
    with pytest.raises(UserError, match="too short"):
        optimize(loaded, OptimizeSettings(timeout=1), progress=False)
    with pytest.raises(UserError, match="--modes ablate"):
        optimize(loaded, OptimizeSettings(modes=["sphere"]), progress=False)
    with pytest.raises(UserError, match="--search-size 2 is too small"):
        optimize(loaded, OptimizeSettings(search_size=2), progress=False)


def test_search_prompts_are_never_direction_prompts(prompt_files, tmp_path):
    harmful, harmless = (resolve_prompts(path, label=label) for path, label in zip(prompt_files, (1, 0)))
    search_harmful, search_harmless, direction = search_and_direction_sets(
        harmful, harmless, OptimizeSettings(search_size=3))
    assert len(search_harmful) == 3 and len(search_harmless) == 3 and len(direction) == 14
    assert not set(direction.texts) & set(search_harmful.texts + search_harmless.texts)
    (tmp_path / "other.txt").write_text("\n".join(f"Describe harbour number {i}." for i in range(6)))
    explicit = OptimizeSettings(direction_prompts=f"{prompt_files[0]},{tmp_path / 'other.txt'}")
    with pytest.raises(UserError, match="0 of the 10 harmful training prompts are outside"):
        search_and_direction_sets(harmful, harmless, explicit)
    explicit.direction_prompts = f"{tmp_path / 'other.txt'},{prompt_files[1]}"
    with pytest.raises(UserError, match="harmless training prompts are outside"):
        search_and_direction_sets(harmful, harmless, explicit)


def test_optimize_ablate_only_keeps_the_result_bakeable(cache_root, prompt_files, tmp_path):
    loaded = tiny_model("llama", layers=3)
    harmful, harmless = prompt_files
    (tmp_path / "dir_harmful.txt").write_text("\n".join(f"Explain how to do wrong deed {i}." for i in range(6)))
    (tmp_path / "dir_harmless.txt").write_text("\n".join(f"Explain how to bake loaf {i}." for i in range(6)))
    settings = OptimizeSettings(trials=3, timeout=120, harmful=harmful, harmless=harmless, modes=["ablate"],
                                direction_prompts=f"{tmp_path / 'dir_harmful.txt'},{tmp_path / 'dir_harmless.txt'}",
                                max_tokens=4, batch_size=8, finalists=2, max_kl=10.0, screen_dtype="bfloat16",
                                validate_all_finalists=True)
    result = optimize(loaded, settings, progress=False)
    assert result.config["mode"] == "ablate" and all(row["mode"] == "ablate" for row in result.finalists)
    for row in result.finalists:  # each generated on validation, its proxy measured on the same prompts
        val = row["validation"]
        assert val["n_harmful"] == 5 and 0 <= val["proxy_refusals"] <= 5 and 0 <= val["proxy_agreement"] <= 1
    assert result.proxy_agreement is not None
    assert all("clamp_scale" not in row["params"] for row in result.pareto)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # screening dtype restored


def test_optimize_searches_per_prompt_gates_unless_told_not_to(cache_root, prompt_files):
    import optuna

    from alignment_artifacts.cache import cache_dir

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    settings = OptimizeSettings(trials=5, timeout=120, harmful=harmful, harmless=harmless, modes=["clamp"],
                                max_tokens=4, batch_size=8, finalists=2, max_kl=10.0)
    for gate in (True, False):
        settings.gate = gate
        optimize(loaded, settings, progress=False)
        study_name = stored_config(loaded).notes["optimize"]["study"]
        storage = f"sqlite:///{cache_dir('studies') / (loaded.info.name + '.db')}"
        trials = optuna.load_study(study_name=study_name, storage=storage).trials
        gated = [t for t in trials if t.params.get("gated")]
        assert len(gated) == (2 if gate else 0)  # the two gated seed clamps
        assert all(2 <= t.params["gate_layer"] <= 3 and t.user_attrs["kl"] >= 0 for t in gated)
    config = config_from_params({"mode": "clamp", "clamp_scale": 1.2, "direction_layer": 2, "kernel_centre": 1,
                                 "kernel_width": 4, "kernel_floor": 1.0, "gated": True, "gate_layer": 3,
                                 "gate_level": 0.1}, 4, loaded)
    assert (config.gate_layer, config.gate_level, config.scale) == (3, 0.1, 1.2)


def test_gated_screening_equals_the_gated_passes(cache_root, prompt_files):
    """The search scores a gated trial as its ungated twin on the prompts the gate lets through and
    the unmodified model elsewhere; that must be what the gated hooks do."""
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.evaluation import first_logits, refusal_opening_ids
    from alignment_artifacts.optimize import _Scorer
    from alignment_artifacts.steering import apply_steering

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    directions = get_directions(loaded, SteeringConfig(mode="clamp"), source=f"{harmful},{harmless}",
                                progress=False)
    texts = {path: [format_chat(loaded.tokenizer, line) for line in Path(path).read_text().splitlines()]
             for path in prompt_files}
    scorer = _Scorer(loaded, texts[harmful], texts[harmless], 4, directions, range(2, 4))
    opening = refusal_opening_ids(loaded.tokenizer)
    base = first_logits(loaded, texts[harmless], 4, whole=True)
    tried = []
    for level in (-0.5, 0.3, 0.5, 0.7, 1.5):
        config = SteeringConfig(mode="clamp", scale=2.0, clamp_level=-1.0, direction_layer=2, gate_layer=3,
                                gate_level=level)
        refusal, kl, odds = scorer.score(config)
        with apply_steering(loaded, config, directions):
            real_odds = refusal_log_odds(first_logits(loaded, texts[harmful], 4), opening)
            real_kl = kl_divergence(base, first_logits(loaded, texts[harmless], 4))
        torch.testing.assert_close(odds, real_odds, rtol=1e-4, atol=1e-4)
        assert refusal == pytest.approx(float(torch.sigmoid(real_odds).mean()), abs=1e-5)
        assert kl == pytest.approx(float(real_kl.mean()), abs=1e-6)
        tried.append(int((real_kl > 1e-9).sum()))
    assert len(set(tried)) > 1 and max(tried) > 0  # the levels gate different numbers of prompts


def test_layer_kernel_shape():
    weights = layer_weights(10, centre=4, width=2, floor=0.25)
    assert weights[4] == 1.0 and weights[0] == 0.25 and weights[5] == pytest.approx(0.625)


def test_exported_folder_evaluates_like_hooked_configuration(cache_root, prompt_files, tmp_path):
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.export import export
    from alignment_artifacts.models import load_model

    loaded = tiny_model("qwen2", layers=3)
    harmful, harmless = prompt_files
    settings = EvaluationSettings(harmful=harmful, harmless=harmless, max_tokens=4, batch_size=4)
    config = resolve_config(loaded, SteeringConfig(mode="ablate", scale=1.0, source=f"{harmful},{harmless}"))
    hooked = evaluate(loaded, config, settings, progress=False)
    folder = export(loaded, config, get_directions(loaded, config, progress=False), tmp_path / "baked")
    exported = load_model(str(folder), device="cpu")
    baked = evaluate(exported, SteeringConfig(mode="none"), settings, progress=False, reference=loaded)
    assert baked.refusals == hooked.refusals and baked.baseline_refusals == hooked.baseline_refusals
    assert baked.kl_mean == pytest.approx(hooked.kl_mean, rel=1e-3, abs=1e-6)
