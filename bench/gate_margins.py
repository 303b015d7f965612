"""How far apart a per-prompt gate sees harmful, borderline and ordinary prompts, layer by layer.

A gate steers the prompts whose last-token projection on the direction passes a level, a place
between the ordinary mean (0) and the sensitive mean (1) of the direction's own prompts. This prints,
for every layer `optimize` may gate at, where each group's prompts sit on that scale (min, 5th
percentile, median, 95th percentile, max), and the share of each group a gate at each of --levels lets
through: the margin a gate has between the harmful prompts it must steer and the borderline and
ordinary prompts it must leave alone, on prompts the direction was not computed from.

The direction and the splits are the ones `python bench/quality.py` gives `optimize`: public harmful
prompts (../shared/data; the train split's first 32 are the search prompts, the rest the direction's,
the 39 val prompts the check's) and the bundled ordinary and borderline sets (train and val splits;
the borderline set's unsafe contrasts too); and the bundled harmful set, which neither the search nor
the check sees, as the held-out count. Forward passes only, no generation (about 16 minutes for
the builtin Qwen on a 2-core CPU). Prints no prompt text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from alignment_artifacts.api import get_model
from alignment_artifacts.evaluation.passes import chat_texts, last_token_states
from alignment_artifacts.optimize import OptimizeSettings, search_and_direction_sets, train_val
from alignment_artifacts.optimize.search import Space
from alignment_artifacts.prompts import resolve_prompts
from alignment_artifacts.resolve import get_directions
from alignment_artifacts.steering import SteeringConfig, gate_places
from quality import DATA, harmful_files  # the same prompt files bench/quality.py gives optimize

QUANTILES = (0.0, 0.05, 0.5, 0.95, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--levels", default="0.3,0.4,0.5,0.6", help="gate levels to report pass rates at")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--layers", default=None, help="gate layers (default: those optimize searches)")
    args = parser.parse_args()
    tmp = harmful_files(Path(args.data))
    if tmp is None:
        return 0
    settings = OptimizeSettings()  # optimize's defaults, as bench/quality.py leaves them
    loaded = get_model(args.model)
    search, source = search_and_direction_sets(resolve_prompts(str(tmp / "harmful_train.json"), label=1),
                                               resolve_prompts(settings.harmless, label=0), settings)
    directions = get_directions(loaded, SteeringConfig(mode="ablate"), source=source, progress=False)
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else list(Space(loaded.adapter.n_layers, ("clamp",), gate=True).gate_layers))
    borderline = {split: resolve_prompts(f"{settings.borderline}:{split}", label=0) for split in ("train", "val")}
    ordinary_train, ordinary_val = train_val(settings.ordinary, settings.seed, "ordinary")
    groups = {"harmful search (train)": search.texts,
              "harmful val": resolve_prompts(str(tmp / "harmful_val.json"), label=1).texts,
              "harmful bundled (unseen)": resolve_prompts("harmful", label=1).texts,
              "borderline train": borderline["train"].filter(label=0).texts,
              "borderline val": borderline["val"].filter(label=0).texts,
              "unsafe contrasts val": borderline["val"].filter(label=1).texts,
              "ordinary train": ordinary_train[:200], "ordinary val": ordinary_val[:200]}
    states = {name: last_token_states(loaded, chat_texts(loaded, texts, None), directions.site, layers)
              for name, texts in groups.items()}
    levels = [float(x) for x in args.levels.split(",")]
    print(f"model: {loaded.info.name} ({loaded.info.dtype}); direction: {directions.site}, "
          f"{directions.n_positive} harmful vs {directions.n_negative} ordinary prompts")
    print("groups: " + ", ".join(f"{name} {len(texts)}" for name, texts in groups.items()))
    for layer in layers:
        print(f"\ngate layer {layer}: place on the scale (0 ordinary mean, 1 sensitive mean) "
              f"{' '.join(f'q{q:.2f}' for q in QUANTILES)} | pass at {' '.join(f'{x:.2f}' for x in levels)}")
        for name, by_layer in states.items():
            place = gate_places(directions, layer, by_layer[layer])
            quantiles = place.quantile(torch.tensor(QUANTILES)).tolist()
            passing = [float((place > level).float().mean()) for level in levels]
            print(f"  {name:24} {' '.join(f'{q:5.2f}' for q in quantiles)} | "
                  f"{' '.join(f'{p:4.0%}' for p in passing)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
