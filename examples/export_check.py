"""Bake the stored (or default) ablation into Qwen's weights and check the export.

1. Exports an `hf` folder for the builtin Qwen model with directional ablation: the stored
   `optimize` configuration when it is an ungated `ablate` one (`optimize --modes ablate --no-gate`), else
   plain ablation at the default direction layer (clamps and gates are conditional, hooks only).
2. In a fresh process that imports only transformers, loads the folder and computes next-token
   logits on mild prompts; compares them with the hooked model in this process.
Prints `max relative logit difference` (goal <= 1e-4 in float32). Needs about 3x the model's
float32 size in RAM (the loaded model, the baked copy while saving, the fresh process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from alignment_artifacts.api import get_directions, get_model, resolve_config
from alignment_artifacts.export import export
from alignment_artifacts.models.generation import format_chat
from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering

PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "Explain how a bicycle gear works.",
           "Give me three tips for better sleep."]

FRESH = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
rows = []
with torch.no_grad():
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        rows.append(model(input_ids=ids).logits[0, -1].tolist())
assert "alignment_artifacts" not in sys.modules
print(json.dumps(rows))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--out", default=None, help="export folder (default: a temporary folder)")
    parser.add_argument("--config", help="a steering configuration JSON to bake (mode ablate)")
    args = parser.parse_args()
    loaded = get_model(args.model)
    if args.config:
        config = resolve_config(loaded, SteeringConfig.load(args.config))
    else:
        config = resolve_config(loaded, SteeringConfig(mode="auto"))
        if config.mode != "ablate" or config.gate_layer is not None:
            config = resolve_config(loaded, SteeringConfig(mode="ablate"))
    directions = get_directions(loaded, config)
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="aa-export-"), "ablated")
    export(loaded, Steering(config, directions), out, format="hf", force=True)
    texts = [format_chat(loaded.tokenizer, p) for p in PROMPTS]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fresh = subprocess.run([sys.executable, "-c", FRESH, out, json.dumps(texts)], capture_output=True, text=True,
                           env=env, check=True)
    baked = torch.tensor(json.loads(fresh.stdout.strip().splitlines()[-1]))
    hooked = []
    with torch.no_grad(), apply_steering(loaded, config, directions):
        for text in texts:
            ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            hooked.append(loaded.model(input_ids=ids).logits[0, -1])
    hooked_t = torch.stack(hooked)
    relative = ((hooked_t - baked).abs().max() / hooked_t.abs().max()).item()
    print(f"model: {loaded.info.name}")
    print(f"configuration: mode={config.mode} scale={config.scale:.3f} direction_layer={config.direction_layer} "
          f"({config.notes.get('auto', 'explicit')})")
    print(f"export folder: {out}")
    print(f"max relative logit difference (fresh transformers vs hooked): {relative:.2e}")
    print(f"top-1 agreement: {int((hooked_t.argmax(-1) == baked.argmax(-1)).sum())}/{len(texts)}")


if __name__ == "__main__":
    main()
