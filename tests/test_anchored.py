"""ASFT and PSFT in the LightningModule: the reference (a frozen copy, or the LoRA base with its adapters off), the
gradient of a whole step against the formula on materialized logits, and PSFT's snapshot kept in checkpoints."""

import copy

import lightning as L
import pytest
import torch
from test_model import TINY, GradientCapture, OneBatch, trainer, uneven_batch

from deft_lightning.lora import LoRA, adapters_off
from deft_lightning.model import DeftModule, shift_labels
from deft_lightning.objectives import ASFT, DFT, PSFT

LORA = LoRA(r=4, alpha=8, targets=["query", "value", "head"])


def drifted(objective, lora=None, fused=True, micro_batch_size=None) -> DeftModule:
    """A configured module whose trained weights have drifted from its reference (else KL = 0 and r = 1)."""
    L.seed_everything(0)
    module = DeftModule(
        objective=objective,
        model_config=TINY,
        gradient_clip=0,
        fused=fused,
        lora=lora,
        micro_batch_size=micro_batch_size,
    )
    module.configure_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if lora is None or "lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def formula_gradients(module: DeftModule, batch: dict) -> dict[str, torch.Tensor]:
    """The objective on materialized logits of a copy of the module, reference logits from its frozen model or from
    its base with the adapters off, and autograd for the gradient of the step's token mean."""
    module = copy.deepcopy(module)
    model, objective = module.model, module.objective
    with torch.no_grad():
        if module.reference is not None:
            reference = module.reference(batch["input_ids"])
        else:
            with adapters_off(model):
                reference = model(batch["input_ids"])
    logits = model(batch["input_ids"])
    targets = shift_labels(batch["labels"])
    kept = targets != -100
    logp_all = torch.log_softmax(logits[kept], -1)
    logp = logp_all.gather(1, targets[kept][:, None]).squeeze(1)
    if isinstance(objective, ASFT):
        kl = torch.nn.functional.kl_div(logp_all, torch.softmax(reference[kept], -1), reduction="none").sum(-1)
        loss = -logp.detach().exp() * logp + objective.kl_weight * kl
    else:
        old = torch.log_softmax(reference[kept], -1).gather(1, targets[kept][:, None]).squeeze(1)
        ratio = (logp - old).exp()
        loss = -torch.minimum(ratio, ratio.clamp(1 - objective.epsilon, 1 + objective.epsilon))
    (loss.sum() / kept.sum()).backward()
    return {f"model.{name}": p.grad for name, p in model.named_parameters() if p.grad is not None}


CASES = [(ASFT(kl_weight=0.5), None), (ASFT(kl_weight=0.5), LORA), (PSFT(epsilon=0.1, refresh_every=100), None)]


@pytest.mark.parametrize("path", ["fused", "plain", "micro-batches"])
@pytest.mark.parametrize(("objective", "lora"), CASES, ids=["ASFT", "ASFT-LoRA", "PSFT"])  # PSFT + LoRA: refused
def test_step_gradient_is_the_anchored_formula(objective, lora, path):
    batch = uneven_batch()
    module = drifted(objective, lora, fused=path != "plain", micro_batch_size=1 if path == "micro-batches" else None)
    if isinstance(objective, PSFT):
        module.objective.refresh_reference_every = 0  # keep the drifted reference for this step
    want = formula_gradients(module, batch)
    capture = GradientCapture()
    trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(batch))
    got = capture.grads[0]
    assert set(want) == set(got)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_asft_at_the_start_is_dft_and_lora_reads_no_second_copy():
    """Step 0: the reference is the model, KL = 0 and its gradient (p − q) is exactly 0 — ASFT's step is DFT's, bit
    for bit. Under LoRA the module holds no reference model and no tensor besides the LoRA model's."""
    batch = uneven_batch()
    grads = {}
    for objective in (ASFT(), DFT()):
        L.seed_everything(0)
        module = DeftModule(objective=objective, model_config=TINY, gradient_clip=0)
        capture = GradientCapture()
        trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(batch))
        grads[type(objective).__name__] = capture.grads[0]
    assert grads["ASFT"].keys() == grads["DFT"].keys()
    for name, grad in grads["DFT"].items():
        assert torch.equal(grads["ASFT"][name], grad), name

    lora_asft, lora_dft = drifted(ASFT(), LORA), drifted(DFT(), LORA)
    assert lora_asft.reference is None
    assert sum(t.numel() for t in lora_asft.state_dict().values()) == sum(
        t.numel() for t in lora_dft.state_dict().values()
    )
    full = drifted(ASFT())
    assert (
        full.reference is not None and full.reference.lm_head.weight.data_ptr() != full.model.lm_head.weight.data_ptr()
    )
    assert not any(p.requires_grad for p in full.reference.parameters())


def test_psft_refreshes_its_snapshot_every_k_steps():
    batch = uneven_batch()
    L.seed_everything(0)
    module = DeftModule(objective=PSFT(refresh_every=2), model_config=TINY, learning_rate=1e-2, warmup_ratio=0)
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append(
                (copy.deepcopy(pl_module.reference.state_dict()), copy.deepcopy(pl_module.model.state_dict()))
            )

    weights_before = []

    class Before(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            weights_before.append(copy.deepcopy(pl_module.model.state_dict()))

    trainer(max_steps=4, callbacks=[Before(), Record()]).fit(module, datamodule=OneBatch(batch))
    for step, (reference, _) in enumerate(snapshots):
        start = weights_before[step - step % 2]  # refreshed at steps 0 and 2, from the weights before that step
        for name, value in reference.items():
            assert torch.equal(value, start[name]), (step, name)
    assert not torch.equal(snapshots[1][0]["lm_head.weight"], snapshots[1][1]["lm_head.weight"])


def test_psft_resume_is_exact_with_the_snapshot_in_the_checkpoint(tmp_path):
    """Four steps straight equal three, a checkpoint, a fresh module and the fourth: step 3 reads the snapshot taken
    at step 2, which only the checkpoint holds."""
    batch = uneven_batch()

    def module():
        L.seed_everything(0)
        return DeftModule(objective=PSFT(refresh_every=2), model_config=TINY, learning_rate=1e-2, warmup_ratio=0)

    straight = module()
    trainer(max_steps=4).fit(straight, datamodule=OneBatch(batch))

    class StopAfterThree(L.Callback):  # an interruption: the same 4-step schedule, stopped after step 3
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step == 3

    first = module()
    run = trainer(max_steps=4, callbacks=[StopAfterThree()])
    run.fit(first, datamodule=OneBatch(batch))
    assert run.global_step == 3
    run.save_checkpoint(tmp_path / "step3.ckpt")
    assert any(k.startswith("reference.") for k in torch.load(tmp_path / "step3.ckpt", weights_only=True)["state_dict"])
    resumed = module()
    trainer(max_steps=4).fit(resumed, datamodule=OneBatch(batch), ckpt_path=tmp_path / "step3.ckpt")
    for (name, want), got in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
