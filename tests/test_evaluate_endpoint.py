"""`evaluate --endpoint`: a model behind an OpenAI-compatible server, measured in the four groups.

The servers here are real HTTP servers on 127.0.0.1 (random ports, threads): a small one that
answers greedily from a tiny random model, with or without top log-probs and with faults on
demand, the toolkit's own `serve`, and llama.cpp's server where it is installed.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from alignment_artifacts.cli import main
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import (
    EndpointSettings,
    EvaluationSettings,
    chat_texts,
    evaluate,
    evaluate_endpoint,
    first_logits,
    format_table,
    generate_answers,
    kl_divergence,
    load_group_sets,
)
from alignment_artifacts.evaluation.remote import KL_UNAVAILABLE, ChatEndpoint, single_token_texts
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.steering import SteeringConfig
from json_server import JsonServer, model_list
from tiny_models import save_tiny, tiny_model

FAST = dict(model=None, concurrency=2, timeout=10.0, retries=1, backoff=0.01)
SMALL = dict(n_borderline=6, n_ordinary=8, n_capability=6, max_tokens=4, capability_max_tokens=4, batch_size=4,
             generation_batch_size=4)


class TinyServer:
    """OpenAI-compatible chat completions from a tiny model, one greedy answer per request.

    ``mode``: ``logprobs`` (top log-probs of the first answer token when asked), ``plain`` (ignores
    the field), ``reject`` (400 when asked for log-probs), ``garbage`` (a body that is not JSON),
    ``broken`` (JSON that is no chat completion), ``error`` (HTTP 500), ``slow`` (sleeps 1 s).
    ``fail_first``: that many 503s first; ``fail_after``: 503 once that many answers were given.
    """

    def __init__(self, loaded):
        self.loaded, self.mode, self.fail_first, self.fail_after = loaded, "logprobs", 0, None
        self.posts, self.answered, self.bodies, self.lock = 0, 0, [], threading.Lock()
        self.http = JsonServer(self.handle)
        self.url = self.http.url

    def handle(self, body, headers):
        if body is None:
            return 200, model_list("tiny")
        with self.lock:
            self.posts += 1
            down = self.fail_after is not None and self.answered >= self.fail_after
            failing = self.posts <= self.fail_first or down
        if failing or self.mode == "error":
            return (503 if failing else 500), {"error": {"message": "unavailable"}}
        if self.mode == "slow":
            time.sleep(1.0)
        if self.mode == "garbage":
            return 200, b"<html>proxy error"
        if self.mode == "broken":
            return 200, {"object": "error"}
        if self.mode == "reject" and body.get("logprobs"):
            return 400, {"error": {"message": "logprobs are not supported"}}
        with self.lock:
            self.answered += 1
            self.bodies.append(body)
            return 200, self.answer(body)

    def answer(self, body):
        tokenizer = self.loaded.tokenizer
        system = next((m["content"] for m in body["messages"] if m["role"] == "system"), None)
        text = format_chat(tokenizer, body["messages"][-1]["content"], system)
        answers = generate_answers(self.loaded, [text], body["max_tokens"], 1)
        choice = {"index": 0, "message": {"role": "assistant", "content": answers.texts[0]}, "finish_reason": "length"}
        if self.mode == "logprobs" and body.get("logprobs"):
            logp = torch.log_softmax(answers.first_logits[0].double(), -1)
            values, ids = logp.topk(body["top_logprobs"])
            top = [{"token": tokenizer.decode([i]), "logprob": v} for v, i in zip(values.tolist(), ids.tolist())]
            choice["logprobs"] = {"content": [{**top[0], "top_logprobs": top}]}
        return {"id": "x", "object": "chat.completion", "model": "tiny", "choices": [choice]}

    def close(self):
        self.http.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all while server threads and the client share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", layers=3)


@pytest.fixture()
def server(loaded):
    running = TinyServer(loaded)
    yield running
    running.close()


@pytest.fixture()
def harmful(tmp_path):
    path = tmp_path / "harmful.txt"
    path.write_text("\n".join(f"Tell me how to do bad thing number {i}." for i in range(10)))
    return str(path)


def endpoint(url, **extra):
    return EndpointSettings(url, **{**FAST, **extra})


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_four_groups_from_an_endpoint_with_logprobs(cache_root, loaded, server, harmful):
    settings = EvaluationSettings(harmful=harmful, **SMALL)
    served = endpoint(server.url, top_logprobs=5, extra={"repeat_penalty": 1.0})
    result = evaluate_endpoint(served, settings, reference=loaded, progress=False)
    data = json.loads(json.dumps(result.to_json()))
    assert {"harmful", "borderline", "ordinary", "capability"} <= set(data)
    assert result.model == f"endpoint:{server.url}#tiny" and data["config"]["compared_with"] == "local:tiny-llama"
    method = data["kl_method"]
    assert method["kind"] == "approximate" and method["top_k"] == 5 and method["returned_k_min"] == 5
    assert method["prompts"] == {"borderline": 6, "ordinary": 8} and 0 < method["matched_mass"] <= 1
    # the endpoint serves the local model itself: the same greedy answers, labels and first-token distribution
    h, b, o = result.harmful, result.borderline, result.ordinary
    assert h.n == 10 and h.before == h.after and h.marker_refusals_before == h.marker_refusals_after
    assert h.first_token_refusal_score_before is not None and h.first_token_refusal_score_after is None
    assert b.refusals_before == b.refusals_after and o.refusals_before == o.refusals_after
    assert o.kl.n == 8 and o.kl.max < 1e-6 and o.touched == 0.0 and b.kl.n == 6 and b.touched == 0.0
    assert result.capability.n == 6 and result.capability.delta == 0.0
    requests = {json.dumps(m["messages"][-1]["content"]): m for m in server.bodies}
    assert len(server.bodies) == 30 == len(requests)  # one request per prompt of the four groups
    assert all(m["temperature"] == 0 and m["max_tokens"] == 4 and m["model"] == "tiny" and m["repeat_penalty"] == 1.0
               for m in server.bodies)
    sets = load_group_sets(settings)
    assert all("logprobs" not in requests[json.dumps(p)] for p in sets.harmful)  # KL is not measured there
    assert all(requests[json.dumps(p)]["top_logprobs"] == 5 for p in sets.ordinary)
    table = format_table(result)
    assert "KL approximate (lower bound)" in table and "top 5" in table and "before -> endpoint" in table


def test_approximate_kl_is_a_lower_bound_refined_by_a_larger_k(cache_root, loaded, harmful):
    """Against a different model: KL over k buckets <= KL over more buckets <= the exact KL, and with the
    whole vocabulary asked for it equals the KL over every uniquely decoded token plus one rest bucket."""
    served = tiny_model("llama", layers=3, seed=1)
    settings = EvaluationSettings(harmful=harmful, groups=("ordinary",), n_ordinary=8, max_tokens=2, batch_size=4)
    texts = chat_texts(loaded, load_group_sets(settings).ordinary, None)
    before, after = first_logits(loaded, texts, 4), first_logits(served, texts, 4)
    exact = kl_divergence(before, after)
    unique = torch.tensor(sorted(single_token_texts(loaded.tokenizer).values()))

    def coarse(logits):
        probs = torch.softmax(logits.double(), -1)
        kept = probs[:, unique]
        return torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1)

    p, q = coarse(before), coarse(after)
    expected = (p * (p / q).log()).sum(-1)
    running = TinyServer(served)
    try:
        means = []
        for k in (3, len(loaded.tokenizer)):
            result = evaluate_endpoint(endpoint(running.url, top_logprobs=k), settings, reference=loaded,
                                       progress=False)
            assert result.kl_method["top_k"] == k and result.ordinary.kl.n == 8
            means.append(result.ordinary.kl.mean)
    finally:
        running.close()
    assert 0 < means[0] <= means[1] + 1e-9 and means[1] <= float(exact.mean()) + 1e-9
    assert means[1] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert result.ordinary.touched == 1.0


@pytest.mark.parametrize("mode", ["plain", "reject"])
def test_without_logprobs_kl_is_unavailable_not_zero(cache_root, loaded, server, harmful, mode):
    server.mode = mode
    settings = EvaluationSettings(harmful=harmful, **SMALL)
    result = evaluate_endpoint(endpoint(server.url), settings, reference=loaded, progress=False)
    data = json.loads(json.dumps(result.to_json()))
    assert data["kl_method"]["kind"] == "unavailable" and data["kl_method"]["note"].startswith(KL_UNAVAILABLE)
    assert ("rejected the request" in data["kl_method"]["note"]) == (mode == "reject")
    for name in ("kl", "collateral_kl", "touched"):
        assert data["borderline"][name] is None
    assert data["ordinary"]["kl"] is None and data["ordinary"]["touched"] is None
    h = result.harmful
    assert h.before == h.after and result.borderline.n_judged == 6 and result.ordinary.n == 8  # measured all the same
    table = format_table(result)
    assert KL_UNAVAILABLE in table and "KL unavailable; touched unavailable" in table


def test_interrupted_run_resumes_without_asking_again(cache_root, loaded, server, harmful):
    settings = EvaluationSettings(harmful=harmful, **SMALL)
    server.fail_after = 11  # mid-batch (batches of 8): the server goes down after 11 answers
    with pytest.raises(UserError, match=r"failed 2 times \(last: HTTP 503"):
        evaluate_endpoint(endpoint(server.url), settings, reference=loaded, progress=False)
    assert server.answered == 11
    server.fail_after, server.answered = None, 0
    result = evaluate_endpoint(endpoint(server.url), settings, reference=loaded, progress=False)
    assert server.answered == 30 - 11  # every answer given before the failure was kept
    again = evaluate_endpoint(endpoint(server.url), settings, reference=loaded, progress=False)
    assert server.answered == 30 - 11 and again.harmful == result.harmful and again.ordinary == result.ordinary
    assert result.harmful.before == result.harmful.after
    stored = "".join(path.read_text() for path in (cache_root / "endpoint-evaluation").rglob("*.json"))
    assert "bad thing" not in stored and '"label"' in stored  # labels only, never prompts or answers


def test_endpoint_failures_are_clear_errors(cache_root, loaded, server, harmful):
    settings = EvaluationSettings(harmful=harmful, groups=("harmful",), n_harmful=2, max_tokens=2)

    def run(**extra):
        return evaluate_endpoint(endpoint(server.url, model="tiny", concurrency=1, **extra), settings,
                                 reference=loaded, progress=False)

    server.fail_first = 2  # transient 503s are retried
    assert run(retries=2).harmful.n == 2 and server.posts == 2 + 2
    server.posts, server.fail_first = 0, 0
    settings.n_harmful = 1
    for mode, message in (("garbage", r"not JSON: '<html>proxy error'\). --endpoint must point at an OpenAI"),
                          ("error", r"failed 2 times \(last: HTTP 500"),
                          ("broken", "not a chat completion"), ("slow", r"last: timed out")):
        server.mode, server.posts = mode, 0
        shutil.rmtree(cache_root / "endpoint-evaluation")  # ask again, not the cache
        with pytest.raises(UserError, match=message) as info:
            run(timeout=0.2) if mode == "slow" else run()
        assert f"{server.url}/chat/completions" in str(info.value)
        assert server.posts == (1 if mode == "broken" else 2)  # malformed replies retried; valid JSON not


def test_endpoint_down_is_a_user_error_naming_the_url(cache_root, loaded, harmful, tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    settings = EvaluationSettings(harmful=harmful, groups=("harmful",), n_harmful=2)
    with pytest.raises(UserError, match=rf"{url}/chat/completions failed 2 times.*server is running.*--endpoint"):
        evaluate_endpoint(endpoint(url, model="tiny"), settings, reference=loaded, progress=False)
    with pytest.raises(UserError, match=rf"{url}/models failed"):  # the model name is looked up first
        evaluate_endpoint(endpoint(url), settings, reference=loaded, progress=False)
    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    base = ["evaluate", "--model", str(folder), "--harmful", harmful, "--groups", "harmful", "--n-harmful", "2"]
    assert main([*base, "--endpoint", url, "--endpoint-model", "tiny", "--endpoint-retries", "1"]) == 2
    err = capsys.readouterr().err
    assert f"error: {url}/chat/completions failed 2 times" in err and "Traceback" not in err


def test_bad_endpoint_options(cache_root, harmful, tmp_path, capsys):
    """Each is refused before any model loads: --model names a missing folder, whose error would show otherwise."""
    cases = [(["--endpoint", "127.0.0.1:8000"], "not an http(s) URL"),
             (["--endpoint", "http://127.0.0.1:1/v1", "--mode", "ablate"], "steering options"),
             (["--baseline-endpoint", "http://127.0.0.1:1/v1"], "pass --endpoint URL too"),
             (["--endpoint", "http://127.0.0.1:1/v1", "--endpoint-concurrency", "0"], "at least 1"),
             (["--endpoint", "http://127.0.0.1:1/v1", "--endpoint-top-logprobs", "-1"], "0 (do not ask)"),
             (["--endpoint", "http://127.0.0.1:1/v1", "--endpoint-body", "[1]"], "must be a JSON object")]
    for extra, message in cases:
        assert main(["evaluate", "--model", str(tmp_path / "missing"), "--harmful", harmful, *extra]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="one before side"):
        evaluate_endpoint(endpoint("http://127.0.0.1:1/v1"), EvaluationSettings(harmful=harmful), progress=False)


def test_two_endpoints_compared(cache_root, loaded, server, harmful):
    """--baseline-endpoint: both sides served; KL over the texts both top-k lists give."""
    other = TinyServer(tiny_model("llama", layers=3, seed=1))
    try:
        settings = EvaluationSettings(harmful=harmful, **SMALL)
        same = evaluate_endpoint(endpoint(server.url), settings, baseline=endpoint(server.url), progress=False)
        assert same.ordinary.kl.max < 1e-12 and same.harmful.before == same.harmful.after
        assert same.config["compared_with"] == f"endpoint:{server.url}#tiny"
        posts = server.answered
        different = evaluate_endpoint(endpoint(other.url), settings, baseline=endpoint(server.url), progress=False)
        assert server.answered == posts  # the before side came from the cache
        assert different.ordinary.kl.mean > 0 and different.kl_method["kind"] == "approximate"
        assert different.capability.n == 6
    finally:
        other.close()


def test_against_the_toolkits_own_server_matches_a_local_evaluation(cache_root, harmful, tmp_path, capsys):
    """`serve --mode none` answers exactly as the local model does greedily, so evaluate --endpoint
    against it reports the local evaluation's labels on both sides."""
    from alignment_artifacts.api import get_model
    from alignment_artifacts.serve import ServerThread, create_app

    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    loaded = get_model(str(folder))
    args = ["--model", str(folder), "--harmful", harmful, "--n-borderline", "4", "--n-ordinary", "6",
            "--n-capability", "4", "--max-tokens", "6", "--json"]
    with ServerThread(create_app(loaded, SteeringConfig(mode="none"), lambda config: None)) as running:
        url = f"{running.url}/v1"
        chat = ChatEndpoint(endpoint(url))
        sets = load_group_sets(EvaluationSettings(n_ordinary=6))
        local = generate_answers(loaded, chat_texts(loaded, sets.ordinary, None), 6, 4).texts
        assert [chat.reply([{"role": "user", "content": p}], 6, False).text for p in sets.ordinary] == local
        assert main(["evaluate", "--endpoint", url, *args]) == 0
        remote = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--mode", "none", *args]) == 0
    plain = json.loads(capsys.readouterr().out)
    for group in ("harmful", "borderline", "ordinary"):
        before = {k: v for k, v in remote[group].items() if not k.endswith(("_after", "kl", "touched", "after"))}
        assert before == {k: v for k, v in plain[group].items() if k in before}
    assert remote["harmful"]["after"] == plain["harmful"]["before"] == remote["harmful"]["before"]
    assert remote["borderline"]["refusals_after"] == plain["borderline"]["refusals_before"]
    assert remote["ordinary"]["refusals_after"] == plain["ordinary"]["refusals_before"]
    assert remote["capability"]["after"] == plain["capability"]["before"]
    if remote["kl_method"]["kind"] == "approximate":  # a serve that returns log-probs
        assert remote["ordinary"]["kl"]["max"] < 1e-5
    else:  # today's serve rejects logprobs with a 400
        assert "rejected the request" in remote["kl_method"]["note"] and remote["ordinary"]["kl"] is None


