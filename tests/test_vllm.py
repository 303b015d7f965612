"""vLLM loads the baked `hf` export as the plain checkpoint it is (runs only where vllm and a CUDA GPU are)."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")


def test_vllm_runs_the_baked_export_like_the_hooks(tmp_path):
    from alignment_artifacts.export import export
    from alignment_artifacts.models.generation import format_chat
    from alignment_artifacts.steering import Steering, SteeringConfig, apply_steering
    from test_export import PROMPTS
    from tiny_models import tiny_model
    from tiny_steering import random_directions

    loaded = tiny_model("llama", hidden=256)  # head size 64, which every vLLM attention backend takes
    directions = random_directions(loaded)
    config = SteeringConfig(mode="ablate", direction_layer=2)
    out = export(loaded, Steering(config, directions), tmp_path / "baked")
    assert not list(out.glob("*.py"))  # no custom code to trust
    rows = [loaded.tokenizer(format_chat(loaded.tokenizer, p), add_special_tokens=False).input_ids for p in PROMPTS]
    with torch.no_grad(), apply_steering(loaded, config, directions):
        hooked = [loaded.model(input_ids=torch.tensor([r])).logits[0, -1].log_softmax(-1) for r in rows]

    llm = vllm.LLM(model=str(out), dtype="float16", enforce_eager=True, gpu_memory_utilization=0.2,
                   max_model_len=256, skip_tokenizer_init=True, seed=0)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    results = llm.generate([{"prompt_token_ids": r} for r in rows], params)
    for result, expected in zip(results, hooked):
        top = result.outputs[0].logprobs[0]
        for token_id, logprob in top.items():  # vLLM's top-5 against the hooked model, in float16 precision
            assert abs(logprob.logprob - float(expected[token_id])) < 0.03, token_id
        first, second = expected.topk(2).values.tolist()
        if first - second > 0.05:  # greedy agrees wherever the hooked model's choice is clear
            assert result.outputs[0].token_ids[0] == int(expected.argmax())
