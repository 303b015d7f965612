"""Export: baked weights reproduce hooked ablation, control vectors land on the right llama.cpp layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.export import (
    EXPORT_MANIFEST,
    bake_ablation,
    control_vector_index,
    export,
    load_steering,
    read_control_vector,
)
from alignment_artifacts.models import ModelAdapter, site_hooks, wrap_model
from alignment_artifacts.models.generation import encode_batch, format_chat
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
from tiny_models import FAMILIES, POST_NORMED, tiny_config, tiny_model
from tiny_steering import random_directions

PROMPTS = ["How do locks work?", "Write a poem about the sea.", "Hello"]
APPROXIMATE = POST_NORMED  # post-projection norms: baking is not exact


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, especially on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def real_logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    """Logits at real (unpadded) positions only: padded rows are fully masked and implementation-defined."""
    ids, mask = encode_batch(tokenizer, [format_chat(tokenizer, p) for p in prompts], "cpu")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return out[mask.bool()]


def hooked_logits(loaded, config, directions) -> torch.Tensor:
    with apply_steering(loaded, config, directions):
        return real_logits(loaded.model, loaded.tokenizer)


def reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def export_quietly(loaded, config, directions, out, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export(loaded, Steering(config, directions), out, **kwargs)
    return path, [str(w.message) for w in caught if "Approximate" in str(w.message)]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_bake_matches_hooked_ablation(family, tmp_path):
    loaded = tiny_model(family)
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate", direction_layer=2)
    expected = hooked_logits(loaded, config, directions)
    before = snapshot(loaded.model)
    out, warned = export_quietly(loaded, config, directions, tmp_path / "baked", evaluation={"refusal": 0.1})
    assert_unchanged(loaded.model, before)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    error = relative_error(real_logits(reload(out), loaded.tokenizer), expected)
    if family in APPROXIMATE:
        assert warned and manifest["warnings"] and manifest["exact"] is False
        assert "Warning" in (out / "README.md").read_text()
        print(f"{family}: baked vs hooked relative logit error {error:.3g} (approximate by design), "
              f"export's own check {manifest['bake_check']['relative']:.3g}")
        return
    assert not warned and manifest["exact"] is True and manifest["warnings"] == []
    assert error < 1e-4, (family, error)
    assert manifest["bake_check"]["relative"] < 1e-4
    assert manifest["evaluation"] == {"refusal": 0.1}
    assert "refusal" in (out / "README.md").read_text()


@pytest.mark.parametrize("family", POST_NORMED)
def test_post_norm_bake_writes_nothing_along_the_direction(family):
    """A norm between projection and residual: the projections are baked against gain*u, so at scale 1
    what the norm adds has no component along u (orthogonalising against u alone would leave some)."""
    loaded = tiny_model(family)
    with torch.no_grad():  # trained post norms have uneven gains; a constant gain would hide the difference
        for name, param in loaded.model.named_parameters():
            if ".post_" in name and "norm" in name:
                param.uniform_(0.2, 1.8).sub_(loaded.adapter.spec.norm_offset)
    directions = random_directions(loaded)
    u = directions.unit(2)
    baked, _ = bake_ablation(loaded, Steering(SteeringConfig(mode="ablate", direction_layer=2), directions))
    adapter = ModelAdapter(baked)
    seen: dict[tuple[str, int], torch.Tensor] = {}
    observers = {(site, layer): (lambda key: lambda h: seen.__setitem__(key, h @ u))((site, layer))
                 for site in ("attn_out", "mlp_out") for layer in range(adapter.n_layers)}
    with site_hooks(adapter, observers):
        real_logits(baked, loaded.tokenizer)
    assert max(p.abs().max().item() for p in seen.values()) < 1e-4
    with site_hooks(loaded.adapter, observers):
        real_logits(loaded.model, loaded.tokenizer)
    assert min(p.abs().max().item() for p in seen.values()) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_hf_bake_layer_subset_with_kernel(family, tmp_path):
    loaded = tiny_model(family)
    directions = random_directions(loaded, seed=3)
    config = SteeringConfig(mode="ablate", scale=0.8, layers=[1, 2], layer_weights={1: 0.5, 2: 1.0, 3: 0.7})
    expected = hooked_logits(loaded, config, directions)
    out, _ = export_quietly(loaded, config, directions, tmp_path / "baked")
    baked = reload(out)
    assert relative_error(real_logits(baked, loaded.tokenizer), expected) < 1e-4
    original, new = dict(loaded.model.named_parameters()), dict(baked.named_parameters())
    for name in loaded.adapter.spec.embeddings:  # layer 0 is not targeted: embeddings stay as they were
        assert torch.equal(new[name + ".weight"], original[name + ".weight"])


def test_hf_bake_unties_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_tokenizer

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    loaded = wrap_model(model, tiny_tokenizer(), name="tiny-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    directions = random_directions(loaded)
    steering = SteeringConfig(mode="ablate", direction_layer=1)
    expected = hooked_logits(loaded, steering, directions)
    head = model.lm_head.weight.detach().clone()
    out, _ = export_quietly(loaded, steering, directions, tmp_path / "baked")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    baked = reload(out)
    assert torch.equal(baked.lm_head.weight, head)
    assert not torch.equal(baked.model.embed_tokens.weight, head)
    assert relative_error(real_logits(baked, loaded.tokenizer), expected) < 1e-4


def test_hf_export_loads_in_fresh_process(tmp_path):
    loaded = tiny_model("qwen2")
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate", direction_layer=2)
    out, _ = export_quietly(loaded, config, directions, tmp_path / "baked")
    expected = real_logits(reload(out), loaded.tokenizer, PROMPTS[:1])[-1]
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "folder = sys.argv[1]\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation='eager')\n"
        "tok = AutoTokenizer.from_pretrained(folder)\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': sys.argv[2]}], tokenize=False,\n"
        "                               add_generation_prompt=True)\n"
        "ids = tok(text, return_tensors='pt', add_special_tokens=False).input_ids\n"
        "logits = model(input_ids=ids).logits[0, -1]\n"
        "assert 'alignment_artifacts' not in sys.modules\n"
        "print(json.dumps(logits.tolist()))\n"
    )
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script, str(out), PROMPTS[0]], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    fresh = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    assert relative_error(fresh, expected) < 1e-5


@pytest.mark.parametrize("mode", ["proximity", "sphere", "always", "none"])
def test_hf_refuses_non_linear_modes(mode, tmp_path):
    loaded = tiny_model("llama")
    with pytest.raises(UserError, match="vectors"):
        export(loaded, Steering(SteeringConfig(mode=mode), random_directions(loaded)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_refusals(tmp_path):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    with pytest.raises(UserError, match="constant vector"):
        export(loaded, Steering(SteeringConfig(mode="ablate"), directions), tmp_path / "cv.gguf",
               format="gguf-control-vector")
    with pytest.raises(UserError, match="auto"):
        export(loaded, Steering(SteeringConfig(mode="auto"), directions), tmp_path / "x")
    with pytest.raises(UserError, match="Unknown export format"):
        export(loaded, Steering(SteeringConfig(mode="ablate"), directions), tmp_path / "x", format="onnx")
    with pytest.raises(UserError, match="residual stream itself"):
        export(loaded, Steering(SteeringConfig(mode="ablate", site="resid_pre"), directions), tmp_path / "x")
    assert not any(tmp_path.iterdir())


def test_existing_output_needs_force_and_failures_leave_nothing(tmp_path, monkeypatch):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    config = SteeringConfig(mode="always", layers=[1])
    out = tmp_path / "vectors"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError, match="already exists"):
        export(loaded, Steering(config, directions), out, format="vectors")
    assert (out / "keep.txt").read_text() == "old"

    import alignment_artifacts.export as export_module

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "atomic_write_json", disk_full)
    with pytest.raises(OSError):
        export(loaded, Steering(config, directions), out, format="vectors", force=True)
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(OSError):
        export(loaded, Steering(config, directions), tmp_path / "fresh", format="vectors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors"]  # no partial folders left behind
    monkeypatch.undo()
    export(loaded, Steering(config, directions), out, format="vectors", force=True)
    assert not (out / "keep.txt").exists() and (out / "steering.json").is_file()


def adder(vector: torch.Tensor):
    return lambda h: h + vector


def test_control_vector_layers_and_values(tmp_path):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    config = SteeringConfig(mode="always", scale=0.7, layers=[1, 2], site="mlp_out")
    path = export(loaded, Steering(config, directions), tmp_path / "cv.gguf", format="gguf-control-vector")
    cv = read_control_vector(path)
    assert cv["arch"] == "controlvector" and cv["model_hint"] == "llama" and cv["layer_count"] == 2
    assert sorted(cv["tensors"]) == ["direction.1", "direction.2"]  # block L's output is direction.L
    for layer in (1, 2):
        vector = cv["tensors"][f"direction.{layer}"]
        assert vector.dtype.name == "float32" and vector.shape == (loaded.adapter.hidden_size,)
        torch.testing.assert_close(torch.from_numpy(vector), -0.7 * directions.vectors[layer])

    # Adding direction.N to block N's output, as llama.cpp does, reproduces the hooked steering.
    expected = hooked_logits(loaded, config, directions)
    adds = {("resid_post", int(name.split(".")[1])): adder(torch.from_numpy(v))
            for name, v in cv["tensors"].items()}
    with site_hooks(loaded.adapter, adds):
        replayed = real_logits(loaded.model, loaded.tokenizer)
    assert relative_error(replayed, expected) < 1e-5


def test_control_vector_amplify_resid_pre_and_folder(tmp_path):
    loaded = tiny_model("gpt2")
    directions = random_directions(loaded)
    config = SteeringConfig(mode="amplify", scale=1.5, direction_layer=1, layers=[3], site="resid_pre",
                            layer_weights={3: 0.5})
    out = export(loaded, Steering(config, directions), tmp_path / "cv", format="gguf-control-vector")
    cv = read_control_vector(out)
    assert list(cv["tensors"]) == ["direction.2"]
    torch.testing.assert_close(torch.from_numpy(cv["tensors"]["direction.2"]), 0.75 * directions.vectors[1])
    assert (out / "README.md").is_file() and (out / EXPORT_MANIFEST).is_file()


def test_control_vector_index_rules():
    assert control_vector_index("mlp_out", 1) == 1
    assert control_vector_index("resid_post", 5) == 5
    assert control_vector_index("resid_pre", 2) == 1
    for site, layer in (("resid_pre", 0), ("resid_pre", 1), ("mlp_out", 0), ("resid_post", 0)):
        with pytest.raises(UserError, match="cannot"):
            control_vector_index(site, layer)
    with pytest.raises(UserError, match="attn_out"):
        control_vector_index("attn_out", 3)


def test_vectors_roundtrip(tmp_path):
    loaded = tiny_model("llama")
    directions = random_directions(loaded)
    config = SteeringConfig(mode="adaptive", scale=0.6, layers=[1, 3], layer_weights={1: 1.0, 3: 0.25})
    out = export(loaded, Steering(config, directions), tmp_path / "vectors", format="vectors")
    loaded_config, loaded_directions = load_steering(out)
    assert loaded_config.to_json() == config.to_json()
    assert loaded_directions.layers == directions.layers
    for layer in directions.layers:
        assert torch.equal(loaded_directions.vectors[layer], directions.vectors[layer])
        assert torch.equal(loaded_directions.pca[layer], directions.pca[layer])
    assert torch.equal(hooked_logits(loaded, loaded_config, loaded_directions),
                       hooked_logits(loaded, config, directions))
    with pytest.raises(UserError, match=r"steering\.json"):
        load_steering(tmp_path)
