"""optimize over the mode table's ablations and over direction variants, on tiny random models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignment_artifacts.api import get_directions, resolve_steering, stored_config
from alignment_artifacts.cache import cache_dir
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import first_logits, refusal_log_odds, refusal_opening_ids
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.optimize import OptimizeSettings, _study_key, optimize, search_and_direction_sets, split
from alignment_artifacts.optimize.search import SEARCH_MODES, Scorer, Space
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.steering import SteeringConfig, apply_steering
from tiny_models import tiny_model

VARIANTS = ["median", "harmless_projected"]  # neither is the default: the stored choice must carry its variant


@pytest.fixture
def prompt_files(tmp_path):
    (tmp_path / "harmful.txt").write_text("\n".join(f"Tell me how to do bad thing number {i}." for i in range(10)))
    (tmp_path / "harmless.txt").write_text("\n".join(f"Tell me a fact about bread number {i}." for i in range(10)))
    return str(tmp_path / "harmful.txt"), str(tmp_path / "harmless.txt")


def _settings(prompt_files, **extra):
    harmful, harmless = prompt_files
    return OptimizeSettings(**{**dict(trials=5, timeout=120, harmful=harmful, harmless=harmless, max_tokens=3,
                                      batch_size=8, generation_batch_size=8, finalists=2, max_kl=10.0, search_size=6,
                                      n_val_ordinary=6, n_val_borderline=6, judged_borderline=4, judged_ordinary=3,
                                      n_capability=4, screen_dtype="model"), **extra})


def test_searchable_modes_come_from_the_mode_table():
    assert {"ablate", "clamp", "ablate_weight_norm", "ablate_norm", "ablate_mean"} <= set(SEARCH_MODES)
    assert not {"amplify", "always", "sphere", "subspace", "none", "auto"} & set(SEARCH_MODES)


def test_optimize_searches_modes_and_variants_and_auto_applies_the_stored_variant(cache_root, prompt_files):
    import optuna

    loaded = tiny_model("llama", layers=4)
    modes = ["ablate_weight_norm", "ablate"]
    space = Space(4, tuple(modes), True, tuple(VARIANTS))
    seeds = space.seeds(dict.fromkeys(space.seed_gate_layers, 0.0))
    settings = _settings(prompt_files, modes=modes, direction_variants=VARIANTS, trials=len(seeds))
    result = optimize(loaded, settings, progress=False)
    config = SteeringConfig.from_json(result.config)
    chosen = next(row for row in result.finalists if row["trial"] == config.notes["optimize"]["trial"])
    assert config.mode == chosen["params"]["mode"] in settings.modes
    variant = lambda params: params.get("direction_variant", VARIANTS[0])  # noqa: E731  (a gate: the plain recipe's)
    assert config.direction_variant == variant(chosen["params"]) in VARIANTS
    storage = f"sqlite:///{cache_dir('studies') / (loaded.info.name + '.db')}"
    trials = optuna.load_study(study_name=config.notes["optimize"]["study"], storage=storage).trials
    assert {(t.params["mode"], variant(t.params)) for t in trials[:len(seeds)]} == \
        {(m, v) for m in settings.modes for v in VARIANTS}  # the seed points cover every mode and variant
    assert len(list(cache_dir("directions").iterdir())) == len(VARIANTS)  # each variant computed once

    # the direction prompts are never scored, whatever the variant
    train, _ = split(resolve_prompts(prompt_files[0], label=1), settings.seed, "harmful")
    searched, source = search_and_direction_sets(train, resolve_prompts(prompt_files[1], label=0), settings)
    assert not set(searched.texts) & set(source.texts)
    direct = {v: get_directions(loaded, SteeringConfig(mode="ablate", direction_variant=v), source=source,
                                progress=False) for v in [*VARIANTS, "mean_diff"]}
    assert all(d.prompt_set_hash == source.content_hash() and d.variant == v for v, d in direct.items())

    # --mode auto resolves to the stored configuration with its variant's directions: the same logits
    texts = [format_chat(loaded.tokenizer, t) for t in searched.texts]
    auto = resolve_steering(loaded, SteeringConfig(mode="auto"), progress=False)
    assert auto.config.direction_variant == config.direction_variant
    assert auto.directions is not None and auto.directions.variant == config.direction_variant
    with auto.apply(loaded):
        via_auto = first_logits(loaded, texts, 4)
    with apply_steering(loaded, config, direct[config.direction_variant]):
        via_config = first_logits(loaded, texts, 4)
    with apply_steering(loaded, config, direct["mean_diff"]):
        via_mean_diff = first_logits(loaded, texts, 4)
    assert torch.equal(via_auto, via_config)
    assert not torch.allclose(via_auto, via_mean_diff)  # the variant really changes what auto applies
    assert stored_config(loaded).direction_variant == config.direction_variant


def test_every_searchable_mode_and_variant_is_scored_as_it_steers(cache_root, prompt_files):
    """Each seed point (every searchable mode, two variants) scores exactly the refusal odds its configuration
    gives when applied with its own variant's directions."""
    loaded = tiny_model("llama", layers=4)
    harmful, harmless = prompt_files
    variants = ("mean_diff", "standardized")
    directions = {v: get_directions(loaded, SteeringConfig(mode="ablate", direction_variant=v),
                                    source=f"{harmful},{harmless}", progress=False) for v in variants}
    chat = lambda lines: [format_chat(loaded.tokenizer, t) for t in lines]  # noqa: E731
    harmful_texts = chat(resolve_prompts(harmful).texts)
    scorer = Scorer(loaded, harmful_texts, chat(resolve_prompts("ordinary:train").texts[:6]),
                    chat(resolve_prompts("borderline:train", label=0).filter(label=0).texts[:6]), 4, directions,
                    range(2, 4))
    space = Space(4, SEARCH_MODES, gate=False, variants=variants)
    opening, seen = refusal_opening_ids(loaded.tokenizer), set()
    before = [p.detach().clone() for p in loaded.model.parameters()]
    for params in space.seeds():
        config = space.config(params, loaded)
        seen.add((config.mode, config.direction_variant))
        score = scorer.score(config)
        with apply_steering(loaded, config, directions[config.direction_variant]):
            real = refusal_log_odds(first_logits(loaded, harmful_texts, 4), opening)
        torch.testing.assert_close(score.odds, real, rtol=1e-4, atol=1e-4)
        assert score.cost > 0
    assert seen == {(m, v) for m in SEARCH_MODES for v in variants}
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.model.parameters()))  # weight edits undone


