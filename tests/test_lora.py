"""LoRA adapters: only they train, the first step is the full fine-tune's, the fused pass (a LoRA head included)
equals the plain one, checkpoints hold the adapters only and resume exactly, and a merged export gives the LoRA
module's logits."""

import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, tiny_fit_command, write_tiny_checkpoint
from test_model import GradientCapture, OneBatch, trainer, uneven_batch

from deft_lightning.lora import LoRA
from deft_lightning.model import DeftModule
from deft_lightning.objectives import DEFT


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base") / "ckpt")


class FirstLoss(L.Callback):
    def on_train_batch_end(self, trainer, *args) -> None:
        self.loss = getattr(self, "loss", None) or float(trainer.callback_metrics["train/loss"])


def test_only_adapters_train_and_the_first_step_is_the_full_fine_tunes(base):
    batch = uneven_batch()
    losses = {}
    for name, lora in (("full", None), ("lora", LoRA(r=4, alpha=8, targets=["query", "value", "mlp", "head"]))):
        L.seed_everything(0)
        module = DeftModule(objective=DEFT(), checkpoint_dir=base, lora=lora, learning_rate=1e-2)
        first = FirstLoss()
        fit = trainer(max_steps=1, callbacks=[first])
        module.configure_model()
        before = {k: v.clone() for k, v in module.model.state_dict().items()}
        fit.fit(module, datamodule=OneBatch(batch))
        losses[name] = first.loss
        if lora is not None:
            trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
            assert trained and all("lora_" in n for n in trained)
            assert {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]} == {
                id(p) for p in module.model.parameters() if p.requires_grad
            }
            for name_, value in module.model.state_dict().items():
                if "lora_" not in name_:
                    assert torch.equal(value, before[name_]), name_  # the base is frozen
                elif "lora_B" in name_:
                    assert not torch.equal(value, before[name_]), name_  # the adapters moved
    assert losses["lora"] == pytest.approx(losses["full"], rel=1e-6)  # B = 0: the base model's loss


def test_fused_pass_with_a_lora_head_equals_the_plain_path(base):
    grads = []
    for fused in (True, False):
        L.seed_everything(0)
        lora = LoRA(r=4, alpha=8, targets=["query", "head"])
        module = DeftModule(objective=DEFT(), checkpoint_dir=base, lora=lora, fused=fused, gradient_clip=0)
        module.configure_model()
        torch.nn.init.normal_(module.model.lm_head.lora_B, std=0.02)  # a head adapter that already moved
        capture = GradientCapture()
        trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(uneven_batch()))
        grads.append({n: g for n, g in capture.grads[0].items() if g is not None})
    assert "model.lm_head.lora_A" in grads[0]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-7)


def lora_fit(run_dir: Path, base: Path, *extra: str) -> list[str]:
    return tiny_fit_command(
        run_dir,
        "--model.model_config=null",
        f"--model.checkpoint_dir={base}",
        "--model.lora.r=4",
        "--model.lora.alpha=8",
        "--model.lora.targets=[query, value, head]",
        "--trainer.max_steps=12",
        "--checkpoint.every_n_train_steps=4",
        *extra,
    )


def test_checkpoints_hold_the_adapters_resume_exactly_and_export_merged(base, tmp_path):
    import test_resume

    reference = tmp_path / "reference"
    result = subprocess.run(lora_fit(reference, base), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(reference / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    model_keys = [k for k in state if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # the frozen base is read back from checkpoint_dir

    run_dir = tmp_path / "run"
    process = subprocess.Popen(lora_fit(run_dir, base), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    test_resume_wait = test_resume.reached(6)
    while not test_resume_wait(run_dir):
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    resumed = subprocess.run(
        lora_fit(run_dir, base, "--ckpt_path=last"), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert test_resume.logged_steps(run_dir) == list(range(12))
    final = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for name, value in state.items():
        assert torch.equal(final[name], value), name

    from test_export import hf_logits

    from deft_lightning.export import export

    out = export(reference / "checkpoints/last.ckpt", tmp_path / "hf", "hf")
    module = DeftModule(checkpoint_dir=base, lora={"r": 4, "alpha": 8, "targets": ["query", "value", "head"]})
    module.configure_model()
    module.load_state_dict(state, strict=False)  # base from checkpoint_dir, adapters from the fit
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = module.model(ids)  # the LoRA module as trained, adapters not merged
    assert (hf_logits(out, ids) - unmerged).abs().max() <= 1e-4

    from deft_lightning.data import FileSource
    from deft_lightning.evaluation import Continuation
    from deft_lightning.evaluation.run import evaluate

    benchmark = Continuation("tiny", FileSource(ROOT / "data/tiny/val.jsonl"), limit=4, max_new_tokens=4)
    cells = evaluate({"lora": reference / "checkpoints/last.ckpt"}, [benchmark], tmp_path / "eval")["cells"]
    assert cells[0]["model"] == "lora" and "similarity" in cells[0]["metrics"]  # evaluate takes LoRA runs as they are
