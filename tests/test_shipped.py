"""Everything shipped runs as shipped: every configs/*.yaml fits one step with only the backbone swapped for a tiny
one and its generated sources shrunk (validation intervals, batch sizes and the rest as written); the evaluation
and grid configs check out dry; the installed script is the CLI; help lists every command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name not in ("lab.yaml", "fsdp.yaml"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """A random tiny model with the tiny tokenizer (and its chat template), long enough for every config."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("backbone") / "tiny", block_size=4096)


def substitutes(config: dict, backbone: Path) -> list[str]:
    """The backbone and tokenizer swapped for the tiny ones; generated sources cut to a few rows."""
    args = [f"--data.init_args.tokenizer_dir={backbone}"]
    if (config.get("model") or {}).get("checkpoint_dir"):
        args.append(f"--model.checkpoint_dir={backbone}")
    for split in ("train", "val"):
        init_args = ((config["data"]["init_args"].get(split) or {}).get("init_args")) or {}
        for key, small in (("count", 16), ("total", 16)):
            if key in init_args:
                args.append(f"--data.init_args.{split}.init_args.{key}={small if split == 'train' else 4}")
    return args


def run(command: list[str], cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=environment, **kwargs)


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_every_shipped_fit_config_runs_one_step(tmp_path, tiny_backbone, name):
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    command = [sys.executable, "-m", "deft_lightning", "fit", "--config", f"configs/{name}"]
    command += [*substitutes(config, tiny_backbone), "--trainer.max_steps=1"]
    command += [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fit summary" in result.stdout and (tmp_path / "run/checkpoints/last.ckpt").exists()


def test_the_fsdp_config_on_a_machine_without_gpus_says_what_to_do(tmp_path, tiny_backbone):
    command = [sys.executable, "-m", "deft_lightning", "fit", "--config", "configs/strong.yaml", "--config"]
    command += ["configs/fsdp.yaml", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    command += substitutes(yaml.safe_load((ROOT / "configs/strong.yaml").read_text()), tiny_backbone)
    result = run(command)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "this machine has none" in errors[0] and "--trainer.accelerator cpu" in errors[0]


def test_evaluation_and_grid_configs_check_out_dry(tmp_path, tiny_backbone):
    from deft_lightning.evaluation.run import parse_config

    for path in sorted((ROOT / "configs/eval").glob("*.yaml")):
        assert parse_config(["--config", str(path)])["benchmarks"], path  # the benchmark classes build
    command = [sys.executable, "-m", "deft_lightning", "evaluate", "--config", "configs/eval/smollm2.yaml"]
    command += [f"--models={{base: {tiny_backbone}}}", "--dry_run=true", "--limit=4"]
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "figfont" in result.stdout.lower() and "4" in result.stdout
    for grid in sorted((ROOT / "configs/grids").glob("*.yaml")):
        text = grid.read_text().replace("runs/sweeps", str(tmp_path / "sweeps"))
        copy = tmp_path / grid.name
        copy.write_text(text)
        result = run([sys.executable, "-m", "deft_lightning", "sweep", "--config", str(copy), "--dry-run"])
        assert result.returncode == 0, (grid, result.stderr[-3000:])
        assert "model:" in result.stdout and "…" not in result.stdout  # whole cell configs, not cut at 200 characters


def test_the_installed_script_is_the_same_cli(tmp_path):
    script = Path(sys.executable).parent / "deft-lightning"
    if not script.exists():
        script = shutil.which("deft-lightning")
    assert script, "pip install -e . installs the deft-lightning script"
    overview = run([str(script), "--help"])
    assert overview.returncode == 0
    for command in ("fit", "evaluate", "export", "lab", "analyze", "sweep", "data", "prepare-model", "bench"):
        assert f"  {command} " in overview.stdout, command
    places = [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    fit = run([str(script), "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=1", *places])
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "DeftCLI object" not in fit.stdout + fit.stderr and (tmp_path / "run/checkpoints/last.ckpt").exists()
    bench = run([sys.executable, "-m", "deft_lightning", "bench", "--help"])
    assert "gpu" in bench.stdout


def test_a_fit_log_that_is_not_a_terminal_has_progress_lines_and_no_warnings(tmp_path):
    """Redirected output (SLURM, nohup): plain progress lines instead of a bar that shows only at the end, and none
    of the library notices a user cannot act on — across a periodic checkpoint and a resume."""
    base = [sys.executable, "-m", "deft_lightning", "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=20",
            "--checkpoint.every_n_train_steps=5", f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.limit_val_batches=0"]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    stop = '--trainer.callbacks+={"class_path": "fault_injection.SigtermAt", "init_args": {"step": 8}}'
    stopped = subprocess.run([*base, stop], cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    resumed = subprocess.run([*base, "--ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for result in (stopped, resumed):
        noise = [line for line in result.stderr.splitlines() if "arn" in line or "deprecat" in line or "Tip" in line]
        assert not noise, noise
    progress = [line for line in resumed.stdout.splitlines() if line.startswith("step ")]
    assert progress[0].startswith("step 9/20 · loss") and "ETA" in progress[0] and progress[-1].startswith("step 20/20")


def test_data_shows_and_dumps_what_a_fit_trains_in_its_order(tmp_path):
    """`data` marks the trained tokens, prints the split table, and its dump's step-0 rows are the rows a fit
    trains at step 0."""
    import json

    from probes import rows_per_step

    dump = tmp_path / "order.jsonl"
    places = [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}"]
    command = [sys.executable, "-m", "deft_lightning", "data", "--config", "configs/tiny.yaml", "--rows", "2"]
    shown = run([*command, "--dump", str(dump), *places])
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert shown.stdout.count("── train row") == 2 and "<|endoftext|>»" in shown.stdout and "trainable" in shown.stdout
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == 512 and {row["step"] for row in rows} == set(range(32))
    environment = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    fit = [sys.executable, "-m", "deft_lightning", "fit", "--config", "configs/tiny.yaml", "--trainer.max_steps=1"]
    fit += ["--trainer.callbacks+=probes.RowsPerStep", *places]
    assert subprocess.run(fit, cwd=ROOT, capture_output=True, timeout=600, env=environment).returncode == 0
    import hashlib

    def digest(row: dict) -> str:
        ids, labels = row["input_ids"], row["labels"]
        return hashlib.sha1(repr((ids, labels)).encode()).hexdigest()[:12]

    assert sorted(digest(row) for row in rows if row["step"] == 0) == rows_per_step(tmp_path / "run")[0]


def test_sweep_takes_ascii_objective_names_and_overrides(tmp_path):
    grid = (ROOT / "configs/grids/miniature.yaml").read_text().replace("runs/sweeps", str(tmp_path / "sweeps"))
    (tmp_path / "grid.yaml").write_text(grid)
    command = [sys.executable, "-m", "deft_lightning", "sweep", "--config", str(tmp_path / "grid.yaml"), "--dry-run"]
    result = run([*command, "--regimes", "weak", "--objectives", "NLL", "-p", "--set", "trainer.max_steps=3"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "# weak/smollm2/−p/1" in result.stdout and "max_steps: 3" in result.stdout
    assert "class_path: deft_lightning.objectives.Prob" in result.stdout