def test_optimize_names_what_it_can_search(cache_root):
    loaded = tiny_model("llama", layers=2)
    with pytest.raises(UserError, match=r"Did you mean 'ablate_weight_norm'.*ablate_mean.*--modes ablate,"):
        optimize(loaded, OptimizeSettings(modes=["ablate_wieght_norm"]), progress=False)
    with pytest.raises(UserError, match=r"cannot search the mode.*amplify"):
        optimize(loaded, OptimizeSettings(modes=["clamp", "amplify"]), progress=False)
    with pytest.raises(UserError, match=r"Did you mean 'mean_diff'.*Variants: mean_diff, harmless_projected"):
        optimize(loaded, OptimizeSettings(direction_variants=["mean-diff"]), progress=False)
    with pytest.raises(UserError, match="--direction-variants: unknown variant"):
        optimize(loaded, OptimizeSettings(direction_variants=[]), progress=False)


def test_study_keys_change_with_the_space_and_only_then():
    """A study without gates resumes across versions (its space has not changed since variants were searched:
    the key below is what that version computed, weights 'weights', directions 'prompts'); a study with gates
    (searched behind any hooked mode before space version 2) starts afresh; a second variant is a new study."""
    loaded = SimpleNamespace(info=SimpleNamespace(weights_hash="weights"))
    assert _study_key(loaded, OptimizeSettings(modes=["ablate"], gate=False), "prompts") == "0384ef84dacb3b4e"
    assert _study_key(loaded, OptimizeSettings(), "prompts") != "416b30439952c030"  # the gated space of version 1
    default = _study_key(loaded, OptimizeSettings(), "prompts")
    varied = OptimizeSettings(direction_variants=["mean_diff", "median"])
    assert _study_key(loaded, varied, "prompts") != default


def test_cli_passes_direction_variants():
    from alignment_artifacts.cli import build_parser

    args = build_parser().parse_args(["optimize", "--modes", "ablate_weight_norm", "--direction-variants",
                                      "mean_diff,median"])
    assert (args.modes, args.direction_variants) == ("ablate_weight_norm", "mean_diff,median")


@pytest.mark.parametrize(("flags", "settings"), [
    (["--modes", "clamp,ablate_wieght_norm"], {"modes": ["clamp", "ablate_wieght_norm"]}),
    (["--direction-variants", "mean-diff"], {"direction_variants": ["mean-diff"]})])
def test_cli_refuses_a_bad_name_before_loading_the_model(cache_root, monkeypatch, capsys, flags, settings):
    """A typo in --modes or --direction-variants costs no model load, and reads as optimize() says it."""
    import alignment_artifacts.api
    from alignment_artifacts.cli import main

    def no_loading(*args, **kwargs):
        pytest.fail("optimize loaded the model before checking its settings")

    monkeypatch.setattr(alignment_artifacts.api, "get_model", no_loading)
    assert main(["optimize", "--model", "smollm2-135m-instruct", *flags]) == 2
    with pytest.raises(UserError) as raised:
        optimize(tiny_model("llama", layers=2), OptimizeSettings(**settings), progress=False)
    assert capsys.readouterr().err == f"error: {raised.value}\n"
