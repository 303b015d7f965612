"""Hostile probes kept as tests: bad input, killed processes, damaged caches and a stalling client.

Each case asserts the exit code (or HTTP status), the message, and that nothing on disk changed
that the user did not ask to change. Tiny random models only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from alignment_artifacts import activation_pass, cache
from alignment_artifacts import activations as act
from alignment_artifacts.api import get_directions, resolve_config
from alignment_artifacts.cache import atomic_directory
from alignment_artifacts.cli import main
from alignment_artifacts.errors import UserError
from alignment_artifacts.evaluation import EvaluationSettings, evaluate
from alignment_artifacts.export import export
from alignment_artifacts.models import GenerationConfig, generate
from alignment_artifacts.prompts.sets import Prompt, PromptSet
from alignment_artifacts.serve import ServerLimits, ServerThread, create_app
from alignment_artifacts.steering import Steering, SteeringConfig
from test_activations import TEXTS, make_set
from tiny_models import tiny_model
from tiny_steering import random_directions

LONG = " ".join(["bread"] * 400)  # far beyond the tiny models' 256 positions


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def model_folder(loaded, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the command in this process; (exit code, stderr)."""
    try:
        code = main(list(argv))
    finally:
        cache.set_cache_root(None)  # --cache-dir must not leak into later tests
    return code, capsys.readouterr().err


def snapshot(*roots: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``roots`` with (is folder, size, mtime): equal snapshots mean nothing changed."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            info = path.stat()
            state[str(path)] = (path.is_dir(), 0 if path.is_dir() else info.st_size, info.st_mtime_ns)
    return state


def interrupt_at(monkeypatch, call: int) -> None:
    """Make the ``call``-th batch of collections raise, as a Ctrl-C there would (until ``resume``)."""
    original, calls = activation_pass.run_batch, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(activation_pass, "run_batch", flaky)
    monkeypatch.setattr(activation_pass, "_original_run_batch", original, raising=False)


def resume(monkeypatch) -> None:
    """Undo ``interrupt_at`` only (``monkeypatch.undo`` would also drop the cache_root fixture's setting)."""
    monkeypatch.setattr(activation_pass, "run_batch", activation_pass._original_run_batch)


def slow_batches(monkeypatch, seconds: float) -> None:
    original = activation_pass.run_batch

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(activation_pass, "run_batch", slow)


# 1. A prompt longer than the model's context ---------------------------------------------------------------


def test_cli_generate_refuses_a_prompt_longer_than_the_context(capsys, model_folder, tmp_path):
    before = snapshot(tmp_path)
    code, err = cli(capsys, "generate", LONG, "--model", str(model_folder), "--cache-dir", str(tmp_path / "c"),
                    "--max-tokens", "4", "--no-stream")
    assert code == 2
    assert re.search(r"The prompt is \d{3} tokens long .* the model's context is 256 tokens", err), err
    assert "--truncate" in err
    assert snapshot(tmp_path) == before
    code, _ = cli(capsys, "generate", LONG, "--model", str(model_folder), "--cache-dir", str(tmp_path / "c"),
                  "--max-tokens", "4", "--no-stream", "--truncate")
    assert code == 0


def test_api_generate_checks_the_context_and_truncates_when_asked(loaded):
    with pytest.raises(UserError, match="context is 256 tokens"):
        generate(loaded, [LONG], GenerationConfig(max_tokens=8))
    out = generate(loaded, [LONG], GenerationConfig(max_tokens=8, truncate=True))
    assert out.prompt_lengths[0] + 8 <= 256 and out.prompt_lengths[0] > 200


def test_chat_history_is_dropped_oldest_first_when_truncating(loaded):
    from alignment_artifacts.models.generation import fit_prompt

    history = [{"role": "user", "content": "bread " * 60}, {"role": "assistant", "content": "bread " * 60}] * 3
    with pytest.raises(UserError, match="context is 256 tokens"):
        fit_prompt(loaded.tokenizer, "Hello", 256, 16, history=history)
    text = fit_prompt(loaded.tokenizer, "Hello", 256, 16, truncate=True, history=history)
    assert text.count("<|im_start|>user") < 4 and "Hello" in text
    assert len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) + 16 <= 256


