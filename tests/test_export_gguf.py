"""export --format gguf: the source GGUF with the ablation baked in, loadable by transformers and llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alignment_artifacts.errors import UserError
from alignment_artifacts.export import bake_ablation, export
from alignment_artifacts.export_gguf import (
    MANIFEST_KEY,
    directions_sha256,
    open_llama_cpp,
    read_manifest,
    writable_types,
)
from alignment_artifacts.models import load_model
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
from test_export import PROMPTS, one_thread, real_logits, relative_error  # noqa: F401 (fixture)
from tiny_gguf import write_tiny_llama_gguf
from tiny_models import tiny_config, tiny_model, tiny_tokenizer
from tiny_steering import random_directions

ABLATE = SteeringConfig(mode="ablate", scale=1.0, direction_layer=2)  # every layer, so the embedding is edited too


def tiny_gguf(tmp_path, matrix_type="F32", types=None, tied=False, hidden=64):
    """A tiny llama GGUF and the model this package loads from it (dequantized, float32)."""
    if tied:
        from transformers import AutoModelForCausalLM

        from alignment_artifacts.models import wrap_model

        config = tiny_config("llama", hidden=hidden)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        source = wrap_model(AutoModelForCausalLM.from_config(config, dtype=torch.float32), tiny_tokenizer())
    else:
        source = tiny_model("llama", hidden=hidden)
    path = write_tiny_llama_gguf(source, tmp_path / f"tiny-{matrix_type}.gguf", matrix_type, types)
    return path, load_model(str(path), device="cpu", dtype="float32")


def gguf_tensors(path):
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def dequantized(tensor) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(tensor.data, tensor.tensor_type).reshape([int(n) for n in reversed(tensor.shape.tolist())])


def baked_weights(loaded, config, directions) -> dict[str, np.ndarray]:
    baked, _ = bake_ablation(loaded, Steering(config, directions))
    return {k: v.float().numpy() for k, v in baked.state_dict().items()}


GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight"} | {
    f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for i in range(4)
    for g, h in (("attn_output", "self_attn.o_proj"), ("ffn_down", "mlp.down_proj"))}


@pytest.mark.parametrize("matrix_type", ["F32", "Q8_0", "Q4_1"])
def test_round_trip_matches_baked_weights(matrix_type, tmp_path, cache_root):
    path, loaded = tiny_gguf(tmp_path, matrix_type)
    directions = random_directions(loaded)
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "ablated.gguf", format="gguf",
                 evaluation={"refusal": 0.2})
    source, written = gguf_tensors(path), gguf_tensors(out)
    assert list(written) == list(source)
    expected = baked_weights(loaded, ABLATE, directions)
    for name, tensor in written.items():
        if name in GGUF_NAMES:
            assert tensor.tensor_type == source[name].tensor_type  # written in the source's type
            want, got = expected[GGUF_NAMES[name]], dequantized(tensor)
            assert not np.array_equal(got, dequantized(source[name]))
            # at most one quantization step of the block's largest value (4 bits: 1/15 of its range)
            step = {"F32": 1e-6, "Q8_0": 1 / 127, "Q4_1": 2 / 15}[matrix_type] * np.abs(want).max()
            assert np.abs(got - want).max() <= step + 1e-6, name
        else:
            assert tensor.tensor_type == source[name].tensor_type
            assert tensor.data.tobytes() == source[name].data.tobytes(), name  # byte for byte
    manifest = read_manifest(out)
    assert manifest["format"] == "gguf" and manifest["steering"] == ABLATE.to_json()
    assert manifest["directions_sha256"] == directions_sha256(directions)
    assert manifest["package_version"] and manifest["evaluation"] == {"refusal": 0.2}
    assert sorted(manifest["modified"]) == sorted(GGUF_NAMES)
    assert manifest["output_head_untied"] is False


def test_every_metadata_field_is_copied(tmp_path, cache_root):
    import gguf

    path, loaded = tiny_gguf(tmp_path, "Q8_0")
    out = export(loaded, Steering(ABLATE, random_directions(loaded)), tmp_path / "ablated.gguf", format="gguf")
    source, written = gguf.GGUFReader(path).fields, gguf.GGUFReader(out).fields
    assert set(written) - set(source) == {MANIFEST_KEY}
    for key, field in source.items():
        if not key.startswith("GGUF."):
            assert written[key].types == field.types and written[key].contents() == field.contents(), key


def test_transformers_loads_the_export_and_matches_hooks(tmp_path, cache_root):
    """Read back by transformers' own GGUF loader, the F32 export computes what the hooks compute."""
    _, loaded = tiny_gguf(tmp_path, "F32")
    directions = random_directions(loaded)
    with apply_steering(loaded, ABLATE, directions):
        hooked = real_logits(loaded.model, loaded.tokenizer)
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "ablated.gguf", format="gguf")
    ablated = load_model(str(out), device="cpu", dtype="float32")
    assert relative_error(real_logits(ablated.model, ablated.tokenizer), hooked) < 1e-4
    assert relative_error(real_logits(loaded.model, loaded.tokenizer), hooked) > 1e-2  # the ablation does act


