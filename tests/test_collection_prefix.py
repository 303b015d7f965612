"""Collection runs the chat template's shared prefix once; what it records still equals a full
forward of each prompt on its own, at every site, layer and position."""

from __future__ import annotations

import copy

import pytest
import torch

from alignment_artifacts import activations as act
from alignment_artifacts.activation_pass import collection_prefix, encode_prompt
from alignment_artifacts.models.adapter import SITES
from alignment_artifacts.models.generation import common_prefix_length
from alignment_artifacts.models.hooks import site_hooks
from alignment_artifacts.prompts.sets import Prompt, PromptSet
from alignment_artifacts.steering import SteeringConfig, apply_steering
from test_activations import TEXTS, make_set
from tiny_models import tiny_model
from tiny_steering import random_directions

SYSTEM = "You are a helpful assistant who answers well."
POSITIONS = ["last", "mean", "post_instruction", "first_generated"]


def without_template(loaded):
    """The same model with a tokenizer that has no chat template (the plain "User: ... Assistant:" format)."""
    tokenizer = copy.deepcopy(loaded.tokenizer)
    tokenizer.chat_template = None
    return type(loaded)(loaded.model, tokenizer, loaded.adapter, loaded.info)


def alone(loaded, ids: list[int], steps: int = 1) -> dict[tuple[str, int], list[torch.Tensor]]:
    """Each site's hidden states [seq, hidden] for one prompt run alone and unpadded, then for each of
    ``steps - 1`` greedy tokens appended, without any cache."""
    layers = range(loaded.adapter.n_layers)
    seen: dict[tuple[str, int], list[torch.Tensor]] = {(s, layer): [] for s in SITES for layer in layers}

    def record(key):
        return lambda h: seen[key].append(h[0].detach().clone())

    ids = list(ids)
    with torch.no_grad(), site_hooks(loaded.adapter, {key: record(key) for key in seen}):
        for _ in range(steps):
            logits = loaded.model(input_ids=torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    return seen


def expected(h: torch.Tensor, e, position: str, suffix: int) -> torch.Tensor:
    if position == "last":
        return h[e.user_end - 1]
    if position == "mean":
        return h[e.user_start:e.user_end].mean(0)
    if position == "post_instruction":
        return h[len(e.ids) - suffix:]
    return h[-1]


def check_against_alone(loaded, store, system):
    for i, prompt in enumerate(store.prompts):
        e = encode_prompt(loaded.tokenizer, prompt.text, system, None)
        seen = alone(loaded, e.ids)
        for (site, layer), (h,) in seen.items():
            for position in POSITIONS:
                got = store.get(site, layer, position)
                want = expected(h, e, position, got.shape[1] if got.dim() == 3 else 0)
                torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, k=(site, layer, position, i): f"{k}: {m}")


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_prefix_equals_each_prompt_alone(cache_root, family, batch_size):
    loaded = tiny_model(family, layers=3)
    ps = make_set(8)  # prompts of different lengths: batches are left-padded after the prefix
    encoded = [encode_prompt(loaded.tokenizer, p.text, SYSTEM, None) for p in ps.prompts]
    prefix = collection_prefix(loaded, encoded)
    assert prefix.length == min(e.user_start for e in encoded) >= 8  # the whole template before the user's text
    assert len({len(e.ids) for e in encoded}) > 3
    store = act.collect_activations(loaded, ps, sites="all", positions=POSITIONS, dtype="float32",
                                    batch_size=batch_size, system=SYSTEM, progress=False)
    check_against_alone(loaded, store, SYSTEM)


@pytest.mark.parametrize("system", [None, SYSTEM])
def test_without_a_chat_template(cache_root, system):
    loaded = without_template(tiny_model("llama", layers=2))
    ps = make_set(6)
    encoded = [encode_prompt(loaded.tokenizer, p.text, system, None) for p in ps.prompts]
    assert (collection_prefix(loaded, encoded).length > 0) == (system is not None)  # "User: " alone is too short
    store = act.collect_activations(loaded, ps, sites="all", positions=POSITIONS, dtype="float32", batch_size=4,
                                    system=system, progress=False)
    check_against_alone(loaded, store, system)


