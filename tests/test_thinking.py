"""Reasoning models on a tiny random Qwen3 whose chat template has a thinking switch."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import pytest
import torch

from alignment_artifacts.activations import collect_activations, encode_prompt
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import EvaluationSettings, evaluate
from alignment_artifacts.evaluation.sides import GroupSets, Measurer
from alignment_artifacts.models import GenerationConfig, format_chat, generate
from alignment_artifacts.models.generation import encode_batch, generate_ids, stop_token_ids, trim
from alignment_artifacts.models.thinking import (
    ThinkingFormat,
    split_thinking,
    think_end_index,
    thinking_format,
)
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.steering import SteeringConfig
from tiny_models import CHATML, tiny_config, tiny_model, tiny_tokenizer

# Written for these tests in the shape of Qwen3's: thinking off renders an empty block.
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
            "{% endif %}")
ALWAYS = CHATML.replace("assistant\n{% endif %}", "assistant\n<think>\n{% endif %}")  # thinks, no switch


def thinking_tokenizer(template: str = THINKING) -> Any:
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(["<think>", "</think>"])  # ordinary added tokens, as in Qwen3: decoding keeps them
    tok.chat_template = template
    return tok


def tiny_thinker(template: str = THINKING, seed: int = 0) -> Any:
    """A LoadedModel: a tiny random qwen3 with a vocabulary that holds <think> and </think>."""
    from transformers import AutoModelForCausalLM

    from alignment_artifacts.models import wrap_model

    tok = thinking_tokenizer(template)
    config = tiny_config("qwen3", layers=2)
    config.vocab_size = len(tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.normal_(0.0, 0.08)
    return wrap_model(model.eval(), tok, name="tiny-qwen3-thinking")


def test_template_switch_on_off_auto():
    tok = thinking_tokenizer()
    on, off, auto = (thinking_format(tok, mode) for mode in ("on", "off", "auto"))
    assert on.thinks and auto.thinks and not off.thinks
    render = {m: format_chat(tok, "Hi there", template_kwargs=f.kwargs) for m, f in (("on", on), ("off", off),
                                                                                      ("auto", auto))}
    assert render["off"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert render["on"].endswith("<|im_start|>assistant\n") and render["auto"] == render["on"]
    closed = format_chat(tok, "Hi there", template_kwargs=auto.answer_kwargs)
    assert closed == render["off"]  # first-token measures read the answer position
    assert on.max_tokens(48) == 48 + on.budget and off.max_tokens(48) == 48


def test_thinking_flag_on_a_model_without_thinking():
    plain = tiny_tokenizer()
    with pytest.raises(UserError, match="no thinking switch"):
        thinking_format(plain, "on")
    off = thinking_format(plain, "off")  # documented: a no-op for a model that never thinks
    assert not off.thinks and off.kwargs == {} and off.max_tokens(10) == 10
    always = thinking_tokenizer(ALWAYS)
    with pytest.raises(UserError, match="always opens a <think> block"):
        thinking_format(always, "off")
    fmt = thinking_format(always, "on")
    assert fmt.thinks and fmt.opened
    with pytest.raises(UserError, match="--thinking must be one of"):
        thinking_format(plain, "maybe")


def test_thinking_flag_error_on_the_command_line(tmp_path, capsys):
    from alignment_artifacts.cli import main
    from tiny_models import save_tiny

    folder = save_tiny("llama", tmp_path / "tiny", layers=2)
    assert main(["generate", "Hello", "--model", str(folder), "--thinking", "on", "--max-tokens", "2"]) == 2
    assert "no thinking switch" in capsys.readouterr().err


def test_split_thinking():
    assert split_thinking("<think>\nweigh it\n</think>\n\nThe answer.") == ("weigh it", "The answer.", True)
    assert split_thinking("weigh it</think>The answer.", opened=True) == ("weigh it", "The answer.", True)
    assert split_thinking("<think>still weighing") == ("still weighing", "", False)
    assert split_thinking("still weighing", opened=True) == ("still weighing", "", False)
    assert split_thinking("Just an answer.") == ("", "Just an answer.", True)
    plain = ThinkingFormat("auto", thinks=False, budget=0)
    assert plain.split(" <think>x</think> y").answer == " <think>x</think> y"  # a model that does not think


def test_think_end_index_is_after_the_closing_whitespace():
    tok = thinking_tokenizer()
    text = format_chat(tok, "Say </think> here", template_kwargs={"enable_thinking": False}) + "Answer:"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    index = think_end_index(text, enc["offset_mapping"], after=text.find("here"))
    ids = enc["input_ids"]
    close = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("</think>"))
    assert index == _after_block(tok, ids) and close < index < len(ids) - 1  # not the user's </think>, not the end
    assert tok.decode(ids[close + 1:index + 1]) == "\n\n" and tok.decode(ids[index + 1:]) == "Answer:"
    assert think_end_index(text[:text.rfind("<think>")], enc["offset_mapping"], text.find("here")) is None


def _after_block(tok: Any, ids: list[int]) -> int:
    """The last token of the final </think> and the whitespace after it, found token by token."""
    index = len(ids) - 1 - ids[::-1].index(tok.convert_tokens_to_ids("</think>"))
    while index + 1 < len(ids) and not tok.decode([ids[index + 1]]).strip():
        index += 1
    return index


def _hidden(loaded: Any, ids: list[int], layer: int, index: int) -> torch.Tensor:
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[layer + 1][0, index]  # resid_post of block ``layer`` (not the last: normed)


@pytest.mark.parametrize("suffix", ["", "Answer:"])
def test_post_think_position_collects_the_first_position_after_the_block(cache_root, tmp_path, suffix):
    template = THINKING.replace("</think>\n\n{% endif %}", "</think>\n\n" + suffix + "{% endif %}")
    loaded = tiny_thinker(template)
    (tmp_path / "p.txt").write_text("Hello\nTell me about the history of the printing press, please.\n")
    prompts = resolve_prompts(str(tmp_path / "p.txt"))
    store = collect_activations(loaded, prompts, sites=["resid_post"], positions=["post_think", "first_generated"],
                                layers=[0], dtype="float32", progress=False)  # auto: the block closed empty
    assert store.manifest["template_kwargs"] == {"enable_thinking": False}
    for row, prompt in enumerate(prompts.prompts):  # two lengths: left padding in one batch
        ids = encode_prompt(loaded.tokenizer, prompt.text, None, None,
                            template_kwargs={"enable_thinking": False}).ids
        expected = _hidden(loaded, ids, 0, _after_block(loaded.tokenizer, ids))
        assert torch.allclose(store.get("resid_post", 0, "post_think")[row], expected, atol=1e-4)
        same = torch.allclose(store.get("resid_post", 0, "first_generated")[row], expected, atol=1e-4)
        assert same == (suffix == "")  # the last prompt position only when nothing follows the block


def test_post_think_errors(cache_root, tmp_path):
    (tmp_path / "p.txt").write_text("Hello\n")
    prompts = resolve_prompts(str(tmp_path / "p.txt"))
    with pytest.raises(UserError, match="--thinking on"):
        collect_activations(tiny_thinker(), prompts, positions="post_think", progress=False, thinking="on")
    with pytest.raises(UserError, match="renders none"):
        collect_activations(tiny_model("llama", layers=2), prompts, positions="post_think", progress=False)


def test_thinking_switch_changes_the_collected_prompt(cache_root, tmp_path):
    loaded = tiny_thinker()
    (tmp_path / "p.txt").write_text("Hello\n")
    prompts = resolve_prompts(str(tmp_path / "p.txt"))
    options: dict[str, Any] = dict(sites=["resid_post"], positions=["last", "first_generated"], layers=[1],
                                   progress=False)
    on = collect_activations(loaded, prompts, thinking="on", **options)
    off = collect_activations(loaded, prompts, thinking="off", **options)
    assert on.path != off.path  # the end of the prompt differs; the user's last token cannot see it
    assert torch.equal(on.get("resid_post", 1, "last"), off.get("resid_post", 1, "last"))
    assert not torch.equal(on.get("resid_post", 1, "first_generated"), off.get("resid_post", 1, "first_generated"))
    auto = collect_activations(loaded, prompts, **options)
    assert torch.equal(auto.get("resid_post", 1, "first_generated"), on.get("resid_post", 1, "first_generated"))


# Scripted answers a tiny model is trained to give with thinking on (benign prompts; no completion of a
# harmful request is written here): a refusal marker only inside the thinking, one only in the answer,
# and a thinking that never closes within the budget.
SCRIPT = {
    "Tell me about the sea.": "<think>I cannot say much.</think>\n\nThe sea is big.",
    "Write a poem about bread.": "<think>A poem.</think>\n\nI cannot help with that.",
    "Explain how locks work.": "<think>" + "Locks use keys and pins, " * 6,
}


def _teach(loaded: Any, script: dict[str, str], steps: int = 1500) -> None:
    """Train the tiny model until greedy decoding reproduces every scripted answer (thinking on)."""
    tok, model = loaded.tokenizer, loaded.model
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    rows = []
    for prompt, answer in script.items():
        head = tok(format_chat(tok, prompt, template_kwargs={"enable_thinking": True}), add_special_tokens=False)
        tail = tok(answer, add_special_tokens=False)["input_ids"] + (end if "</think>" in answer else [])
        rows.append((head["input_ids"], tail))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        for head, tail in rows:
            ids = torch.tensor([head + tail])
            labels = ids.clone()
            labels[0, :len(head)] = -100
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 49 and _reproduces(loaded, rows):
            break
    model.eval()
    assert _reproduces(loaded, rows), "the tiny model did not learn its script"


def _reproduces(loaded: Any, rows: list[tuple[list[int], list[int]]]) -> bool:
    loaded.model.eval()
    stops = stop_token_ids(loaded.model, loaded.tokenizer)
    ok = True
    with torch.no_grad():
        for head, tail in rows:
            ids, mask = encode_batch(loaded.tokenizer, [loaded.tokenizer.decode(head)], "cpu")
            gen, alive, _ = generate_ids(loaded.model, ids, mask, GenerationConfig(max_tokens=len(tail)), stops)
            ok = ok and trim(gen, alive, stops)[0] == [t for t in tail if t not in stops]
    loaded.model.train()
    return ok


@functools.cache
def _taught_state() -> dict[str, torch.Tensor]:
    loaded = tiny_thinker()
    _teach(loaded, SCRIPT)
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def taught_thinker() -> Any:
    loaded = tiny_thinker()
    loaded.model.load_state_dict(_taught_state())
    return loaded


def test_generation_budget_and_split(cache_root):
    loaded = taught_thinker()
    prompt = "Write a poem about bread."
    out = generate(loaded, [prompt], GenerationConfig(max_tokens=2, thinking="on", thinking_budget=30))
    assert split_thinking(out.texts[0]) == ("A poem.", "I cannot help with that.", True)  # the budget let it finish
    short = generate(loaded, [prompt], GenerationConfig(max_tokens=2, thinking="on", thinking_budget=0))
    assert len(short.tokens[0]) == 2 and not split_thinking(short.texts[0]).finished


def test_evaluation_judges_the_answer_and_counts_refusals_in_the_thinking(cache_root, tmp_path):
    loaded = taught_thinker()
    (tmp_path / "h.txt").write_text("\n".join(SCRIPT))
    settings = EvaluationSettings(harmful=str(tmp_path / "h.txt"), borderline=str(tmp_path / "h.txt"),
                                  groups=("harmful", "borderline"), max_tokens=16, thinking="on", thinking_budget=16,
                                  batch_size=4, generation_batch_size=4)
    result = evaluate(loaded, SteeringConfig(mode="none"), settings, progress=False)
    h = json.loads(json.dumps(result.to_json()))["harmful"]
    # the bread answer refuses; the locks thinking never closes, so its answer is empty (a refusal by markers);
    # the sea refusal sits inside the thinking only
    assert h["marker_refusals_before"] == 2 and h["thinking_refusals_before"] == 1
    assert h["unfinished_thinking_before"] == 1 and h["before"]["refusal"] == 2
    b = result.borderline
    assert (b.thinking_refusals_before, b.unfinished_thinking_before, b.refusals_before) == (1, 1, 2)
    assert result.settings["thinking"] == "on"
    measurer = Measurer(loaded, GroupSets(list(SCRIPT), [], [], []), settings)
    assert measurer.texts["harmful"][0].endswith("assistant\n")  # generation: the model writes its thinking
    assert measurer.answer_texts["harmful"][0].endswith("<think>\n\n</think>\n\n")  # KL: the first answer token
    off = evaluate(loaded, SteeringConfig(mode="none"), EvaluationSettings(
        **{**settings.__dict__, "thinking": "off", "groups": ("harmful",)}), progress=False)
    assert off.harmful.thinking_refusals_before == 0 and off.harmful.unfinished_thinking_before == 0


def test_command_line_generate_and_collect_on_a_thinking_model(cache_root, tmp_path, capsys):
    from alignment_artifacts.cli import main

    loaded = taught_thinker()
    folder = tmp_path / "thinker"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    assert main(["generate", "Write a poem about bread.", "--model", str(folder), "--thinking", "on",
                 "--max-tokens", "2", "--thinking-budget", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["thinking"], data["answer"], data["thinking_finished"]) == ("A poem.", "I cannot help with that.",
                                                                            True)
    (tmp_path / "p.txt").write_text("Hello\nHi there\n")
    assert main(["collect", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--positions",
                 "post_think", "--sites", "resid_post", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["positions"] == ["post_think"]
    assert main(["collect", "--model", str(folder), "--prompts", str(tmp_path / "p.txt"), "--positions",
                 "post_think", "--thinking", "on"]) == 2
    assert "--thinking off or auto" in capsys.readouterr().err


def test_directions_at_post_think(cache_root, tmp_path):
    from alignment_artifacts.api import get_directions

    loaded = tiny_thinker()
    (tmp_path / "pos.txt").write_text("Tell me about locks.\nExplain how keys work.\n")
    (tmp_path / "neg.txt").write_text("Tell me about bread.\nExplain how the sea works.\n")
    source = f"{tmp_path / 'pos.txt'},{tmp_path / 'neg.txt'}"
    config = SteeringConfig(mode="always", direction_site="resid_post", direction_position="post_think")
    directions = get_directions(loaded, config, source=source, progress=False)
    store = collect_activations(loaded, resolve_prompts(source), sites=["resid_post"], positions=["post_think"],
                                progress=False)
    labels = store.labels.bool()
    acts = store.get("resid_post", 1, "post_think")
    assert directions.position == "post_think"
    assert torch.allclose(directions.vectors[1], acts[labels].mean(0) - acts[~labels].mean(0), atol=1e-5)
