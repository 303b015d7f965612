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
from alignment_artifacts.optimize import OptimizeSettings, layer_weights, optimize
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
    assert none.broad_marker_hits == sum(generated_refusals(loaded, texts, 4, 4)[1])  # measured, not assumed
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
    used = DirectionSet.load(stored.source)  # the stored config carries the search's own directions,
    assert used.n_positive == 5 and used.n_negative == 5  # computed on the training split only
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


def test_optimize_ablate_only_keeps_the_result_bakeable(cache_root, prompt_files):
    loaded = tiny_model("llama", layers=3)
    harmful, harmless = prompt_files
    settings = OptimizeSettings(trials=3, timeout=120, harmful=harmful, harmless=harmless, modes=["ablate"],
                                direction_prompts=f"{harmful},{harmless}", max_tokens=4, batch_size=8, finalists=2,
                                max_kl=10.0, screen_dtype="bfloat16")
    result = optimize(loaded, settings, progress=False)
    assert result.config["mode"] == "ablate" and all(row["mode"] == "ablate" for row in result.finalists)
    assert all("clamp_scale" not in row["params"] for row in result.pareto)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # screening dtype restored


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
