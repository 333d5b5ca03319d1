"""FSDP2 (ModelParallelStrategy, fully_shard per Block) on CPU with gloo: 2 ranks train, checkpoint and resume
like one process with the same global batch."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_fit_command

ROOT = Path(__file__).resolve().parents[1]
FSDP2 = [
    "--trainer.devices=2",
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=2",
    "--trainer.strategy.tensor_parallel_size=1",
]
pytestmark = pytest.mark.slow


def fit(run_dir: Path, steps: int, per_rank_batch: int, *extra: str) -> None:
    args = tiny_fit_command(
        run_dir,
        f"--trainer.max_steps={steps}",
        "--checkpoint.every_n_train_steps=4",
        f"--data.init_args.batch_size={per_rank_batch}",
        "--model.micro_batch_size=4",
        *extra,
    )
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def trajectory(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


def test_fsdp2_two_ranks_match_one_process_and_resume(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    fit(single, 8, 16)
    fit(single, 12, 16, "--ckpt_path=last")
    fit(sharded, 8, 8, *FSDP2)
    assert (sharded / "checkpoints/last.ckpt").is_dir()  # a sharded (distributed) checkpoint
    fit(sharded, 12, 8, *FSDP2, "--ckpt_path=last")
    for name in ("train/loss", "train/nll", "train/p", "train/alpha", "train/grad_norm"):
        one, two = trajectory(single, name), trajectory(sharded, name)
        assert len(one) == len(two) == 12
        assert two == pytest.approx(one, rel=2e-4, abs=1e-6), name


def test_fsdp_config_parses_with_a_regime_config():
    from deft_lightning.strategies import BlockFSDPStrategy

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deft_lightning",
            "fit",
            "--config",
            "configs/strong.yaml",
            "--config",
            "configs/fsdp.yaml",
            "--print_config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deft_lightning.strategies.BlockFSDPStrategy" in result.stdout and "bf16-mixed" in result.stdout
    assert BlockFSDPStrategy(activation_checkpointing=False).sharding_strategy.name == "FULL_SHARD"
