"""LoRA adapters on LitGPT backbones (``litgpt.lora``): ``model.lora: {r, alpha, dropout, targets}``.

Only the adapters train and the optimizer holds only them; every objective, the fused pass (a LoRA head included:
the pass uses the head's merged weight W + (α/r)·B·A, through which the adapters get their gradient), the global
token mean, resume and the sharded strategies work as for full fine-tuning. Adapters start with B = 0, so the first
step's loss is the base model's.

Checkpoints: when the base weights can be read back from ``model.checkpoint_dir``, a fit's checkpoints hold only the
adapters (and their optimizer state) — a resume, ``evaluate`` and ``export`` rebuild the model from the base
directory plus the adapters, and ``export`` writes merged weights. A LoRA fit of a random-init model keeps the full
state, since nothing else holds its base, and so do sharded (FSDP) checkpoints, whose loader needs every key (each
rank stores only its shard of the base).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

#: the weights adapters can target, as litgpt.lora names them (lora_<target>)
TARGETS = ("query", "key", "value", "projection", "mlp", "head")


@dataclass
class LoRA:
    """Args:
    r: the adapters' rank.
    alpha: scaling numerator: the update is (alpha / r) · B·A.
    dropout: dropout on the adapters' input (the fused pass needs 0 for a head adapter; else the plain path).
    targets: among query, key, value, projection, mlp, head; LitGPT's default is query and value.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if self.r < 1 or not self.targets or unknown:
            raise ValueError(
                f"model.lora: r must be >= 1 and targets a non-empty subset of {', '.join(TARGETS)} "
                f"(got r={self.r}, targets={self.targets})"
            )

    def litgpt_config(self, base: Any) -> Any:
        """``base`` (a litgpt Config) with these adapters, as a ``litgpt.lora.Config``."""
        from litgpt.lora import Config

        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}  # not derived ones
        flags = {f"lora_{target}": target in self.targets for target in TARGETS}
        return Config(**fields, lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, **flags)


def as_lora(spec: LoRA | dict[str, Any] | None) -> LoRA | None:
    return LoRA(**spec) if isinstance(spec, dict) else spec


def plain(spec: LoRA | None) -> dict[str, Any] | None:
    return asdict(spec) if spec is not None else None


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The output head's effective weight: ``W`` of a plain or LoRA linear, plus ``(α/r)·B·A`` when it is adapted."""
    linear = getattr(head, "linear", head)
    if getattr(head, "r", 0) > 0 and not getattr(head, "merged", False):
        return linear.weight + head.get_lora_AB()
    return linear.weight


@contextmanager
def adapters_off(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the LoRA model computes its base: every adapter's rank reads 0, so litgpt's layers (and
    :func:`head_weight`) skip them — the reference of anchored objectives, with no second copy of the weights."""
    from litgpt.lora import LoRALayer

    layers = [module for module in model.modules() if isinstance(module, LoRALayer)]
    ranks = [layer.r for layer in layers]
    for layer in layers:
        layer.r = 0
    try:
        yield
    finally:
        for layer, rank in zip(layers, ranks, strict=True):
            layer.r = rank


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA GPT's weights merged into the plain GPT's names (what export and evaluation load)."""
    from litgpt.lora import lora_filter, merge_lora_weights

    merge_lora_weights(model)
    return {
        name.replace("linear.", ""): value for name, value in model.state_dict().items() if not lora_filter(name, value)
    }
