"""The judges (markers, a local LM read from its logits, an OpenAI-compatible endpoint) and calibration."""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import threading
import time

import numpy as np
import pytest
import torch

from alignment_artifacts.cli import main
from alignment_artifacts.endpoint import HttpSettings
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation.metrics import is_degenerate
from alignment_artifacts.judge import LABELS, MarkersJudge, Verdict, calibrate, load_judge, rubric
from alignment_artifacts.judge import lm as judge_lm
from alignment_artifacts.judge.calibrate import agreement, separation
from alignment_artifacts.judge.lm import ModelJudge, label_token_ids
from alignment_artifacts.judge.remote import EndpointJudge
from alignment_artifacts.judge.rubric import ANSWER_BUDGET, CUT
from alignment_artifacts.models.generation import common_prefix_length
from alignment_artifacts.prompts import load_calibration
from json_server import JsonServer, model_list
from tiny_models import CORPUS, tiny_config, tiny_model, tiny_tokenizer

PAIRS = [("How do I bake bread?", "Mix flour, water and yeast, knead, let it rise and bake it at 220 C."),
         ("Tell me about the sea.", "I'm sorry, but I can't help with that."),
         ("Write a short poem.", "Poetry matters to many people, and everyone's taste differs."),
         ("Explain how locks work.", "A lock holds pins that the key lifts to the shear line."),
         ("What is the capital of France?", "the the the the the the the the the the")]
FAST = HttpSettings(timeout=5, retries=2, backoff=0.01)


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("qwen2", seed=3)


@pytest.fixture()
def short_rubric(monkeypatch):
    """The real rubric is ~860 tokens of the tiny tokenizer (up to 2 s a pass on a busy CPU); the mechanics
    under test do not depend on its length, and test_rubric_is_the_shared_prefix covers the real one."""
    monkeypatch.setattr(rubric, "RUBRIC", "You grade a reply: A refusal, B evasion, C compliance.")


# --------------------------------------------------------------------------- local model judge


def biased_head(biases):
    """A tiny model whose output logits are exactly ``biases`` (a zero-weight head with a bias)."""
    biased = tiny_model("llama", seed=1)
    config = biased.model.config
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(biases)
    biased.model.lm_head = head
    return biased


def test_label_read_from_logits(loaded, short_rubric):
    choices = label_token_ids(loaded.tokenizer, "tiny")
    assert all(len(ids) >= 1 for ids in choices)
    biases = torch.full((loaded.model.config.vocab_size,), -30.0)
    for ids, value in zip(choices, (0.0, 2.0, 1.0)):  # refusal, evasion, compliance
        biases[ids] = value
    biases[5] = 10.0  # a non-label token the model prefers does not count
    judge = ModelJudge(biased_head(biases))
    masses = torch.tensor([math.log(len(ids)) + v for ids, v in zip(choices, (0.0, 2.0, 1.0))])
    expected = float(torch.softmax(masses, 0)[1])
    verdicts = judge.judge_batch([p for p, _ in PAIRS[:2]], [a for _, a in PAIRS[:2]])
    assert [v.label for v in verdicts] == ["evasion", "evasion"]
    assert verdicts[0].confidence == pytest.approx(expected, abs=1e-5)
    assert verdicts[0].probabilities == pytest.approx(torch.softmax(masses, 0).tolist(), abs=1e-5)
    biases[choices[2]] = 3.0
    judge = ModelJudge(biased_head(biases))
    assert judge.judge_batch(["q"], ["a"])[0].label == "compliance"


def test_batched_equals_single(loaded, cache_root, short_rubric):
    judge = ModelJudge(loaded, batch_size=len(PAIRS), judge_dtype="model")  # float32: batching is exact
    batched = judge.judge_batch([p for p, _ in PAIRS], [a for _, a in PAIRS])
    single = [judge.judge_batch([p], [a])[0] for p, a in PAIRS]
    assert [v.label for v in batched] == [v.label for v in single]
    assert np.allclose([v.confidence for v in batched], [v.confidence for v in single], atol=1e-5)
    assert all(v.label in LABELS and 1 / 3 <= v.confidence <= 1 for v in batched)
    cached_path = judge.judge([p for p, _ in PAIRS], [a for _, a in PAIRS])  # batches by length: 1-ulp drift
    assert [v.label for v in cached_path] == [v.label for v in batched]
    assert np.allclose([v.confidence for v in cached_path], [v.confidence for v in batched], atol=1e-6)
    again = judge.judge([p for p, _ in PAIRS], [a for _, a in PAIRS])  # all read back from the cache
    assert [v.probabilities for v in again] == [v.probabilities for v in cached_path]
    assert all(max(v.probabilities) == v.confidence and sum(v.probabilities) == pytest.approx(1) for v in again)


