"""`python -m deft_lightning fit|validate|test --config`: a short fit per objective, logs, custom objectives."""

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deft_lightning.cli import main
from deft_lightning.data.sources import BadRowError
from deft_lightning.model import DeftModule

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny.yaml")
OBJECTIVES = ["NLL", "Prob", "QLog", "DFT", "EAFT", "Cayley", "CayleyReference", "DEFT"]


def fit_args(tmp_path: Path, *extra: str, steps: int = 10) -> list[str]:
    return [
        "fit",
        "--config",
        CONFIG,
        f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *extra,
    ]


def read_metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ten_step_fit_per_objective(tmp_path, objective):
    cli = main(fit_args(tmp_path, f"--model.objective={objective}"))
    assert cli.trainer.global_step == 10
    rows = [r for r in read_metrics(cli.trainer.log_dir) if r["train/loss"]]
    assert len(rows) == 10
    for name in (
        "train/loss",
        "train/nll",
        "train/p",
        "train/weight",
        "train/entropy",
        "train/acc",
        "train/tokens_per_s",
        "train/lr",
        "train/grad_norm",
    ):
        assert all(torch.isfinite(torch.tensor(float(r[name]))) for r in rows), name
    has_alpha = objective in ("QLog", "Cayley", "CayleyReference", "DEFT")
    assert bool(rows[-1].get("train/alpha")) == has_alpha
    assert type(cli.model.objective).__name__ == objective


def test_module_entry_point_trains_and_logs(tmp_path):
    """The README command, as a subprocess: progress, CSV log, summary table, and a loadable checkpoint."""
    result = subprocess.run(
        [sys.executable, "-m", "deft_lightning", *fit_args(tmp_path, steps=40)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Fit summary" in result.stdout
    rows = read_metrics(tmp_path / "run")
    losses = [float(r["train/nll"]) for r in rows if r["train/nll"]]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])  # it learns
    assert any(r["val/nll"] for r in rows)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = DeftModule.load_from_checkpoint(checkpoint, weights_only=True)
    assert module.hparams["objective"] == {"class_path": "deft_lightning.objectives.DEFT", "init_args": {}}
    assert type(module.objective).__name__ == "DEFT"


CUSTOM = textwrap.dedent('''
    import torch
    from deft_lightning.objectives import Objective


    class Focal(Objective):
        """Focal loss -(1 - p)^gamma * log p."""

        def __init__(self, gamma: float = 2.0):
            self.gamma = gamma

        def token_loss(self, logp, stats):
            return -(-torch.expm1(logp)).pow(self.gamma) * logp
''')


def test_custom_objective_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "focal.yaml"
    config.write_text("model:\n  objective:\n    class_path: my_losses.Focal\n    init_args:\n      gamma: 1.5\n")
    cli = main(fit_args(tmp_path, f"--config={config}", steps=5))
    assert cli.trainer.global_step == 5
    assert cli.model.objective.gamma == 1.5
    assert cli.model.hparams["objective"] == {"class_path": "my_losses.Focal", "init_args": {"gamma": 1.5}}
    rows = [r for r in read_metrics(cli.trainer.log_dir) if r["train/weight"]]
    assert rows and all(float(r["train/weight"]) > 0 for r in rows)


