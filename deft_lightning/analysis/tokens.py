"""Token-level quantities behind the paper's figures, computed from a model and SFT rows (no plotting here).

:func:`token_statistics` runs a model over the trainable (response) tokens of some rows — the same prompt
rendering, masking and truncation as training — and returns per-token log p and the requested statistics in a
fixed order, so two models on the same rows give aligned arrays. The other functions are the figures' numbers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from deft_lightning.data.module import IGNORE_INDEX, collate
from deft_lightning.data.preparation import encode_example
from deft_lightning.objectives import Objective
from deft_lightning.prompting import Prompter
from deft_lightning.statistics import Needs, TokenStats, target_log_probs


@torch.no_grad()
def token_statistics(
    model: torch.nn.Module,
    prompter: Prompter,
    rows: list[dict[str, str]],
    needs: Needs,
    max_seq_length: int,
    batch_size: int = 4,
    progress: str | None = None,
) -> TokenStats:
    """Log p and ``needs`` for every trainable token of ``rows`` (row order, then position), in fp32 on CPU."""
    if not rows:
        raise ValueError("token_statistics: no rows")
    device = next(model.parameters()).device
    examples = []
    for row in rows:
        input_ids, labels, _ = encode_example(prompter, row, max_seq_length)
        examples.append({"input_ids": input_ids, "labels": labels})
    parts: list[TokenStats] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=progress, disable=progress is None, unit="batch"):
        batch = collate(examples[start : start + batch_size])
        logits = model(batch["input_ids"].to(device))
        targets = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).to(device)
        logp, stats = target_log_probs(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), needs)
        computed = {name: getattr(stats, name).float().cpu() for name in needs.requested()}
        parts.append(TokenStats(logp.float().cpu(), stats.vocab_size, **computed))
    if sum(p.logp.numel() for p in parts) == 0:
        raise ValueError("token_statistics: the rows have no trainable tokens (check max_seq_length)")
    merged = {name: torch.cat([getattr(p, name) for p in parts]) for name in needs.requested()}
    return TokenStats(torch.cat([p.logp for p in parts]), parts[0].vocab_size, **merged)


def logit_gradient_norm(stats: TokenStats) -> Tensor:
    """‖softmax − onehot‖₂ per token = √(1 − 2p + Σp²); the logit gradient's norm is the gate times this."""
    return (1 - 2 * stats.prob + stats.collision).clamp_min(0).sqrt()


def gradient_shares(stats: TokenStats, objectives: dict[str, Objective]) -> dict[str, Tensor]:
    """For each objective, each token's share of the total logit-gradient magnitude over these tokens
    (|w_i| · ‖softmax_i − onehot_i‖ / Σ_j ...). Needs the collision statistic (and what the objectives need)."""
    norm = logit_gradient_norm(stats)
    shares = {}
    for name, objective in objectives.items():
        magnitude = objective.weight(stats.logp, stats).abs() * norm
        shares[name] = magnitude / magnitude.sum().clamp_min(torch.finfo(magnitude.dtype).tiny)
    return shares


def probability_fractions(prob: Tensor, low: float = 1e-3, high: float = 0.5) -> dict[str, float]:
    """The fractions of tokens with p < ``low`` and p > ``high``, as in the paper's Figures 3, 4 and 6."""
    return {f"p<{low:g}": float((prob < low).float().mean()), f"p>{high:g}": float((prob > high).float().mean())}


def forgetting_fractions(p_before: Tensor, p_after: Tensor, confident: float = 0.5) -> dict[str, float]:
    """Figure 1's bars: the shares of learned (ΔP > 0) and forgotten (ΔP < 0) tokens, and within each the
    shares of tokens the earlier model was confident (p ≥ ``confident``) or not confident about."""
    delta = p_after - p_before
    learned, forgotten, high = delta > 0, delta < 0, p_before >= confident

    def share(mask: Tensor, within: Tensor) -> float:
        return float((mask & within).sum() / within.sum()) if within.any() else math.nan

    everything = torch.ones_like(learned)
    return {
        "learned": share(learned, everything),
        "forgotten": share(forgotten, everything),
        "learned_high_confidence": share(high, learned),
        "learned_low_confidence": share(~high, learned),
        "forgotten_high_confidence": share(high, forgotten),
        "forgotten_low_confidence": share(~high, forgotten),
    }