def test_collect_refuses_a_long_prompt_before_writing_anything(capsys, model_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"How do locks work?\n{LONG}\n")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "collect", "--model", str(model_folder), "--prompts", str(prompts), "--cache-dir",
                    str(tmp_path / "c"), "--layers", "0")
    assert code == 2 and re.search(r"A prompt is \d{3} tokens long", err) and "--truncate" in err, err
    assert snapshot(tmp_path) == before
    code, _ = cli(capsys, "collect", "--model", str(model_folder), "--prompts", str(prompts), "--cache-dir",
                  str(tmp_path / "c"), "--layers", "0", "--truncate", "--json")
    assert code == 0


def test_evaluate_refuses_a_long_prompt_before_computing(loaded, cache_root, tmp_path):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text(f"How do locks work?\n{LONG}\n")
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("Name a colour.\n")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"Prompt 2 of the harmful group is \d{3} tokens long"):
        evaluate(loaded, SteeringConfig(mode="none"),
                 EvaluationSettings(harmful=str(harmful), ordinary=str(harmless), n_borderline=2, n_capability=2,
                                    max_tokens=4), progress=False)
    assert snapshot(tmp_path) == before


# 2. A damaged part file of an interrupted collection ---------------------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False])
def test_damaged_part_files_are_recomputed(cache_root, monkeypatch, use_cache):
    loaded = tiny_model("gpt2", layers=2)
    ps = make_set(10)
    clean = act.collect_activations(loaded, ps, batch_size=2, progress=False, use_cache=False,
                                    cache_folder=cache_root / "clean")
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        act.collect_activations(loaded, ps, batch_size=2, progress=False)
    parts = next((cache_root / "activations").glob(".*.parts"))
    first, second, _ = sorted(parts.glob("batch-*.safetensors"))  # the third stays whole
    first.write_bytes(first.read_bytes()[:40])  # cut short
    data = bytearray(second.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])  # same size and header, other numbers
    second.write_bytes(bytes(data))
    resume(monkeypatch)
    if use_cache:
        with pytest.warns(UserWarning, match=r"Discarded the part file .*batch-00000") as caught:
            resumed = act.collect_activations(loaded, ps, batch_size=2, progress=False)
        assert any("batch-00001" in str(w.message) and "checksum" in str(w.message) for w in caught)
        assert resumed.manifest["resumed"] is True  # the third part was whole and reused
    else:
        resumed = act.collect_activations(loaded, ps, batch_size=2, progress=False, use_cache=False)
    for layer in range(2):
        assert torch.equal(resumed.get("mlp_out", layer, "last"), clean.get("mlp_out", layer, "last"))
    assert not parts.exists()
    assert not list((cache_root / "activations").glob(".*"))  # no parts, lock or temporary files left


def test_resumed_collection_says_so_and_counts_the_earlier_time(cache_root, monkeypatch, capsys, model_folder):
    from safetensors import safe_open

    prompts = cache_root.parent / "prompts.txt"
    prompts.write_text("\n".join(TEXTS) + "\n")
    argv = ["collect", "--model", str(model_folder), "--prompts", str(prompts), "--batch-size", "2", "--json"]
    interrupt_at(monkeypatch, 3)
    assert cli(capsys, *argv)[0] == 130
    capsys.readouterr()
    part = sorted((cache_root / "activations").glob(".*.parts/batch-00001.safetensors"))[0]
    with safe_open(str(part), "pt") as handle:
        earlier = float(handle.metadata()["seconds"])
    resume(monkeypatch)
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed"] is True
    assert summary["seconds"] >= earlier and summary["seconds"] > summary["seconds_this_run"] - 1e-9


