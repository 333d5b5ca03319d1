"""The regime lab: its fine-tuning step is DeftModule's (loss and gradients), it runs end to end from the command
line with ASCII objective names, gives identical numbers when repeated, and `analyze prior` places a model beside
its regimes."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from deft_lightning.lab import Settings, finetune, pretrained, run_lab
from deft_lightning.model import DeftModule, shift_labels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "seeds": 2,
    "language": {"symbols": 16, "length": 4, "noise": 0.2},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "pretrain": {"items": 600, "steps": 40, "batch_size": 32, "learning_rate": 3.0e-3},
    "finetune": {"train_items": 64, "steps": 10, "batch_size": 16, "learning_rate": 2.0e-3},
    "evaluate": {"every": 5, "items": 32},
}


def tiny_settings(tmp_path: Path) -> Path:
    shipped = yaml.safe_load((ROOT / "configs/lab.yaml").read_text())
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump({**shipped, **TINY, "out": str(tmp_path / "lab")}, allow_unicode=True))
    return path


class Capture(L.Callback):
    """The first step's batch, its logged loss and the gradients the optimizer is about to apply."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = {name: value.clone() for name, value in batch.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {name: p.grad.clone() for name, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.loss = float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("objective", ["DEFT", "NLL"])
def test_a_lab_fine_tuning_step_is_deft_modules_step(tmp_path, objective):
    """One lab step (fused path, Trainer, in-memory data) equals the objective's materialized loss on the same batch,
    computed by hand from a DeftModule built from the same base: loss and every gradient."""
    settings = Settings.from_file(tiny_settings(tmp_path))
    settings.finetune.update(steps=1, gradient_clip=0)  # the raw gradient
    base = pretrained(settings, 1, tmp_path / "pretrained")
    capture = Capture()
    spec = settings.objectives[objective]
    finetune(settings, base, settings.regimes["strong"], spec, 1, callbacks=[capture])
    reference = DeftModule(objective=spec, checkpoint_dir=base)
    reference.configure_model()
    logits = reference.model(capture.batch["input_ids"])
    targets = shift_labels(capture.batch["labels"]).reshape(-1)
    kept = targets != -100
    loss = reference.objective(logits.reshape(-1, logits.shape[-1])[kept], targets[kept]).mean()
    loss.backward()
    assert capture.loss == pytest.approx(loss.item(), rel=1e-6)
    for name, parameter in reference.model.named_parameters():
        torch.testing.assert_close(capture.grads[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lab_runs_from_the_command_line_and_repeats_exactly(tmp_path):
    config = tiny_settings(tmp_path)
    command = [sys.executable, "-m", "deft_lightning", "lab", "--config", str(config), "--workers", "2"]
    command += ["--regimes", "weak", "strong", "--objectives", "NLL", "-p"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "lab"
    assert {"summary.md", "summary.json", "accuracy.png"} <= {p.name for p in out.iterdir()}
    markdown = (out / "summary.md").read_text()
    assert "shaded bands: ± one standard deviation over the seeds" in markdown  # the plots' caption names the bands
    assert "Each regime's headline metric (top)" not in result.stdout  # the printed table stops before the plots
    summary = json.loads((out / "summary.json").read_text())
    assert summary["regimes"] == ["weak", "strong"] and list(summary["objectives"]) == ["NLL", "−p"]
    verdicts = {v["claim"]: v["outcome"] for v in summary["report"]["verdicts"]}
    assert any(claim.startswith("weak prior: NLL learns") for claim in verdicts)  # the −p predictions were judged
    assert all(outcome in ("reproduced", "not separated", "reversed") for outcome in verdicts.values())
    assert "The paper's predictions" in result.stdout and "−p − NLL" in result.stdout
    # the same numbers again, in this process and on one worker (the pretrained models come from the cache)
    settings = Settings.from_file(config)
    again = run_lab(settings, ["weak", "strong"], ["NLL", "−p"], tmp_path / "again", workers=1, progress=False)
    assert json.dumps(again["cells"], sort_keys=True) == json.dumps(
        {
            r: {o: {int(s): c for s, c in cells.items()} for o, cells in by.items()}
            for r, by in summary["cells"].items()
        },
        sort_keys=True,
    )


def prior_command(model: Path, lab: Path, out: Path) -> list[str]:
    """`analyze prior` of `model` on the tiny validation rows, beside the lab summary in `lab`."""
    command = [sys.executable, "-m", "deft_lightning", "analyze", "prior", "--model", str(model), "--data"]
    command += [str(ROOT / "data/tiny/val.jsonl"), "--lab", str(lab / "summary.json"), "--prompt-style", "alpaca"]
    return [*command, "--out", str(out), "--limit", "8"]


def test_analyze_prior_places_a_model_beside_the_lab_regimes(tmp_path):
    from conftest import write_tiny_checkpoint

    settings = Settings.from_file(tiny_settings(tmp_path))
    run_lab(settings, ["weak", "strong"], ["NLL", "−p"], tmp_path / "lab", workers=1, progress=False)
    command = prior_command(write_tiny_checkpoint(tmp_path / "model"), tmp_path / "lab", tmp_path / "analysis")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lab: weak" in result.stdout and "paper Model-Strong" in result.stdout
    assert "nearest lab regime: weak" in result.stdout  # a random model rates every target ~1/V
    assert "in the lab's weak regime" in result.stdout and "did best on greedy_em" in result.stdout


def test_analyze_prior_as_the_readme_runs_it_on_a_fresh_clone(tmp_path):
    """No lab results yet: the numbers print with what to run for the comparison; a second analysis into the same
    folder under its own --name (the README's FigFont line after its math line) does not collide."""
    from conftest import write_tiny_checkpoint

    command = prior_command(write_tiny_checkpoint(tmp_path / "model"), tmp_path / "no-lab", tmp_path / "analysis")
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "no regime lab results at" in first.stdout and "run `make lab`" in first.stdout
    second = subprocess.run([*command, "--name", "prior-b"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {"prior.csv", "prior-b.csv"} <= {p.name for p in (tmp_path / "analysis").iterdir()}


@pytest.mark.parametrize("name", Settings.from_file(ROOT / "configs/lab.yaml").objectives)
def test_every_shipped_lab_objective_builds_and_the_default_run_judges_every_prediction(name):
    from deft_lightning.lab import PREDICTIONS, objective_spec
    from deft_lightning.objectives import Objective, objective_from_spec

    settings = Settings.from_file(ROOT / "configs/lab.yaml")
    assert isinstance(objective_from_spec(objective_spec(settings, name)), Objective)
    default = settings.run["objectives"]
    assert set(default) <= set(settings.objectives)
    assert {p.a for p in PREDICTIONS} | {p.b for p in PREDICTIONS} <= set(default)
