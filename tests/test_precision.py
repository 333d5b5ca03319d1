"""Correct at the users' precision: bf16-mixed (CPU autocast has CUDA's dtype rules), gates down to 1e-20 with
full relative precision, fp32 statistics whatever autocast says, and the edges (−inf logits, ties, logging)."""

import csv
import math

import lightning as L
import pytest
import torch
from test_model import TINY, GradientCapture, OneBatch, trainer, uneven_batch
from test_objectives import reference_gate

from deft_lightning.fused import fused_objective_loss
from deft_lightning.model import DeftModule, cosine_with_warmup
from deft_lightning.objectives import (
    ASFT,
    DEFT,
    DFT,
    EAFT,
    NLL,
    PSFT,
    Cayley,
    CayleyReference,
    Objective,
    OnlyBottomP,
    OnlyTopP,
    Power,
    Prob,
    QLog,
)
from deft_lightning.statistics import Needs, target_log_probs

OBJECTIVES = [NLL(), Prob(), QLog(0.3), QLog(1.0), DFT(), EAFT(), Cayley(), CayleyReference(), DEFT()]
OBJECTIVES += [Power(1.5), OnlyTopP(0.1, log=True), OnlyBottomP(0.1)]  # p^k of log p = −45 fits fp32 for k < 2
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def autocast():
    return torch.autocast(**BF16)


def test_fused_backward_under_bf16_autocast():
    """The issue's repro: fp32 hidden states, autocast on — used to fail in index_copy_ (Float vs BFloat16)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (10,))
    with autocast():
        loss, token_loss, _, logp, stats = fused_objective_loss(hidden, weight, targets, DEFT(), 0.1)
        loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    assert loss.dtype == token_loss.dtype == logp.dtype == stats.collision.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("objective", [ASFT(), PSFT()], ids=repr)
def test_anchored_statistics_are_fp32_under_bf16_autocast(objective):
    """The reference's logits are formed like the model's: bf16 operands, fp32 products, fp32 KL and log q_y."""
    torch.manual_seed(3)
    hidden, weight = torch.randn(40, 32, requires_grad=True), torch.randn(300, 32, requires_grad=True)
    reference = (torch.randn(40, 32), torch.randn(300, 32))
    targets = torch.randint(0, 300, (40,))
    with autocast():
        loss, token_loss, _, _, stats = fused_objective_loss(
            hidden, weight, targets, objective, 0.1, reference=reference
        )
        loss.backward()
    assert token_loss.dtype == stats.reference_kl.dtype == stats.reference_logp.dtype == torch.float32
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()
    exact = torch.log_softmax(reference[0].bfloat16().double() @ reference[1].bfloat16().double().T, -1)
    exact = exact.gather(1, targets[:, None]).squeeze(1)
    assert (stats.reference_logp.double() - exact).abs().max() < 1e-4


def test_fused_logits_are_fp32_products_of_bf16_operands():
    """Under autocast the operands are rounded to bf16 (as autocast's linear does), the logits are not."""
    torch.manual_seed(1)
    hidden, weight = torch.randn(64, 96), torch.randn(2000, 96) * 0.3
    targets = torch.randint(0, 2000, (64,))
    with autocast():
        logp = fused_objective_loss(hidden, weight, targets, NLL(), 1.0)[3]
    exact = torch.log_softmax(hidden.bfloat16().double() @ weight.bfloat16().double().T, -1)
    exact = exact.gather(1, targets[:, None]).squeeze(1)
    assert (logp.double() - exact).abs().max() < 1e-4
    rounded = torch.log_softmax((hidden.bfloat16() @ weight.bfloat16().T).double(), -1)  # bf16 logits
    assert (rounded.gather(1, targets[:, None]).squeeze(1) - exact).abs().max() > 1e-3  # what we avoid


def test_statistics_are_fp32_under_autocast():
    """The collision bmm is on autocast's bf16 list; statistics must not follow it."""
    torch.manual_seed(2)
    logits, targets = torch.randn(48, 4096) * 3, torch.randint(0, 4096, (48,))
    needs = Needs(entropy=True, collision=True, top_k=20, correct=True)
    _, want = target_log_probs(logits, targets, needs)
    with autocast():
        _, got = target_log_probs(logits, targets, needs)
    for name in ("collision", "entropy", "topk_entropy"):
        value = getattr(got, name)
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, getattr(want, name), rtol=1e-6, atol=0)


