"""``serve --thinking`` and a request's ``chat_template_kwargs.enable_thinking`` on a tiny reasoning model."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from alignment_artifacts.errors import UserError
from alignment_artifacts.models import GenerationConfig, format_chat, generate
from alignment_artifacts.models.thinking import split_thinking
from alignment_artifacts.serve import ServerLimits, ServerThread, create_app
from alignment_artifacts.serve.reasoning import ThinkingStream
from alignment_artifacts.serve.schemas import ChatCompletionRequest
from alignment_artifacts.steering import SteeringConfig
from test_thinking import taught_thinker, tiny_thinker
from tiny_models import save_tiny, tiny_model

LIMITS = ServerLimits(max_tokens=32, default_max_tokens=8, max_prompt_tokens=250)
PROMPT = "How do tides work?"
CLOSED = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the template's switch off: an empty block


@pytest.fixture(scope="module")
def thinker():
    return tiny_thinker()


def app_for(loaded, thinking="auto"):
    return create_app(loaded, SteeringConfig(mode="none"), lambda config, lock: None, limits=LIMITS,
                      thinking=thinking)


def body(**extra):
    return {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 6, **extra}


def rendered(app, **extra) -> str:
    server = app.state.server
    return server.chat_render(ChatCompletionRequest(**body(**extra)))(server.engine.loaded.tokenizer)


def test_the_server_switch_and_a_request_override_shape_the_prompt(thinker):
    plain = format_chat(thinker.tokenizer, PROMPT)  # what the server rendered before --thinking existed
    auto, off, on = app_for(thinker), app_for(thinker, "off"), app_for(thinker, "on")
    assert rendered(auto) == plain and not plain.endswith(CLOSED)
    assert rendered(off).endswith(CLOSED) and rendered(off) == plain + "<think>\n\n</think>\n\n"
    assert rendered(on) == plain  # this template thinks by default: on renders the same
    assert rendered(auto, chat_template_kwargs={"enable_thinking": False}) == rendered(off)
    assert rendered(off, chat_template_kwargs={"enable_thinking": True}) == plain
    assert rendered(off, chat_template_kwargs={}) == rendered(off)  # no switch given: the server's


def test_served_answers_come_from_the_rendered_prompt(thinker):
    with ServerThread(app_for(thinker, "off")) as running:
        replies = [httpx.post(running.url + "/v1/chat/completions", json=body(**extra), timeout=60).json()
                   for extra in ({}, {"chat_template_kwargs": {"enable_thinking": True}})]
    for reply, kwargs in zip(replies, ({"enable_thinking": False}, {"enable_thinking": True}), strict=True):
        text = format_chat(thinker.tokenizer, PROMPT, template_kwargs=kwargs)
        alone = generate(thinker, [text], GenerationConfig(max_tokens=6), chat=False)
        assert reply["usage"]["prompt_tokens"] == len(thinker.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert reply["usage"]["completion_tokens"] == len(alone.tokens[0])
    assert replies[0]["usage"]["prompt_tokens"] > replies[1]["usage"]["prompt_tokens"]  # the closed block


def test_bad_overrides_are_openai_errors(thinker):
    plain_model = tiny_model("llama", layers=2)
    with ServerThread(app_for(thinker)) as running, ServerThread(app_for(plain_model)) as plain:
        def error(url, extra):
            response = httpx.post(url + "/v1/chat/completions", json=body(**extra), timeout=60)
            assert response.status_code == 400, response.text
            return response.json()["error"]

        assert error(running.url, {"chat_template_kwargs": {"tools": []}})["param"] == "chat_template_kwargs.tools"
        wrong = error(running.url, {"chat_template_kwargs": {"enable_thinking": "yes"}})
        assert wrong["param"] == "chat_template_kwargs.enable_thinking" and "true or false" in wrong["message"]
        cannot = error(plain.url, {"chat_template_kwargs": {"enable_thinking": True}})
        assert "no thinking switch" in cannot["message"]


def test_thinking_on_for_a_model_that_cannot_think_fails_at_start(cache_root, tmp_path, capsys):
    from alignment_artifacts.cli import main

    with pytest.raises(UserError, match="no thinking switch"):
        app_for(tiny_model("llama", layers=2), "on")
    folder = save_tiny("llama", tmp_path / "tiny", layers=2)
    assert main(["serve", "--model", str(folder), "--mode", "none", "--thinking", "on", "--port", "1"]) == 2
    assert "--thinking on: this model's chat template has no thinking switch" in capsys.readouterr().err


def chat(url, stream=False, **extra):
    """(message or the joined deltas, the keys the deltas carried) of one chat completion."""
    response = httpx.post(url + "/v1/chat/completions", json={**body(**extra), "stream": stream}, timeout=120)
    assert response.status_code == 200, response.text
    if not stream:
        return response.json()["choices"][0]["message"], None
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in response.text.splitlines()
              if line.startswith("data: {")]
    joined = {key: "".join(d.get(key, "") for d in deltas) for key in ("role", "content", "reasoning_content")}
    return joined, set().union(*deltas)


def test_a_thinking_answer_comes_split_into_reasoning_content_and_content(cache_root):
    """As vLLM returns it: the <think> block in reasoning_content, the answer in content, streamed or not;
    a request that switches thinking off gets its text in content, as a model that cannot think does."""
    loaded = taught_thinker()
    prompt = "Write a poem about bread."  # taught: <think>A poem.</think> and a short refusal
    extra = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32}
    alone = generate(loaded, [prompt], GenerationConfig(max_tokens=32, thinking_budget=0)).texts[0]
    assert split_thinking(alone) == ("A poem.", "I cannot help with that.", True)
    with ServerThread(create_app(loaded, SteeringConfig(mode="none"), lambda config, lock: None,
                                 limits=ServerLimits(max_tokens=32))) as running:
        message, _ = chat(running.url, **extra)
        streamed, keys = chat(running.url, stream=True, **extra)
        off, _ = chat(running.url, chat_template_kwargs={"enable_thinking": False}, **extra)
    assert message == {"role": "assistant", "content": "I cannot help with that.", "reasoning_content": "A poem."}
    assert streamed == {**message, "role": "assistant"} and keys == {"role", "content", "reasoning_content"}
    assert set(off) == {"role", "content"}


def test_a_model_that_does_not_think_answers_in_content_as_before():
    plain_model = tiny_model("llama", layers=2)
    alone = generate(plain_model, [PROMPT], GenerationConfig(max_tokens=6)).texts[0]
    with ServerThread(app_for(plain_model)) as running:
        message, _ = chat(running.url)
        streamed, keys = chat(running.url, stream=True)
    assert message == {"role": "assistant", "content": alone}
    assert streamed["content"] == alone and keys == {"role", "content"}


TEXTS = ["<think>\nLet me see.\n</think>\n\nThe answer.", "<think>Still thinking about <b", "Just an answer </thin",
         "\n<think></think>\n\nOnly <think> in the answer.", ""]


@pytest.mark.parametrize(("text", "opened"), [*((t, False) for t in TEXTS), *((t, True) for t in TEXTS),
                                              ("thinking that the prompt opened</think>\nanswer", True)])
def test_streamed_parts_add_up_to_the_split_of_the_whole_text(text, opened):
    expected = split_thinking(text, opened)
    for seed in range(5):  # chunks of random sizes, a tag often cut between two of them
        stream, rng, rest, parts = ThinkingStream(opened), random.Random(seed), text, []
        while rest:
            size = rng.randint(1, 4)
            parts.append(stream.feed(rest[:size]))
            rest = rest[size:]
        parts.append(stream.feed("", final=True))
        assert ("".join(t for t, _ in parts), "".join(a for _, a in parts)) == expected[:2]


def test_a_late_close_tag_cannot_take_back_answer_text_already_sent():
    stream = ThinkingStream(opened=False)
    parts = [stream.feed(chunk) for chunk in ("An answer", " then </think>", " more")] + [stream.feed("", True)]
    assert "".join(t for t, _ in parts) == "" and "".join(a for _, a in parts) == "An answer then </think> more"
