"""Models dispatched by accelerate with CPU and disk offload: steering, collection and export as without."""

from __future__ import annotations

import json

import pytest
import torch

from alignment_artifacts.activations import collect_activations
from alignment_artifacts.export import EXPORT_MANIFEST, export
from alignment_artifacts.models import wrap_model
from alignment_artifacts.models.offload import execution_device, site_device
from alignment_artifacts.prompts.sets import Prompt, PromptSet
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
from test_export import PROMPTS, one_thread, real_logits, relative_error, reload  # noqa: F401 (fixture)
from tiny_models import tiny_config, tiny_model, tiny_tokenizer
from tiny_steering import random_directions

pytestmark = pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")

# embeddings, head and every other block on disk; the rest in CPU RAM (executed on the CPU here)
DEVICE_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "disk"}


def offloaded_twin(loaded, tmp_path):
    """The same weights, loaded again with accelerate's dispatch: half the blocks and the embeddings on disk."""
    from transformers import AutoModelForCausalLM

    loaded.model.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=DEVICE_MAP, dtype=torch.float32,
                                                 offload_folder=str(tmp_path / "offload"),
                                                 attn_implementation="eager")
    assert model.model.embed_tokens.weight.device.type == "meta"  # really offloaded
    assert model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    return wrap_model(model, loaded.tokenizer, name=loaded.info.name)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    loaded = tiny_model("llama")
    return loaded, offloaded_twin(loaded, tmp_path_factory.mktemp("offload"))


def test_identity_and_devices(twins):
    loaded, offloaded = twins
    assert offloaded.info.weights_hash == loaded.info.weights_hash  # read from the offloaded weights
    assert offloaded.device == torch.device("cpu") and offloaded.info.device == "cpu"
    assert execution_device(offloaded.model.model.layers[1]) == torch.device("cpu")
    assert site_device(offloaded.adapter, "resid_pre", 0) == torch.device("cpu")


@pytest.mark.parametrize("config", [
    SteeringConfig(mode="ablate", direction_layer=2),
    SteeringConfig(mode="always", scale=0.5, layers=[1, 3], site="mlp_out"),
    SteeringConfig(mode="subspace", scale=0.8, layers=[0, 1, 2, 3], site="resid_pre"),
    SteeringConfig(mode="clamp", clamp_level=0.2, gate_layer=1, direction_layer=2),
], ids=lambda c: c.mode)
def test_steered_logits_equal(config, twins):
    loaded, offloaded = twins
    directions = random_directions(loaded)
    with apply_steering(loaded, config, directions) as expected_handle:
        expected = real_logits(loaded.model, loaded.tokenizer)
    with apply_steering(offloaded, config, directions) as handle:
        got = real_logits(offloaded.model, offloaded.tokenizer)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert handle.interventions() == expected_handle.interventions() and handle.total() > 0
    assert relative_error(real_logits(offloaded.model, offloaded.tokenizer), expected) > 1e-3  # hooks removed


def test_collection_equal(twins, cache_root):
    loaded, offloaded = twins
    prompts = PromptSet("offload-check", [Prompt(id=f"p{i}", text=t, label=i % 2) for i, t in enumerate(PROMPTS)])
    kwargs = dict(sites="resid_pre,attn_out,mlp_out", positions="last,mean,first_generated", dtype="float32",
                  use_cache=False, progress=False)
    expected = collect_activations(loaded, prompts, **kwargs).tensors
    got = collect_activations(offloaded, prompts, **kwargs).tensors
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_export_from_offloaded_model(tied, tmp_path):
    if tied:
        from transformers import AutoModelForCausalLM

        config = tiny_config("llama")
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        loaded = wrap_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                             attn_implementation="eager"), tiny_tokenizer())
    else:
        loaded = tiny_model("llama")
    offloaded = offloaded_twin(loaded, tmp_path)
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate", direction_layer=2)
    with apply_steering(loaded, config, directions):
        expected = real_logits(loaded.model, loaded.tokenizer)
    before = real_logits(offloaded.model, offloaded.tokenizer)
    out = export(offloaded, Steering(config, directions), tmp_path / "baked")
    assert json.loads((out / EXPORT_MANIFEST).read_text())["bake_check"]["relative"] < 1e-5
    assert relative_error(real_logits(reload(out), loaded.tokenizer), expected) < 1e-5
    assert torch.equal(real_logits(offloaded.model, offloaded.tokenizer), before)  # the source is untouched
    assert offloaded.model.model.layers[1].self_attn.o_proj.weight.device.type == "meta"