def conflict_logits(rows: int, vocab: int, logp: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Confident conflicts: one competitor holds nearly all mass (α = Σp² ≈ 1), the target has log p ≈ `logp`."""
    logits = torch.randn(rows, vocab, dtype=torch.float64)
    logits[:, 1] = -logp + torch.linspace(0, 5, rows, dtype=torch.float64)  # log p from `logp` to `logp` − 5
    return logits.to(dtype), torch.zeros(rows, dtype=torch.long)


def logit_cases(dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(3)
    vocab = 1000
    spread = torch.randn(32, vocab, dtype=dtype) * 4
    uniform = torch.randn(32, vocab, dtype=dtype) * 1e-3  # α = Σp² ≈ 1/V
    return {
        "spread": (spread, torch.randint(0, vocab, (32,))),
        "near-uniform": (uniform, torch.randint(0, vocab, (32,))),
        "conflict": conflict_logits(32, vocab, -40.0, dtype),  # log p down to −45, gates down to ~1e-20
    }


def plain_logit_grad(objective: Objective, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(logits, targets).sum(), logits)
    return grad


def fused_logit_grad(objective: Objective, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Through the fused pass with an identity head, so ∂/∂hidden is exactly ∂/∂logits."""
    hidden = logits.detach().requires_grad_(True)
    identity = torch.eye(logits.shape[1], dtype=logits.dtype)
    (grad,) = torch.autograd.grad(fused_objective_loss(hidden, identity, targets, objective, 1.0)[0], hidden)
    return grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("path", ["plain", "fused"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=repr)
def test_logit_gradient_matches_fp64_closed_form_per_row(objective, path, dtype):
    """gate · (softmax − onehot) in fp64 from the same logits; each row to a relative tolerance, however small
    its gate (p^α with log p ≈ −45 and α ≈ 1 is ~1e-20: exactly 0 before, from expm1's backward)."""
    if path == "fused" and objective.batch_dependent:
        pytest.skip("batch-dependent objectives take the plain path")
    tolerance = 2e-5 if dtype == torch.float32 else 1e-10
    grad_of = plain_logit_grad if path == "plain" else fused_logit_grad
    for case, (logits, targets) in logit_cases(dtype).items():
        exact_logits = logits.double()
        error = torch.softmax(exact_logits, -1) - torch.nn.functional.one_hot(targets, logits.shape[1])
        want = reference_gate(objective, exact_logits, targets)[:, None] * error
        got = grad_of(objective, logits, targets).double()
        scale = want.norm(dim=1)
        relative = (got - want).norm(dim=1) / torch.where(scale > 0, scale, 1)  # a masked token's gate: exactly 0
        assert relative.max() < tolerance, f"{case}: worst row {relative.argmax()} off by {relative.max():.2e}"
        if case == "conflict" and (isinstance(objective, DEFT | Prob) or getattr(objective, "alpha", 0) == 1):
            assert want.norm(dim=1).min() < 1e-17  # the gates really are that small


def test_deformed_log_gate_of_a_confident_conflict_is_not_flushed():
    """The issue's repro: fp32, V = 1000, log p ≈ −28.9, α ≈ 1 → ∂loss/∂log p = −p^α ≈ −2.9e-13, not −0.0."""
    torch.manual_seed(4)
    logits = torch.randn(1, 1000) * 4
    logits[0, logits.argmax()] = 30.0
    target = torch.tensor([int((logits.argmax() + 1) % 1000)])
    logp, stats = target_log_probs(logits, target, DEFT.needs, ignore_index=None)
    gate = DEFT().weight(logp, stats)
    exact = torch.exp(stats.collision.double() * logp.double())
    assert gate.item() > 0
    torch.testing.assert_close(gate.double(), exact, rtol=1e-5, atol=0)


def test_eaft_is_finite_with_fewer_than_k_finite_logits():
    logits = torch.full((3, 50), -math.inf)
    logits[:, :4] = torch.tensor([2.0, 1.0, 0.5, -1.0])  # 4 finite logits, k = 20
    targets = torch.tensor([0, 1, 3])
    logits.requires_grad_(True)
    loss = EAFT(k=20)(logits, targets)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    top = torch.softmax(logits.detach()[:, :4].double(), -1)
    torch.testing.assert_close(
        EAFT(k=20).weight(*target_log_probs(logits.detach(), targets, Needs(top_k=20), ignore_index=None)),
        (-(top * top.log()).sum(-1) / math.log(20)).float(),
    )


def test_accuracy_counts_a_target_tied_with_the_maximum():
    logits = torch.tensor([[3.0, 3.0, 1.0], [3.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    targets = torch.tensor([1, 0, 1])
    _, stats = target_log_probs(logits, targets, Needs(correct=True), ignore_index=None)
    assert stats.correct.tolist() == [1.0, 1.0, 0.0]


def gradients(precision: str, fused: bool, objective: Objective) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = DeftModule(objective=objective, model_config=TINY, micro_batch_size=2, gradient_clip=0, fused=fused)
    capture = GradientCapture()
    trainer(precision=precision, callbacks=[capture]).fit(module, datamodule=OneBatch(uneven_batch()))
    return capture.grads[0]


#: relative (Frobenius) error bound of a parameter's gradient under bf16-mixed against fp32, either path
BF16_GRADIENT_BOUND = 0.02  # measured: at most 0.0096 for NLL, DEFT, EAFT, Cayley, −p, DFT


@pytest.mark.parametrize("objective", [NLL(), DEFT(), EAFT()], ids=repr)
def test_bf16_mixed_fit_fused_matches_plain(objective):
    """A Trainer(precision="bf16-mixed") step trains through the fused pass, and its gradients are as close to
    the fp32 ones as the plain (materialized bf16 logits) path's are, within the stated bound."""
    reference = gradients("32-true", fused=True, objective=objective)
    fused = gradients("bf16-mixed", fused=True, objective=objective)
    plain = gradients("bf16-mixed", fused=False, objective=objective)
    for name, want in reference.items():
        for path, got in (("fused", fused), ("plain", plain)):
            assert got[name].dtype == torch.float32
            error = ((got[name] - want).norm() / want.norm()).item()
            assert error < BF16_GRADIENT_BOUND, f"{path} {name}: {error:.3g}"


class Sometimes(Objective):
    """NLL, poisoned with NaN on the steps in ``nan_steps`` (the module sets ``step`` before each)."""

    def __init__(self, nan_steps: tuple[int, ...] = ()) -> None:
        self.nan_steps = nan_steps
        self.step = 0

    def token_loss(self, logp, stats):
        return -logp * (math.nan if self.step in self.nan_steps else 1.0)


class StepCounter(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.objective.step = batch_idx


def logged_rows(tmp_path, log_every_n_steps: int) -> tuple[DeftModule, dict[int, dict[str, str]]]:
    from lightning.pytorch.loggers import CSVLogger

    batch = uneven_batch()

    class Repeat(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([batch] * 8, batch_size=None)

    L.seed_everything(0)
    module = DeftModule(objective=Sometimes((5,)), model_config=TINY, warmup_ratio=0.5)
    logger = CSVLogger(tmp_path / str(log_every_n_steps), name="", version="")
    fit = trainer(max_steps=8, logger=logger, log_every_n_steps=log_every_n_steps, callbacks=[StepCounter()])
    fit.fit(module, Repeat())
    with open(tmp_path / str(log_every_n_steps) / "metrics.csv") as handle:
        return module, {int(row["step"]): row for row in csv.DictReader(handle) if row["train/loss"]}


def test_logged_rows_follow_the_steps_through_a_skipped_step(tmp_path):
    """The lr column is the rate each step used; a skipped step (no update) is a step and a row of its own, and
    with log_every_n_steps > 1 every row carries its own step's statistics."""
    module, every = logged_rows(tmp_path, 1)
    assert sorted(every) == list(range(8))
    assert module.skipped_steps == 1 and module.global_step == 8
    for step, row in every.items():
        assert float(row["train/lr"]) == pytest.approx(5e-5 * cosine_with_warmup(step, 4, 8, 0.0)), step
        assert float(row["train/skipped_steps"]) == (step >= 5)
    _, second = logged_rows(tmp_path, 2)
    assert sorted(second) == [1, 3, 5, 7]
    for step, row in second.items():
        for name in ("train/loss", "train/entropy", "train/collision", "train/lr", "train/skipped_steps"):
            assert row[name] == every[step][name], (step, name)
