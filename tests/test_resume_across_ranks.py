"""Resuming on another number of ranks (2 processes, gloo): the resumed steps train exactly the global batches an
uninterrupted run trains, with plain and length-grouped batches, single-file (DDP) and sharded (FSDP2)
checkpoints; a changed global batch is refused before anything is prepared."""

import csv
import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_fit_command
from probes import rows_per_step

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
STRATEGIES = {
    "fsdp1": ['--trainer.strategy={"class_path": "deft_lightning.strategies.BlockFSDPStrategy"}'],
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ['--trainer.strategy={"class_path": "deft_lightning.strategies.FSDP2Strategy"}'],
}
pytestmark = pytest.mark.slow


def fit(run_dir: Path, stop: int | None, ranks: int, strategy: str | None, grouping: str, *extra: str):
    """9 steps (preempted after step ``stop``) with a global batch of 16 rows over ``ranks`` ranks; ``grouping``:
    plain, length-grouped or packed batches."""
    preempt = f'--trainer.callbacks+={{"class_path": "fault_injection.SigtermAt", "init_args": {{"step": {stop}}}}}'
    args = tiny_fit_command(
        run_dir,
        "--trainer.max_steps=9",
        *([preempt] if stop else []),
        f"--data.init_args.batch_size={GLOBAL_BATCH // ranks}",
        f"--data.init_args.length_grouping={str(grouping == 'grouped').lower()}",
        f"--data.init_args.packing={str(grouping == 'packed').lower()}",
        "--model.micro_batch_size=4",
        "--trainer.callbacks+=probes.RowsPerStep",
        f"--trainer.devices={ranks}",
        *(STRATEGIES[strategy] if strategy else []),
        *extra,
    )
    environment = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]


@pytest.mark.parametrize(("strategy", "grouping"), [("ddp", "plain"), ("fsdp2", "grouped"), ("fsdp1", "packed")])
def test_resume_on_another_number_of_ranks_trains_the_same_global_batches(tmp_path, strategy, grouping):
    """2 ranks for 3 steps, then 1 rank to step 6, then 2 ranks to step 9: every step's rows (the union over
    ranks) and losses are those of one uninterrupted process with the same global batch."""
    reference = tmp_path / "reference"
    assert fit(reference, None, 1, None, grouping).returncode == 0
    run_dir = tmp_path / "run"
    for stop, ranks, resume in ((3, 2, ()), (6, 1, ("--ckpt_path=last",)), (None, 2, ("--ckpt_path=last",))):
        # sharded checkpoints need the sharded strategy, on any number of devices
        result = fit(run_dir, stop, ranks, strategy if ranks > 1 or strategy != "ddp" else None, grouping, *resume)
        assert result.returncode == (143 if stop else 0), result.stderr[-3000:]
    expected = rows_per_step(reference)
    assert sorted(expected) == list(range(9))
    assert rows_per_step(run_dir) == expected
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-4)


def test_a_changed_global_batch_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    assert fit(run_dir, 3, 2, "ddp", "plain").returncode == 143
    result = fit(run_dir, None, 1, None, "plain", "--ckpt_path=last", "--data.init_args.batch_size=8")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "global batches of 16 rows (data.batch_size 8 × 2 rank(s))" in lines[0]
    assert "this run's are 8 (data.batch_size 8 × 1 rank(s))" in lines[0]
    assert "Data (" not in result.stdout + result.stderr  # refused before the data was prepared


def test_every_rank_resumes_its_own_random_stream(tmp_path):
    """LoRA dropout on 2 ranks: preempted after step 3 and resumed, the weights are those of an uninterrupted run
    (every rank restores its own RNG state; restoring rank 0's on both drew other dropout masks on rank 1)."""
    import torch

    lora = ["--model.lora.r=4", "--model.lora.alpha=8", "--model.lora.dropout=0.3"]
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert fit(reference, None, 2, "ddp", "plain", *lora).returncode == 0
    assert fit(run_dir, 3, 2, "ddp", "plain", *lora).returncode == 143
    states = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["rng_states"]["per_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    assert fit(run_dir, None, 2, "ddp", "plain", *lora, "--ckpt_path=last").returncode == 0
    expected = torch.load(reference / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert any("lora_" in name for name in expected)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=0, msg=name)
