"""Both sides of an evaluation are saved chunk by chunk: an interrupted baseline, or an interrupted
steered side (every prompt, or the prompts a gate opens), resumes where it stopped and gives what an
uninterrupted run gives."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import alignment_artifacts.evaluation.sides as sides
from alignment_artifacts.api import get_directions
from alignment_artifacts.evaluation import Baseline, EvaluationSettings, load_group_sets
from alignment_artifacts.evaluation.groups import evaluate_against, steered_key
from alignment_artifacts.evaluation.results import GROUPS
from alignment_artifacts.steering import Steering, SteeringConfig, gate_passes
from length_judge import LengthJudge
from tiny_models import tiny_model


@pytest.fixture()
def settings(tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("\n".join(f"Tell me how to do bad thing number {i}." for i in range(10)))
    # 10 harmful, 6 borderline, 5 of 8 ordinary answered, 6 capability
    return EvaluationSettings(harmful=str(harmful), n_borderline=6, n_ordinary=8, n_capability=6, max_tokens=4,
                              capability_max_tokens=4, batch_size=4, generation_batch_size=2, judged_ordinary=5)


def test_an_interrupted_baseline_resumes_at_its_chunk_and_gives_the_whole_run(cache_root, settings, monkeypatch):
    monkeypatch.setattr(sides, "CHUNK_WIDTHS", 2)  # 27 prompts at width 2: 7 chunks of 4 (the last 3)
    loaded = tiny_model("llama", layers=3)
    sets = load_group_sets(settings)
    whole = Baseline(loaded, sets, settings, LengthJudge())
    expected = whole.side()
    shutil.rmtree(whole.folder)

    answered: list[int] = []
    real_generate, real_judge = sides.generate_answers, sides.Measurer.judge_pending

    def counting(loaded, texts, *args, **kwargs):
        answered.append(len(texts))
        return real_generate(loaded, texts, *args, **kwargs)

    def interrupted(self, judge, side):
        if len(answered) == 4:  # the fourth chunk: harmful done, borderline half done
            raise KeyboardInterrupt
        real_judge(self, judge, side)

    monkeypatch.setattr(sides, "generate_answers", counting)
    monkeypatch.setattr(sides.Measurer, "judge_pending", interrupted)
    judge = LengthJudge()
    with pytest.raises(KeyboardInterrupt):
        Baseline(loaded, sets, settings, judge).side()
    saved = {p.name.split("-")[0].split(".")[0]: p.name for p in whole.folder.iterdir()}
    assert saved["harmful"].endswith(".json") and ".part" not in saved["harmful"]  # whole: its own file
    assert ".part" in saved["borderline"] and "ordinary" not in saved and judge.calls == 12

    monkeypatch.setattr(sides.Measurer, "judge_pending", real_judge)
    answered.clear()
    resumed = Baseline(loaded, sets, settings, judge)
    side = resumed.side()
    assert answered == [4, 4, 4, 3]  # only what was not saved, in the uninterrupted run's chunks
    assert judge.calls == 12 + 4 + 5  # capability is not judged
    assert side == expected  # the same chunks as the uninterrupted run: the same batch shapes, bit for bit
    assert not list(whole.folder.glob("*.part.json")) and set(resumed.seconds) == set(settings.groups)
    assert all(seconds > 0 for seconds in resumed.seconds.values())


def test_a_damaged_part_file_starts_its_group_again(cache_root, settings, monkeypatch):
    loaded = tiny_model("llama", layers=3)
    sets = load_group_sets(settings)
    baseline = Baseline(loaded, sets, settings, LengthJudge())
    path = baseline.files.part_path("borderline")
    path.parent.mkdir(parents=True, exist_ok=True)
    short = '["refusal"]'  # every field, each shorter than "done" says
    path.write_text(f'{{"done": 4, "seconds": 1.0, "borderline_labels": {short}, '
                    f'"borderline_thinking_refusals": [false], "borderline_unfinished": [false]}}')
    expected = Baseline(loaded, sets, replace(settings, n_ordinary=7), LengthJudge()).side()  # other folder
    side = baseline.side()
    assert side.borderline_labels == expected.borderline_labels and not path.exists()
    path.write_text("{}")  # as a run killed between writing the whole group and removing its part leaves it
    Baseline(loaded, sets, settings, LengthJudge()).side()
    assert not path.exists()


@pytest.mark.parametrize("gate_level", [None, -1.0, 0.5])
def test_an_interrupted_steered_side_resumes_at_its_chunk_and_leaves_nothing_behind(cache_root, settings,
                                                                                   monkeypatch, tmp_path,
                                                                                   gate_level):
    monkeypatch.setattr(sides, "CHUNK_WIDTHS", 2)
    loaded = tiny_model("llama", layers=4)
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("\n".join(f"Tell me a fact about bread number {i}." for i in range(10)))
    directions = get_directions(loaded, SteeringConfig(mode="clamp"), source=f"{settings.harmful},{harmless}",
                                progress=False)
    gate = {} if gate_level is None else {"gate_layer": 3, "gate_level": gate_level}
    steering = Steering(SteeringConfig(mode="ablate", scale=1.0, direction_layer=2, **gate), directions)
    judge = LengthJudge()
    sets = load_group_sets(settings)
    baseline = Baseline(loaded, sets, settings, judge)
    baseline.side()
    baseline.logits("borderline"), baseline.logits("ordinary")
    cutoff = {"harmful": 10, "borderline": 6, "ordinary": 5, "capability": 6}  # answers of every prompt
    opened = {g: list(range(len(getattr(sets, g)))) for g in GROUPS}
    if gate_level is not None:
        opened = {g: gate_passes(directions, 3, gate_level, baseline.gate_states(g, directions.site, 3))
                  .nonzero().flatten().tolist() for g in GROUPS}
    answers = {g: sum(i < cutoff[g] for i in opened[g]) for g in GROUPS}  # in queue order
    if gate_level == 0.5:  # a gate that opens some prompts of a group and not others (the subset path)
        assert any(0 < len(opened[g]) < len(getattr(sets, g)) for g in GROUPS), opened
    else:  # -1 opens every prompt
        assert answers == cutoff

    answered: list[int] = []
    logits: list[str] = []
    real_generate, real_judge, real_logits = sides.generate_answers, sides.Measurer.judge_pending, sides.Measurer.logits

    def counting(loaded, texts, *args, **kwargs):
        answered.append(len(texts))
        return real_generate(loaded, texts, *args, **kwargs)

    def counting_logits(self, group):
        logits.append(group)
        return real_logits(self, group)

    monkeypatch.setattr(sides, "generate_answers", counting)
    monkeypatch.setattr(sides.Measurer, "logits", counting_logits)
    judge.calls = 0
    expected = evaluate_against(loaded, steering, baseline, progress=False).to_json()
    steered = baseline.folder / "steered"
    assert not steered.exists()  # a whole side's saved chunks, and their folders, are removed
    whole_run, asked = list(answered), judge.calls
    # equal chunks of at most 2 widths of 2 (27 answers when every prompt runs: 7 chunks, the last of 3)
    total = sum(answers.values())
    assert len(whole_run) >= 3 and sum(whole_run) == total and max(whole_run) <= 4
    assert logits == [g for g in ("borderline", "ordinary") if opened[g]]

    def interrupted(self, judge, side):
        if len(answered) == 3:
            raise KeyboardInterrupt
        real_judge(self, judge, side)

    answered.clear(), logits.clear()
    monkeypatch.setattr(sides.Measurer, "judge_pending", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_against(loaded, steering, baseline, progress=False)
    assert list(steered.glob("*/*.part.json")) or list(steered.glob("*/*-*.json"))
    assert len(list(steered.glob("*/*_kl.safetensors"))) == len(logits)
    monkeypatch.setattr(sides.Measurer, "judge_pending", real_judge)
    answered.clear(), logits.clear()
    judge.calls = 0
    resumed = evaluate_against(loaded, steering, baseline, progress=False).to_json()
    assert answered == whole_run[2:] and not logits  # the two saved chunks and the saved KLs are read
    judged_before = min(sum(whole_run[:2]), total - answers["capability"])  # capability comes last, unjudged
    assert judge.calls == asked - judged_before > 0
    for result in (expected, resumed):
        result.pop("seconds")
    assert resumed == expected and not steered.exists()


def test_a_steered_side_is_saved_apart_for_another_evaluated_model():
    """An export evaluated against its base (another model, mode none) must not resume another
    export's chunks; evaluated against its own baseline, the key is the kept check's."""
    from types import SimpleNamespace

    def model(weights):
        return SimpleNamespace(info=SimpleNamespace(weights_hash=weights, dtype="float32"))

    base = model("base")
    baseline = SimpleNamespace(key="b", judge=SimpleNamespace(key="j"), settings=EvaluationSettings(),
                               folder=Path("/kept"), loaded=base)
    steering = Steering(SteeringConfig(mode="none"))
    keys = {steered_key(baseline, steering, loaded) for loaded in (None, base, model("one"), model("two"))}
    assert len(keys) == 3  # None and the baseline's own model are the same side
