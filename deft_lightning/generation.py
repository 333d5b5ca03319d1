"""Batched greedy / sampled generation with LitGPT's KV cache.

litgpt's ``batched_generate_fn`` needs prompts of one length per batch (its rope and KV caches take one
position vector), so requests are grouped by prompt length and each group runs in batches; ``n`` samples of
one prompt always share a batch. Sampling uses the global torch RNG: seed it for reproducible samples.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from litgpt import GPT
from litgpt.generate.base import batched_generate_fn


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int = 16


@torch.no_grad()  # not inference_mode: the rope cache rebuilt here must stay usable by autograd
def generate(
    model: GPT, prompts: list[list[int]], eos_id: int, sampling: SamplingConfig = SamplingConfig()
) -> list[list[list[int]]]:
    """For each prompt, ``num_samples`` completions (token ids, stopped at and excluding EOS)."""
    if sampling.temperature == 0 and sampling.num_samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives identical samples; set num_samples=1")
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
        by_length[len(prompt)] += [index] * sampling.num_samples
    outputs: list[list[list[int]]] = [[] for _ in prompts]
    was_training, device = model.training, next(model.parameters()).device
    original_max_seq_length = model.max_seq_length
    model.eval()
    sample_args = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": None}
    try:
        for length, indices in sorted(by_length.items()):
            total = length + sampling.max_new_tokens
            if total > model.config.block_size:
                raise ValueError(
                    f"prompt of {length} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                    f"model's block_size {model.config.block_size}"
                )
            model.max_seq_length = total
            for start in range(0, len(indices), sampling.batch_size):
                batch = indices[start : start + sampling.batch_size]
                model.set_kv_cache(batch_size=len(batch), device=device)
                tokens = torch.tensor([prompts[i] for i in batch], device=device)
                completions: list[list[int]] = [[] for _ in batch]
                for step in batched_generate_fn(
                    model,
                    tokens,
                    total,
                    sample_args=sample_args,
                    stop_tokens=([eos_id],),
                    include_prompt=False,
                    include_eos=False,
                ):
                    for completion, token in zip(completions, step, strict=True):
                        if token is not None:
                            completion.append(int(token))
                model.clear_kv_cache()
                for i, completion in zip(batch, completions, strict=True):
                    outputs[i].append(completion)
    finally:
        model.clear_kv_cache()
        model.max_seq_length = original_max_seq_length
        model.train(was_training)
    return outputs
