"""A run records itself: summary.json, summary.md and training_curves.png beside metrics.csv (one row per step,
continuous across a resume), and the output a user sees stays quiet — through the real CLI in a subprocess."""

import csv
import itertools
import json
import re
import subprocess

import pytest
from conftest import ROOT, tiny_fit_command

pytestmark = pytest.mark.slow  # one process start each

#: lines Lightning prints that say nothing a user can act on here
NOISE = ("TPU available", "HPU available", "GPU available", "Seed set", "MeanMetric", "Total FLOPs", "| Name ")


def fit(run_dir, *extra: str, validation: bool = True) -> subprocess.CompletedProcess:
    command = tiny_fit_command(run_dir, *extra)
    if validation:  # tiny_fit_command turns validation off
        command = [part for part in command if part != "--trainer.limit_val_batches=0"]
        command += ["--trainer.val_check_interval=3", "--trainer.limit_val_batches=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metric_rows(run_dir) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_a_fit_and_its_resume_record_one_row_per_step_and_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    first = fit(run_dir, "--trainer.max_steps=6")
    output = first.stdout + first.stderr
    assert not [noise for noise in NOISE if noise in output], output[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["optimizer_steps"] == 6 and summary["resumed_from_step"] is None
    assert summary["first_step"]["step"] == 0 and summary["last_step"]["step"] == 5
    assert summary["parameters"] > 0 and summary["device"] == "cpu × 1"
    rows = metric_rows(run_dir)
    assert [int(row["step"]) for row in rows] == list(range(6))  # validation joined its step's row
    assert any(row["val/nll"] for row in rows) and all(row["train/loss"] for row in rows)
    seen = [int(float(row["train/tokens_seen"])) for row in rows]
    assert all(b > a for a, b in itertools.pairwise(seen)) and summary["tokens_seen"] == seen[-1]
    markdown = (run_dir / "summary.md").read_text()
    assert "| metric | first step (0) | last step (5) |" in markdown and "training_curves.png" in markdown
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resumed = fit(run_dir, "--trainer.max_steps=10", "--ckpt_path=last")
    output = resumed.stdout + resumed.stderr
    for quiet in ("exists and is not empty", "weights_only", *NOISE):
        assert quiet not in output, (quiet, output[-3000:])
    rows = metric_rows(run_dir)
    assert [int(row["step"]) for row in rows] == list(range(10))
    seen_after = [int(float(row["train/tokens_seen"])) for row in rows]
    assert seen_after[:6] == seen and all(b > a for a, b in itertools.pairwise(seen_after))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["optimizer_steps"] == 10
    assert summary["first_step"]["step"] == 0 and summary["last_step"]["step"] == 9  # the run's, not the launch's
    assert summary["tokens_seen"] == seen_after[-1]
    assert "Fit summary" in resumed.stdout and re.search(r"resumed from step +6\n", resumed.stdout)
