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


def write_tiny_checkpoint(out: Path, seed: int = 0, block_size: int = 512) -> Path:
    """A random tiny LitGPT checkpoint directory with the tiny tokenizer (stands in for a base model)."""
    import shutil

    import torch
    from litgpt import GPT, Config
    from litgpt.utils import save_config

    out.mkdir(parents=True, exist_ok=True)
    config = Config(
        name="t", block_size=block_size, vocab_size=320, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=32
    )
    torch.manual_seed(seed)
    torch.save(GPT(config).state_dict(), out / "lit_model.pth")
    save_config(config, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "data/tiny/tokenizer" / name, out / name)
    return out