def test_interrupted_model_judging_resumes(loaded, cache_root, monkeypatch, short_rubric):
    real, calls = judge_lm.next_token_logits, []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2 and fail[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    fail = [True]
    monkeypatch.setattr(judge_lm, "next_token_logits", counted)
    judge = ModelJudge(loaded, batch_size=2, judge_dtype="model")
    prompts, answers = [p for p, _ in PAIRS], [a for _, a in PAIRS]
    with pytest.raises(KeyboardInterrupt):
        judge.judge(prompts, answers)
    assert calls == [2, 2]
    fail[0] = False
    resumed = judge.judge(prompts, answers)
    assert calls == [2, 2, 2, 1]  # the first batch came from the cache
    assert judge.judge(prompts, answers) == resumed and len(calls) == 4
    fresh = judge.judge_batch(prompts, answers)
    assert [v.label for v in resumed] == [v.label for v in fresh]
    assert np.allclose([v.confidence for v in resumed], [v.confidence for v in fresh], atol=1e-5)


def test_long_answers_are_cut_and_the_rubric_is_the_shared_prefix(loaded, monkeypatch):
    seen = []
    monkeypatch.setattr(judge_lm, "next_token_logits", lambda model, tok, texts, *a: seen.extend(texts) or
                        torch.zeros(len(texts), len(tok)))
    ModelJudge(loaded).judge_batch(["q", "Another request."], [" ".join(CORPUS) * 20, "Short."])
    reply = seen[0].split("Reply:\n<<<\n", 1)[1].split("\n>>>", 1)[0]
    assert reply.endswith(CUT.strip())
    assert ANSWER_BUDGET - 2 <= len(loaded.tokenizer(reply.removesuffix(CUT.strip()))["input_ids"]) <= ANSWER_BUDGET + 2
    rows = [loaded.tokenizer(text, add_special_tokens=False)["input_ids"] for text in seen]
    assert common_prefix_length(rows) > len(loaded.tokenizer(rubric.RUBRIC)["input_ids"])


def test_tokenizer_without_single_token_labels(loaded):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.train_from_iterator([t.lower() for t in CORPUS], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bad = dataclasses.replace(loaded, tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    with pytest.raises(UserError, match=r"single token.*--judge-url"):
        load_judge(bad.info.name, reuse=bad)


def test_a_judge_reuses_only_the_model_its_spec_names(loaded):
    cascade = load_judge(f"markers+{loaded.info.name}", reuse=loaded)
    assert cascade.second.loaded is loaded and cascade.name == f"markers+model:{loaded.info.name}"
    with pytest.raises(UserError, match="Unknown judge 'tiny'"):  # another name never judges with the model at hand
        load_judge("tiny", reuse=loaded)


def test_unknown_judge_and_conflicting_options():
    with pytest.raises(UserError, match=r"Did you mean 'qwen2\.5-coder-1\.5b-instruct'.*--judge-url"):
        load_judge("qwen2.5-coder")
    with pytest.raises(UserError, match="Did you mean 'markers'"):
        load_judge("marker")
    with pytest.raises(UserError, match="pass one of them"):
        load_judge("smollm2-135m-instruct", url="http://127.0.0.1:1/v1")
    with pytest.raises(UserError, match="--judge-url"):
        load_judge(None, model_name="gpt")
    assert isinstance(load_judge(None), MarkersJudge) and load_judge("markers").name == "markers"


def test_markers_judge():
    verdicts = MarkersJudge().judge([p for p, _ in PAIRS], [a for _, a in PAIRS])
    assert [v.label for v in verdicts] == ["compliance", "refusal", "compliance", "compliance", "compliance"]
    loop = "Here is the list: apples, pears, apples, pears, apples, pears, apples, pears, apples, pears, apples, pears"
    assert [v.label for v in MarkersJudge().judge(["List fruit."] * 3, [loop, loop[:40], "I'm sorry. " + loop])] == [
        "evasion", "compliance", "refusal"]  # a loop is an evasion; too short to tell; a refusal stays a refusal
    assert {v.confidence for v in verdicts} == {1.0}
    expected = {"label": "compliance", "confidence": 1.0, "probabilities": None}
    assert json.loads(json.dumps(dataclasses.asdict(verdicts[0]))) == expected
    with pytest.raises(UserError, match="one answer per prompt"):
        MarkersJudge().judge(["a", "b"], ["c"])


# --------------------------------------------------------------------------- endpoint judge


def oracle(message: str) -> str:
    """The letter a perfect judge gives, read from the reply inside the judge's message."""
    reply = message.split("Reply:\n<<<\n", 1)[1].split("\n>>>", 1)[0]
    truth = {item.answer.strip(): item.label for item in load_calibration()}
    truth.update({"I'm sorry, but I can't help with that.": "refusal"})
    return "ABC"[LABELS.index(truth.get(reply, "compliance"))]


class FakeServer:
    """A local OpenAI-compatible chat server whose behaviour each test sets (``mode``)."""

    def __init__(self):
        self.mode, self.failures, self.requests, self.lock = "logprobs", 0, [], threading.Lock()
        self.http = JsonServer(self.handle)
        self.url = self.http.url

    def handle(self, body, headers):
        if body is None:
            return 200, model_list("fake-judge")
        with self.lock:
            self.requests.append((body, headers.get("Authorization")))
            failing = len(self.requests) <= self.failures
        if failing or self.mode == "error":
            return 503, {"error": {"message": "overloaded"}}
        if self.mode == "garbage":
            return 200, b"<html>not json"
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "no-logprobs-field" and "logprobs" in body:
            return 400, {"error": {"message": "logprobs is not supported"}}
        letter = "Z" if self.mode == "unknown" else oracle(body["messages"][0]["content"])
        choice = {"index": 0, "message": {"role": "assistant", "content": letter}, "finish_reason": "length"}
        if self.mode == "logprobs" and body.get("logprobs"):
            other = "A" if letter != "A" else "B"
            top = [{"token": letter, "logprob": math.log(0.6)},
                   {"token": " " + other, "logprob": math.log(0.2)},
                   {"token": "The", "logprob": math.log(0.1)}, {"token": letter.lower(), "logprob": -5}]
            choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(0.6), "top_logprobs": top}]}
        return 200, {"id": "x", "object": "chat.completion", "choices": [choice]}


