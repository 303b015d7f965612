"""Evaluation metrics and the optimize loop on tiny models and small prompt files."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from alignment_artifacts.analysis.directions import DirectionSet
from alignment_artifacts.api import resolve_config, stored_config
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import (
    EvaluationSettings,
    evaluate,
    first_logits,
    generated_refusals,
    is_degenerate,
    is_refusal,
    kl_divergence,
    refusal_log_odds,
    refusal_opening_ids,
)
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.optimize import (
    OptimizeSettings,
    choose,
    config_from_params,
    layer_weights,
    optimize,
    pick_finalists,
    search_and_direction_sets,
    with_an_ungated_finalist,
)
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
from length_judge import LengthJudge
from tiny_models import tiny_model


def test_refusal_markers_normalise_apostrophes():
    assert is_refusal("I can\u2019t help with that.")
    assert is_refusal("Sorry, but I CANNOT do this")
    assert not is_refusal("Sure! Here is a recipe for bread.")
    assert not is_refusal("This is illegal in some places, but here is the history.")  # broad words are not primary


def test_a_loop_is_degenerate_and_ordinary_repetition_is_not():
    assert is_degenerate("You are a big, mean, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy, lazy")
    assert is_degenerate("The answer is the answer is the answer is the answer is the answer is the answer")
    assert not is_degenerate("no no no no no no no no")  # fewer than 12 words: too short to call
    steps = ("1. Preheat the oven to 200 C. 2. Mix the flour and the salt. 3. Add the water and the yeast. "
             "4. Knead the dough for ten minutes. 5. Let the dough rise for an hour. 6. Bake the bread.")
    code = "for i in range(3):\n    print(i)\nfor j in range(3):\n    print(j * 2)\nprint('done')"
    table = ("| day | task |\n| Monday | gym |\n| Tuesday | gym |\n| Wednesday | rest |\n| Thursday | gym |\n"
             "| Friday | rest |")
    assert not any(is_degenerate(text) for text in (steps, code, table, "Sure! " * 3 + "Here is a recipe for bread."))


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


SMALL = dict(n_borderline=6, n_ordinary=8, n_capability=6, max_tokens=4, capability_max_tokens=4, batch_size=4,
             generation_batch_size=4)


def test_evaluate_reports_four_groups_none_exact_and_ablate_moves(cache_root, prompt_files):
    loaded = tiny_model("llama", layers=3)
    harmful, harmless = prompt_files
    settings = EvaluationSettings(harmful=harmful, **SMALL)
    none = evaluate(loaded, SteeringConfig(mode="none"), settings, progress=False)
    data = json.loads(json.dumps(none.to_json()))
    assert {"harmful", "borderline", "ordinary", "capability"} <= set(data) and data["judge"] == "markers"
    # mode none reuses the baseline as its after side; a reference model forces the after side to be measured
    measured = evaluate(loaded, SteeringConfig(mode="none"), settings, progress=False, reference=loaded)
    for group in ("harmful", "borderline", "ordinary", "capability"):
        assert getattr(measured, group) == getattr(none, group), group
    none = measured
    h = none.harmful
    assert h.n == 10 and h.before == h.after and h.marker_refusals_before == h.marker_refusals_after
    # markers' only evasion is a loop (evaluation.is_degenerate), and 4-token answers are too short for one
    assert sum(h.before.values()) == 10 and h.before["evasion"] == 0
    texts = [format_chat(loaded.tokenizer, line) for line in Path(harmful).read_text().splitlines()]
    assert h.broad_marker_hits == sum(generated_refusals(loaded, texts, 4, 4).broad)  # measured, not assumed
    assert none.ordinary.kl.mean == 0.0 and none.ordinary.n == 8 and none.ordinary.touched == 0.0
    assert none.borderline.n == 6 and none.borderline.collateral_kl.mean == 0.0
    assert none.capability.n == 6 and none.capability.delta == 0.0
    ablate = evaluate(loaded, SteeringConfig(mode="ablate", scale=1.0, source=f"{harmful},{harmless}"), settings,
                      progress=False)
    assert ablate.ordinary.kl.mean > 0 and ablate.ordinary.touched == 1.0  # unconditional: every prompt moves
    assert ablate.ordinary.kl.low <= ablate.ordinary.kl.mean <= ablate.ordinary.kl.high
    assert ablate.borderline.kl.mean > 0 and ablate.borderline.touched == 1.0
    assert ablate.capability.n == 6 and ablate.capability.before == none.capability.before


def test_all_groups_in_one_queue_give_what_each_group_gives_alone(prompt_files):
    """Measurer.answers runs every group in one queue, with each group's own token limit."""
    from alignment_artifacts.evaluation.results import Side
    from alignment_artifacts.evaluation.sides import Measurer, load_group_sets

    loaded = tiny_model("llama", layers=3)
    settings = EvaluationSettings(harmful=prompt_files[0], **{**SMALL, "max_tokens": 6, "capability_max_tokens": 3})
    sets = load_group_sets(settings)
    limits = {"harmful": None, "borderline": 4, "ordinary": 5, "capability": None}
    together, apart = Side(), Side()
    measurer = Measurer(loaded, sets, settings)
    measurer.answers(together, limits)
    replies_together = dict(measurer.pending)
    measurer.judge_pending(LengthJudge(), together)
    replies_apart = {}
    for group, limit in limits.items():
        measurer.answers(apart, {group: limit})
        replies_apart.update(measurer.pending)
        measurer.judge_pending(LengthJudge(), apart)
    assert replies_together == replies_apart
    assert [len(replies_together[g]) for g in ("harmful", "borderline", "ordinary")] == [10, 4, 5]
    assert max(len(loaded.tokenizer(r)["input_ids"]) for r in replies_together["ordinary"]) > 3  # limits differ
    # the first-token scores come from prefills of other batch shapes: equal up to float32 rounding (which
    # differs between CPUs), everything else exactly
    assert together.harmful_odds == pytest.approx(apart.harmful_odds, abs=1e-5)
    assert replace(together, harmful_odds=apart.harmful_odds) == apart and len(together.capability_correct) == 6


