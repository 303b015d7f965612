"""Collected activations equal the model's own hidden states; caching and resuming are exact."""

from __future__ import annotations

import pytest
import torch

from alignment_artifacts import activation_pass
from alignment_artifacts import activations as act
from alignment_artifacts.errors import UserError
from alignment_artifacts.models.generation import positions_from_mask
from alignment_artifacts.prompts.sets import Prompt, PromptSet
from tiny_models import tiny_model

TEXTS = ["How do locks work?", "Write a poem about the sea.", "What is the capital of France?",
         "Tell me about bread", "Hello", "Explain the printing press and its history in detail please.",
         "Name a colour.", "How do I bake bread at home?", "What is water?", "Thanks!"]


def make_set(n: int = 8) -> PromptSet:
    prompts = [Prompt(id=f"p{i}", text=t, label=i % 2, category="c") for i, t in enumerate(TEXTS[:n])]
    return PromptSet("test", prompts)


def reference(loaded, prompt_set, rows, site_layer):
    """Hidden states of the same batch (same padding) via output_hidden_states."""
    encoded = [act.encode_prompt(loaded.tokenizer, prompt_set.prompts[i].text, None, None) for i in rows]
    length = max(len(e.ids) for e in encoded)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, length - len(e.ids):] = torch.tensor(e.ids)
        mask[r, length - len(e.ids):] = 1
    out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                       output_hidden_states=True)
    last = torch.tensor([length - len(e.ids) + e.user_end - 1 for e in encoded])
    return out.hidden_states, last


@pytest.mark.parametrize("batch_size", [1, 8])
def test_matches_hidden_states_float32(cache_root, batch_size):
    loaded = tiny_model("qwen2", layers=3)
    ps = make_set(8)
    store = act.collect_activations(loaded, ps, sites="resid_pre,resid_post", positions="last,first_generated",
                                    dtype="float32", batch_size=batch_size, progress=False)
    order = sorted(range(8), key=lambda i: len(act.encode_prompt(loaded.tokenizer, ps.prompts[i].text, None,
                                                                 None).ids))
    batches = [order[i:i + batch_size] for i in range(0, 8, batch_size)]
    for rows in batches:
        hidden, last = reference(loaded, ps, rows, None)
        for layer in range(3):
            got = store.get("resid_pre", layer, "last")[rows]
            assert torch.equal(got, hidden[layer][torch.arange(len(rows)), last])
            got_final = store.get("resid_pre", layer, "first_generated")[rows]
            assert torch.equal(got_final, hidden[layer][:, -1])
        for layer in range(2):
            assert torch.equal(store.get("resid_post", layer, "last")[rows],
                               hidden[layer + 1][torch.arange(len(rows)), last])


def test_float16_within_rounding_and_mlp_matches_module(cache_root):
    loaded = tiny_model("llama", layers=2)
    ps = make_set(8)
    store = act.collect_activations(loaded, ps, sites="mlp_out", positions="mean,last", batch_size=8,
                                    progress=False)
    assert store.get("mlp_out", 0, "last").shape == (8, 64)
    seen = {}
    handle = loaded.model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    order = sorted(range(8), key=lambda i: len(act.encode_prompt(loaded.tokenizer, ps.prompts[i].text, None,
                                                                 None).ids))
    try:
        _, last = reference(loaded, ps, order, None)
    finally:
        handle.remove()
    expected = seen["o"][torch.arange(8), last]
    torch.testing.assert_close(store.get("mlp_out", 1, "last")[order], expected, rtol=2e-3, atol=2e-3)


def test_cache_hit_and_keys(cache_root):
    loaded = tiny_model("llama", layers=2)
    ps = make_set(6)
    first = act.collect_activations(loaded, ps, progress=False)
    again = act.collect_activations(loaded, ps, progress=False)
    assert not first.cache_hit and again.cache_hit
    assert torch.equal(first.get("mlp_out", 1, "last"), again.get("mlp_out", 1, "last"))
    other = act.collect_activations(loaded, make_set(5), progress=False)
    assert other.path != first.path
    other_site = act.collect_activations(loaded, ps, sites="attn_out", progress=False)
    assert other_site.path != first.path
    assert first.manifest["bytes_per_prompt"] > 0 and first.manifest["storage_ratio_vs_full_mlp_capture"] < 1


def test_interrupted_run_resumes_identically(cache_root, monkeypatch):
    loaded = tiny_model("gpt2", layers=2)
    ps = make_set(10)
    clean = act.collect_activations(loaded, ps, batch_size=3, progress=False, use_cache=False,
                                    cache_folder=cache_root / "clean")
    calls = {"n": 0}
    original = activation_pass.run_batch

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(activation_pass, "run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        act.collect_activations(loaded, ps, batch_size=3, progress=False)
    key_folder = next((cache_root / "activations").glob(".*.parts"))
    assert len(list(key_folder.glob("batch-*.safetensors"))) == 2
    assert not list((cache_root / "activations").glob("*/manifest.json"))
    monkeypatch.setattr(activation_pass, "run_batch", original)
    resumed = act.collect_activations(loaded, ps, batch_size=3, progress=False)
    for layer in range(2):
        assert torch.equal(resumed.get("mlp_out", layer, "last"), clean.get("mlp_out", layer, "last"))


def test_generated_positions_shape(cache_root):
    loaded = tiny_model("llama", layers=2)
    store = act.collect_activations(loaded, make_set(4), positions="generated:5,post_instruction",
                                    progress=False, batch_size=2)
    assert store.get("mlp_out", 0, "generated:5").shape == (4, 5, 64)
    assert store.get("mlp_out", 0, "post_instruction").shape[0] == 4


def test_bad_inputs(cache_root):
    loaded = tiny_model("llama", layers=2)
    with pytest.raises(UserError, match="Valid sites"):
        act.parse_sites("mlp_output_x")
    with pytest.raises(UserError, match="Valid positions"):
        act.parse_positions("lats")
    with pytest.raises(UserError, match="numbered 0 to 1"):
        act.parse_layers("0-4", 2)
    with pytest.raises(UserError, match="empty"):
        act.collect_activations(loaded, PromptSet("x", []), progress=False)
    assert act.parse_sites("mlp.output,attention") == ["mlp_out", "attn_out"]
    assert act.parse_sites("all") == ["resid_pre", "resid_post", "attn_out", "mlp_out"]
    assert act.parse_layers("1,3-4", 6) == [1, 3, 4]
