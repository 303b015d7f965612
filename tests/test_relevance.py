"""The relevance judge: per-token pointwise mutual information of answer and request, read in batches."""

from __future__ import annotations

import math

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.judge import load_judge
from alignment_artifacts.judge import relevance as rel
from alignment_artifacts.models.chat import format_chat
from tiny_models import tiny_model

PAIRS = [("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise and bake it at 220 C."),
         ("Tell me about the sea.", "I'm sorry, but I can't help with that."),
         ("Write a short poem.", "Roses are red"),
         ("Explain how locks work in some detail, please.", "A lock holds pins that the key lifts to the shear line.")]


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("qwen2", seed=3)


def one_by_one(loaded, context: str, answer: list[int]) -> float:
    """The mean log-probability of ``answer`` after ``context``, one unpadded row at a time."""
    prompt = loaded.tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + answer])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return float(logp.gather(1, torch.tensor(answer)[:, None]).mean())


def test_batched_log_likelihoods_equal_one_row_at_a_time(loaded, monkeypatch):
    contexts = [format_chat(loaded.tokenizer, p) for p, _ in PAIRS]
    answers = [loaded.tokenizer(a, add_special_tokens=False)["input_ids"] for _, a in PAIRS]
    expected = [one_by_one(loaded, c, a) for c, a in zip(contexts, answers)]
    assert len({len(a) for a in answers}) > 1 and len({len(c) for c in contexts}) > 1  # padding on both sides
    assert rel.answer_log_likelihoods(loaded, contexts, answers, batch_size=4) == pytest.approx(expected, abs=1e-4)
    monkeypatch.setattr(rel, "LOGITS_BUDGET", 1)  # one row per pass when the logits would not fit
    assert rel.answer_log_likelihoods(loaded, contexts, answers, batch_size=4) == pytest.approx(expected, abs=1e-4)
    with_empty = rel.answer_log_likelihoods(loaded, contexts[:2], [answers[0], []], batch_size=4)
    assert with_empty[0] == pytest.approx(expected[0], abs=1e-4) and math.isnan(with_empty[1])


def test_relevance_is_the_gain_over_the_neutral_request(loaded):
    values = rel.relevance(loaded, [p for p, _ in PAIRS], [a for _, a in PAIRS])
    for (prompt, answer), value in zip(PAIRS, values):
        ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
        given = one_by_one(loaded, format_chat(loaded.tokenizer, prompt), ids)
        neutral = one_by_one(loaded, format_chat(loaded.tokenizer, rel.NEUTRAL), ids)
        assert value == pytest.approx(given - neutral, abs=1e-4)


def test_verdicts_from_relevance():
    above, below = rel.relevance_verdict(rel.THRESHOLD + rel.SCALE), rel.relevance_verdict(rel.THRESHOLD - rel.SCALE)
    assert above.label == "compliance" and below.label == "evasion"
    assert above.confidence == pytest.approx(1 / (1 + math.exp(-1))) == below.confidence
    assert above.probabilities == pytest.approx((0.0, 1 - above.confidence, above.confidence))
    assert rel.relevance_verdict(rel.THRESHOLD).label == "compliance"  # at the threshold: complied
    assert rel.relevance_verdict(1e9).confidence == 1.0 and rel.relevance_verdict(-1e9).label == "evasion"
    assert rel.relevance_verdict(math.nan).label == "refusal"  # an empty answer, as the rubric has it


def test_relevance_judge_labels_by_its_threshold_and_caches_by_it(loaded, cache_root):
    prompts, answers = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    values = rel.relevance(loaded, prompts, answers)
    middle = sorted(values)[1] + 1e-3  # two answers above it, two below
    judge = rel.RelevanceJudge(loaded, batch_size=3, judge_dtype="model", threshold=middle)
    verdicts = judge.judge(prompts, answers)
    assert [v.label for v in verdicts] == ["compliance" if v >= middle else "evasion" for v in values]
    assert sorted(v.label for v in verdicts) == ["compliance", "compliance", "evasion", "evasion"]
    assert judge.judge(prompts, answers) == verdicts  # read back from the cache
    assert len(list((cache_root / "judgements" / judge.key).glob("*.json"))) == 2  # batches of 3 and 1
    other = rel.RelevanceJudge(loaded, judge_dtype="model", threshold=middle + 1)
    assert other.key != judge.key and {v.label for v in other.judge(prompts, answers)} == {"evasion"}


def test_relevance_specs(loaded):
    judge = load_judge(f"relevance:{loaded.info.name}", reuse=loaded)
    assert isinstance(judge, rel.RelevanceJudge) and judge.loaded is loaded
    assert judge.name == f"relevance:{loaded.info.name}"
    cascade = load_judge(f"markers+relevance:{loaded.info.name}", reuse=loaded)
    assert cascade.name == f"markers+relevance:{loaded.info.name}" and cascade.second.loaded is loaded
    for spec, url in (("relevance:", None), (f"relevance:{loaded.info.name}", "http://127.0.0.1:9/v1")):
        with pytest.raises(UserError, match="needs a local model after 'relevance:'"):
            load_judge(spec, url=url, reuse=loaded)
    with pytest.raises(UserError, match=r"Unknown judge 'nonsense'.*relevance:MODEL"):
        load_judge("relevance:nonsense")
