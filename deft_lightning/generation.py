"""Batched greedy / sampled generation with LitGPT's KV cache, for prompts of any mix of lengths.

litgpt's own ``batched_generate_fn`` takes one position vector per batch, so it needs prompts of equal length.
LitGPT's ``GPT`` also accepts per-row positions (``input_pos`` of shape ``[B, T]``), which is all ragged
batching needs: prompts are right-padded for the prefill, and each row then decodes at its own next position.
A row's pad slots in the KV cache lie after its last real token, so the causal mask hides them until the row
overwrites them with its own generated tokens. Only the last prompt position's logits are computed.

Sampling is reproducible per request, independent of batch size and order: sample ``k`` of prompt ``i`` draws
from its own generator seeded by ``(seeds[i], k)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from litgpt import GPT
from litgpt.generate.base import sample_top_p
from torch import Tensor
from tqdm.auto import tqdm


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.temperature == 0 and self.num_samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives identical samples; set num_samples=1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"invalid sampling settings: {self}")


@contextmanager
def _head_on_positions(model: GPT, positions: Tensor) -> Iterator[None]:
    """Feed the output head only the final-norm output at ``positions[b]`` of each row ``b``."""
    rows = torch.arange(positions.numel(), device=positions.device)
    hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out[rows, positions].unsqueeze(1))
    try:
        yield
    finally:
        hook.remove()


def _set_max_seq_length(model: GPT, length: int) -> None:
    """LitGPT rebuilds the RoPE tables in fp32 on every change; keep the dtype they had (bf16 in a ``bf16-true``
    model), so generating in the middle of a fit does not change the training numerics after it."""
    dtype = model.cos.dtype
    model.max_seq_length = length
    model.cos, model.sin = model.cos.to(dtype), model.sin.to(dtype)


def _sample_seed(seed: int, sample: int) -> int:
    return (seed * 1_000_003 + sample * 7_919 + 12_345) % (2**63)


class _Sampler:
    """Next tokens from ``[B, V]`` logits: greedy, or per-row generators (top-p as in ``litgpt.generate``)."""

    def __init__(self, sampling: SamplingConfig, seeds: list[int], device: torch.device) -> None:
        self.sampling = sampling
        self.generators = []
        if sampling.temperature > 0:
            for seed in seeds:
                generator = torch.Generator(device=device)
                generator.manual_seed(seed)
                self.generators.append(generator)

    def __call__(self, logits: Tensor) -> Tensor:
        if not self.generators:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.sampling.temperature
        tokens = []
        for row, generator in zip(logits, self.generators, strict=True):
            if self.sampling.top_p < 1:
                row = sample_top_p(row, self.sampling.top_p)
            tokens.append(torch.multinomial(torch.softmax(row, dim=-1), 1, generator=generator))
        return torch.cat(tokens)


def _generate_batch(model: GPT, eos_id: int, prompts: list[list[int]], sampler: _Sampler, max_new: int) -> list:
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())
    model.clear_kv_cache()  # the previous batch's cache is shorter or larger than this one needs
    _set_max_seq_length(model, longest + max_new)
    model.set_kv_cache(batch_size=len(prompts), device=device)
    tokens = torch.tensor([p + [eos_id] * (longest - len(p)) for p in prompts], device=device)
    positions = torch.arange(longest, device=device).expand(len(prompts), -1)
    with _head_on_positions(model, lengths - 1):
        logits = model(tokens, positions, input_pos_maxp1=longest)[:, -1]

    def advance(next_tokens: Tensor, step: int) -> Tensor:
        positions = (lengths + step).unsqueeze(1)
        return model(next_tokens.unsqueeze(1), positions, input_pos_maxp1=longest + step + 1)[:, -1]

    return decode(logits, advance, sampler, eos_id, max_new)


def decode(
    logits: Tensor, advance: Callable[[Tensor, int], Tensor], sampler: _Sampler, eos_id: int, max_new: int
) -> list[list[int]]:
    """Up to ``max_new`` tokens per row: sample from ``logits [B, V]``, then ``advance(tokens, step)`` gives the
    next logits; a row stops at its EOS (not included). Shared by every backend's batch."""
    completions: list[list[int]] = [[] for _ in range(logits.shape[0])]
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(max_new):
        next_tokens = sampler(logits)
        done |= next_tokens == eos_id
        for completion, token, finished in zip(completions, next_tokens.tolist(), done.tolist(), strict=True):
            if not finished:
                completion.append(token)
        if bool(done.all()) or step == max_new - 1:
            break
        logits = advance(next_tokens, step)
    return completions


#: ``run_batch(prompts, sampler, max_new_tokens) -> completions``: one batch of requests through some model
BatchFn = Callable[[list[list[int]], "_Sampler", int], list[list[int]]]


def generate_batched(
    run_batch: BatchFn,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    seeds: list[int] | None,
    progress: str | None,
    device: torch.device,
) -> list[list[list[int]]]:
    """The requests (``num_samples`` per prompt) sorted by prompt length so a batch needs little padding, each
    batch decoded by ``run_batch`` with its own per-request sampler; shared by every generation backend."""
    seeds = list(range(len(prompts))) if seeds is None else seeds
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty")
    requests = sorted(
        ((i, k) for i in range(len(prompts)) for k in range(sampling.num_samples)), key=lambda r: len(prompts[r[0]])
    )
    outputs: list[list[list[int]]] = [[[] for _ in range(sampling.num_samples)] for _ in prompts]
    bar = tqdm(total=len(requests), desc=progress, unit="seq", disable=progress is None, dynamic_ncols=True)
    try:
        for start in range(0, len(requests), sampling.batch_size):
            batch = requests[start : start + sampling.batch_size]
            sampler = _Sampler(sampling, [_sample_seed(seeds[i], k) for i, k in batch], device)
            completions = run_batch([prompts[i] for i, _ in batch], sampler, sampling.max_new_tokens)
            for (i, k), completion in zip(batch, completions, strict=True):
                outputs[i][k] = completion
            bar.update(len(batch))
    finally:
        bar.close()
    return outputs


@torch.no_grad()  # not inference_mode: the rope cache rebuilt here must stay usable by autograd
def generate(
    model: GPT,
    prompts: list[list[int]],
    eos_id: int,
    sampling: SamplingConfig = SamplingConfig(),
    seeds: list[int] | None = None,
    progress: str | None = None,
) -> list[list[list[int]]]:
    """For each prompt, ``sampling.num_samples`` completions (token ids, stopped at and excluding EOS).

    Args:
        seeds: one seed per prompt for sampling (default: the prompt's index); ignored when greedy.
        progress: show a progress bar with this description.
    """
    for index, prompt in enumerate(prompts):
        if len(prompt) + sampling.max_new_tokens > model.config.block_size:
            raise ValueError(
                f"prompt {index} has {len(prompt)} tokens; with {sampling.max_new_tokens} new tokens that "
                f"exceeds the model's block_size {model.config.block_size}"
            )
    was_training, device = model.training, next(model.parameters()).device
    original_max_seq_length = model.max_seq_length
    model.eval()
    try:
        run_batch = functools.partial(_generate_batch, model, eos_id)
        return generate_batched(run_batch, prompts, sampling, seeds, progress, device)
    finally:
        model.clear_kv_cache()
        _set_max_seq_length(model, original_max_seq_length)
        model.train(was_training)
