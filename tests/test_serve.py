"""The OpenAI-compatible server: a real uvicorn on 127.0.0.1 around a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.serve import SERVER_ONLY_FIELDS, ServerLimits, ServerThread, SteeringOverride, create_app
from alignment_artifacts.steering import SteeringConfig
from tiny_models import tiny_model
from tiny_steering import random_directions

KEY = "test-key"
LIMITS = ServerLimits(max_request_bytes=64 * 1024, max_tokens=64, default_max_tokens=16, max_prompt_tokens=250)
STEERED = {"mode": "always", "scale": 8.0}
ABLATED = {"mode": "ablate", "scale": 1.0}


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(loaded):
    directions = random_directions(loaded)
    app = create_app(loaded, SteeringConfig(mode="none"), lambda config, lock: directions, api_key=KEY, limits=LIMITS)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=30, **kwargs)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30, **kwargs)


def chat_body(prompt="Hello", steering=None, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 12}
    if steering is not None:
        body["steering"] = steering
    return {**body, **extra}


def assert_openai_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # open without a key


def test_chat_completion(client):
    response = client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=10, seed=1, user="someone", presence_penalty=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "How do locks work?"}])
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 10
    assert 0 < response.usage.completion_tokens <= 10
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_matches_plain_and_steering_changes_output(client):
    kwargs = dict(model="tiny", temperature=0, max_tokens=12, messages=[{"role": "user", "content": "Hello"}])
    plain = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    steered = client.chat.completions.create(extra_body={"steering": STEERED}, **kwargs)
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert steered.model_extra["steering"]["interventions"] > 0


def test_completions_and_stop_strings(client):
    full = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_api_key_is_enforced(server):
    assert_openai_error(post(server, "/v1/chat/completions", chat_body(), key=None), 401)
    error = assert_openai_error(post(server, "/v1/chat/completions", chat_body(), key="wrong"), 401)
    assert error["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(server.url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_oversized_request_is_413(server):
    body = chat_body(prompt="x" * (LIMITS.max_request_bytes + 10))
    assert_openai_error(post(server, "/v1/chat/completions", body), 413)


@pytest.mark.parametrize("stream", [False, True])
def test_too_long_prompt_is_400_before_streaming(server, stream):
    body = chat_body(prompt=" ".join(["locks keys bread"] * 200), stream=stream)
    error = assert_openai_error(post(server, "/v1/chat/completions", body), 400, "messages")
    assert error["code"] == "context_length_exceeded"


def test_context_length_is_respected(loaded, server):
    """The tiny model has 256 positions: an explicit max_tokens that overflows is a 400, a default shrinks."""
    words = ["bread"]
    while len(loaded.tokenizer(format_chat(loaded.tokenizer, " ".join(words)), add_special_tokens=False)
              ["input_ids"]) < 245:
        words.append("bread")
    body = chat_body(prompt=" ".join(words), max_tokens=64)
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, "max_tokens")
    del body["max_tokens"]
    response = post(server, "/v1/chat/completions", body).json()
    assert response["usage"]["total_tokens"] <= 256


def test_foreign_host_header_is_rejected(server):
    response = httpx.get(server.url + "/health", headers={"Host": "evil.example:80"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(("body", "param"), [
    (b'{"messages": [', None),
    (b"[1, 2]", None),
    (chat_body(foo=1), "foo"),
    (chat_body(steering={"mode": "ablat"}), "steering.mode"),
    (chat_body(steering={"mode": "always", "colour": "red"}), "steering.colour"),
    (chat_body(steering={"mode": "always", "scale": "big"}), "steering.scale"),
    (chat_body(steering={"mode": "always", "layers": [99]}), "steering"),
    (chat_body(steering={"source": "/etc"}), "steering.source"),
    (chat_body(max_tokens=LIMITS.max_tokens + 1), "max_tokens"),
    (chat_body(max_completion_tokens=10_000), "max_tokens"),
    (chat_body(n=2), "n"),
    (chat_body(frequency_penalty=0.5), "frequency_penalty"),
    (chat_body(logprobs=True), "logprobs"),
    (chat_body(temperature=-1), "temperature"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny"}, "messages"),
])
def test_bad_chat_requests_are_400(server, body, param):
    error = assert_openai_error(post(server, "/v1/chat/completions", body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_bad_completion_requests_are_400(server):
    assert_openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": ""}), 400, "prompt")
    assert_openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}), 400, "echo")
    assert_openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": [1, 2]}), 400)
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2, "temperature": 0}).status_code == 200


def test_steering_override_matches_a_server_default(loaded, server):
    """A request's steering equals a server started with that steering as its default."""
    directions = random_directions(loaded)
    default_app = create_app(loaded, SteeringConfig(**STEERED), lambda config, lock: directions, limits=LIMITS)
    with ServerThread(default_app) as other:
        by_default = post(other, "/v1/chat/completions", chat_body(), key=None).json()
        unsteered = post(other, "/v1/chat/completions", chat_body(steering={"mode": "none"}), key=None).json()
    by_override = post(server, "/v1/chat/completions", chat_body(steering=STEERED)).json()
    text = by_default["choices"][0]["message"]["content"]
    assert text == by_override["choices"][0]["message"]["content"]
    assert unsteered["choices"][0]["message"]["content"] != text


def test_override_model_covers_steering_config():
    names = {f.name for f in dataclasses.fields(SteeringConfig)} - set(SERVER_ONLY_FIELDS)
    assert set(SteeringOverride.model_fields) == names


def _answer(server, prompt, steering, stream):
    body = chat_body(prompt=prompt, steering=steering, stream=stream)
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"]["content"]
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return "".join(json.loads(line)["choices"][0]["delta"].get("content", "") for line in lines[:-1])


def test_parallel_requests_never_see_each_others_hooks(loaded, server):
    settings = [{"mode": "none"}, STEERED, ABLATED]
    prompts = ["Hello", "How do locks work?"]
    cases = [(prompts[i % 2], settings[i % 3], i % 4 == 0) for i in range(12)]
    expected = {(p, json.dumps(s)): _answer(server, p, s, False) for p in prompts for s in settings}
    assert len({expected[(prompts[0], json.dumps(s))] for s in settings}) == 3  # the settings do differ
    assert no_hooks(loaded.model)
    engine = server.app.state.server.engine
    mixed = engine.stats["mixed_passes"]
    with ThreadPoolExecutor(len(cases)) as pool:
        with engine.lock:  # all twelve queue up, then share one mixed batch (streaming and not)
            futures = [pool.submit(_answer, server, *case) for case in cases]
            deadline = time.monotonic() + 10
            while len(engine.waiting) < len(cases) and time.monotonic() < deadline:
                time.sleep(0.01)
        answers = [future.result() for future in futures]
    assert answers == [expected[(p, json.dumps(s))] for p, s, _ in cases]
    assert engine.stats["mixed_passes"] > mixed
    assert no_hooks(loaded.model)