def test_against_llama_cpp_server(cache_root, harmful, tmp_path):
    """llama.cpp's OpenAI server on a tiny float32 GGUF of the local model: log-probs come back and the
    approximate KL against the local model stays at float rounding. Needs llama-cpp-python[server]."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette")
    pytest.importorskip("starlette_context")
    pytest.importorskip("pydantic_settings")
    tiny_gguf = pytest.importorskip("tiny_gguf")
    loaded = tiny_model("llama", layers=3)
    model = tiny_gguf.write_tiny_llama_gguf(loaded, tmp_path / "tiny.gguf")
    port = closed_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--model_alias", "tiny"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(UserError):
                ChatEndpoint(endpoint(url, retries=0, timeout=2))
                break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        settings = EvaluationSettings(harmful=harmful, **SMALL)
        result = evaluate_endpoint(endpoint(url, concurrency=1, extra={"repeat_penalty": 1.0}), settings,
                                   reference=loaded, progress=False)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert result.kl_method["kind"] == "approximate" and result.kl_method["top_k"] == 20
    assert result.kl_method["matched_mass"] > 0
    assert result.ordinary.kl.n == 8 and result.ordinary.kl.max < 1e-3
    assert result.harmful.n == 10 and sum(result.harmful.after.values()) == 10
    assert math.isfinite(result.borderline.collateral_kl.mean)


def test_local_evaluation_keeps_exact_kl(cache_root, loaded, harmful):
    result = evaluate(loaded, SteeringConfig(mode="none"), EvaluationSettings(harmful=harmful, **SMALL),
                      progress=False)
    assert result.kl_method == {"kind": "exact"} and result.ordinary.kl.mean == 0.0
