"""Interrupted runs: kill -9 at a random step, kill -9 during a checkpoint write, SIGTERM; exact resume."""

import csv
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_fit_command

from deft_lightning.data.module import saved_data_position

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4
pytestmark = pytest.mark.slow


def command(run_dir: Path, *extra: str) -> list[str]:
    return tiny_fit_command(
        run_dir, f"--trainer.max_steps={STEPS}", f"--checkpoint.every_n_train_steps={EVERY}", *extra
    )


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/loss")]


def logged_steps(run_dir: Path) -> list[int]:
    return [int(row["step"]) for row in read_rows(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["state_dict"]


def start_and_interrupt(run_dir: Path, until, sig: int, *extra: str) -> int:
    """Start a fit and send `sig` once `until(run_dir)` holds; the fit's exit status."""
    process = subprocess.Popen(
        command(run_dir, *extra), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    while not until(run_dir):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    process.send_signal(sig)
    return process.wait(timeout=120)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(run_dir)
    assert logged_steps(run_dir) == list(range(STEPS))
    return run_dir


def reached(step: int):
    def check(run_dir: Path) -> bool:
        try:
            return max(logged_steps(run_dir), default=-1) >= step
        except (FileNotFoundError, KeyError, ValueError):
            return False

    return check


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert logged_steps(run_dir) == list(range(STEPS))  # no gap, no repeat
    expected = weights(reference)
    for name, value in weights(run_dir).items():
        assert torch.equal(value, expected[name]), name


def test_kill_at_a_random_step_then_resume_is_exact(tmp_path, reference):
    run_dir = tmp_path / "run"
    start_and_interrupt(run_dir, reached(random.Random().randint(EVERY + 1, STEPS - 3)), signal.SIGKILL)
    assert weights(run_dir)  # a checkpoint from before the kill
    run(run_dir, "--ckpt_path=last")
    assert_same_run(run_dir, reference)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference):
    run_dir = tmp_path / "run"
    plugin = "--trainer.plugins=fault_injection.StallingCheckpointIO"

    def writing(run_dir: Path) -> bool:  # the second last.ckpt (step 8) is half-written and stalled
        folder = run_dir / "checkpoints"
        return (folder / f"step={2 * EVERY}.ckpt").is_file() and any(folder.glob(".last.ckpt.tmp-*"))

    start_and_interrupt(run_dir, writing, signal.SIGKILL, plugin)
    checkpoint = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)  # intact and loadable
    assert checkpoint["global_step"] == EVERY  # the first last.ckpt; the second (step 8) was being written
    run(run_dir, "--ckpt_path=last")
    assert_same_run(run_dir, reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))  # the next write of that file replaced it


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_write_a_resumable_checkpoint_and_exit_non_zero(tmp_path, reference, sig, status):
    """Preemption (SIGTERM) and Ctrl-C (SIGINT) finish the step, save last.ckpt there and exit 128 + the signal,
    so a scheduler can tell a stopped run from a finished one; the resume is exact."""
    run_dir = tmp_path / "run"
    assert start_and_interrupt(run_dir, reached(EVERY + 2), sig) == status
    step = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert step > EVERY  # taken at the signal, not the last periodic one
    run(run_dir, "--ckpt_path=last")
    assert_same_run(run_dir, reference)


def test_resume_without_checkpoint_is_an_error_unless_auto(tmp_path):
    result = subprocess.run(
        command(tmp_path / "run", "--ckpt_path=last"), cwd=ROOT, capture_output=True, text=True, env=environment()
    )
    assert result.returncode != 0 and "no " in result.stderr and "--ckpt_path auto" in result.stderr
    run(tmp_path / "run", "--ckpt_path=auto", "--trainer.max_steps=4")
    again = subprocess.run(
        command(tmp_path / "run", "--trainer.max_steps=4"), cwd=ROOT, capture_output=True, text=True, env=environment()
    )
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr


def test_resume_after_a_skipped_step_keeps_every_row(tmp_path):
    """A non-finite step (skipped, no update) before the checkpoint: the resumed run has every row, no gap."""
    skip = "--trainer.callbacks+=fault_injection.NonFiniteAt"
    reference = tmp_path / "reference"
    run(reference, skip)
    rows = read_rows(reference)
    assert [float(row["train/skipped_steps"]) for row in rows] == [float(step >= 2) for step in range(STEPS)]
    run_dir = tmp_path / "run"
    start_and_interrupt(run_dir, reached(EVERY + 2), signal.SIGTERM, skip)
    run(run_dir, "--ckpt_path=last", skip)
    assert_same_run(run_dir, reference)


