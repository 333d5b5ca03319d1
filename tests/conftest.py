import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_fit_command(run_dir: Path, *extra: str) -> list[str]:
    """`python -m deft_lightning fit` on configs/tiny.yaml in `run_dir`, quiet, no validation."""
    return [
        sys.executable,
        "-m",
        "deft_lightning",
        "fit",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        f"--trainer.default_root_dir={run_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=0",
        f"--data.init_args.cache_dir={run_dir.parent / 'cache'}",
        *extra,
    ]