def test_tied_head_keeps_the_original_embedding(tmp_path, cache_root):
    path, loaded = tiny_gguf(tmp_path, "Q8_0", tied=True)
    assert "output.weight" not in gguf_tensors(path)
    directions = random_directions(loaded)
    with apply_steering(loaded, ABLATE, directions):
        hooked = real_logits(loaded.model, loaded.tokenizer)
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "ablated.gguf", format="gguf")
    source, written = gguf_tensors(path), gguf_tensors(out)
    assert written["output.weight"].data.tobytes() == source["token_embd.weight"].data.tobytes()
    assert written["token_embd.weight"].data.tobytes() != source["token_embd.weight"].data.tobytes()
    assert read_manifest(out)["output_head_untied"] is True
    ablated = load_model(str(out), device="cpu", dtype="float32")
    assert not ablated.model.config.tie_word_embeddings
    assert relative_error(real_logits(ablated.model, ablated.tokenizer), hooked) < 0.05  # Q8_0 requantization


def test_unwritable_source_type_falls_back(tmp_path, cache_root):
    """Q4_K (which the gguf package reads but cannot write) becomes Q8_0, or the type asked for."""
    assert "Q4_K" not in writable_types() and "Q8_0" in writable_types()
    _, loaded = tiny_gguf(tmp_path, "F16", types={"token_embd.weight": "Q4_K"}, hidden=256)
    directions = random_directions(loaded)
    expected = baked_weights(loaded, ABLATE, directions)["model.embed_tokens.weight"]
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "auto.gguf", format="gguf")
    written = gguf_tensors(out)
    assert written["token_embd.weight"].tensor_type.name == "Q8_0"
    assert written["blk.1.ffn_down.weight"].tensor_type.name == "F16"  # writable: kept
    assert np.abs(dequantized(written["token_embd.weight"]) - expected).max() <= np.abs(expected).max() / 127
    modified = read_manifest(out)["modified"]["token_embd.weight"]
    assert modified["source_type"] == "Q4_K" and modified["written_type"] == "Q8_0"
    assert 0 < modified["requantization_rms_error"] < 0.01
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "f32.gguf", format="gguf", gguf_type="F32")
    written = gguf_tensors(out)
    assert {written[name].tensor_type.name for name in GGUF_NAMES} == {"F32"}
    assert np.abs(dequantized(written["token_embd.weight"]) - expected).max() < 1e-5


def test_layer_subset_edits_only_those_layers(tmp_path, cache_root):
    path, loaded = tiny_gguf(tmp_path, "Q8_0")
    config = SteeringConfig(mode="ablate", scale=0.7, layers=[1, 3], layer_weights={1: 1.0, 3: 0.5})
    out = export(loaded, Steering(config, random_directions(loaded)), tmp_path / "ablated.gguf", format="gguf")
    source, written = gguf_tensors(path), gguf_tensors(out)
    changed = {n for n in source if written[n].data.tobytes() != source[n].data.tobytes()}
    assert changed == {f"blk.{i}.{g}.weight" for i in (1, 3) for g in ("attn_output", "ffn_down")}