def test_generated_steps_from_the_shared_prefix(cache_root):
    loaded = tiny_model("qwen2", layers=2)
    ps = make_set(5)
    store = act.collect_activations(loaded, ps, sites="resid_post,mlp_out", positions="generated:4",
                                    dtype="float32", batch_size=5, system=SYSTEM, progress=False)
    for i, prompt in enumerate(ps.prompts):
        seen = alone(loaded, encode_prompt(loaded.tokenizer, prompt.text, SYSTEM, None).ids, steps=4)
        for (site, layer), states in seen.items():
            if site in ("resid_post", "mlp_out"):
                want = torch.stack([h[-1] for h in states])
                torch.testing.assert_close(store.get(site, layer, "generated:4")[i], want, rtol=1e-4, atol=1e-5)


def test_gated_collection_runs_whole_prompts(cache_root, tmp_path):
    """Under a gate, a prefix run once cannot know which prompts pass (``allows_prefix_sharing``): collection
    then runs every prompt whole, with the gate's decision pass, exactly as one prompt alone."""
    loaded = tiny_model("qwen2", layers=4)
    directions = random_directions(loaded)
    v = directions.vectors[2]
    directions.negative_mean[2], directions.positive_mean[2] = -1e3 * v, 1e3 * v  # every prompt passes
    config = SteeringConfig(mode="always", scale=3.0, gate_layer=2, gate_level=0.0)
    ps = make_set(6)
    kwargs = dict(sites="resid_post", positions="last", dtype="float32", system=SYSTEM, progress=False,
                  use_cache=False)
    encoded = [encode_prompt(loaded.tokenizer, p.text, SYSTEM, None) for p in ps.prompts]
    assert collection_prefix(loaded, encoded).length > 0
    with apply_steering(loaded, config, directions):
        assert collection_prefix(loaded, encoded).length == 0
    plain = act.collect_activations(loaded, ps, cache_folder=tmp_path / "plain", batch_size=3, **kwargs)
    with apply_steering(loaded, config, directions):
        batched = act.collect_activations(loaded, ps, cache_folder=tmp_path / "batched", batch_size=3, **kwargs)
        single = [act.collect_activations(loaded, PromptSet("one", [p]), cache_folder=tmp_path / p.id, **kwargs)
                  for p in ps.prompts]
    for layer in range(4):
        want = torch.cat([s.get("resid_post", layer, "last") for s in single])
        torch.testing.assert_close(batched.get("resid_post", layer, "last"), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched.get("resid_post", 0, "last"), plain.get("resid_post", 0, "last"))


def test_one_prompt_shares_nothing(cache_root):
    loaded = tiny_model("llama", layers=2)
    one = PromptSet("one", [Prompt(id="p", text=TEXTS[0], label=0)])
    assert collection_prefix(loaded, [encode_prompt(loaded.tokenizer, TEXTS[0], SYSTEM, None)]).length == 0
    store = act.collect_activations(loaded, one, sites="all", positions=POSITIONS, dtype="float32", system=SYSTEM,
                                    progress=False)
    check_against_alone(loaded, store, SYSTEM)


def test_prompts_that_start_alike_share_only_the_template(cache_root):
    """Prompts whose texts begin with the same words share more than the template; the shared part
    stops before the user's text, so the mean over it sees every one of its tokens."""
    loaded = tiny_model("llama", layers=2)
    texts = ["How do locks work?", "How do I bake bread at home?", "How do I bake bread?", "How do birds fly?"]
    ps = PromptSet("alike", [Prompt(id=f"p{i}", text=t, label=i % 2) for i, t in enumerate(texts)])
    encoded = [encode_prompt(loaded.tokenizer, t, SYSTEM, None) for t in texts]
    assert common_prefix_length([e.ids for e in encoded]) > encoded[0].user_start
    assert collection_prefix(loaded, encoded).length == encoded[0].user_start
    store = act.collect_activations(loaded, ps, sites="all", positions=POSITIONS, dtype="float32", batch_size=2,
                                    system=SYSTEM, progress=False)
    check_against_alone(loaded, store, SYSTEM)