def test_validate_and_test_subcommands(tmp_path):
    data = f"--data.init_args.test={{class_path: FileSource, init_args: {{path: {ROOT / 'data/tiny/val.jsonl'}}}}}"
    main(fit_args(tmp_path, steps=2))
    fit_log = (tmp_path / "run/metrics.csv").read_text()
    cli = main(["validate", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'run'}", data])
    assert "val/nll" in cli.trainer.callback_metrics
    assert (tmp_path / "run/metrics.csv").read_text() == fit_log  # validation logs apart, not as a second step 0
    assert "val/nll" in (tmp_path / "run/validate/metrics.csv").read_text()
    cli = main(["test", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path / 'run'}", data])
    nll = float(cli.trainer.callback_metrics["test/nll"])
    assert 0 < nll < 10


def test_unknown_objective_is_a_clear_cli_error(tmp_path):
    from deft_lightning.errors import CommandError

    with pytest.raises(CommandError, match="NoSuchLoss is not an objective; use one of"):
        main(fit_args(tmp_path, "--model.objective=NoSuchLoss"))


def test_bad_data_file_fails_before_training(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(BadRowError, match=r"bad.jsonl:2: missing field 'output'"):
        main(fit_args(tmp_path, f"--data.init_args.train.init_args.path={bad}"))


TINY_OVERRIDES = [
    "--model.checkpoint_dir=null",
    "--model.model_config={name: t, block_size: 1024, vocab_size: 320, padded_vocab_size: 320, n_layer: 1, "
    "n_head: 2, n_embd: 16}",
    f"--data.init_args.tokenizer_dir={ROOT / 'data/tiny/tokenizer'}",
    "--data.init_args.prompt_style=alpaca",
    "--data.init_args.max_seq_length=1024",
    "--trainer.val_check_interval=2",
]
SMALL_SOURCES = {
    "weak": ["--data.init_args.train.init_args.count=16", "--data.init_args.val.init_args.count=4"],
    "strong": ["--data.init_args.train.init_args.count=16"],
    "intermediate": [],
    "mixed": ["--data.init_args.train.init_args.total=16", "--data.init_args.prompt_style=chat_template"],
}


@pytest.mark.parametrize("regime", ["strong", "intermediate", "weak", "mixed"])
def test_regime_configs_fit_offline_on_the_tiny_model(tmp_path, regime):
    args = [
        "fit",
        "--config",
        str(ROOT / f"configs/{regime}.yaml"),
        *TINY_OVERRIDES,
        *SMALL_SOURCES[regime],
        "--trainer.max_steps=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
    ]
    cli = main(args)
    assert cli.trainer.global_step == 3
    assert cli.datamodule.regime == regime and cli.datamodule.reports["train"].examples > 0


def test_training_throughput_callback_counts_unpadded_tokens(tmp_path, capsys):
    cli = main(fit_args(tmp_path, "--trainer.callbacks+=deft_lightning.callbacks.TrainingThroughput", steps=2))
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith('{"tokens"')][-1]
    result = json.loads(line)
    first = next(iter(cli.datamodule.train_dataloader()))
    assert result["seconds"] > 0 and 0 < result["tokens"] <= 2 * first["input_ids"].numel()


def test_regime_validation_items_are_held_out_from_evaluation():
    """weak.yaml / strong.yaml validate on items that no shipped evaluation config reports."""
    import importlib

    import yaml

    from deft_lightning.data.sources import RowReport
    from deft_lightning.evaluation.run import parse_config

    def build(spec):
        module, _, name = spec["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))

    evaluated = set()
    for config in ("smollm2", "paper"):
        for benchmark in parse_config(["--config", str(ROOT / f"configs/eval/{config}.yaml")])["benchmarks"]:
            source = benchmark.source
            if type(source).__name__ == "HubSource" or not getattr(source, "path", ROOT).exists():
                continue  # the hub and the paper's local benchmark copies are not here
            evaluated |= {row["instruction"] for row in source.rows(RowReport())}
    assert len(evaluated) > 200
    for regime in ("weak", "strong"):
        val = yaml.safe_load((ROOT / f"configs/{regime}.yaml").read_text())["data"]["init_args"]["val"]
        held_out = {row["instruction"] for row in build(val).rows(RowReport())}
        assert held_out and not held_out & evaluated, regime


def test_precision_is_chosen_by_the_device():
    from deft_lightning.cli import resolve_precision

    assert resolve_precision("auto", cuda_available=True, bf16_supported=True)[0] == "bf16-mixed"
    assert resolve_precision("gpu", cuda_available=True, bf16_supported=True)[0] == "bf16-mixed"
    assert resolve_precision("auto", cuda_available=True, bf16_supported=False)[0] == "32-true"  # no fp16
    assert resolve_precision("cpu", cuda_available=True, bf16_supported=True)[0] == "32-true"
    assert resolve_precision("auto", cuda_available=False, bf16_supported=False)[0] == "32-true"


def test_shipped_configs_run_here_in_fp32_and_an_explicit_precision_wins(tmp_path, capsys):
    cli = main(fit_args(tmp_path, steps=2))
    assert cli.trainer.precision == "32-true"
    assert "32-true (chosen: CPU" in capsys.readouterr().out  # the fit summary says why
    explicit = main(fit_args(tmp_path / "b", "--trainer.precision=bf16-mixed", steps=1))
    assert explicit.trainer.precision == "bf16-mixed"


def test_progress_bar_names_the_step_limit_not_epoch_minus_two():
    from types import SimpleNamespace

    from deft_lightning.callbacks import step_progress_bar

    bar = step_progress_bar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=24)
    assert bar._get_train_description(0).strip() == "Epoch 0 (step limit 24)"


def test_fit_summary_scores_held_out_items_before_and_after(tmp_path, capsys):
    heldout = (
        '{"class_path": "deft_lightning.evaluation.Continuation", "init_args": {"name": "tiny-val", '
        '"source": {"class_path": "deft_lightning.data.FileSource", "init_args": {"path": "data/tiny/val.jsonl"}}, '
        '"limit": 8, "max_new_tokens": 6}}'
    )
    main(fit_args(tmp_path, f"--summary.heldout={heldout}", "--summary.predictions=2", steps=30))
    out = capsys.readouterr().out
    table = out[out.index("held-out tiny-val (8 items, greedy)") :].splitlines()
    values = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in table[2:6]}
    assert set(values) == {"nll", "p", "similarity", "exact"}
    assert values["nll"][1] < values["nll"][0]  # the held-out answers became likelier
    assert "before (greedy)" in out