def test_evaluate_cli_json_has_the_four_groups(cache_root, prompt_files, capsys, tmp_path):
    from alignment_artifacts.cli import main
    from tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    harmful, _ = prompt_files
    assert main(["evaluate", "--model", str(folder), "--mode", "none", "--harmful", harmful, "--n-borderline", "4",
                 "--n-ordinary", "4", "--n-capability", "4", "--max-tokens", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["harmful"]["n"] == 10 and data["borderline"]["n"] == 4 and data["ordinary"]["n"] == 4
    assert data["capability"]["n"] == 4 and data["judge"] == "markers"
    assert main(["evaluate", "--model", str(folder), "--groups", "harmful,typo"]) == 2
    assert "Unknown evaluation group(s) ['typo']" in capsys.readouterr().err


def test_collateral_kl_of_a_gate_counts_only_the_prompts_it_lets_through(cache_root, prompt_files):
    """A gate that steers some borderline prompts: the collateral KL sees exactly those, among the
    prompts the unmodified model answers, and the touched fraction is the share it let through."""
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.evaluation import Baseline, chat_texts, load_group_sets
    from alignment_artifacts.evaluation.groups import evaluate_against

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    settings = EvaluationSettings(harmful=harmful, groups=("borderline", "ordinary"), n_borderline=16,
                                  n_ordinary=8, max_tokens=3, batch_size=4, generation_batch_size=4)
    judge = LengthJudge()
    baseline = Baseline(loaded, load_group_sets(settings), settings, judge)
    directions = get_directions(loaded, SteeringConfig(mode="clamp"), source=f"{harmful},{harmless}",
                                progress=False)
    touched = set()
    for level in (-1.0, 0.5, 2.0):
        config = resolve_config(loaded, SteeringConfig(mode="ablate", scale=1.0, direction_layer=2, gate_layer=3,
                                                       gate_level=level))
        result = evaluate_against(loaded, Steering(config, directions), baseline, progress=False)
        b = result.borderline
        labels = baseline.side().borderline_labels
        answered = [x != "refusal" for x in labels]  # an evasion of a safe prompt is still an answer to it
        assert "evasion" in labels and b.n_answered == sum(answered) and 0 < b.n_answered < 16
        # the same numbers from the per-prompt KLs: gated-out prompts are bit-identical (KL exactly 0)
        with apply_steering(loaded, config, directions):
            steered = first_logits(loaded, chat_texts(loaded, baseline.sets.borderline, None), 4)
        kl = kl_divergence(baseline.logits("borderline", share_prefix=False), steered)
        assert b.touched == pytest.approx(float((kl > 1e-6).double().mean()))
        assert b.collateral_kl.mean == pytest.approx(float(kl[torch.tensor(answered)].mean()), abs=1e-6)
        touched.add(round(b.touched, 3))
    assert (len(touched) > 1 and 0.0 in touched) or len(touched) == 3  # the levels let different shares through
    calls = judge.calls
    Baseline(loaded, load_group_sets(settings), settings, judge).side()  # cached: the judge is not asked again
    assert judge.calls == calls
    changed = LengthJudge()
    changed.key = "length, other rules"  # same name, other labels possible: the cached labels are not its own
    Baseline(loaded, load_group_sets(settings), settings, changed).side()
    assert changed.calls > 0


def _optimize_settings(prompt_files, **extra):
    harmful, harmless = prompt_files
    values = dict(trials=3, timeout=120, harmful=harmful, harmless=harmless, max_tokens=3, batch_size=8,
                  generation_batch_size=8, finalists=2, max_kl=10.0, search_size=6, n_val_ordinary=6,
                  n_val_borderline=6, judged_borderline=4, judged_ordinary=3, n_capability=4)
    values.update(extra)
    return OptimizeSettings(**values)


def test_optimize_stores_four_groups_and_a_relative_direction_path_used_by_auto(cache_root, prompt_files,
                                                                                 tmp_path, monkeypatch):
    from alignment_artifacts import cache

    loaded = tiny_model("llama", layers=4)
    settings = _optimize_settings(prompt_files)
    result = optimize(loaded, settings, progress=False)
    assert result.trials == 3 and result.validation["harmful"]["n"] == 5
    assert {"harmful", "borderline", "ordinary", "capability"} <= set(result.validation)
    assert all({"harmful", "ordinary"} <= set(row["validation"]) for row in result.finalists)
    stored = stored_config(loaded)
    assert stored is not None and stored.mode in ("clamp", "ablate") and stored.layer_weights
    assert not Path(stored.source).is_absolute()  # relative to the cache root: a moved cache keeps working
    assert SteeringConfig.load(result.stored_at) == stored  # --config takes the stored file as it is
    used = DirectionSet.load(cache_root / stored.source)  # the search's own directions: the training prompts
    assert used.n_positive == 3 and used.n_negative == 10  # it does not score, and the harmless set
    moved = tmp_path / "moved"
    cache_root.rename(moved)
    monkeypatch.setenv(cache.ENV_VAR, str(moved))
    auto = resolve_config(loaded, SteeringConfig(mode="auto"))
    assert auto.direction_layer == stored.direction_layer and auto.scale == stored.scale
    from alignment_artifacts.api import get_directions

    assert get_directions(loaded, auto, progress=False).prompt_set_hash == used.prompt_set_hash
    settings.resume, settings.trials = True, 5
    again = optimize(loaded, settings, progress=False)
    assert again.trials == 5


def test_the_unmodified_side_is_measured_whole_before_the_search_is_priced(cache_root, prompt_files, monkeypatch):
    """The search gets what --timeout leaves after pricing the checks from the baseline; the unmodified
    first-token logits that every check's KL compares with belong to that baseline, not to the first check."""
    import alignment_artifacts.optimize as optimize_module

    real, seen = optimize_module.search_budget, {}

    def recording(settings, baseline, started):
        seen["files"] = {p.name for p in baseline.folder.iterdir()}
        seen["seconds"] = set(baseline.seconds)
        return real(settings, baseline, started)

    monkeypatch.setattr(optimize_module, "search_budget", recording)
    optimize(tiny_model("llama", layers=3), _optimize_settings(prompt_files, trials=2, finalists=1), progress=False)
    assert {"borderline_logits.safetensors", "ordinary_logits.safetensors"} <= seen["files"]
    assert seen["seconds"] == {"harmful", "borderline", "ordinary", "capability"}


def test_a_resumed_optimize_reads_the_finalist_checks_an_earlier_run_finished(cache_root, prompt_files, monkeypatch):
    """A check costs about a baseline; --resume after an interruption must not pay it again. A damaged
    check file is measured again, and other directions are another check."""
    import alignment_artifacts.optimize.check as check_module

    real, calls = check_module.evaluate_against, []

    def counting(*args, **kwargs):
        calls.append(args[1].config)
        return real(*args, **kwargs)

    import alignment_artifacts.optimize as optimize_module

    real_price, prices = optimize_module.checks_price, []

    def recording(*args, **kwargs):
        prices.append(real_price(*args, **kwargs))
        return prices[-1]

    monkeypatch.setattr(check_module, "evaluate_against", counting)
    monkeypatch.setattr(optimize_module, "checks_price", recording)
    loaded = tiny_model("llama", layers=3)
    # clamps first: two clamp seeds, so the finalist is not the plain recipe, whose check is a separate one
    settings = _optimize_settings(prompt_files, trials=2, finalists=1, check_plain_recipe=True,
                                  modes=["clamp", "ablate"])
    first = optimize(loaded, settings, progress=False)
    assert len(calls) == 2 and prices[-1] > 0  # the finalist and the plain recipe; the finalist was priced
    settings.resume = True
    again = optimize(loaded, settings, progress=False)
    assert len(calls) == 2 and again.validation == first.validation
    assert prices[-1] == 0  # its kept check costs nothing: the search could have had that time
    assert [row["validation"] for row in again.finalists] == [row["validation"] for row in first.finalists]
    assert [row["reused"] for row in first.finalists + again.finalists] == [False, False, True, True]

    kept = sorted((cache_root / "evaluation").glob("*/checks/*.json"))
    assert len(kept) == 2
    kept[0].write_text('{"harmful": ')  # cut short by a crash of another tool
    third = optimize(loaded, settings, progress=False)
    untimed = lambda validation: {k: v for k, v in validation.items() if k != "seconds"}  # noqa: E731
    assert len(calls) == 3 and sorted(row["reused"] for row in third.finalists) == [False, True]
    assert [untimed(row["validation"]) for row in third.finalists] == \
        [untimed(row["validation"]) for row in first.finalists]
    assert untimed(json.loads(kept[0].read_text())) in [untimed(row["validation"]) for row in first.finalists]


def test_configurations_checked_without_a_search_sit_beside_the_plain_recipe_and_are_kept(cache_root, prompt_files):
    """A setting chosen outside the search (by a hand audit) is checked as a finalist is, against the same
    baseline and beside the plain recipe; the checks are kept, so a second run reads them; the plain
    recipe's row matches the one optimize checks for reference."""
    from alignment_artifacts.optimize import check_configurations

    harmful, harmless = prompt_files
    loaded = tiny_model("llama", layers=3)
    settings = _optimize_settings(prompt_files, trials=2, finalists=1, check_plain_recipe=True)
    clamp = SteeringConfig(mode="clamp", scale=1.0, clamp_level=0.2, direction_layer=1, gate_layer=1,
                           gate_level=0.3, source=f"{harmful},{harmless}")
    rows = check_configurations(loaded, [clamp], settings, progress=False)
    assert [r.get("reference") for r in rows] == ["plain recipe", None] and not any(r["reused"] for r in rows)
    assert rows[1]["config"]["mode"] == "clamp" and rows[1]["config"]["gate_layer"] == 1
    assert rows[0]["config"]["mode"] == "ablate" and rows[0]["config"]["scale"] == 1.0
    assert rows[1]["validation"]["harmful"]["n"] > 0 and rows[1]["validation"]["capability"] is not None
    again = check_configurations(loaded, [clamp], settings, progress=False)
    assert all(r["reused"] for r in again) and [r["validation"] for r in again] == [r["validation"] for r in rows]
    searched = optimize(loaded, settings, progress=False)  # the same baseline: its plain recipe is the one read
    plain = next(r for r in searched.finalists if r.get("reference") == "plain recipe")
    assert plain["reused"] and plain["validation"] == rows[0]["validation"]


def test_a_kept_check_is_keyed_by_the_directions_numbers_the_configuration_and_the_baseline():
    from types import SimpleNamespace

    from alignment_artifacts.optimize.check import check_path

    def directions(value):
        vectors = {0: torch.full((4,), value), 1: torch.ones(4)}
        return DirectionSet(site="resid_post", position="last", source="pooled", vectors=vectors,
                            positive_mean={k: v * 2 for k, v in vectors.items()},
                            negative_mean={k: v * 0 for k, v in vectors.items()}, hidden_size=4)

    def judge(key):
        return SimpleNamespace(key=key)

    baseline = SimpleNamespace(key="b", judge=judge("j"), settings=EvaluationSettings(), folder=Path("/kept"))
    config = SteeringConfig(mode="ablate", direction_layer=1)
    path = check_path(baseline, Steering(config, directions(1.0)))
    assert path == check_path(baseline, Steering(config, directions(1.0))) and path.parent == Path("/kept/checks")
    others = [check_path(baseline, Steering(config, directions(1.0 + 1e-6))),
              check_path(baseline, Steering(replace(config, scale=0.9), directions(1.0))),
              check_path(SimpleNamespace(**{**vars(baseline), "key": "c"}), Steering(config, directions(1.0))),
              check_path(SimpleNamespace(**{**vars(baseline), "judge": judge("k")}), Steering(config, directions(1.0))),
              check_path(SimpleNamespace(**{**vars(baseline), "settings": EvaluationSettings(judged_borderline=9)}),
                         Steering(config, directions(1.0)))]
    assert path not in others and len(set(others)) == len(others)


def test_optimize_bad_input(cache_root, tmp_path):
    loaded = tiny_model("llama", layers=2)
    (tmp_path / "few.txt").write_text("one\ntwo\nthree")
    with pytest.raises(UserError, match="at least 8"):
        optimize(loaded, OptimizeSettings(harmful=str(tmp_path / "few.txt")), progress=False)
    with pytest.raises(UserError, match="too short"):
        optimize(loaded, OptimizeSettings(timeout=1), progress=False)
    with pytest.raises(UserError, match="--modes ablate"):
        optimize(loaded, OptimizeSettings(modes=["sphere"]), progress=False)
    with pytest.raises(UserError, match="--search-size 2 is too small"):
        optimize(loaded, OptimizeSettings(search_size=2), progress=False)
    with pytest.raises(UserError, match="--n-capability 0, --judged-ordinary 0: every check size"):
        optimize(loaded, OptimizeSettings(n_capability=0, judged_ordinary=0), progress=False)


def test_search_prompts_are_never_direction_prompts(prompt_files, tmp_path):
    harmful, harmless = (resolve_prompts(path, label=label) for path, label in zip(prompt_files, (1, 0)))
    search_harmful, direction = search_and_direction_sets(harmful, harmless, OptimizeSettings(search_size=3))
    assert len(search_harmful) == 3 and len(direction) == 17
    assert not set(direction.texts) & set(search_harmful.texts)
    (tmp_path / "other.txt").write_text("\n".join(f"Describe harbour number {i}." for i in range(6)))
    explicit = OptimizeSettings(direction_prompts=f"{prompt_files[0]},{tmp_path / 'other.txt'}")
    with pytest.raises(UserError, match="0 of the 10 harmful training prompts are outside"):
        search_and_direction_sets(harmful, harmless, explicit)


def test_optimize_ablate_only_keeps_the_result_bakeable(cache_root, prompt_files, tmp_path):
    loaded = tiny_model("llama", layers=3)
    (tmp_path / "dir_harmful.txt").write_text("\n".join(f"Explain how to do wrong deed {i}." for i in range(6)))
    (tmp_path / "dir_harmless.txt").write_text("\n".join(f"Explain how to bake loaf {i}." for i in range(6)))
    settings = _optimize_settings(prompt_files, modes=["ablate"], screen_dtype="bfloat16",
                                  direction_prompts=f"{tmp_path / 'dir_harmful.txt'},{tmp_path / 'dir_harmless.txt'}",
                                  check_plain_recipe=True)
    result = optimize(loaded, settings, progress=False)
    assert result.config["mode"] == "ablate" and all(row["config"]["mode"] == "ablate" for row in result.finalists)
    plain = [row for row in result.finalists if row.get("reference") == "plain recipe"]
    assert len(plain) == 1 and plain[0]["config"]["scale"] == 1.0
    assert all("clamp_scale" not in row["params"] for row in result.pareto)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # screening dtype restored


@pytest.mark.parametrize("mode", ["clamp", "ablate"])
def test_optimize_charges_a_gate_for_the_borderline_prompts_it_steers(cache_root, prompt_files, mode):
    """The screening cost of a gated trial includes the collateral KL on borderline prompts it lets
    through, equal to what the real gated hooks do there; a gate that lets none through costs nothing.
    Harmful prompts pass with a margin: their odds are the real hooks' at the stricter level, and one the
    stricter gate misses counts as refused."""
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.optimize.search import UNSEEN_HARMFUL_PLACE, Scorer

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    directions = get_directions(loaded, SteeringConfig(mode="clamp"), source=f"{harmful},{harmless}",
                                progress=False)
    chat = lambda lines: [format_chat(loaded.tokenizer, t) for t in lines]  # noqa: E731
    borderline = chat(resolve_prompts("borderline:train", label=0).filter(label=0).texts[:16])
    ordinary = chat(resolve_prompts("ordinary:train").texts[:8])
    harmful_texts = chat(Path(harmful).read_text().splitlines())
    scorer = Scorer(loaded, harmful_texts, ordinary, borderline, 4, {"mean_diff": directions}, range(2, 4))
    opening = refusal_opening_ids(loaded.tokenizer)
    base = {"ordinary": first_logits(loaded, ordinary, 4, share_prefix=False),
            "borderline": first_logits(loaded, borderline, 4, share_prefix=False)}
    costs, margin_mattered = [], False
    for level in (-0.5, 0.3, 0.75, 1.4):  # the harmful margin's level must stay in the gate's range (at most 2)
        config = SteeringConfig(mode=mode, scale=1.0, clamp_level=0.0, direction_layer=2, gate_layer=3,
                                gate_level=level)
        score = scorer.score(config)
        stricter = replace(config, gate_level=Scorer.gate_level("harmful", level))
        assert stricter.gate_level == level / UNSEEN_HARMFUL_PLACE
        with apply_steering(loaded, stricter, directions):
            real_odds = refusal_log_odds(first_logits(loaded, harmful_texts, 4), opening)
        missed = [i for i in range(len(harmful_texts))
                  if i not in scorer._passing("harmful", 3, stricter.gate_level, directions)]
        real_odds[missed] = math.inf  # a harmful prompt the gate misses counts as refused
        with apply_steering(loaded, config, directions):
            real = {name: kl_divergence(base[name], first_logits(loaded, texts, 4))
                    for name, texts in (("ordinary", ordinary), ("borderline", borderline))}
        torch.testing.assert_close(score.odds, real_odds, rtol=1e-4, atol=1e-4)
        margin_mattered |= scorer._passing("harmful", 3, level, directions) != \
            scorer._passing("harmful", 3, stricter.gate_level, directions)
        assert score.kl_ordinary == pytest.approx(float(real["ordinary"].mean()), abs=1e-6)
        collateral = real["borderline"][scorer.answered]
        assert score.kl_collateral == pytest.approx(float(collateral.mean()), abs=1e-6)
        assert score.cost == pytest.approx(score.kl_ordinary + score.kl_collateral)
        steered_answered = set(scorer._passing("borderline", 3, level, directions)) & set(scorer.answered)
        assert (score.kl_collateral > 0) == bool(steered_answered)  # charged exactly when it steers those
        costs.append(score.kl_collateral)
    assert len(set(costs)) > 1 and max(costs) > 0
    assert margin_mattered  # some level lets a harmful prompt through only without the margin


def test_seed_gates_sit_at_the_highest_level_that_screening_lets_every_harmful_prompt_through(cache_root,
                                                                                            prompt_files,
                                                                                            monkeypatch):
    """Per gate layer the refusal proxy is the plain recipe's up to the margin level and rises past it (a
    missed harmful prompt counts as refused), while cost only falls with the level: so a short search
    starts there."""
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.optimize import search
    from alignment_artifacts.optimize.search import GATE_LEVELS, Scorer, Space, run_search
    from alignment_artifacts.steering import gate_places

    # the tiny model's harmful prompts sit near 1 on the scale, where 0.75 of it is past the top of the range
    monkeypatch.setattr(search, "UNSEEN_HARMFUL_PLACE", 0.5)

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    directions = get_directions(loaded, SteeringConfig(mode="ablate"), source=f"{harmful},{harmless}",
                                progress=False)
    chat = lambda lines: [format_chat(loaded.tokenizer, t) for t in lines]  # noqa: E731
    scorer = Scorer(loaded, chat(Path(harmful).read_text().splitlines()),
                    chat(resolve_prompts("ordinary:train").texts[:6]),
                    chat(resolve_prompts("borderline:train", label=0).filter(label=0).texts[:6]), 4,
                    {"mean_diff": directions}, range(2, 4))
    space = Space(4, ("ablate",), gate=True)
    plain = space.config(space.plain_recipe(), loaded)
    plain_refusal = scorer.score(plain).refusal
    inside = 0
    for layer in (2, 3):
        level = scorer.margin_level(layer, "mean_diff")
        assert GATE_LEVELS[0] <= level <= GATE_LEVELS[1] and level == round(level, 2)
        lowest = float(gate_places(directions, layer, scorer._states("harmful")[layer]).min())
        gated = lambda x, at=layer: scorer.score(replace(plain, gate_layer=at, gate_level=x))  # noqa: E731
        if GATE_LEVELS[0] < level < GATE_LEVELS[1]:
            inside += 1
            assert level < search.UNSEEN_HARMFUL_PLACE * lowest <= level + 0.01
            at, above, below = gated(level), gated(level + 0.01), gated(level - 0.2)
            assert at.refusal == pytest.approx(plain_refusal, abs=1e-6)  # all pass: the plain recipe
            assert above.refusal > plain_refusal + 1 / len(scorer.texts["harmful"]) - 1e-3  # one missed
            assert below.cost >= at.cost >= above.cost  # a lower gate lets more ordinary and borderline through
    assert inside  # the tiny model's harmful prompts sit where the grid has room on some layer
    searched = run_search(loaded, space, scorer, key="margin", trials=3, timeout=60, seed=0, resume=False,
                          progress=False)
    gated_seeds = [t.params for t in searched.complete if t.params.get("gated")]
    assert [(p["gate_layer"], p["gate_level"]) for p in gated_seeds] == \
        [(layer, scorer.margin_level(layer, "mean_diff")) for layer in space.seed_gate_layers]


def test_optimize_searches_per_prompt_gates_unless_told_not_to(cache_root, prompt_files):
    """A gated trial is the plain recipe behind a gate: only the gate is searched."""
    import optuna

    from alignment_artifacts.cache import cache_dir
    from alignment_artifacts.optimize.search import Space

    loaded = tiny_model("llama", layers=4)
    settings = _optimize_settings(prompt_files, trials=6, modes=["ablate"], finalists=1)
    space = Space(4, ("ablate",), gate=True)
    plain = space.config(space.plain_recipe(), loaded)
    for gate in (True, False):
        settings.gate = gate
        optimize(loaded, settings, progress=False)
        study_name = stored_config(loaded).notes["optimize"]["study"]
        storage = f"sqlite:///{cache_dir('studies') / (loaded.info.name + '.db')}"
        trials = optuna.load_study(study_name=study_name, storage=storage).trials
        gated = [t for t in trials if t.params.get("gated")]
        assert len(gated) >= (2 if gate else 0) and (gate or not gated)  # two seeds: gates at 50% and 75% depth
        for t in gated:
            assert set(t.params) == {"gated", "gate_layer", "gate_level"}
            assert 2 <= t.params["gate_layer"] <= 3 and t.user_attrs["kl_collateral"] >= 0
            config = space.config(t.params, loaded)
            assert replace(config, gate_layer=None, gate_level=0.0) == plain
            assert (config.gate_layer, config.gate_level) == (t.params["gate_layer"], t.params["gate_level"])
        assert all(0.3 <= t.params["ablate_scale"] <= 1.2 for t in trials if not t.params.get("gated"))
    config = config_from_params({"mode": "clamp", "clamp_scale": 1.2, "direction_layer": 2, "kernel_centre": 1,
                                 "kernel_width": 4, "kernel_floor": 1.0, "gated": True, "gate_layer": 3,
                                 "gate_level": 0.1}, 4, loaded)
    assert (config.gate_layer, config.gate_level, config.scale) == (3, 0.1, 1.2)


def test_only_the_plain_recipe_is_gated(cache_root, prompt_files):
    """A gate decides where to steer, not how much: the search puts gates in front of the plain recipe only,
    never behind a clamp or a mode that edits the weights (which steers every prompt alike)."""
    import optuna

    from alignment_artifacts.cache import cache_dir
    from alignment_artifacts.optimize.search import Space

    space = Space(4, ("clamp", "ablate", "ablate_weight_norm"), gate=True)
    seeds = space.seeds({2: 0.15, 3: 0.25})
    assert [(s["mode"], s.get("gated")) for s in seeds] == [("clamp", None)] * 4 + [
        ("ablate", False), ("ablate", True), ("ablate", True), ("ablate_weight_norm", None)]
    assert seeds[5:7] == [{"mode": "ablate", "gated": True, "gate_layer": 2, "gate_level": 0.15},
                          {"mode": "ablate", "gated": True, "gate_layer": 3, "gate_level": 0.25}]
    assert not any(s.get("gated") for s in Space(4, ("clamp", "ablate"), gate=False).seeds())
    loaded = tiny_model("llama", layers=4)
    optimize(loaded, _optimize_settings(prompt_files, trials=12, modes=list(space.modes), finalists=1),
             progress=False)
    study_name = stored_config(loaded).notes["optimize"]["study"]
    storage = f"sqlite:///{cache_dir('studies') / (loaded.info.name + '.db')}"
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    assert any(t.params.get("gated") for t in trials)
    assert all(t.params["mode"] == "ablate" for t in trials if t.params.get("gated"))
    assert not any("gated" in t.params for t in trials if t.params["mode"] != "ablate")


def test_choice_prefers_fewer_not_complied_then_fewer_refusals_then_lower_cost_within_the_capability_budget():
    def row(trial, not_complied, kl, collateral, delta):
        return {"trial": trial, "validation": {"harmful": {"not_complied_after": not_complied},
                                               "ordinary": {"kl": {"mean": kl}},
                                               "borderline": {"collateral_kl": {"mean": collateral}},
                                               "capability": {"delta": delta}}}

    rows = [row(1, 0, 0.05, 0.5, -0.05), row(2, 0, 0.02, 0.04, 0.0), row(3, 0, 0.01, 0.01, -0.005),
            row(4, 2, 0.001, 0.0, 0.0)]
    assert choose(rows, 0.01)["trial"] == 3  # 1 loses capability; 3 is cheaper than 2
    assert choose([rows[0]], 0.01)["trial"] == 1  # nothing qualifies: all are considered
    refusing, evading = row(5, 3, 0.001, 0.001, 0.0), row(6, 3, 0.01, 0.01, 0.0)
    refusing["validation"]["harmful"]["after"] = {"refusal": 3, "evasion": 0, "compliance": 0}
    evading["validation"]["harmful"]["after"] = {"refusal": 0, "evasion": 3, "compliance": 0}
    assert choose([refusing, evading], 0.01)["trial"] == 6  # a tie in not complied: fewer refusals first


def test_a_single_finalist_is_the_cheapest_point_that_removes_refusals_as_the_plain_recipe_does():
    from types import SimpleNamespace

    front = [SimpleNamespace(number=i, values=values) for i, values in
             enumerate([(0.0, 0.09), (0.02, 0.05), (0.05, 0.02), (0.08, 0.01), (0.5, 0.001)])]
    numbers = lambda picked: [t.number for t in picked]  # noqa: E731
    assert numbers(pick_finalists(front, 1, 0.1, 0.8)) == [0]  # no plain recipe scored: cheapest of the lowest
    assert numbers(pick_finalists(front, 1, 0.1, 0.8, plain_refusal=0.05)) == [2]  # meets the bar, cheapest
    assert numbers(pick_finalists(front, 1, 0.1, 0.8, plain_refusal=0.045)) == [2]  # within REFUSAL_TIE of it
    assert numbers(pick_finalists(front, 2, 0.1, 0.8, plain_refusal=0.05)) == [0, 2]  # a spread: none above it
    assert numbers(pick_finalists(front, 1, 0.1, 0.8, plain_refusal=0.3)) == [3]  # half the unmodified: a cap
    # nothing inside the cost budget meets it (0 does, at 0.09): the cheapest of the lowest inside
    assert numbers(pick_finalists(front, 1, 0.06, 0.8, plain_refusal=0.005)) == [1]


def test_the_search_records_the_plain_recipes_refusal_proxy(cache_root, prompt_files):
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.optimize.search import Scorer, Space, run_search

    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    directions = get_directions(loaded, SteeringConfig(mode="ablate"), source=f"{harmful},{harmless}",
                                progress=False)
    chat = lambda lines: [format_chat(loaded.tokenizer, t) for t in lines]  # noqa: E731
    scorer = Scorer(loaded, chat(Path(harmful).read_text().splitlines()[:6]),
                    chat(resolve_prompts("ordinary:train").texts[:6]),
                    chat(resolve_prompts("borderline:train", label=0).filter(label=0).texts[:6]), 4,
                    {"mean_diff": directions}, range(2, 4))
    for modes, plain_scored in ((("clamp", "ablate"), True), (("clamp",), False)):
        space = Space(4, modes, gate=True)
        trials = len(space.seeds(dict.fromkeys(space.seed_gate_layers, 0.0)))
        searched = run_search(loaded, space, scorer, key=f"plain-{len(modes)}", trials=trials,
                              timeout=120, seed=0, resume=False, progress=False)
        plain = space.config(space.plain_recipe(), loaded)
        expected = [t.values[0] for t in searched.complete if space.config(t.params, loaded) == plain]
        assert len(expected) == (1 if plain_scored else 0)
        assert searched.plain_refusal == (expected[0] if plain_scored else None)
        if plain_scored:
            assert searched.plain_refusal == pytest.approx(scorer.score(plain).refusal, abs=1e-6)


def test_an_ungated_setting_is_validated_when_gated_ones_fill_the_front():
    from types import SimpleNamespace

    from alignment_artifacts.optimize.search import Searched

    def trial(number, refusal, cost, gated):
        return SimpleNamespace(number=number, values=(refusal, cost),
                               params={"mode": "clamp", "gated": gated} if gated is not None else {"mode": "ablate"})

    gated = [trial(0, 0.0, 0.004, True), trial(1, 0.02, 0.001, True), trial(2, 0.05, 0.0002, True)]
    ungated = [trial(3, 0.01, 0.03, False), trial(4, 0.0, 0.08, None), trial(5, 0.0, 0.09, None),
               trial(6, 0.0, 0.5, False)]  # 6: over the cost budget
    searched = Searched(study=None, complete=gated + ungated, pareto=gated)
    picked = with_an_ungated_finalist(searched, 2, max_cost=0.1, base_refusal=0.4)
    assert [t.number for t in pick_finalists(searched.pareto, 2, 0.1, 0.4)] == [0, 2]
    assert [t.number for t in picked] == [0, 4]  # the weakest gated pick (2) gives way to the best ungated (4)
    # one slot: the front decides, and takes its lowest refusal inside the budget, not its cheapest point
    assert [t.number for t in with_an_ungated_finalist(searched, 1, 0.1, 0.4)] == \
        [t.number for t in pick_finalists(searched.pareto, 1, 0.1, 0.4)] == [0]
    assert [t.number for t in pick_finalists(searched.pareto, 1, 0.003, 0.4)] == [1]  # 0 is over this budget
    crowded = [trial(7, 0.0, 0.09, False), trial(8, 0.005, 0.004, False), trial(9, 0.05, 0.0002, False)]
    assert [t.number for t in pick_finalists(crowded, 1, 0.1, 0.4)] == [8]  # a tie in refusal: the cheaper
    narrow = Searched(study=None, complete=gated[:1] + ungated, pareto=gated[:1])  # a front of one fills up
    assert [t.number for t in with_an_ungated_finalist(narrow, 2, 0.1, 0.4)] == [0, 4]
    plain = Searched(study=None, complete=ungated, pareto=ungated[:2])  # no gate searched: unchanged
    assert with_an_ungated_finalist(plain, 2, 0.1, 0.4) == pick_finalists(plain.pareto, 2, 0.1, 0.4)


def test_checks_are_priced_by_what_they_run_and_finalists_fit_the_budget():
    """An ungated finalist costs a margin over the baseline's duration; a gated one less, by the share
    its gate opened; the finalists checked are as many as leave the search its minimum."""
    import time
    from types import SimpleNamespace

    from alignment_artifacts.optimize.budget import CHECK_MARGIN, GATED_FLOOR, MIN_SEARCH, checks_price, search_budget
    from alignment_artifacts.optimize.search import Searched

    def trial(number, refusal, cost, gated, opened=1.0):
        return SimpleNamespace(number=number, values=(refusal, cost), params={"mode": "clamp", "gated": gated},
                               user_attrs={"opened": opened})

    baseline = SimpleNamespace(seconds={"harmful": 100.0, "borderline": 60.0, "ordinary": 20.0, "capability": 20.0})
    ungated = CHECK_MARGIN * 200

    def gated_price(opened):
        return ungated * (GATED_FLOOR + (1 - GATED_FLOOR) * opened)

    gated = [trial(0, 0.0, 0.004, True, opened=0.2), trial(1, 0.05, 0.001, True, opened=0.0)]
    only_gated = Searched(study=None, complete=gated, pareto=gated)
    assert checks_price(only_gated, baseline, 2, 0.1, 0.4) == pytest.approx(gated_price(0.2) + gated_price(0.0))
    both = Searched(study=None, complete=[*gated, trial(2, 0.0, 0.05, False)], pareto=gated)
    assert checks_price(both, baseline, 2, 0.1, 0.4) == pytest.approx(gated_price(0.2) + ungated)  # 2 for 1
    kept = lambda t: t.number == 2  # noqa: E731  (its check is on disk: --resume reads it)
    assert checks_price(both, baseline, 2, 0.1, 0.4, kept) == pytest.approx(gated_price(0.2))
    assert gated_price(0.0) < gated_price(0.2) < ungated
    now = time.perf_counter()
    assert search_budget(OptimizeSettings(finalists=3, timeout=3 * ungated + 1000), baseline, now) == \
        (pytest.approx(1000, abs=1), 3)
    with pytest.warns(UserWarning, match="checking 2"):
        budget, n = search_budget(OptimizeSettings(finalists=3, timeout=2 * ungated + MIN_SEARCH + 10), baseline, now)
    assert n == 2 and budget == pytest.approx(MIN_SEARCH + 10, abs=1)
    with pytest.warns(UserWarning, match="searching"):  # one finalist is always checked
        assert search_budget(OptimizeSettings(finalists=3, timeout=ungated), baseline, now) == (MIN_SEARCH, 1)


def test_searching_on_never_checks_finalists_that_no_longer_fit_the_timeout():
    """The search runs on for the time the picked finalists' checks leave; when what it finds then would
    cost more to check than the time left (a kept check displaced by a new one), the earlier picks are
    checked, and a search whose picks still fit keeps its own."""
    from alignment_artifacts.optimize.budget import MIN_SEARCH, search_on
    from alignment_artifacts.optimize.search import Searched

    clock = {"spent": 0.0}
    timeout = 1000.0

    def searches(prices):  # one Searched per extension, each priced as given
        return [Searched(study="study", complete=[object()] * (i + 1), pareto=[]) for i in range(len(prices))]

    def run(prices, trials=60):
        steps = searches(prices)
        price = {id(s): p for s, p in zip(steps, prices, strict=True)}
        calls = []

        def extend(spare, study):
            assert study == "study"
            calls.append(spare)
            clock["spent"] += spare  # a search uses all it was given
            return steps[len(calls)]

        clock["spent"] = 100.0
        searched, picked = search_on(steps[0], trials, extend=extend, price=lambda s: price[id(s)],
                                     time_left=lambda: timeout - clock["spent"])
        return steps, calls, searched, picked

    with pytest.warns(UserWarning, match="picked before"):
        steps, calls, searched, picked = run([0.0, 800.0])  # a kept pick (free) displaced by one costing 800
    assert calls == [900.0] and searched is steps[1] and picked is steps[0]
    steps, calls, searched, picked = run([500.0, 300.0, 300.0])  # cheaper picks: search on again, keep them
    assert calls == [400.0, 200.0] and searched is picked is steps[2]
    steps, calls, searched, picked = run([900.0 - MIN_SEARCH + 1])  # too little spare: no extension
    assert calls == [] and picked is steps[0]
    steps, calls, searched, picked = run([0.0], trials=1)  # every trial done: nothing to search on for
    assert calls == [] and picked is steps[0]


def test_layer_kernel_shape():
    weights = layer_weights(10, centre=4, width=2, floor=0.25)
    assert weights[4] == 1.0 and weights[0] == 0.25 and weights[5] == pytest.approx(0.625)


def test_exported_folder_evaluates_like_hooked_configuration(cache_root, prompt_files, tmp_path):
    from alignment_artifacts.api import get_directions
    from alignment_artifacts.export import export
    from alignment_artifacts.models import load_model

    loaded = tiny_model("qwen2", layers=3)
    harmful, harmless = prompt_files
    settings = EvaluationSettings(harmful=harmful, **SMALL)
    config = resolve_config(loaded, SteeringConfig(mode="ablate", scale=1.0, source=f"{harmful},{harmless}"))
    hooked = evaluate(loaded, config, settings, progress=False)
    folder = export(loaded, Steering(config, get_directions(loaded, config, progress=False)), tmp_path / "baked")
    exported = load_model(str(folder), device="cpu")
    baked = evaluate(exported, SteeringConfig(mode="none"), settings, progress=False, reference=loaded)
    assert baked.harmful.after == hooked.harmful.after and baked.harmful.before == hooked.harmful.before
    assert baked.ordinary.kl.mean == pytest.approx(hooked.ordinary.kl.mean, rel=1e-3, abs=1e-6)
    assert baked.borderline.kl.mean == pytest.approx(hooked.borderline.kl.mean, rel=1e-3, abs=1e-6)
    assert baked.capability.after == hooked.capability.after
