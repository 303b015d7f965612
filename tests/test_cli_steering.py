"""The steering path from the CLI: flags from the mode table, `suppress` through `api.suppress_prompt`."""

from __future__ import annotations

import json

import pytest

from alignment_artifacts.cli import build_parser, main
from alignment_artifacts.errors import UserError
from alignment_artifacts.steering import MODES, PARAMS, SteeringConfig
from test_evaluation import prompt_files  # noqa: F401  (a fixture)
from tiny_models import save_tiny


@pytest.fixture()
def direction_source(prompt_files):  # noqa: F811  (the fixture imported above)
    return ",".join(prompt_files)


def test_mode_table_drives_the_flags_and_validation():
    parser = build_parser()
    for mode in MODES:
        args = parser.parse_args(["suppress", "hi", "--mode", mode])
        assert args.mode == mode and args.scale is None
    flags = {param.flag: param for param in PARAMS.values()}
    assert "--clamp-level" in flags and "--proximity-threshold" in flags
    args = parser.parse_args(["suppress", "hi", "--clamp-level", "0.4", "--pca-components", "3"])
    assert args.clamp_level == 0.4 and args.pca_components == 3 and args.decay_rate is None
    with pytest.raises(SystemExit):
        parser.parse_args(["suppress", "hi", "--mode", "ablat"])
    for param in PARAMS.values():
        with pytest.raises(UserError, match=param.flag):
            SteeringConfig(**{param.name: float("nan")}).validate()


def test_suppress_cli_matches_the_api(cache_root, direction_source, tmp_path, capsys):
    from alignment_artifacts.api import get_model, suppress_prompt
    from alignment_artifacts.models import GenerationConfig

    folder = save_tiny("llama", tmp_path / "tiny", layers=3)
    prompt = "How do locks work?"
    common = ["--model", str(folder), "--mode", "always", "--direction-source", direction_source,
              "--max-tokens", "4", "--ignore-end-tokens"]
    assert main(["suppress", prompt, *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["scale"] == 1.0  # unset: the mode's default
    assert sum(data["interventions"].values()) > 0
    result = suppress_prompt(prompt, get_model(str(folder)), mode="always", source=direction_source,
                             generation=GenerationConfig(max_tokens=4, ignore_end_tokens=True))
    assert (result.baseline, result.steered, result.interventions) == (data["baseline"], data["steered"],
                                                                     data["interventions"])
    assert main(["suppress", prompt, *common, "--scale", "0"]) == 0
    out = capsys.readouterr().out
    assert "unmodified" in out and "steered: mode=always scale=0" in out and "interventions: 0 positions" in out


def test_serve_checks_request_steering_against_the_table():
    from alignment_artifacts.serve import ApiError, SteeringOverride, steering_for

    default = SteeringConfig(mode="always", scale=2.0)
    with pytest.raises(ApiError, match="clamp-level") as caught:
        steering_for(default, SteeringOverride(clamp_level=5.0), True)
    assert caught.value.param == "steering.clamp_level"
    with pytest.raises(ApiError, match="Unknown mode"):
        steering_for(default, SteeringOverride(mode="ablat"), True)
    assert steering_for(default, SteeringOverride(mode="clamp"), True).scale is None  # that mode's default
    assert steering_for(default, SteeringOverride(mode="always"), True).scale == 2.0
    assert steering_for(default, SteeringOverride(mode="clamp", scale=0.5), True).scale == 0.5