def test_refusals_leave_nothing(tmp_path, cache_root):
    path, loaded = tiny_gguf(tmp_path, "Q8_0")
    directions = random_directions(loaded)
    out = tmp_path / "x.gguf"
    with pytest.raises(UserError, match="cannot write Q4_K"):
        export(loaded, Steering(ABLATE, directions), out, format="gguf", gguf_type="Q4_K")
    with pytest.raises(UserError, match=r"ending in \.gguf"):
        export(loaded, Steering(ABLATE, directions), tmp_path / "folder", format="gguf")
    with pytest.raises(UserError, match="vectors"):
        export(loaded, Steering(SteeringConfig(mode="always"), directions), out, format="gguf")
    with pytest.raises(UserError, match="per prompt"):
        export(loaded, Steering(SteeringConfig(mode="ablate", gate_layer=1), directions), out, format="gguf")
    with pytest.raises(UserError, match="--format gguf only"):
        export(loaded, Steering(ABLATE, directions), tmp_path / "hf", format="hf", gguf_type="F16")
    hf_model = tiny_model("llama")
    with pytest.raises(UserError, match="convert_hf_to_gguf"):
        export(hf_model, Steering(ABLATE, random_directions(hf_model)), out, format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", path.name])
    out.write_bytes(b"keep")
    with pytest.raises(UserError, match="already exists"):
        export(loaded, Steering(ABLATE, directions), out, format="gguf")
    assert out.read_bytes() == b"keep"


def test_interrupted_write_leaves_the_old_file(tmp_path, cache_root, monkeypatch):
    import gguf

    path, loaded = tiny_gguf(tmp_path, "Q8_0")
    out = tmp_path / "ablated.gguf"
    out.write_bytes(b"old")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError):
        export(loaded, Steering(ABLATE, random_directions(loaded)), out, format="gguf", force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", path.name, out.name])


def test_cli_export_gguf(tmp_path, cache_root, capsys):
    from alignment_artifacts.cli import main

    path, _ = tiny_gguf(tmp_path, "Q8_0")
    directions = tmp_path / "directions"
    loaded = load_model(str(path), device="cpu", dtype="float32")
    random_directions(loaded).save(directions)
    out = tmp_path / "cli.gguf"
    capsys.readouterr()  # the one-time conversion above printed progress
    code = main(["export", "--model", str(path), "--device", "cpu", "--mode", "ablate", "--direction-layer", "2",
                 "--direction-source", str(directions), "--format", "gguf", "--gguf-type", "F16",
                 "--out", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["format"] == "gguf"
    assert gguf_tensors(out)["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    assert read_manifest(out)["gguf_type"] == "F16"


# llama.cpp ------------------------------------------------------------------------------------

def llama_first_token_logits(path, ids: list[list[int]]) -> torch.Tensor:
    llm = open_llama_cpp(path, n_ctx=128, n_threads=1)
    rows = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        rows.append(torch.tensor(np.array(llm.scores[len(seq) - 1, :llm.n_vocab()])))
    return torch.stack(rows)


def hf_first_token_logits(loaded, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([loaded.model(input_ids=torch.tensor([seq])).logits[0, -1] for seq in ids])


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("matrix_type", ["F32", "Q8_0", "Q4_1"])
def test_llama_cpp_runs_the_export_like_the_hooks(matrix_type, tmp_path, cache_root):
    """llama.cpp (llama-cpp-python) loads the exported file and computes what transformers computes from
    it; in F32 and Q8_0 that is the hooked ablation within the quantisation floor."""
    pytest.importorskip("llama_cpp")
    from alignment_artifacts.models.generation import format_chat

    path, loaded = tiny_gguf(tmp_path, matrix_type)
    directions = random_directions(loaded)
    ids = [loaded.tokenizer(format_chat(loaded.tokenizer, p), add_special_tokens=False).input_ids for p in PROMPTS]
    plain = hf_first_token_logits(loaded, ids)
    with apply_steering(loaded, ABLATE, directions):
        hooked = hf_first_token_logits(loaded, ids)
    out = export(loaded, Steering(ABLATE, directions), tmp_path / "ablated.gguf", format="gguf")
    read_back = hf_first_token_logits(load_model(str(out), device="cpu", dtype="float32"), ids)
    llama_plain, llama_ablated = llama_first_token_logits(path, ids), llama_first_token_logits(out, ids)
    floor, ablated, effect = kl(plain, llama_plain), kl(hooked, llama_ablated), kl(hooked, plain)
    print(f"{matrix_type}: KL(hooked||llama.cpp export) {ablated:.2e}, floor KL(hf||llama.cpp) {floor:.2e}, "
          f"ablation effect KL(hooked||plain) {effect:.2e}")
    assert kl(read_back, llama_ablated) < max(4 * floor, 1e-6)  # the file itself: the floor, as unmodified
    assert torch.equal(read_back.argmax(-1), llama_ablated.argmax(-1))
    if matrix_type == "F32":
        assert relative_error(llama_ablated, hooked) < 1e-3
    elif matrix_type == "Q8_0":  # requantizing the edited matrices in Q8_0 costs little beyond the floor
        assert ablated < 4 * floor and torch.equal(hooked.argmax(-1), llama_ablated.argmax(-1))
    else:  # a fresh 4-bit rounding of every edited matrix: far above the floor, still the ablation's side
        assert ablated < effect / 2
