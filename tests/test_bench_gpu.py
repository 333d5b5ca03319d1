"""The GPU readiness check, end to end on the CPU at toy sizes (``bench gpu --dry-run``), so it cannot rot before
a session is lent a GPU to run it for real."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deft_lightning", "bench", "gpu", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    names = ["precision", "matmul peak", "numerics", "loss step", "fit throughput", "strategies", "generation"]
    assert list(sections) == names
    failed = {name: section["error"] for name, section in sections.items() if "error" in section}
    assert not failed, failed
    assert sections["precision"]["result"]["precision"] == "32-true"  # what a CPU host gets
    numerics = sections["numerics"]["result"]
    assert numerics["all_hold"], [row for row in numerics["rows"] if not row["holds"]]
    assert {row["objective"] for row in numerics["rows"]} >= {"DEFT()", "NLL()", "EAFT(k=20, gamma=1.0)"}
    loss = {row["case"]: row for row in sections["loss step"]["result"]["rows"]}
    assert "time_ratio" in loss["fused DEFT"] and "liger FLCE" in loss  # Liger itself only where it is installed
    fit = sections["fit throughput"]["result"]["rows"]
    assert [row["run"] for row in fit][-1] == "litgpt finetune_full (NLL)" and fit[-1]["ours_vs_litgpt"] > 0
    assert all(row["ok"] and row["fused"] for row in sections["strategies"]["result"]["rows"])
    assert [row["batch"] for row in sections["generation"]["result"]["rows"]] == [1, 4]
    assert "## numerics" in (tmp_path / "gpu_check.md").read_text()
