"""The sweep runner on the tiny model: a 2 × 2 grid (regimes × objectives), a killed sweep that resumes, the
tables' layout, and grid errors before any fit starts."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, write_tiny_checkpoint

from deft_lightning.sweep import GridError, cell_config, deep_merge, load_grid, run_sweep


def grid(tmp_path: Path, **changes) -> Path:
    base = write_tiny_checkpoint(tmp_path / "base", block_size=256)
    continuation = {
        "class_path": "deft_lightning.evaluation.Continuation",
        "init_args": {
            "name": "cont",
            "source": {
                "class_path": "deft_lightning.data.FileSource",
                "init_args": {"path": str(ROOT / "data/tiny/val.jsonl"), "limit": 3},
            },
            "max_new_tokens": 4,
        },
    }
    tiny = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    fit = deep_merge(
        tiny,
        {
            "trainer": {"max_steps": 2, "enable_progress_bar": False, "limit_val_batches": 0},
            "data": {"init_args": {"cache_dir": str(tmp_path / "cache"), "batch_size": 4}},
        },
    )
    del fit["model"]["model_config"]  # the backbone's checkpoint directory defines the model
    document = {
        "out_dir": str(tmp_path / "sweep"),
        "seeds": [1],
        "fit": fit,
        "backbones": {"tiny": {"checkpoint_dir": str(base)}},
        "objectives": {
            "NLL": {"class_path": "deft_lightning.objectives.NLL"},
            "−p": {"class_path": "deft_lightning.objectives.Prob"},
        },
        "regimes": {
            "a": {
                "fit": {"data": {"init_args": {"train": {"init_args": {"path": str(ROOT / "data/tiny/train.jsonl")}}}}},
                "benchmarks": [continuation],
            },
            "b": {
                "fit": {"data": {"init_args": {"train": {"init_args": {"path": str(ROOT / "data/tiny/val.jsonl")}}}}},
                "benchmarks": [continuation],
            },
        },
        "evaluate": {"batch_size": 4, "prompt_style": "alpaca"},
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return path


def test_cell_configs_merge_grid_backbone_regime_objective_and_seed(tmp_path):
    loaded = load_grid(grid(tmp_path, seeds=[1, 2]))
    config = cell_config(loaded, "b", "tiny", "−p", 2)
    assert config["seed_everything"] == 2
    assert config["model"]["objective"]["class_path"] == "deft_lightning.objectives.Prob"
    assert config["model"]["checkpoint_dir"] == str(tmp_path / "base")
    assert config["data"]["init_args"]["train"]["init_args"]["path"].endswith("data/tiny/val.jsonl")
    assert config["data"]["init_args"]["tokenizer_dir"] == str(tmp_path / "base")
    assert config["trainer"]["max_steps"] == 2 and config["data"]["init_args"]["batch_size"] == 4


def test_grid_errors_come_before_any_fit(tmp_path):
    with pytest.raises(GridError, match="unknown keys"):
        load_grid(grid(tmp_path, regime={}))
    with pytest.raises(GridError, match=r"no regimes \['c'\]"):
        run_sweep(grid(tmp_path), regimes=["c"])
    bad = grid(tmp_path)
    document = yaml.safe_load(bad.read_text())
    document["regimes"]["a"]["benchmarks"][0]["init_args"]["max_new_tokens"] = "many"
    bad.write_text(yaml.safe_dump(document, allow_unicode=True))
    with pytest.raises(Exception, match="max_new_tokens"):
        run_sweep(bad)
    assert not list((tmp_path / "sweep").glob("*/*/*/cell.yaml"))  # no fit started


@pytest.mark.slow
def test_two_by_two_sweep_survives_a_kill_and_prints_paper_tables(tmp_path):
    path = grid(tmp_path)
    command = [sys.executable, "-m", "deft_lightning", "sweep", "--config", str(path)]
    first = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    done = tmp_path / "sweep/a/tiny/NLL-seed1/done.json"
    deadline = time.time() + 300
    while not done.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and the fit it is running
    first.wait()
    assert done.exists() and not (tmp_path / "sweep/summary.md").exists()

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[1/4] a/tiny/NLL seed 1: finished earlier" in second.stdout
    for regime in ("a", "b"):
        out = tmp_path / "sweep" / regime / "tiny"
        lines = (out / "eval/tables.md").read_text().splitlines()
        assert lines[1].split() == ["model", "cont", "similarity", "cont", "exact"]
        assert [line.split()[0] for line in lines[3:]] == ["base", "NLL", "−p"]
        assert (out / "trajectory.png").is_file()
        for objective in ("NLL", "−p"):
            cell = yaml.safe_load((out / f"{objective}-seed1/cell.yaml").read_text())
            assert cell["seed_everything"] == 1  # every cell records its exact config and seed
            assert json.loads((out / f"{objective}-seed1/done.json").read_text())["seconds"] > 0
    assert "== b / tiny ==" in second.stdout
    third = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # everything reused
    assert third.returncode == 0 and third.stdout.count("finished earlier") == 4


@pytest.mark.parametrize("name", ["miniature", "paper"])
def test_shipped_grids_build_every_cell(name):
    from deft_lightning.evaluation.run import parse_config

    loaded = load_grid(ROOT / f"configs/grids/{name}.yaml")
    for regime, settings in loaded["regimes"].items():
        for backbone in loaded["backbones"]:
            for objective in loaded["objectives"]:
                config = cell_config(loaded, regime, backbone, objective, 1)
                assert config["model"]["objective"] == loaded["objectives"][objective]
                assert "${backbone}" not in json.dumps(config)
        benchmarks = parse_config(["--models", "{x: y}", "--benchmarks", json.dumps(settings["benchmarks"])])
        assert benchmarks["benchmarks"]