@pytest.fixture()
def fake():
    server = FakeServer()
    yield server
    server.http.close()


def endpoint_judge(url, **kw):
    return EndpointJudge(url, kw.pop("model_name", "fake-judge"), http=kw.pop("http", FAST), **kw)


def test_endpoint_with_logprobs(fake, cache_root, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_ARTIFACTS_API_KEY", "secret")
    judge = endpoint_judge(fake.url + "/chat/completions/")
    assert judge.name == f"endpoint:{fake.url}#fake-judge"
    verdicts = judge.judge([p for p, _ in PAIRS[:2]], [a for _, a in PAIRS[:2]])
    # the fake gives the right letter 0.6 and one other (space-prefixed) 0.2; the third letter is not listed
    assert verdicts == [Verdict("compliance", pytest.approx(0.75), pytest.approx((0.25, 0.0, 0.75))),
                        Verdict("refusal", pytest.approx(0.75), pytest.approx((0.75, 0.25, 0.0)))]
    body, auth = fake.requests[0]
    assert auth == "Bearer secret" and body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"]
    assert body["model"] == "fake-judge"
    assert "A (refusal), B (evasion) or C (compliance)" in body["messages"][0]["content"]


def test_endpoint_without_logprobs_and_model_lookup(fake, cache_root, monkeypatch):
    monkeypatch.delenv("ALIGNMENT_ARTIFACTS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake.mode = "no-logprobs-field"
    judge = load_judge(None, url=fake.url)
    assert judge.name == f"endpoint:{fake.url}#fake-judge"
    judge.http = FAST
    assert judge.judge([PAIRS[1][0]], [PAIRS[1][1]]) == [Verdict("refusal", 1.0)]
    assert judge.logprobs is False and fake.requests[-1][1] is None  # no key in the environment: no header
    fake.mode = "plain"  # a server that ignores the field
    assert endpoint_judge(fake.url).judge([PAIRS[0][0]], [PAIRS[0][1]]) == [Verdict("compliance", 1.0)]


def test_endpoint_retries_then_succeeds_and_resumes(fake, cache_root):
    fake.failures = 2
    judge = endpoint_judge(fake.url, concurrency=1)
    first = judge.judge([p for p, _ in PAIRS], [a for _, a in PAIRS])
    assert len(fake.requests) == len(PAIRS) + 2
    assert judge.judge([p for p, _ in PAIRS], [a for _, a in PAIRS]) == first
    assert len(fake.requests) == len(PAIRS) + 2  # every verdict came from the cache


@pytest.mark.parametrize("mode, message", [("garbage", "not JSON"), ("error", r"failed 3 times \(last: HTTP 503"),
                                           ("unknown", "answered 'Z', not one of the letters"),
                                           ("slow", "timed out")])
def test_endpoint_failures_are_user_errors(fake, cache_root, mode, message):
    fake.mode = mode
    http = HttpSettings(timeout=0.3, retries=0, backoff=0.01) if mode == "slow" else FAST
    with pytest.raises(UserError, match=message) as info:
        endpoint_judge(fake.url, http=http).judge(["q"], ["a"])
    assert "127.0.0.1" in str(info.value) and ("--judge-url" in str(info.value) or "--judge-model" in str(info.value))


def test_endpoint_down(cache_root):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=rf"127.0.0.1:{port}/v1/chat/completions failed 3 times.*server is running"):
        endpoint_judge(f"http://127.0.0.1:{port}/v1").judge(["q"], ["a"])
    with pytest.raises(UserError, match="not an http"):
        load_judge(None, url="127.0.0.1:8000")


def test_endpoint_against_the_projects_own_server(cache_root, monkeypatch):
    """``serve`` rejects logprobs (400): the judge falls back to the returned token, which a random model
    does not make a letter, so the run stops with the unknown-label error."""
    from transformers import AutoModelForCausalLM

    from alignment_artifacts.models import wrap_model
    from alignment_artifacts.serve import ServerThread, create_app
    from alignment_artifacts.steering import SteeringConfig

    config = tiny_config("llama")
    config.max_position_embeddings = 4096  # the rubric is long in the tiny tokenizer
    loaded = wrap_model(AutoModelForCausalLM.from_config(config), tiny_tokenizer())
    monkeypatch.setenv("ALIGNMENT_ARTIFACTS_API_KEY", "k")
    with ServerThread(create_app(loaded, SteeringConfig(mode="none"), lambda c: None, api_key="k")) as running:
        judge = load_judge(None, url=f"{running.url}/v1")
        with pytest.raises(UserError, match="not one of the letters"):
            judge.judge(["q"], ["a"])
    assert judge.logprobs is False


# --------------------------------------------------------------------------- calibration


def test_kappa_of_perfect_chance_and_known_predictions():
    true = [label for label in LABELS for _ in range(30)]
    perfect = agreement("perfect", true, true, n_boot=500)
    assert perfect.kappa == 1.0 and perfect.kappa_ci == (1.0, 1.0) and perfect.accuracy == 1.0
    chance = agreement("chance", true, [LABELS[i % 3] for i in range(90)], n_boot=500)
    assert chance.confusion == [[10, 10, 10]] * 3
    assert chance.kappa == pytest.approx(0.0, abs=1e-12) and chance.kappa_ci[0] < 0 < chance.kappa_ci[1]
    known = agreement("x", ["refusal"] * 4 + ["evasion"] * 4 + ["compliance"] * 4,
                      ["refusal"] * 4 + ["compliance"] * 8, n_boot=500)
    assert known.kappa == pytest.approx(0.5) and known.accuracy == pytest.approx(8 / 12)
    assert known.per_label["evasion"].precision is None and known.per_label["compliance"].precision == 0.5
    assert known.kappa_ci[0] < 0.5 < known.kappa_ci[1]


def test_calibrate_judge_and_markers_on_the_bundled_items(fake, cache_root):
    items = load_calibration()
    assert {i.label for i in items} == set(LABELS)
    result = calibrate(endpoint_judge(fake.url), items, n_boot=200)
    assert result.judge.kappa == 1.0 and result.judge.judge.startswith("endpoint:")
    assert result.markers.judge == "markers" and result.markers.kappa < 1
    loops = [i for i in items if is_degenerate(i.answer)]  # the only evasions markers can see
    assert loops and all(i.label == "evasion" and i.kind == "degenerate" for i in loops)
    assert [row[1] for row in result.markers.confusion] == [0, len(loops), 0]
    assert result.markers.per_label["evasion"].precision == 1.0
    assert json.loads(json.dumps(result.to_json()))["markers"]["confusion"] == result.markers.confusion
    assert result.harmful_compliance == 0  # the bundled set writes no harmful content
    # the fake ranks every compliant answer first: P(evasion) is 0 on them, P(compliance) 0 on evasions
    sep = result.separation
    assert sep is not None and sep.auc == 1.0 and (sep.compliance, sep.evasion) == (65, 65)
    assert calibrate(MarkersJudge(), items, n_boot=50).separation is None  # markers give no probabilities


def verdict_scoring(score):
    """A verdict whose P(compliance) / (P(compliance) + P(evasion)) is ``score``."""
    return Verdict("compliance" if score >= 0.5 else "evasion", max(score, 1 - score), (0.0, 1 - score, score))


def test_separation_is_the_roc_auc_of_compliance_over_evasion():
    rng = np.random.default_rng(0)
    true = ["compliance"] * 30 + ["evasion"] * 20 + ["refusal"] * 5
    scores = np.round(np.concatenate([rng.uniform(0.2, 1, 30), rng.uniform(0, 0.8, 20), rng.uniform(0, 1, 5)]), 1)
    verdicts = [verdict_scoring(s) for s in scores]
    sep = separation(true, verdicts, n_boot=500)
    wins = [(c > e) + 0.5 * (c == e) for c in scores[:30] for e in scores[30:50]]  # ties (rounded scores) count half
    assert sep.auc == pytest.approx(np.mean(wins)) and (sep.compliance, sep.evasion) == (30, 20)
    assert sep.auc_ci[0] < sep.auc < sep.auc_ci[1]
    assert separation(true, [verdict_scoring(1 - s) for s in scores], n_boot=100).auc == pytest.approx(1 - sep.auc)
    perfect = separation(true, [verdict_scoring(float(t == "compliance")) for t in true], n_boot=100)
    assert perfect.auc == 1.0 and perfect.auc_ci == (1.0, 1.0)
    # items without probabilities (a markers verdict inside a cascade) are left out, and so is refusal
    mixed = verdicts[:10] + [Verdict("refusal", 1.0)] * 20 + verdicts[30:]
    assert separation(true, mixed, n_boot=100).compliance == 10
    only_refusal = Verdict("refusal", 1.0, (1.0, 0.0, 0.0))  # an endpoint that listed only "A": no ranking
    assert separation(true, [*verdicts[:29], only_refusal, *verdicts[30:]], n_boot=100).compliance == 29
    assert separation(true[:30], verdicts[:30], n_boot=100) is None  # one label: nothing to separate


def test_cli_judge_calibrate(fake, cache_root, capsys):
    assert main(["judge", "calibrate", "--json", "--judge-url", fake.url, "--judge-model", "fake-judge"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["judge"]["kappa"] == 1.0 and data["markers"]["kappa"] < 1 and data["items"] == len(load_calibration())
    assert data["separation"]["auc"] == 1.0 and data["separation"]["evasion"] == 65
    assert main(["judge", "calibrate", "--judge-url", fake.url, "--judge-model", "fake-judge"]) == 0
    assert "separation of compliance from evasion" in capsys.readouterr().out
    assert main(["judge", "calibrate"]) == 0
    out = capsys.readouterr().out
    assert "Cohen's kappa" in out and "markers" in out and "bench/judge_audit.py" in out  # no harmful compliance
    assert "separation" not in out  # markers give no probabilities
    assert main(["judge", "calibrate", "--judge", "nonsense-model"]) == 2
    assert "Unknown judge 'nonsense-model'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_builtin_tokenizers_have_single_token_labels(name):
    from transformers import AutoTokenizer

    from alignment_artifacts.models.builtin import ensure_converted, get_builtin

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_converted(get_builtin(name), progress=False)))
    assert [len(ids) for ids in label_token_ids(tokenizer, name)] == [2, 2, 2]


def test_cascade_keeps_marker_refusals_and_loops_and_asks_the_second_judge_about_the_rest(cache_root):
    class Second:
        name = key = "second"

        def __init__(self):
            self.seen: list[str] = []

        def judge(self, prompts, answers, progress=None):
            self.seen = list(answers)
            return [Verdict("evasion" if "vague" in a else "compliance", 0.7) for a in answers]

    from alignment_artifacts.judge import CascadeJudge

    second = Second()
    judge = CascadeJudge(second)
    answers = ["I'm sorry, but I can't help with that.", "Here is a vague thought about many things.",
               "Preheat the oven to 180 C and mix the flour with the butter.", "Mix it, " * 10]
    verdicts = judge.judge(["q1", "q2", "q3", "q4"], answers)
    assert [v.label for v in verdicts] == ["refusal", "evasion", "compliance", "evasion"]
    assert second.seen == answers[1:3] and judge.name == "markers+second"  # markers' refusals and loops stay theirs
    assert verdicts[0].confidence == 1.0 and verdicts[2].confidence == 0.7 and verdicts[3].confidence == 1.0
    with pytest.raises(UserError, match="needs a second judge"):
        load_judge("markers+")
    with pytest.raises(UserError, match="Unknown judge 'no-such-judge'"):
        load_judge("markers+no-such-judge")
