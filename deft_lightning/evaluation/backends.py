"""Generation backends for ``evaluate --backend litgpt|hf|vllm``: the same prompts (token ids from the shared
:class:`~deft_lightning.prompting.Prompter`), seeds and sampling settings, whatever the engine.

- ``litgpt`` (default): the LitGPT model with its KV cache (:func:`deft_lightning.generation.generate`).
- ``hf``: transformers' model from an exported Hugging Face directory (a fit's checkpoint is exported on the fly,
  once, into ``<out_dir>/exported/``), decoded by the same request batching and per-request samplers as
  ``litgpt``, so greedy outputs agree and samples follow the same seeds.
- ``vllm``: vLLM on the exported directory (GPU hosts; ``pip install -e ".[vllm]"``), one seed per request.
  vLLM's samplers draw differently from torch's generators: sampled outputs are reproducible per backend, not
  equal across them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from deft_lightning.generation import SamplingConfig, _Sampler, decode, generate, generate_batched
from deft_lightning.loading import ModelRef, load_weights

BACKENDS = ("litgpt", "hf", "vllm")
Backend = Literal["litgpt", "hf", "vllm"]


class Generator(Protocol):
    def __call__(
        self,
        prompts: list[list[int]],
        eos_id: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
        progress: str | None = None,
    ) -> list[list[list[int]]]: ...


def load_generator(backend: Backend, ref: ModelRef, device: torch.device, dtype: torch.dtype, export_dir: Path):
    """A :class:`Generator` for ``ref`` on ``backend``."""
    if backend == "litgpt":
        return functools.partial(generate, load_weights(ref, device, dtype))
    if backend == "vllm":
        require_vllm()
    directory = hf_directory(ref, export_dir)
    if backend == "hf":
        return HFGenerator(directory, device, dtype)
    if backend == "vllm":
        return VLLMGenerator(directory, dtype)
    raise ValueError(f"evaluate: backend must be one of {', '.join(BACKENDS)}, got '{backend}'")


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError(
            'evaluate --backend vllm needs vLLM, an optional extra for GPU hosts: pip install -e ".[vllm]" '
            "(or use --backend litgpt / hf)"
        ) from None


def hf_directory(ref: ModelRef, export_dir: Path) -> Path:
    """``ref`` exported as a Hugging Face directory under ``export_dir``, once per checkpoint content."""
    import hashlib
    import json

    from deft_lightning.export import export

    key = hashlib.sha256(json.dumps(ref.fingerprint(), default=str).encode()).hexdigest()[:12]
    out = Path(export_dir) / f"{ref.name}-{key}"
    if not (out / "config.json").is_file():
        export(ref.path, out, "hf", force=True, tokenizer_dir=ref.tokenizer_dir)
    return out


class HFGenerator:
    """transformers' ``AutoModelForCausalLM`` decoded with a KV cache: prompts left-padded, per-row positions."""

    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
        self.device = device

    def __call__(
        self,
        prompts: list[list[int]],
        eos_id: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
        progress: str | None = None,
    ) -> list[list[list[int]]]:
        run_batch = functools.partial(self._batch, eos_id)
        return generate_batched(run_batch, prompts, sampling, seeds, progress, self.device)

    @torch.no_grad()
    def _batch(self, eos_id: int, prompts: list[list[int]], sampler: _Sampler, max_new: int) -> list[list[int]]:
        longest = max(map(len, prompts))
        tokens = torch.tensor([[eos_id] * (longest - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        output = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = output.past_key_values

        def advance(next_tokens: torch.Tensor, step: int) -> torch.Tensor:
            nonlocal mask, positions, cache
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            step_output = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = step_output.past_key_values
            return step_output.logits[:, -1].float()

        return decode(output.logits[:, -1].float(), advance, sampler, eos_id, max_new)


class VLLMGenerator:
    """vLLM on a Hugging Face directory; prompts go in as token ids, one seeded request per sample."""

    def __init__(self, directory: Path, dtype: torch.dtype) -> None:
        from vllm import LLM

        self.llm = LLM(model=str(directory), dtype=str(dtype).removeprefix("torch."), enforce_eager=False)

    def __call__(
        self,
        prompts: list[list[int]],
        eos_id: int,
        sampling: SamplingConfig,
        seeds: list[int] | None = None,
        progress: str | None = None,
    ) -> list[list[list[int]]]:
        from vllm import SamplingParams, TokensPrompt

        from deft_lightning.generation import _sample_seed

        seeds = list(range(len(prompts))) if seeds is None else seeds
        requests: list[Any] = []
        params = []
        for index, prompt in enumerate(prompts):
            for sample in range(sampling.num_samples):
                requests.append(TokensPrompt(prompt_token_ids=prompt))
                params.append(
                    SamplingParams(
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        seed=_sample_seed(seeds[index], sample) % 2**31,
                        stop_token_ids=[eos_id],
                    )
                )
        results = self.llm.generate(requests, params, use_tqdm=progress is not None)
        outputs = [[[] for _ in range(sampling.num_samples)] for _ in prompts]
        for position, result in enumerate(results):
            ids = [token for token in result.outputs[0].token_ids if token != eos_id]
            outputs[position // sampling.num_samples][position % sampling.num_samples] = ids
        return outputs