def test_load_model_with_offload_folder(tmp_path):
    """--offload-folder loads through accelerate's device_map="auto" (all in RAM here, where it fits)."""
    from alignment_artifacts.models import load_model

    loaded = tiny_model("llama")
    loaded.model.save_pretrained(tmp_path / "model")
    loaded.tokenizer.save_pretrained(tmp_path / "model")
    plain = load_model(str(tmp_path / "model"), device="cpu", dtype="float32")
    dispatched = load_model(str(tmp_path / "model"), device="cpu", dtype="float32",
                            offload_folder=str(tmp_path / "offload"))
    assert dispatched.info.weights_hash == plain.info.weights_hash
    torch.testing.assert_close(real_logits(dispatched.model, dispatched.tokenizer),
                               real_logits(plain.model, plain.tokenizer))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [
    SteeringConfig(mode="ablate", direction_layer=2),
    SteeringConfig(mode="subspace", scale=0.8, layers=[0, 1, 2, 3], site="resid_pre"),
    SteeringConfig(mode="clamp", clamp_level=0.2, gate_layer=1, direction_layer=2),
], ids=lambda c: c.mode)
def test_layers_executing_on_gpu_and_cpu(config, twins):
    """Blocks alternate between the GPU and the CPU: hooks find their directions on each block's device."""
    import copy

    from accelerate import dispatch_model

    loaded, _ = twins
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.layers.2": 0,
                  "model.layers.3": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    model = dispatch_model(copy.deepcopy(loaded.model), device_map, main_device="cpu")  # "cpu" blocks run there
    mixed = wrap_model(model, loaded.tokenizer, name=loaded.info.name)
    assert site_device(mixed.adapter, "attn_out", 1).type == "cpu"
    assert site_device(mixed.adapter, "resid_pre", 2).type == "cpu"  # block 1's output, not yet moved
    assert site_device(mixed.adapter, "attn_out", 2).type == "cuda"
    directions = random_directions(loaded)
    with apply_steering(loaded, config, directions) as expected_handle:
        expected = real_logits(loaded.model, loaded.tokenizer)
    with apply_steering(mixed, config, directions) as handle:
        got = real_logits(mixed.model, mixed.tokenizer)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    assert handle.interventions() == expected_handle.interventions()


def test_an_offloaded_run_uses_only_the_memory_of_the_device_asked_for(monkeypatch):
    """accelerate's "auto" fills every GPU it sees first: "--device cpu --offload-folder" on a GPU machine must
    stay off the GPUs, and "cuda:1" off GPU 0."""
    import accelerate.utils

    from alignment_artifacts.models.loading import dispatch_options

    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {0: 80, 1: 70, "cpu": 64})
    assert dispatch_options("cpu", offload=True) == {"device_map": "auto", "max_memory": {"cpu": 64}}
    assert dispatch_options("cuda:1", offload=True) == {"device_map": "auto", "max_memory": {1: 70, "cpu": 64}}
    assert dispatch_options("cuda", offload=True) == dispatch_options("cuda", offload=False) == {"device_map": "auto"}
    assert dispatch_options("cuda:1", offload=False) == {"device_map": {"": "cuda:1"}}
    assert dispatch_options("cpu", offload=False) == {}
