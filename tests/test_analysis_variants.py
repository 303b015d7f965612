"""``analyze --direction-variant``: the statistics measure the variant's direction, the output says which.

The synthetic stores plant what each variant is meant to see (or miss): a contrast that lies along
the ordinary mean (``harmless_projected`` removes it), and one clean unit among noisy ones
(``standardized`` finds it, the plain mean difference drowns it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignment_artifacts.activations import ActivationStore
from alignment_artifacts.analysis import analyze, write_report
from alignment_artifacts.analysis.directions import direction_from_groups
from alignment_artifacts.analysis.stats import hedges_g
from alignment_artifacts.errors import UserError
from alignment_artifacts.prompts.sets import Prompt
from test_analysis_report import synthetic_store
from test_api_steer import write_prompt_files
from tiny_models import save_tiny

FAST = {"n_permutations": 50, "n_bootstrap": 50, "progress": False}
N, HIDDEN = 40, 16


def planted_store(positive_mean: np.ndarray, negative_mean: np.ndarray, std: np.ndarray, seed: int = 0
                  ) -> ActivationStore:
    """Unpaired prompts, half sensitive, at two layers with the same planted group means and per-unit spread."""
    rng = np.random.default_rng(seed)
    prompts = [Prompt(f"p{i}", f"prompt {i}", int(i < N // 2)) for i in range(N)]
    tensors = {}
    for layer in range(2):
        rows = [(positive_mean if p.label else negative_mean) + std * rng.standard_normal(HIDDEN) for p in prompts]
        tensors["mlp_out", layer, "last"] = torch.tensor(np.array(rows), dtype=torch.float32)
    manifest = {"model_id": "synthetic/planted", "weights_hash": "w" * 16, "hidden_size": HIDDEN,
                "prompt_set_hash": "p" * 16, "prompt_set_name": "planted", "dtype": "float32"}
    return ActivationStore.from_tensors(prompts, tensors, manifest)


def pooled_g(store: ActivationStore, variant: str) -> float:
    rows = analyze(store, variant=variant, **FAST).to_json()["rows"]
    return min(row["g"] for row in rows if row["category"] == "pooled")


def test_a_contrast_along_the_ordinary_mean_is_what_harmless_projected_removes():
    ordinary = np.zeros(HIDDEN)
    ordinary[0] = 5.0
    store = planted_store(1.5 * ordinary, ordinary, np.ones(HIDDEN))  # sensitive = ordinary mean, longer
    assert pooled_g(store, "mean_diff") > 2.0
    assert abs(pooled_g(store, "harmless_projected")) < 1.0  # what is left is noise


def test_one_clean_unit_among_noisy_ones_is_what_standardized_finds():
    std, gap = np.ones(HIDDEN), np.zeros(HIDDEN)
    std[1], gap[1] = 0.1, 1.0  # the groups differ by 10 SDs on unit 1, by chance elsewhere
    store = planted_store(gap, np.zeros(HIDDEN), std)
    plain, standardized = pooled_g(store, "mean_diff"), pooled_g(store, "standardized")
    assert plain < 2.0 and standardized > 4.0


@pytest.mark.parametrize("variant", ["harmless_projected", "benign_subspace", "standardized"])
def test_in_sample_numbers_are_those_of_the_variant_direction(variant):
    store = synthetic_store()
    result = analyze(store, layers=[1, 2], variant=variant, benign_components=2, **FAST)
    plain = analyze(store, layers=[1, 2], **FAST).to_json()
    data = result.to_json()
    assert data["config"]["direction_variant"] == variant and data["config"]["statistics_variant"] == variant
    assert ("benign_components" in data["config"]) == (variant == "benign_subspace")
    labels = torch.tensor([p.label for p in store.prompts]).bool()
    for row, plain_row in zip(data["rows"], plain["rows"], strict=True):
        if row["category"] != "pooled":
            continue
        x = store.get("mlp_out", row["layer"], "last")
        vector = direction_from_groups(x[labels], x[~labels], "mean", variant, 2)[0].double()
        unit = vector / vector.norm()
        scores = (x.double() @ unit).numpy()
        threshold = 0.5 * (scores[labels.numpy()].mean() + scores[~labels.numpy()].mean())
        assert row["in_sample_g"] == pytest.approx(hedges_g(scores[labels.numpy()], scores[~labels.numpy()]),
                                                   rel=1e-6)
        assert row["in_sample_accuracy"] == ((scores > threshold) == labels.numpy()).mean()
        assert row["direction_norm"] == pytest.approx(float(vector.norm()), rel=1e-6)
        assert row["g"] != plain_row["g"] and row["direction_norm"] != plain_row["direction_norm"]
        saved = result.directions["pooled"]
        assert saved.variant == variant
        assert torch.allclose(saved.vectors[row["layer"]].double(), vector, rtol=1e-5, atol=1e-6)


def test_median_keeps_the_mean_difference_statistics_and_says_so():
    store = synthetic_store()
    plain = analyze(store, layers=[1, 2], **FAST)
    median = analyze(store, layers=[1, 2], variant="median", **FAST)
    config = median.to_json()["config"]
    assert config["direction_variant"] == "median" and config["statistics_variant"] == "mean_diff"
    for row, plain_row in zip(median.rows(), plain.rows(), strict=True):
        assert {k: v for k, v in row.items() if k != "direction_norm"} == \
               {k: v for k, v in plain_row.items() if k != "direction_norm"}
        assert row["direction_norm"] != plain_row["direction_norm"]  # the median direction's own norm
    assert median.directions["pooled"].variant == "median"
    assert not torch.equal(median.directions["pooled"].vectors[1], plain.directions["pooled"].vectors[1])


def test_default_names_mean_diff_and_the_report_names_the_variant(tmp_path):
    config = analyze(synthetic_store(), layers=[2], **FAST).to_json()["config"]
    assert config["direction_variant"] == "mean_diff" and config["statistics_variant"] == "mean_diff"
    median = analyze(synthetic_store(), layers=[1, 2, 3], variant="median", **FAST)
    html = write_report(median, tmp_path / "report.html", "alignment-artifacts report").read_text()
    assert "median (statistics of the mean_diff direction)" in html


def test_bad_variant_and_components_are_clear_errors():
    store = synthetic_store()
    with pytest.raises(UserError, match=r"Unknown direction variant 'harmless_projection'.*harmless_projected"):
        analyze(store, variant="harmless_projection", **FAST)
    with pytest.raises(UserError, match="at least 1"):
        analyze(store, variant="benign_subspace", benign_components=0, **FAST)


def test_command_line_variant_flags(cache_root, tmp_path, capsys):
    from alignment_artifacts.cli import main

    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    base = ["analyze", "--model", str(folder), "--prompts", write_prompt_files(tmp_path), "--permutations", "20",
            "--bootstrap", "20", "--folds", "2", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--direction-variant", "benign_subspace", "--benign-components", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert plain["config"]["direction_variant"] == "mean_diff"
    assert data["config"]["direction_variant"] == "benign_subspace" and data["config"]["benign_components"] == 2
    assert data["output_folder"] != plain["output_folder"]  # beside the plain analysis, not over it
    assert [r["g"] for r in data["rows"]] != [r["g"] for r in plain["rows"]]
    saved = json.loads((cache_root.parent / data["output_folder"] / "directions" / "pooled" /
                        "directions.json").read_text())
    assert saved["variant"] == "benign_subspace" and saved["extra"]["benign_components"] == 2

    assert main([*base[:-1], "--direction-variant", "standardized"]) == 0
    assert "direction variant: standardized" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--direction-variant", "mean-diff"])
    assert exit_info.value.code == 2 and "invalid choice: 'mean-diff'" in capsys.readouterr().err
    assert main([*base, "--benign-components", "0"]) == 2
    assert "--benign-components must be at least 1" in capsys.readouterr().err


def test_command_line_method_median_and_its_clash_with_the_median_variant(cache_root, tmp_path, capsys):
    """``analyze --method median``, which docs/steering-modes.md names: geometric-median centres in their own folder;
    combined with ``--direction-variant median`` (per-unit medians, another thing) it is an error."""
    from alignment_artifacts.cli import main

    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    base = ["analyze", "--model", str(folder), "--prompts", write_prompt_files(tmp_path), "--permutations", "20",
            "--bootstrap", "20", "--folds", "2", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--method", "median"]) == 0
    median = json.loads(capsys.readouterr().out)
    assert plain["config"]["method"] == "mean" and median["config"]["method"] == "median"
    assert median["output_folder"] != plain["output_folder"]  # beside the plain analysis, not over it
    saved = [json.loads((cache_root.parent / data["output_folder"] / "directions" / "pooled" /
                         "directions.json").read_text()) for data in (plain, median)]
    assert saved[0]["method"] == "mean" and saved[1]["method"] == "median"
    assert saved[0]["norms"] != saved[1]["norms"]
    assert [r["g"] for r in median["rows"]] == [r["g"] for r in plain["rows"]]  # statistics: the mean difference's
    assert main([*base[:-1], "--method", "median"]) == 0
    assert "group centres: geometric medians" in capsys.readouterr().out
    assert main([*base, "--method", "median", "--direction-variant", "median"]) == 2
    assert "two different robust directions" in capsys.readouterr().err
