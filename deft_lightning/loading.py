"""Loading a trained model for evaluation or analysis: a LitGPT checkpoint directory (e.g. the base model) or a
``.ckpt`` file written by ``fit``, whose tokenizer and prompt style come from its run directory's ``config.yaml``.

:func:`resolve_model` checks everything cheaply (no weights read); :func:`load_weights` builds the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deft_lightning.prompting import CHAT_TEMPLATE


@dataclass
class ModelRef:
    """A model to evaluate, resolved (and checked) without loading its weights."""

    name: str
    path: Path
    tokenizer_dir: Path
    prompt_style: str
    system_prompt: str | None
    config: Any  # litgpt Config
    #: the LitGPT checkpoint directory the weights started from (its ``config.json`` describes the architecture)
    base_dir: Path | None = None
    #: the fit's LoRA settings (``deft_lightning.lora.LoRA`` fields), when it trained adapters
    lora: dict[str, Any] | None = None

    def fingerprint(self) -> list[Any]:
        inner = "meta.pt" if is_sharded(self.path) else "lit_model.pth"
        stat = (self.path if self.path.is_file() else self.path / inner).stat()
        return [str(self.path.resolve()), stat.st_size, stat.st_mtime_ns, str(self.tokenizer_dir), self.prompt_style]


def is_sharded(path: Path) -> bool:
    """A sharded fit checkpoint: a directory of ``torch.distributed.checkpoint`` shards plus Lightning's ``meta.pt``
    (FSDP2, or FSDP1 with ``state_dict_type: sharded``)."""
    return path.is_dir() and (path / "meta.pt").is_file()


def sharded_layout(path: Path) -> str:
    """Which strategy wrote a sharded checkpoint: ``fsdp2`` (``FSDP2Strategy``) or ``fsdp1`` (``BlockFSDPStrategy``
    with sharded state dicts), from the top-level groups of its ``torch.distributed.checkpoint`` index."""
    from torch.distributed.checkpoint import FileSystemReader

    return _layout(FileSystemReader(path).read_metadata().state_dict_metadata)


def _layout(keys: Any) -> str:
    return "fsdp2" if any(key.startswith("state_dict.") for key in keys) else "fsdp1"


def _as_the_fit_saw_it(path: str | Path | None, fit_directory: str | None) -> Path | None:
    """A path from a fit's config, resolved as the fit resolved it: a relative one against the directory the fit ran
    in (stored in its checkpoints), so ``export``/``evaluate`` work from anywhere; an error names what was tried."""
    from deft_lightning.prepare_model import CheckpointError

    if path is None or Path(path).is_absolute():
        return Path(path) if path is not None else None
    tried = [Path(fit_directory) / path] if fit_directory else []
    tried.append(Path(path))
    for candidate in tried:
        if candidate.exists():
            return candidate
    raise CheckpointError(
        f"the fit's '{path}' is not at {' nor at '.join(str(p.absolute()) for p in tried)}; run from the fit's "
        "working directory, or pass the tokenizer directory explicitly (--tokenizer-dir / tokenizer_dir)"
    )


def _run_settings(checkpoint: Path) -> dict[str, Any]:
    """Tokenizer and prompt settings of the fit that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt``)."""
    import yaml

    config_file = checkpoint.parent.parent / "config.yaml"
    if not config_file.is_file():
        return {}
    config = yaml.safe_load(config_file.read_text()) or {}
    data = config.get("data") or {}
    return {**(data.get("init_args") or data), "checkpoint_dir": (config.get("model") or {}).get("checkpoint_dir")}


def resolve_model(
    name: str, path: Path, tokenizer_dir: Path | None = None, prompt_style: str | None = None
) -> ModelRef:
    """Where the weights, tokenizer and prompt style of model ``name`` come from; errors name the path. ``path``: a
    LitGPT checkpoint directory, a fit's ``.ckpt`` (or sharded checkpoint), or a run directory (its newest
    checkpoint)."""
    from deft_lightning.model import resolve_model_config
    from deft_lightning.prepare_model import CheckpointError, validate_checkpoint_dir

    path = Path(path)
    if not name or re.search(r"[/\\,\s]", name):
        raise ValueError(f"model name '{name}' must not contain '/', '\\', ',' or whitespace (it names files)")
    settings: dict[str, Any] = {}
    base = None
    hparams: dict[str, Any] = {}
    if path.is_dir() and not (path / "lit_model.pth").exists() and (path / "checkpoints").is_dir():  # a run directory
        from deft_lightning.checkpointing import newest_checkpoint

        newest = newest_checkpoint(path / "checkpoints")
        if newest is None:
            raise CheckpointError(f"model '{name}': the run directory '{path}' has no complete checkpoint")
        path = newest
    if path.is_dir() and not is_sharded(path):
        validate_checkpoint_dir(path, ("lit_model.pth", "model_config.yaml"))
        config = resolve_model_config(None, None, path)
        default_tokenizer = base = path
    elif (path.is_file() and path.suffix == ".ckpt") or is_sharded(path):
        try:
            from deft_lightning.checkpointing import read_metadata

            checkpoint = read_metadata(path)
            hparams = dict(checkpoint["hyper_parameters"])
        except Exception as err:
            raise CheckpointError(f"cannot read '{path}' as a fit checkpoint ({type(err).__name__}: {err})") from None
        settings = _run_settings(path)
        fit_directory = checkpoint.get("working_directory")
        base = _as_the_fit_saw_it(hparams.get("checkpoint_dir") or settings.get("checkpoint_dir"), fit_directory)
        if base is not None:
            config = resolve_model_config(None, hparams.get("model_config"), base)
        else:
            config = resolve_model_config(hparams.get("model_name"), hparams.get("model_config"), None)
        if tokenizer_dir is None:
            tokenizer_dir = _as_the_fit_saw_it(settings.get("tokenizer_dir"), fit_directory)
        default_tokenizer = base
    elif not path.exists():
        raise CheckpointError(f"model '{name}': '{path}' does not exist")
    else:
        raise CheckpointError(
            f"model '{name}': '{path}' is neither a LitGPT checkpoint directory nor a fit's .ckpt file"
        )
    tokenizer = tokenizer_dir or default_tokenizer
    if tokenizer is None or not (Path(tokenizer) / "tokenizer.json").is_file():
        raise CheckpointError(f"model '{name}': no tokenizer.json found for '{path}'; set tokenizer_dir")
    style = prompt_style or settings.get("prompt_style") or CHAT_TEMPLATE
    base_dir = Path(base) if base is not None else None
    system = settings.get("system_prompt")
    return ModelRef(name, path, Path(tokenizer), style, system, config, base_dir, hparams.get("lora"))


def _empty_model(ref: ModelRef) -> torch.nn.Module:
    """The architecture the checkpoint was trained as (with LoRA adapters if the fit had them), uninitialized."""
    from litgpt import GPT

    with torch.device("meta"):
        if ref.lora:
            import litgpt.lora

            from deft_lightning.lora import LoRA

            model = litgpt.lora.GPT(LoRA(**ref.lora).litgpt_config(ref.config))
        else:
            model = GPT(ref.config)
    return model.to_empty(device="cpu")


def _read_fit_state(ref: ModelRef, model: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The model weights a fit's ``.ckpt`` or sharded checkpoint holds (LoRA fits: maybe the adapters only); a
    sharded one is read into ``model``'s tensors."""
    from deft_lightning.prepare_model import CheckpointError

    if ref.path.is_file():
        full = torch.load(ref.path, map_location="cpu", mmap=True, weights_only=True)["state_dict"]
        return {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(ref.path)
    keys = reader.read_metadata().state_dict_metadata
    group = "state_dict" if _layout(keys) == "fsdp2" else "model"
    stored = {name: tensor for name, tensor in model.state_dict().items() if f"{group}.model.{name}" in keys}
    state = {group: {f"model.{name}": tensor for name, tensor in stored.items()}}
    try:
        load(state, storage_reader=reader, no_dist=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"cannot read the sharded checkpoint '{ref.path}' ({reason})") from None
    return {name.removeprefix("model."): tensor for name, tensor in state[group].items()}


def read_state_dict(ref: ModelRef) -> dict[str, torch.Tensor]:
    """The GPT's weights (LitGPT names) from a checkpoint directory, a fit's ``.ckpt`` or a sharded fit checkpoint,
    read on one process, model weights only; a LoRA fit's adapters are merged into its base."""
    from deft_lightning.prepare_model import load_state_dict

    if ref.path.is_dir() and not is_sharded(ref.path):
        return load_state_dict(ref.path)
    if ref.lora:
        from deft_lightning.lora import merged_state_dict

        return merged_state_dict(read_lora_model(ref))
    return _read_fit_state(ref, _empty_model(ref) if is_sharded(ref.path) else None)


def read_lora_model(ref: ModelRef) -> torch.nn.Module:
    """A LoRA fit as trained: its base (from the checkpoint, or the base directory when the checkpoint holds only the
    adapters) with the adapters beside it, not merged."""
    from deft_lightning.prepare_model import load_state_dict

    model = _empty_model(ref)
    state = _read_fit_state(ref, model)
    if ref.base_dir is not None:
        model.load_state_dict(load_state_dict(ref.base_dir), strict=False)
    model.load_state_dict(state, strict=False)  # the adapters, and the base when the checkpoint kept it
    return model


def load_weights(ref: ModelRef, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(ref.config)
    state = read_state_dict(ref)
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    model.reset_parameters()  # GPT's own: rebuilds the rope cache (a buffer, not in the state dict)
    return model.to(dtype).eval()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; anything else as torch spells it (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPU, where bf16 is far slower."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32
