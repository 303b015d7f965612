"""analyze() end to end on a synthetic activation store, saved results, figures and the HTML report."""

from __future__ import annotations

import base64
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_artifacts.activations import ActivationStore
from alignment_artifacts.analysis import AnalysisResult, DirectionSet, analyze, load_result, write_report
from alignment_artifacts.analysis.core import ROW_FIELDS
from alignment_artifacts.errors import UserError
from alignment_artifacts.prompts.sets import Prompt

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CATEGORIES = ("violence", "social_political", "privacy")
N_LAYERS, PAIRS, HIDDEN = 6, 12, 48
PNG = b"\x89PNG\r\n\x1a\n"


def synthetic_store(paired: bool = True, seed: int = 0) -> ActivationStore:
    """Categories with their own planted directions, strongest in the middle layers; pairs share a topic."""
    rng = np.random.default_rng(seed)
    if paired:
        prompts = [Prompt(f"{c}-{i}-{side}", f"{side} prompt {i} about {c}", int(side == "a"), c, f"{c}-{i}")
                   for c in CATEGORIES for i in range(PAIRS) for side in ("a", "n")]
    else:
        prompts = [Prompt(f"p{i}", f"prompt {i}", int(i < 14)) for i in range(30)]
    shared = rng.standard_normal(HIDDEN)
    directions = {c: (shared + rng.standard_normal(HIDDEN)) / 4 for c in (*CATEGORIES, None)}
    topics = rng.standard_normal((len(prompts), HIDDEN))
    tensors = {}
    for layer in range(N_LAYERS):
        strength = 1.5 * np.exp(-((layer - 2.5) ** 2) / 4)
        rows = [topics[i // 2 if paired else i] + (p.label - 0.5) * strength * directions[p.category]
                for i, p in enumerate(prompts)]
        x = torch.tensor(np.array(rows) + 0.3 * rng.standard_normal((len(prompts), HIDDEN)), dtype=torch.float32)
        tensors["resid_post", layer, "last"] = x + 1.0
        tensors["mlp_out", layer, "last"] = x
        tensors["mlp_out", layer, "mean"] = 0.5 * x
        tensors["mlp_out", layer, "generated:2"] = x[:, None, :].repeat(1, 2, 1)
    manifest = {"model_id": "synthetic/tiny-model", "weights_hash": "w" * 16, "hidden_size": HIDDEN,
                "prompt_set_hash": "p" * 16, "prompt_set_name": "synthetic-pairs", "dtype": "float32"}
    return ActivationStore.from_tensors(prompts, tensors, manifest)


@pytest.fixture(scope="module")
def store() -> ActivationStore:
    return synthetic_store()


@pytest.fixture(scope="module")
def result(store: ActivationStore) -> AnalysisResult:
    return analyze(store, n_permutations=200, n_bootstrap=200, progress=False)


@pytest.fixture(scope="module")
def saved(result: AnalysisResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return result.save(tmp_path_factory.mktemp("analysis") / "run")


@pytest.fixture(scope="module")
def report(saved: Path) -> Path:
    return write_report(saved, saved.parent / "report.html", "alignment-artifacts report --model synthetic")


def test_json_has_every_category_and_layer(saved: Path, result: AnalysisResult) -> None:
    data = load_result(saved)
    json.dumps(data, allow_nan=False)
    assert data["schema_version"] == 1 and data["kind"] == "alignment_artifacts.analysis"
    assert data["sources"] == ["pooled", *CATEGORIES]
    assert data["config"]["site"] == "mlp_out" and data["config"]["position"] == "last"
    assert data["model"] == {"model_id": "synthetic/tiny-model", "weights_hash": "w" * 16, "hidden_size": HIDDEN,
                             "dtype": "float32"}
    assert data["prompt_set"]["n_pairs"] == 3 * PAIRS and data["prompt_set"]["hash"] == "p" * 16
    rows = {(r["category"], r["layer"]): r for r in data["rows"]}
    assert set(rows) == {(s, layer) for s in data["sources"] for layer in range(N_LAYERS)}
    for row in rows.values():
        assert set(ROW_FIELDS) <= set(row)
        assert row["g"] == row["heldout_g"]
        assert row["ci_low"] <= row["g"] <= row["ci_high"]
        assert 0 <= row["heldout_accuracy"] <= 1 and 0 <= row["heldout_auroc"] <= 1
        assert 1 / 201 <= row["p_value"] <= row["p_holm"] <= 1 and row["p_fdr"] <= row["p_holm"]
        assert row["significant"] == (row["p_holm"] < 0.05)
    assert rows["pooled", 3]["heldout_auroc"] > 0.9 and rows["pooled", 3]["significant"]
    assert data["recommended_layers"] and set(data["recommended_layers"]) <= {1, 2, 3, 4}
    assert data["top_layer"] in data["recommended_layers"]
    assert len(data["cosine"]["categories"][str(data["top_layer"])]["matrix"]) == len(CATEGORIES)
    assert len(data["cosine"]["layers"]["pooled"]["matrix"]) == N_LAYERS
    assert data["hypotheses"]["H1"]["supported"] is None
    h2 = data["hypotheses"]["H2"]
    assert isinstance(h2["estimate"], float) and len(h2["ci"]) == 2 and isinstance(h2["supported"], bool)
    assert result.rows() == data["rows"]


def test_csv_matches_rows(saved: Path) -> None:
    with (saved / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == (1 + len(CATEGORIES)) * N_LAYERS
    assert list(table[0]) == list(ROW_FIELDS)
    assert float(table[0]["g"]) == pytest.approx(load_result(saved)["rows"][0]["g"])


def test_figures_are_valid_pngs(saved: Path) -> None:
    from matplotlib.image import imread

    figures = load_result(saved)["files"]["figures"]
    assert {Path(f).stem for f in figures} == {"effect_size", "heatmap_g", "category_cosine", "layer_cosine",
                                               "projection"}
    for rel in figures:
        path = saved / rel
        assert path.read_bytes()[:8] == PNG
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 200


def test_directions_save_and_reload_equal(saved: Path, result: AnalysisResult) -> None:
    assert set(result.directions) == {"pooled", *CATEGORIES}
    for source, original in result.directions.items():
        loaded = DirectionSet.load(saved / "directions" / source)
        assert loaded.metadata() == original.metadata()
        for name, tensor in original.tensors().items():
            assert torch.equal(loaded.tensors()[name], tensor), name
        assert loaded.model_id == "synthetic/tiny-model" and loaded.hidden_size == HIDDEN
        assert loaded.weights_hash == "w" * 16 and loaded.prompt_set_hash == "p" * 16
        basis = loaded.pca[3]
        assert basis.shape == (5, HIDDEN)
        torch.testing.assert_close(basis @ basis.T, torch.eye(5), atol=1e-4, rtol=0)
    loaded = DirectionSet.load(saved / "directions" / "pooled")
    loaded.check_compatible(HIDDEN, "w" * 16)


def test_choices_and_user_errors(store: ActivationStore) -> None:
    small = analyze(store, site="resid_post", position="last", layers=[1, 2, 3],
                    categories=["violence"], n_permutations=50, n_bootstrap=50, folds="loo", progress=True)
    assert small.site == "resid_post" and small.layers == [1, 2, 3] and small.sources == ["pooled", "violence"]
    assert small.to_json()["hypotheses"]["H2"]["supported"] is None
    assert analyze(store, position="mean", layers=[2], n_permutations=20, n_bootstrap=20,
                   progress=False).position == "mean"
    for kwargs in ({"site": "mlp_in"}, {"position": "generated:2"}, {"position": "first"}, {"layers": [99]},
                   {"categories": ["violense"]}, {"method": "mode"}):
        with pytest.raises(UserError):
            analyze(store, progress=False, **kwargs)


def test_unpaired_contrast_set_and_median_directions(tmp_path: Path) -> None:
    result = analyze(synthetic_store(paired=False), n_permutations=50, n_bootstrap=50, method="median",
                     progress=False)
    data = result.to_json()
    assert data["sources"] == ["pooled"] and not data["prompt_set"]["paired"]
    assert all(row["n_pairs"] == 0 for row in data["rows"])
    assert data["hypotheses"]["H2"]["supported"] is None
    assert result.directions["pooled"].method == "median"
    assert result.directions["pooled"].extra["pca_basis"].startswith("positive rows")
    folder = result.save(tmp_path / "unpaired")
    assert (folder / "figures" / "effect_size.png").exists()
    assert not (folder / "figures" / "category_cosine.png").exists()


def test_report_is_self_contained(report: Path, saved: Path) -> None:
    html = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.IGNORECASE)
    assert "<link" not in html and "<script" not in html
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(load_result(saved)["files"]["figures"]) == len(re.findall("<img", html))
    for blob in images:
        assert base64.b64decode(blob)[:8] == PNG
    for text in ("alignment-artifacts report --model synthetic", "synthetic/tiny-model", "w" * 16, "p" * 16,
                 "synthetic-pairs", "Recommended layers", "H1", "H2", "0.1.0"):
        assert text in html
    header = html[html.index("<th>layer</th>"):]
    assert header.index("held-out g") < header.index("in-sample g")


def test_report_from_result_object(result: AnalysisResult, tmp_path: Path) -> None:
    path = write_report(result, tmp_path / "direct.html", "python -c analyze(...)")
    assert path.read_text().count("<img") == 5


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium is not installed (/usr/bin/chromium)")
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_report.py"), str(report),
                           "--screenshot", str(shot)], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "images: 5 loaded: 5" in done.stdout
    assert shot.read_bytes()[:8] == PNG


def test_report_includes_evaluations_with_their_groups(result: AnalysisResult, tmp_path: Path) -> None:
    import torch

    from alignment_artifacts.capability import paired_difference
    from alignment_artifacts.evaluation.metrics import summarise_kl
    from alignment_artifacts.evaluation.results import BorderlineResult, EvaluationResult, HarmfulResult, OrdinaryResult

    kl = summarise_kl(torch.tensor([0.01, 0.03, 0.0]))
    evaluation = EvaluationResult(
        model="tiny", config={"mode": "ablate", "scale": 1.0, "direction_layer": 2}, judge="model:judge-x",
        harmful=HarmfulResult(4, "model:judge-x", {"refusal": 3, "evasion": 0, "compliance": 1},
                              {"refusal": 0, "evasion": 1, "compliance": 3}, 3, 1, 3, 0, 0, 1.0, -1.0),
        borderline=BorderlineResult(3, "model:judge-x", 3, 1, 0, 1, 0, 2, kl, kl, 2 / 3),
        ordinary=OrdinaryResult(3, "model:judge-x", 3, 0, 0, 0, 0, kl, 2 / 3),
        capability=paired_difference([True, True, False], [True, False, False]))
    data = json.loads(json.dumps(evaluation.to_json()))
    path = write_report(result, tmp_path / "with-eval.html", "cmd", evaluations=[data])
    html = path.read_text()
    assert "Steering evaluation" in html and "judge: model:judge-x" in html and html.count("<img") == 6
    assert "not complied (refusal + evasion), judge" in html and "collateral KL on the 2 it already answers" in html
