"""``python -m deft_lightning export CKPT --out DIR --format litgpt|hf``: a fine-tuned model for other tools.

CKPT is a fit's ``.ckpt``, a sharded fit checkpoint directory (FSDP2, or FSDP1 with sharded state dicts) or a
LitGPT checkpoint directory.

- ``litgpt``: a LitGPT checkpoint directory — ``lit_model.pth``, ``model_config.yaml``, the tokenizer files, chat
  template and generation config (plus the base model's ``config.json`` when it has one) — that ``litgpt
  generate``/``chat`` accept and a new fit takes as ``model.checkpoint_dir``.
- ``hf``: a Hugging Face directory — ``config.json``, ``model.safetensors`` (sharded above 5 GB, with its index),
  tokenizer files, ``generation_config.json``, chat template — that ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` load offline, and vLLM / lm-evaluation-harness serve. The weights are renamed
  by LitGPT's own conversion (``convert_lit_checkpoint``); ``config.json`` is the base model's when it has one,
  else written from the LitGPT config (LLaMA, Qwen2 and GPT-NeoX layouts).

Tied embeddings: LitGPT unties ``wte``/``lm_head`` on import, so after fine-tuning a tied model (SmolLM2,
Qwen2.5-0.5B/1.5B, Llama-3.2) the two usually differ; the export then says ``tie_word_embeddings: false`` and
saves both (vLLM drops a trained ``lm_head`` of a tied config); while they are equal it stays tied.

Everything is written to a hidden sibling directory renamed into place when complete; an existing ``--out`` is
replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from deft_lightning.loading import ModelRef, read_state_dict, resolve_model
from deft_lightning.prepare_model import CheckpointError, replace_directory

FORMATS = ("litgpt", "hf")
#: tokenizer and generation files copied next to the weights, when the tokenizer directory has them
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(
    checkpoint: Path,
    out: Path,
    format: Literal["litgpt", "hf"] = "hf",
    force: bool = False,
    dtype: str | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write ``checkpoint`` as a ``format`` directory at ``out`` (see the module docstring); returns ``out``."""
    if format not in FORMATS:
        raise ValueError(f"export: --format must be one of {', '.join(FORMATS)}, got '{format}'")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"export: --dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"export: '{out}' exists; choose another --out or pass --force to replace it")
    ref = resolve_model("export", Path(checkpoint), tokenizer_dir)  # checks paths before any weight is read
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would carry over to the published directory
    try:
        state = read_state_dict(ref)
        if dtype is not None:
            state = {name: tensor.to(DTYPES[dtype]) for name, tensor in state.items()}
        if format == "litgpt":
            write_litgpt(ref, state, staging)
        else:
            write_hf(ref, state, staging)
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_litgpt(ref: ModelRef, state: dict[str, torch.Tensor], directory: Path) -> None:
    from litgpt.utils import save_config

    torch.save(state, directory / "lit_model.pth")
    save_config(ref.config, directory)
    _copy_tokenizer_files(ref, directory)
    base_config = _base_hf_config(ref)
    if base_config is not None:
        (directory / "config.json").write_text(json.dumps(base_config, indent=2) + "\n")
    if ref.prompt_style != "chat_template":  # litgpt chat reads a LitGPT prompt style from here
        from litgpt.prompts import PromptStyle, save_prompt_style

        save_prompt_style(PromptStyle.from_name(ref.prompt_style), directory)


def write_hf(ref: ModelRef, state: dict[str, torch.Tensor], directory: Path) -> None:
    from huggingface_hub import save_torch_state_dict
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint
    from litgpt.utils import save_config

    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        lit, converted = Path(scratch) / "lit", Path(scratch) / "hf"
        lit.mkdir()
        torch.save(state, lit / "lit_model.pth")
        save_config(ref.config, lit)
        convert_lit_checkpoint(lit, converted)
        weights = torch.load(converted / "model.pth", map_location="cpu", weights_only=True)
    names = _embedding_and_head(weights)
    tied = names is not None and torch.equal(weights[names[0]], weights[names[1]])
    if tied:
        del weights[names[1]]  # a tied config takes the head from the embeddings
    weights = {name: _own_storage(tensor) for name, tensor in weights.items()}
    save_torch_state_dict(weights, directory, max_shard_size="5GB")
    dtype = next(iter(weights.values())).dtype
    config = _base_hf_config(ref) or _hf_config_from_litgpt(ref.config)
    config.update({"tie_word_embeddings": tied, "vocab_size": ref.config.padded_vocab_size})
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_tokenizer_files(ref, directory)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses views into a larger tensor (LitGPT's conversion splits the fused QKV into views)."""
    whole = tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.contiguous().clone()


def _embedding_and_head(weights: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    pairs = (("model.embed_tokens.weight", "lm_head.weight"), ("gpt_neox.embed_in.weight", "embed_out.weight"))
    for embedding, head in pairs:
        if embedding in weights and head in weights:
            return embedding, head
    return None


def _base_hf_config(ref: ModelRef) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` of the model the weights started from, if its directory has one."""
    for directory in (ref.base_dir, ref.tokenizer_dir):
        if directory is not None and (Path(directory) / "config.json").is_file():
            return json.loads((Path(directory) / "config.json").read_text())
    return None


def _hf_config_from_litgpt(config: Any) -> dict[str, Any]:
    """A ``config.json`` for the LitGPT layouts Hugging Face has a class for: LLaMA, Qwen2 and GPT-NeoX."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    unsupported = config.rope_adjustments or config.norm_qk or config.n_expert or config.sliding_window_size
    if config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm" and not unsupported:
        common = {
            "vocab_size": config.padded_vocab_size,
            "hidden_size": config.n_embd,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_query_groups,
            "head_dim": config.head_size,
            "max_position_embeddings": config.block_size,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_base,
            "hidden_act": "silu",
        }
        if config.attn_bias and not config.bias:
            return Qwen2Config(**common).to_dict()
        if not config.attn_bias and not config.bias:
            return LlamaConfig(**common).to_dict()
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm" and not unsupported:
        return GPTNeoXConfig(
            vocab_size=config.padded_vocab_size,
            hidden_size=config.n_embd,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            intermediate_size=config.intermediate_size,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
            rotary_pct=config.rotary_percentage,
            rotary_emb_base=config.rope_base,
            max_position_embeddings=config.block_size,
            layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual,
            attention_bias=config.bias,
            tie_word_embeddings=False,
        ).to_dict()
    raise CheckpointError(
        f"export --format hf: no config.json beside the base model and no Hugging Face layout known for the "
        f"LitGPT config '{config.name}' (LLaMA, Qwen2 and GPT-NeoX are); put the original config.json in the "
        "checkpoint directory"
    )


def _copy_tokenizer_files(ref: ModelRef, directory: Path) -> None:
    for name in TOKENIZER_FILES:
        if (ref.tokenizer_dir / name).is_file():
            shutil.copy(ref.tokenizer_dir / name, directory / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="a fit's .ckpt, a sharded checkpoint or a LitGPT directory")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: as trained)")
    parser.add_argument("--tokenizer-dir", type=Path, help="default: the fit's data.tokenizer_dir")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = export(args.checkpoint, args.out, args.format, args.force, args.dtype, args.tokenizer_dir)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"wrote {out} ({args.format}, {size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
