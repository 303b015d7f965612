"""Random directions and plain logits for steering tests on tiny models (shared by several test files)."""

from __future__ import annotations

import torch

from alignment_artifacts.analysis.directions import DirectionSet
from alignment_artifacts.models.generation import encode_batch, format_chat
from alignment_artifacts.steering import MODES

PROMPTS = ["How do locks work?", "Write a poem about the sea.", "Hello", "Tell me about the history of bread."]


def random_directions(loaded, seed=0, k=3) -> DirectionSet:
    g = torch.Generator().manual_seed(seed)
    hidden, layers = loaded.adapter.hidden_size, range(loaded.adapter.n_layers)
    pca = {}
    for layer in layers:
        q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=g))
        pca[layer] = q.T.contiguous()
    return DirectionSet(site="mlp_out", position="last", source="pooled",
                        vectors={layer: torch.randn(hidden, generator=g) for layer in layers},
                        positive_mean={layer: torch.randn(hidden, generator=g) for layer in layers},
                        negative_mean={layer: torch.randn(hidden, generator=g) for layer in layers}, pca=pca,
                        model_id=loaded.info.name, weights_hash=loaded.info.weights_hash, hidden_size=hidden)


def logits(loaded, prompts=PROMPTS):
    texts = [format_chat(loaded.tokenizer, p) for p in prompts]
    ids, mask = encode_batch(loaded.tokenizer, texts, "cpu")
    return loaded.model(input_ids=ids, attention_mask=mask).logits


STEER_MODES = [m for m in MODES if m not in ("none", "auto")]