def killed(run_dir: Path, *extra: str) -> None:
    result = subprocess.run(command(run_dir, *extra), cwd=ROOT, capture_output=True, text=True, env=environment())
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def test_kill_right_after_a_checkpoint_loses_no_metrics_row(tmp_path, reference):
    """The checkpoint of step 4 is written before Lightning logs step 4's row; a kill there lost the row for good."""
    run_dir = tmp_path / "run"
    killed(run_dir, "--trainer.plugins=fault_injection.KillAroundSave")
    assert max(logged_steps(run_dir)) == EVERY - 2  # the kill came before the row of the checkpoint's step
    run(run_dir, "--ckpt_path=last")
    assert_same_run(run_dir, reference)
    assert [row["train/loss"] for row in read_rows(run_dir)] == [row["train/loss"] for row in read_rows(reference)]


def test_kill_between_publishing_the_periodic_and_the_last_checkpoint(tmp_path, reference):
    """Killed after step=8.ckpt was written and before last.ckpt (still step 4) was: `last` resumes from the newer
    step=8.ckpt, and the resumed run leaves no versioned (-v1) copies behind."""
    run_dir = tmp_path / "run"
    kill = '{"class_path": "fault_injection.KillAroundSave", "init_args": {"occurrence": 2, "after": false}}'
    plugin = f"--trainer.plugins={kill}"
    killed(run_dir, plugin)
    folder = run_dir / "checkpoints"
    steps = {p.name: torch.load(p, weights_only=True)["global_step"] for p in folder.glob("*.ckpt")}
    assert steps == {"last.ckpt": EVERY, f"step={2 * EVERY}.ckpt": 2 * EVERY}
    resumed = run(run_dir, "--ckpt_path=last")
    assert f"resuming from {folder / f'step={2 * EVERY}.ckpt'}" in resumed.stdout + resumed.stderr
    assert_same_run(run_dir, reference)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", f"step={STEPS}.ckpt"]


def interrupt_at(run_dir: Path, step: int, *extra: str) -> int:
    """Launch (resuming when there is a checkpoint), SIGTERM once `step` is logged; the checkpoint's step."""
    resume = ("--ckpt_path=last",) if (run_dir / "checkpoints").is_dir() else ()
    assert start_and_interrupt(run_dir, reached(step), signal.SIGTERM, *resume, *extra) == 143
    return torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)["global_step"]


#: periodic checkpoints that do not divide the step count, and validation between them
UNEVEN = ("--checkpoint.every_n_train_steps=5", "--trainer.limit_val_batches=2", "--trainer.val_check_interval=7")


def test_three_interruptions_resume_to_the_uninterrupted_weights(tmp_path):
    """SIGTERM → resume → SIGTERM → resume → SIGTERM → resume → finish, each resume with `--ckpt_path last`: every
    launch continues from the newest step, and the final weights equal one uninterrupted run's, bit for bit. The
    uninterrupted run's last.ckpt is its final state although 24 is no multiple of the periodic 5 (it was step 20:
    `--ckpt_path last` and `export` of a finished fit read a stale state)."""
    reference = tmp_path / "reference"
    run(reference, *UNEVEN)
    assert torch.load(reference / "checkpoints/last.ckpt", weights_only=True)["global_step"] == STEPS
    run_dir = tmp_path / "run"
    saved = [interrupt_at(run_dir, step, *UNEVEN) for step in (2, 9, 19)]
    assert saved[0] < saved[1] < saved[2] < STEPS and saved[0] >= 3  # each at its signal, after the previous one
    resumed = run(run_dir, "--ckpt_path=last", *UNEVEN)
    assert "Checkpoint directory" not in resumed.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step=20.ckpt"]
    assert_same_run(run_dir, reference)
    # on their steps' rows, none repeated; a signal at a validation step stops before that step's validation
    val_steps = [int(row["step"]) for row in read_rows(run_dir) if row.get("val/nll")]
    assert val_steps == sorted(set(val_steps)) and {6, 13} <= set(val_steps) <= {6, 13, 20}


def test_a_finished_fit_extended_with_more_steps_continues_its_data(tmp_path):
    """A finished fit resumed with a larger max_steps: Lightning counts the epoch it stopped in as closed; the data
    continue where the fit stopped (epoch 0, batch 12), not at the next epoch's batch 12."""
    run_dir = tmp_path / "run"
    run(run_dir, "--trainer.max_steps=12")
    run(run_dir, "--ckpt_path=last", "--trainer.max_steps=40")
    position = saved_data_position(torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True))
    assert (position["epoch"], position["global_batches"]) == (1, 40 - 32)  # 32 global batches an epoch
    assert logged_steps(run_dir) == list(range(40))