# 3. An unusable cache directory ------------------------------------------------------------------------------


def test_a_file_where_the_cache_folder_should_be(capsys, model_folder, tmp_path):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do locks work?\n")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "collect", "--model", str(model_folder), "--prompts", str(prompts), "--cache-dir",
                    str(blocker), "--layers", "0")
    assert code == 2, err
    assert str(blocker) in err and "--cache-dir" in err and "ALIGNMENT_ARTIFACTS_CACHE" in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_a_read_only_cache_root(capsys, model_folder, tmp_path, monkeypatch):
    root = tmp_path / "ro-cache"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # what a read-only file system answers (tests run as root here)
        if self.is_relative_to(root):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setenv(cache.ENV_VAR, str(root))
    code, err = cli(capsys, "collect", "--model", str(model_folder), "--prompts", "harmless", "--limit", "2",
                    "--layers", "0")
    assert code == 2 and "Read-only file system" in err and str(root) in err and "--cache-dir" in err, err
    assert not root.exists()


# 4. Temporary folders of killed processes ---------------------------------------------------------------------


def _writer(final: Path, then: str) -> int:
    """A child process that starts writing ``final`` and then dies (SIGKILL) or stays alive (sleeps)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_directory(final) as tmp:
                (tmp / "model.safetensors").write_bytes(b"0" * 4096)
                os.write(write, b"x")
                if then == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(60)
        finally:
            os._exit(1)
    os.read(read, 1)
    if then == "die":
        os.waitpid(pid, 0)
    return pid


def _age(folder: Path, name: str) -> list[Path]:
    """The temporaries of ``name``, dated an hour back: left by a run before this one."""
    leftovers = sorted(folder.glob(f".{name}.*"))
    for path in leftovers:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    return leftovers


def test_export_removes_what_a_killed_export_left(loaded, tmp_path):
    out = tmp_path / "export"
    _writer(out, "die")
    assert len(_age(tmp_path, "export")) == 1  # what `kill -9` mid-export leaves
    config = resolve_config(loaded, SteeringConfig(mode="always"))
    export(loaded, Steering(config, random_directions(loaded)), out, format="vectors")
    assert (out / "steering.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_running_writer_keeps_its_temporary_folder(loaded, tmp_path):
    out = tmp_path / "export"
    pid = _writer(out, "live")
    try:
        leftovers = _age(tmp_path, "export")
        config = resolve_config(loaded, SteeringConfig(mode="always"))
        export(loaded, Steering(config, random_directions(loaded)), out, format="vectors")
        assert all(path.exists() for path in leftovers) and len(leftovers) == 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_collection_leaves_no_lock_file(cache_root, loaded):
    act.collect_activations(loaded, make_set(4), progress=False)
    assert [p.name for p in (cache_root / "activations").iterdir() if p.name.startswith(".")] == []


# 5. The server ------------------------------------------------------------------------------------------------


def _chat(steering=None):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
    return body if steering is None else {**body, "steering": steering}


def _post(server, body, timeout=30.0):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def _slow_source(n: int) -> PromptSet:
    return PromptSet("slow", [Prompt(f"p{i}", f"{TEXTS[i % len(TEXTS)]} ({i})", i % 2) for i in range(n)])


def test_unsteered_requests_flow_while_directions_are_collected(cache_root, monkeypatch, loaded):
    source = _slow_source(128)  # 8 batches of 16
    slow_batches(monkeypatch, 0.5)
    collected = threading.Event()

    def directions_for(config, model_lock=None):
        directions = get_directions(loaded, config, source=source, progress=False, model_lock=model_lock)
        collected.set()
        return directions

    app = create_app(loaded, SteeringConfig(mode="none"), directions_for, limits=ServerLimits(max_tokens=16))
    with ServerThread(app) as server, ThreadPoolExecutor(1) as pool:
        steered = pool.submit(_post, server, _chat({"mode": "always", "scale": 1.0}))
        time.sleep(0.5)  # the steered request is collecting now
        for _ in range(3):
            started = time.monotonic()
            response = _post(server, _chat())
            assert response.status_code == 200, response.text
            assert time.monotonic() - started < 2.0
        assert not collected.is_set()  # all three were answered while the collection ran
        assert steered.result().status_code == 200


def test_a_corrupt_server_cache_is_a_500_without_paths(cache_root, loaded):
    source = make_set(8)
    config = resolve_config(loaded, SteeringConfig(mode="always"))
    get_directions(loaded, config, source=source, progress=False)
    shutil.rmtree(cache_root / "directions")
    for path in (cache_root / "activations").glob("*/*.safetensors"):
        path.write_bytes(b"damaged")
    before = snapshot(cache_root / "activations")

    def directions_for(config, model_lock=None):
        return get_directions(loaded, config, source=source, progress=False)

    app = create_app(loaded, SteeringConfig(mode="none"), directions_for, limits=ServerLimits(max_tokens=16))
    with ServerThread(app) as server:
        response = _post(server, _chat({"mode": "always", "scale": 1.0}))
        assert response.status_code == 500, response.text
        message = response.json()["error"]["message"]
        assert "/" not in message and "cache" in message
        assert _post(server, _chat()).status_code == 200
    assert snapshot(cache_root / "activations") == before  # reported, not deleted behind the operator's back


def test_a_request_that_takes_too_long_is_cancelled_with_504(cache_root, monkeypatch, loaded):
    slow_batches(monkeypatch, 0.8)

    def directions_for(config, model_lock=None):
        return get_directions(loaded, config, source=_slow_source(48), progress=False, model_lock=model_lock)

    limits = ServerLimits(max_tokens=16, request_timeout=1.0)
    app = create_app(loaded, SteeringConfig(mode="none"), directions_for, limits=limits)
    with ServerThread(app) as server:
        started = time.monotonic()
        response = _post(server, _chat({"mode": "always", "scale": 1.0}))
        assert response.status_code == 504 and "1 s" in response.json()["error"]["message"]
        assert time.monotonic() - started < 3.0
        # The server is not stuck: an unsteered request succeeds once the abandoned collection's
        # 0.8 s lock slices stop crowding its own 1 s budget (a loaded CI core can need a retry).
        deadline = time.monotonic() + 30.0
        while (status := _post(server, _chat()).status_code) == 504 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status == 200


# Wording ------------------------------------------------------------------------------------------------------


def test_csv_without_a_text_column_names_the_real_flag(capsys, model_folder, tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("title,body\nx,y\n")
    before = snapshot(tmp_path)
    code, err = cli(capsys, "collect", "--model", str(model_folder), "--prompts", str(csv), "--cache-dir",
                    str(tmp_path / "c"))
    assert code == 2 and "--text-field" in err and "--column" not in err, err
    assert snapshot(tmp_path) == before


def test_a_missing_gguf_file_is_not_found(capsys, tmp_path):
    code, err = cli(capsys, "generate", "Hello", "--model", str(tmp_path / "models" / "missing.gguf"))
    assert code == 2 and "not found" in err and "Unknown model" not in err, err
    code, err = cli(capsys, "generate", "Hello", "--model", "models/missing.gguf")  # relative: not a hub id
    assert code == 2 and "not found" in err and "hub" not in err.split(".")[0], err


def test_a_missing_directions_folder_is_named_missing(capsys, model_folder, tmp_path):
    missing = tmp_path / "saved" / "directions"
    code, err = cli(capsys, "suppress", "Hello", "--model", str(model_folder), "--mode", "always",
                    "--direction-source", str(missing), "--cache-dir", str(tmp_path / "c"), "--max-tokens", "2")
    assert code == 2 and str(missing) in err and "does not exist" in err and "extension" not in err, err
    assert not (tmp_path / "c").exists()
