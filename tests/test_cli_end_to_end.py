"""``suppress``, ``evaluate``, ``export`` and ``serve`` end to end through ``cli.main`` on a tiny model
folder: exit codes, and outputs checked against what the model itself computes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import alignment_artifacts
from alignment_artifacts import api
from alignment_artifacts.cli import main
from alignment_artifacts.evaluation import chat_texts, first_logits, generated_refusals, kl_divergence
from alignment_artifacts.export import EXPORT_MANIFEST, load_steering
from alignment_artifacts.models import GenerationConfig, generate
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.steering import SteeringConfig, apply_steering
from test_api_steer import PROMPT, write_prompt_files
from test_export import real_logits, relative_error, reload
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("models") / "tiny-llama", layers=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_prompt_files(tmp_path_factory.mktemp("prompts"))


@pytest.fixture()
def loaded(folder):
    """The model the CLI loads from ``folder`` (the API keeps it loaded across calls)."""
    return api.get_model(str(folder))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def steered_with(loaded, config_json):
    """The configuration a command printed, and its directions (from the cache the command filled)."""
    config = SteeringConfig.from_json(config_json)
    return config, api.get_directions(loaded, config, progress=False)


def test_suppress_prints_what_suppress_prompt_returns(cache_root, capsys, folder, source, loaded):
    argv = ["suppress", PROMPT, "--model", folder, "--mode", "always", "--scale", "4", "--direction-source", source,
            "--max-tokens", "6", "--ignore-end-tokens"]
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"model", "prompt", "baseline", "steered", "config", "interventions"}
    expected = api.suppress_prompt(PROMPT, loaded, mode="always", scale=4.0, source=source,
                                   generation=GenerationConfig(max_tokens=6, ignore_end_tokens=True))
    assert data["model"] == loaded.info.name and data["prompt"] == PROMPT
    assert data["baseline"] == expected.baseline == generate(
        loaded, [PROMPT], GenerationConfig(max_tokens=6, ignore_end_tokens=True)).texts[0]
    assert data["steered"] == expected.steered != data["baseline"]
    assert data["interventions"] == expected.interventions and sum(data["interventions"].values()) > 0
    assert data["config"]["mode"] == "always" and data["config"]["scale"] == 4.0
    code, out, _ = run(capsys, *argv, "--no-compare")  # the terminal form: streamed, then the count
    assert code == 0 and "unmodified" not in out and data["steered"] in out
    assert f"interventions: {sum(data['interventions'].values())} positions changed across " \
           f"{len(data['interventions'])} hooked sites" in out


def test_evaluate_reports_what_the_model_computes(cache_root, capsys, folder, source, loaded):
    positive = source.split(",")[0]
    code, out, _ = run(capsys, "evaluate", "--model", folder, "--mode", "ablate", "--direction-source", source,
                       "--harmful", positive, "--groups", "harmful,ordinary", "--n-ordinary", "4", "--max-tokens", "3",
                       "--batch-size", "4", "--generation-batch-size", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["judge"] == "markers" and data["model"] == loaded.info.name
    assert data["borderline"] is None and data["capability"] is None  # only the groups asked for
    assert data["settings"]["n_ordinary"] == 4 and data["settings"]["max_tokens"] == 3
    config, directions = steered_with(loaded, data["config"])
    assert config.mode == "ablate" and config.direction_layer == api.default_direction_layer(3)
    harmful = chat_texts(loaded, Path(positive).read_text().splitlines(), None)
    ordinary = chat_texts(loaded, [p.text for p in resolve_prompts("ordinary:val").prompts][:4], None)
    plain_flags, plain_logits = generated_refusals(loaded, harmful, 3, 4), first_logits(loaded, ordinary)
    with apply_steering(loaded, config, directions):
        steered_flags, steered_logits = generated_refusals(loaded, harmful, 3, 4), first_logits(loaded, ordinary)
    h = data["harmful"]
    assert h["n"] == 10
    assert h["marker_refusals_before"] == sum(plain_flags.flags)
    assert h["marker_refusals_after"] == sum(steered_flags.flags)
    assert h["broad_marker_hits"] == sum(plain_flags.broad)
    o = data["ordinary"]
    assert o["n"] == 4 and o["touched"] == 1.0
    kl = kl_divergence(plain_logits, steered_logits)
    assert o["kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-4) and o["kl"]["mean"] > 0


def test_export_writes_a_model_that_reproduces_the_hooked_configuration(cache_root, capsys, folder, source, loaded,
                                                                        tmp_path):
    out = tmp_path / "baked"
    argv = ["export", "--model", folder, "--mode", "ablate", "--direction-source", source, "--json"]
    code, printed, _ = run(capsys, *argv, "--out", out)
    assert code == 0
    data = json.loads(printed)
    assert data["format"] == "hf" and data["path"] == str(out)
    config, directions = steered_with(loaded, data["config"])
    assert config.mode == "ablate" and config.direction_layer == api.default_direction_layer(3)
    assert json.loads((out / EXPORT_MANIFEST).read_text())["steering"] == data["config"]
    with apply_steering(loaded, config, directions):
        hooked = real_logits(loaded.model, loaded.tokenizer)
    plain = real_logits(loaded.model, loaded.tokenizer)
    baked = real_logits(reload(out), loaded.tokenizer)
    assert relative_error(baked, hooked) < 1e-4 < relative_error(baked, plain)

    code, _, err = run(capsys, *argv, "--out", out)  # an existing output needs --force
    assert code == 2 and "already exists" in err and "--force" in err
    vectors = tmp_path / "vectors"
    code, printed, _ = run(capsys, *argv, "--out", vectors, "--format", "vectors")
    assert code == 0 and json.loads(printed)["format"] == "vectors"
    saved_config, saved = load_steering(vectors)
    assert saved_config.to_json() == data["config"]
    assert saved.layers == directions.layers
    assert all(torch.equal(saved.vectors[layer], directions.vectors[layer]) for layer in directions.layers)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, seconds: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("serve did not answer /health in time")


def test_serve_answers_one_request_with_its_default_steering_then_stops(cache_root, folder, source, loaded):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import httpx

    config = api.resolve_config(loaded, SteeringConfig(mode="always", scale=4.0, source=source))
    directions = api.get_directions(loaded, config, progress=False)  # cached: the server reads them
    answer = GenerationConfig(max_tokens=6)
    plain = generate(loaded, [PROMPT], answer).texts[0]
    with apply_steering(loaded, config, directions):
        steered = generate(loaded, [PROMPT], answer).texts[0]
    assert steered != plain
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(alignment_artifacts.__file__).parents[1]),
           "ALIGNMENT_ARTIFACTS_CACHE": str(cache_root), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "alignment_artifacts", "serve", "--model", str(folder),
                                "--device", "cpu", "--mode", "always", "--scale", "4", "--direction-source", source,
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url)
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                "max_tokens": answer.max_tokens}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["choices"][0]["message"]["content"] == steered
    assert data["steering"]["mode"] == "always" and data["steering"]["interventions"] > 0
    assert 0 < data["usage"]["completion_tokens"] <= answer.max_tokens
    log = process.stdout.read()
    assert f"{url}/v1" in log
    assert code in (0, 130) and "Application shutdown complete" in log, log  # 130: Ctrl-C's status, after a clean stop
