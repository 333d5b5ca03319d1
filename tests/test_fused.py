"""The fused projection + objective pass equals the plain (materialized-logits) path for every objective."""

import pytest
import torch

from deft_lightning.fused import fused_objective_loss
from deft_lightning.objectives import (
    ASFT,
    DEFT,
    DFT,
    EAFT,
    NLL,
    PSFT,
    Cayley,
    CayleyReference,
    OnlyBottomP,
    OnlyTopP,
    Power,
    Prob,
    QLog,
)
from deft_lightning.statistics import Needs, target_log_probs

OBJECTIVES = [NLL(), Prob(), QLog(0.0), QLog(0.4), DFT(), EAFT(), EAFT(k=3, gamma=2.0), Cayley(), DEFT()]
OBJECTIVES += [Power(2.0), OnlyTopP(0.02), OnlyBottomP(0.02, log=True)]
ANCHORED = [ASFT(), ASFT(kl_weight=1.0), PSFT(), PSFT(epsilon=0.02)]


def both_paths(objective, hidden, weight, targets, chunk_elements):
    scale = 1.0 / int((targets != -100).sum())
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, token_loss, gate, _, stats = fused_objective_loss(
        h1, w1, targets, objective, scale, Needs(entropy=True, correct=True), chunk_elements=chunk_elements
    )
    fused = (loss, *torch.autograd.grad(loss, (h1, w1)), token_loss, stats, gate)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp2, stats2 = target_log_probs(h2 @ w2.T, targets, objective.needs | Needs(entropy=True, correct=True))
    plain_loss = objective.token_loss(logp2, stats2).sum() * scale
    plain = (
        plain_loss,
        *torch.autograd.grad(plain_loss, (h2, w2)),
        objective.token_loss(logp2, stats2),
        stats2,
        objective.weight(logp2, stats2),
    )
    return fused, plain


@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
def test_fused_gradients_equal_the_plain_path_fp32(objective):
    torch.manual_seed(0)
    hidden, weight = torch.randn(83, 32), torch.randn(517, 32) * 0.3
    targets = torch.randint(0, 517, (83,))
    targets[::5] = -100  # ignored tokens
    fused, plain = both_paths(objective, hidden, weight, targets, chunk_elements=517 * 7)  # uneven: 7-row chunks
    rel = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[0], plain[0], **rel)
    for got, want in zip(fused[1:3], plain[1:3], strict=True):  # d/d hidden, d/d weight
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    torch.testing.assert_close(fused[3], plain[3].detach(), **rel)
    torch.testing.assert_close(fused[4].entropy, plain[4].entropy, **rel)
    assert torch.equal(fused[4].correct, plain[4].correct)
    torch.testing.assert_close(fused[5], plain[5], **rel)


def materialized(objective, hidden, weight, targets, reference, token_weights, scale):
    """The objective written out on whole [tokens × vocab] logits with torch's own ops, autograd for the gradient."""
    keep = targets != -100
    logits = (hidden @ weight.T)[keep]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, targets[keep, None]).squeeze(1)
    q_logits = (reference[0] @ reference[1].T)[keep]
    if isinstance(objective, ASFT):
        kl = torch.nn.functional.kl_div(logp_all, torch.softmax(q_logits, -1), reduction="none").sum(-1)
        loss = -logp.detach().exp() * logp + objective.kl_weight * kl
    else:  # PSFT: −min(r, clip(r, 1 − ε, 1 + ε))
        ratio = (logp - torch.log_softmax(q_logits, -1).gather(1, targets[keep, None]).squeeze(1)).exp()
        loss = -torch.minimum(ratio, ratio.clamp(1 - objective.epsilon, 1 + objective.epsilon))
    return (loss * token_weights[keep]).sum() * scale


@pytest.mark.parametrize("objective", ANCHORED, ids=repr)
def test_fused_anchored_objectives_equal_the_materialized_formula_fp64(objective):
    """ASFT's KL(π_ref ‖ π_θ) and PSFT's clipped ratio through the fused pass, chunked, with row weights, against the
    formula on materialized logits: loss and both gradients to 1e-6."""
    torch.manual_seed(5)
    hidden, weight = torch.randn(61, 16, dtype=torch.float64), torch.randn(97, 16, dtype=torch.float64) * 0.4
    reference = (hidden + 0.1 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight))
    targets = torch.randint(0, 97, (61,))
    targets[::7] = -100
    token_weights = torch.rand(61, dtype=torch.float64) + 0.5
    scale = 1 / float(token_weights[targets != -100].sum())
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_objective_loss(
        h1, w1, targets, objective, scale, chunk_elements=97 * 6, reference=reference, token_weights=token_weights
    )[0]
    got = (loss, *torch.autograd.grad(loss, (h1, w1)))
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want_loss = materialized(objective, h2, w2, targets, reference, token_weights, scale)
    want = (want_loss, *torch.autograd.grad(want_loss, (h2, w2)))
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_fused_token_weights_scale_each_rows_loss_and_gradient():
    torch.manual_seed(6)
    hidden, weight, targets = torch.randn(20, 8), torch.randn(30, 8), torch.randint(0, 30, (20,))
    token_weights = torch.zeros(20)
    token_weights[:10] = 2.0
    h1 = hidden.clone().requires_grad_()
    loss = fused_objective_loss(h1, weight, targets, DEFT(), 0.1, token_weights=token_weights)[0]
    (grad,) = torch.autograd.grad(loss, h1)
    h2 = hidden[:10].clone().requires_grad_()
    want = fused_objective_loss(h2, weight, targets[:10], DEFT(), 0.2)[0]
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad[:10], torch.autograd.grad(want, h2)[0])
    assert grad[10:].abs().sum() == 0


def test_fused_handles_bf16_inputs_and_no_kept_rows():
    torch.manual_seed(1)
    hidden, weight = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(40, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 40, (16,))
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, token_loss, _, logp, _ = fused_objective_loss(h, w, targets, DEFT(), 1 / 16)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == token_loss.dtype == logp.dtype == torch.float32
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16 and torch.isfinite(grad_w.float()).all()
    h2 = hidden.detach().requires_grad_()
    empty = fused_objective_loss(h2, weight, torch.full((16,), -100), DEFT(), 1.0)[0]
    assert empty.item() == 0
    assert torch.autograd.grad(empty, h2)[0].abs().sum() == 0


def test_fused_gradients_follow_the_upstream_gradient():
    """Backward hands out the stored gradients as they are for ∂/∂loss = 1 and scales them otherwise."""
    torch.manual_seed(2)
    hidden, weight = torch.randn(12, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (12,))
    unit = torch.autograd.grad(fused_objective_loss(hidden, weight, targets, DEFT(), 1 / 12)[0], (hidden, weight))
    scaled_loss = fused_objective_loss(hidden, weight, targets, DEFT(), 1 / 12)[0] * -2.5
    for got, want in zip(torch.autograd.grad(scaled_loss, (hidden, weight)), unit, strict=True):
        torch.testing.assert_close(got, -2.5 * want)


def test_batch_dependent_objectives_are_refused():
    with pytest.raises(ValueError, match="plain path"):
        fused_objective_loss(torch.randn(4, 8), torch.randn(10, 8), torch.arange(4), CayleyReference(), 1.0)


def test_bench_loss_runs_every_case_in_fresh_processes():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "deft_lightning", "bench", "loss", "--size", "tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    assert "failed" not in table
    for case in ("materialized NLL", "litgpt chunked CE", "reference DEFT", "fused DEFT", "fused EAFT"):
        assert case in table
