"""``python -m deft_lightning export CKPT --out DIR --format litgpt|hf|peft``: a fine-tuned model for other tools.

CKPT is a fit's ``.ckpt``, a sharded fit checkpoint directory (FSDP2, or FSDP1 with sharded state dicts) or a
LitGPT checkpoint directory.

- ``litgpt``: a LitGPT checkpoint directory — ``lit_model.pth``, ``model_config.yaml``, the tokenizer files, chat
  template and generation config (plus the base model's ``config.json`` when it has one) — that ``litgpt
  generate``/``chat`` accept and a new fit takes as ``model.checkpoint_dir``.
- ``hf``: a Hugging Face directory — ``config.json`` (with ``architectures``, which vLLM needs),
  ``model.safetensors`` (sharded above 5 GB), tokenizer files, ``generation_config.json``, chat template — that
  ``AutoModelForCausalLM.from_pretrained`` loads offline and vLLM / lm-evaluation-harness serve. ``config.json`` is
  the base model's when it has one (checked against the LitGPT config), else written from the LitGPT config for the
  LLaMA, Qwen2 and GPT-NeoX layouts; a field transformers cannot express is refused by name. Weights are renamed
  by litgpt's converters, chosen by layout.
- ``peft``: a LoRA fit's adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` for PEFT, on the base
  model exported with ``--format hf`` (LLaMA layouts).

**Every hf and peft export proves itself before it is published**: transformers (and PEFT) load the written files,
and their logits on a few positions must equal the trained model's to fp32 rounding; otherwise nothing is written
and the error names the config field that differs. The check loads a second copy of the model in fp32.

Tied embeddings: LitGPT unties ``wte``/``lm_head`` on import, so after fine-tuning a tied model (SmolLM2,
Qwen2.5-0.5B/1.5B, Llama-3.2) the two usually differ; the export then says ``tie_word_embeddings: false`` and
saves both (vLLM drops a trained ``lm_head`` of a tied config); while they are equal it stays tied.

Padding: transformers builds ``nn.Embedding(padding_idx=pad_token_id)``, whose row never trains. Base configs often
say pad = EOS (SmolLM2: ``<|im_end|>``, which every example trains), so the export picks a special token that no
turn uses (``<|endoftext|>`` for SmolLM2) for ``pad_token_id`` and the tokenizer's ``pad_token``, or none.

Everything is written to a hidden sibling directory renamed into place when complete; an existing ``--out`` is
replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from deft_lightning.loading import ModelRef, read_state_dict, resolve_model
from deft_lightning.prepare_model import CheckpointError, replace_directory

FORMATS = ("litgpt", "hf", "peft")
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
    format: Literal["litgpt", "hf", "peft"] = "hf",
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
        checked = None
        if format == "litgpt":
            write_litgpt(ref, state, staging)
        elif format == "hf":
            write_hf(ref, state, staging)
            checked = verify_hf(staging, ref.config, state)
        else:
            checked = write_peft(ref, staging)
        for path in staging.rglob("*"):  # whatever wrote them (temporary files are 0600), readable like any output
            path.chmod(0o755 if path.is_dir() else 0o644)
        replace_directory(staging, out)
        if checked:
            print(f"self-check passed: {checked}", flush=True)
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

    config = _base_hf_config(ref)
    if config is None:
        config = hf_config(ref.config)  # refuses what transformers cannot express, before any weight is converted
    elif mismatches := config_mismatches(config, ref.config):
        raise CheckpointError(
            f"export --format hf: the base model's config.json does not describe the trained model "
            f"({'; '.join(mismatches)}); remove it from the base directory to have one written from the LitGPT "
            "config, or export --format litgpt"
        )
    weights = hf_weights(ref.config, state)
    names = _embedding_and_head(weights)
    tied = names is not None and torch.equal(weights[names[0]], weights[names[1]])
    if tied:
        del weights[names[1]]  # a tied config takes the head from the embeddings
    weights = {name: _own_storage(tensor) for name, tensor in weights.items()}
    save_torch_state_dict(weights, directory, max_shard_size="5GB")
    dtype = next(iter(weights.values())).dtype
    config.update({"tie_word_embeddings": tied, "vocab_size": ref.config.padded_vocab_size})
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if not config.get("architectures"):  # vLLM and several hub tools read the class from here
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    _copy_tokenizer_files(ref, directory)
    config["pad_token_id"] = _set_padding(directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


#: LitGPT config fields that none of the architectures written from scratch can express, with their neutral value
NEUTRAL_FIELDS = {
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "attention_scores_scalar": None,
    "sliding_window_size": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "rope_interleave": False,
    "rope_local_base_freq": None,
    "rope_indices": None,
    "n_expert": 0,
    "scale_embeddings": False,
    "lm_head_bias": False,
    "norm_1": True,
    "norm_2": True,
    "latent_attention": None,
}


def hf_config(config: Any) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a LitGPT config, for the layouts transformers has a class for — LLaMA
    (any bias, GQA/MQA, SiLU or GELU gates), Qwen2 (bias on q/k/v only) and GPT-NeoX. Any field none of them can
    express is refused by name rather than dropped."""
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    problems = [
        f"{name}: {getattr(config, name)!r}"
        for name, neutral in NEUTRAL_FIELDS.items()
        if getattr(config, name, neutral) != neutral
    ]
    gated = config.mlp_class_name in ("LLaMAMLP", "GemmaMLP")
    if gated and config.norm_class_name == "RMSNorm":
        if "Gemma" in config.name:
            problems.append(f"name: {config.name!r} (LitGPT gives Gemma-named models an RMSNorm with a unit offset)")
        if config.parallel_residual:
            problems.append("parallel_residual: True")
        if config.rotary_percentage != 1.0:
            problems.append(f"rotary_percentage: {config.rotary_percentage} (partial rotary)")
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
            "hidden_act": _gate_activation(config),
        }
        _refuse(problems, "LLaMA/Qwen2")
        if config.attn_bias and not config.bias:  # biases on q, k and v only
            return Qwen2Config(**common).to_dict()
        return LlamaConfig(**common, attention_bias=config.bias, mlp_bias=config.bias).to_dict()
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        if config.n_query_groups != config.n_head:
            problems.append(f"n_query_groups: {config.n_query_groups} (GPT-NeoX has no grouped-query attention)")
        if config.head_size * config.n_head != config.n_embd:
            problems.append(f"head_size: {config.head_size} (GPT-NeoX uses n_embd / n_head)")
        if not config.bias:
            problems.append("bias: False (GPT-NeoX's linear layers always have biases)")
        if config.parallel_residual and config.shared_attention_norm:
            problems.append("shared_attention_norm: True (GPT-NeoX normalizes attention and MLP inputs apart)")
        _refuse(problems, "GPT-NeoX")
        return GPTNeoXConfig(
            vocab_size=config.padded_vocab_size,
            hidden_size=config.n_embd,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            intermediate_size=config.intermediate_size,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_pytorch_tanh",
            rotary_pct=config.rotary_percentage,
            rotary_emb_base=config.rope_base,
            max_position_embeddings=config.block_size,
            layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual,
            attention_bias=config.bias,
            tie_word_embeddings=False,
        ).to_dict()
    raise CheckpointError(
        f"export --format hf: no Hugging Face architecture for mlp_class_name {config.mlp_class_name!r} with "
        f"norm_class_name {config.norm_class_name!r} (LLaMA, Qwen2 and GPT-NeoX layouts are written from the LitGPT "
        "config); put the original config.json in the base checkpoint directory, or export --format litgpt"
    )


def _gate_activation(config: Any) -> str:
    if config.mlp_class_name == "LLaMAMLP":
        return "silu"
    return "gelu_pytorch_tanh" if config.gelu_approximate == "tanh" else "gelu"


def _refuse(problems: list[str], architecture: str) -> None:
    if problems:
        raise CheckpointError(
            f"export --format hf: transformers' {architecture} cannot express this LitGPT config's "
            f"{'; '.join(problems)}; export --format litgpt instead (LitGPT reads it as trained)"
        )


def config_mismatches(hf: dict[str, Any], config: Any) -> list[str]:
    """Where a Hugging Face ``config.json`` disagrees with the LitGPT config the weights were trained as."""
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base")))
    pairs = {
        "num_hidden_layers": ("n_layer", hf.get("num_hidden_layers")),
        "hidden_size": ("n_embd", hf.get("hidden_size")),
        "num_attention_heads": ("n_head", hf.get("num_attention_heads")),
        "num_key_value_heads": ("n_query_groups", hf.get("num_key_value_heads")),
        "intermediate_size": ("intermediate_size", hf.get("intermediate_size")),
        "head_dim": ("head_size", hf.get("head_dim")),
        "rope_theta": ("rope_base", rope),
        "rms_norm_eps": ("norm_eps", hf.get("rms_norm_eps", hf.get("layer_norm_eps"))),
    }
    found = []
    for key, (field, value) in pairs.items():
        ours = getattr(config, field)
        if value is not None and not math.isclose(float(value), float(ours), rel_tol=1e-6):
            found.append(f"{key} {value} vs {field} {ours}")
    return found


def hf_weights(config: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (LitGPT names) renamed to Hugging Face's by litgpt's converters, chosen by layout: litgpt picks
    them by ``config.name``, so a Qwen2-shaped model named otherwise crashed on its q/k/v biases."""
    from litgpt.scripts import convert_lit_checkpoint as convert

    weights: dict[str, torch.Tensor] = {}
    if config.mlp_class_name in ("LLaMAMLP", "GemmaMLP") and config.norm_class_name == "RMSNorm":
        biases = {name: tensor for name, tensor in state.items() if name.endswith(".bias")}
        convert.copy_weights_llama(config, weights, {k: v for k, v in state.items() if k not in biases})
        weights.update(_llama_biases(config, biases))
    elif config.mlp_class_name == "GptNeoxMLP":
        convert.copy_weights_gpt_neox(config, weights, state)
    else:  # other families (Gemma, Phi, Falcon, ...) keep litgpt's choice by name and the base config.json
        with tempfile.TemporaryDirectory() as scratch:
            lit, converted = Path(scratch) / "lit", Path(scratch) / "hf"
            lit.mkdir()
            torch.save(state, lit / "lit_model.pth")
            from litgpt.utils import save_config

            save_config(config, lit)
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its arguments
                convert.convert_lit_checkpoint(lit, converted)
            weights = torch.load(converted / "model.pth", map_location="cpu", weights_only=True)
    return weights


def _llama_biases(config: Any, biases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaMA-layout biases under Hugging Face's names (litgpt's LLaMA converter has none of them)."""
    renamed = {}
    sizes = (config.n_head * config.head_size, *(2 * [config.n_query_groups * config.head_size]))
    linear = {"attn.proj": "self_attn.o_proj", "mlp.fc_1": "mlp.gate_proj", "mlp.fc_2": "mlp.up_proj"}
    linear["mlp.proj"] = "mlp.down_proj"
    for name, tensor in biases.items():
        layer, module = name.removesuffix(".bias").split(".", 3)[2:]  # transformer.h.<layer>.<module>
        if module == "attn.qkv":
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.split(sizes), strict=True):
                renamed[f"model.layers.{layer}.self_attn.{projection}.bias"] = part
        else:
            renamed[f"model.layers.{layer}.{linear[module]}.bias"] = tensor
    return renamed


def verify_hf(directory: Path, config: Any, state: dict[str, torch.Tensor]) -> str:
    """The written directory, loaded by transformers, gives the trained model's logits (fp32, both) on a few
    positions, or the export is refused: an unmapped config field changes logits far beyond rounding. Returns what
    was checked, for the user."""
    from litgpt import GPT
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, min(24, config.block_size)), generator=generator)
    with torch.device("meta"):
        ours = GPT(config)
    ours.load_state_dict({name: tensor.float() for name, tensor in state.items()}, assign=True)
    ours.cos, ours.sin = ours.rope_cache(device=torch.device("cpu"))  # a buffer, not in the state dict
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        expected, got = ours.eval()(ids), theirs.eval()(ids).logits
    difference = (got - expected).abs().max().item()
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())  # fp32 rounding, summation order
    if not difference <= tolerance:
        hf = json.loads((directory / "config.json").read_text())
        named = config_mismatches(hf, config) or ["no config field this check can name"]
        raise CheckpointError(
            f"export --format hf: transformers' logits of the written model differ from the trained model's by up "
            f"to {difference:.3g} (fp32 noise ≤ {tolerance:.1g}): {'; '.join(named)}; nothing was written — export "
            "--format litgpt instead"
        )
    return f"transformers' logits equal the trained model's (max |Δ| {difference:.2g} ≤ {tolerance:.1g})"


#: litgpt.lora module (below ``transformer.h.<i>.``) → the Hugging Face LLaMA-layout module PEFT adapts
PEFT_MODULES = {
    "attn.proj": "self_attn.o_proj",
    "mlp.fc_1": "mlp.gate_proj",
    "mlp.fc_2": "mlp.up_proj",
    "mlp.proj": "mlp.down_proj",
}


def write_peft(ref: ModelRef, directory: Path) -> str:
    """A LoRA fit as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for the base model
    exported with ``--format hf``; litgpt's fused q/k/v adapter becomes one adapter per projection (its A rows and
    B rows split per enabled projection). Checked like an hf export: PEFT on the base gives the fit's logits."""
    from safetensors.torch import save_file

    from deft_lightning.loading import read_lora_model

    if not ref.lora:
        raise CheckpointError(
            f"export --format peft: '{ref.path}' trained the whole model, not LoRA adapters; use --format hf"
        )
    config = ref.config
    if config.mlp_class_name not in ("LLaMAMLP", "GemmaMLP") or config.norm_class_name != "RMSNorm":
        raise CheckpointError(
            "export --format peft writes adapters for LLaMA-layout models (q_proj/k_proj/v_proj, ...); this one is "
            f"{config.mlp_class_name}/{config.norm_class_name} — export --format hf writes it with the adapters merged"
        )
    model = read_lora_model(ref)
    base = {n.replace("linear.", ""): v for n, v in model.state_dict().items() if "lora_" not in n}
    adapters: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if getattr(module, "r", 0) <= 0 or not hasattr(module, "lora_A"):
            continue
        a, b = module.lora_A.detach(), module.lora_B.detach()
        if name.endswith("attn.qkv"):
            layer = name.split(".")[2]
            enabled = [p for p, on in zip(("q_proj", "k_proj", "v_proj"), module.enable_lora, strict=True) if on]
            pairs = zip(enabled, a.split(module.r), b.split(module.qkv_shapes), strict=True)
            targets = {f"model.layers.{layer}.self_attn.{p}": (a_part, b_part) for p, a_part, b_part in pairs}
        elif name == "lm_head":
            targets = {"lm_head": (a, b)}
        else:
            layer, inner = name.split(".")[2], name.split(".", 3)[3]
            targets = {f"model.layers.{layer}.{PEFT_MODULES[inner]}": (a, b)}
        for target, (a_part, b_part) in targets.items():
            adapters[f"base_model.model.{target}.lora_A.weight"] = a_part.contiguous().clone()
            adapters[f"base_model.model.{target}.lora_B.weight"] = b_part.contiguous().clone()
    save_file(adapters, directory / "adapter_model.safetensors")
    modules = sorted({key.split(".")[-3] for key in adapters})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ref.lora["r"],
        "lora_alpha": ref.lora["alpha"],
        "lora_dropout": ref.lora["dropout"],
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": str(ref.base_dir) if ref.base_dir else None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    _copy_tokenizer_files(ref, directory)
    return verify_peft(directory, ref, base, model)


def verify_peft(directory: Path, ref: ModelRef, base: dict[str, torch.Tensor], model: torch.nn.Module) -> str:
    """PEFT on the base (written as an hf export) gives the LoRA model's logits, or the export is refused."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError(
            'export --format peft checks the adapter with PEFT: pip install -e ".[peft]" (make setup installs it)'
        ) from None
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        write_hf(ref, base, Path(scratch))
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32, local_files_only=True), directory
        )
        with torch.no_grad():
            got = peft_model.eval()(ids).logits
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    with torch.no_grad():
        expected = model.eval().float()(ids)
    difference = (got - expected).abs().max().item()
    tolerance = 1e-4 * max(1.0, expected.abs().max().item())
    if not difference <= tolerance:
        raise CheckpointError(
            f"export --format peft: PEFT's logits differ from the LoRA fit's by up to {difference:.3g} (fp32 noise ≤ "
            f"{tolerance:.1g}); nothing was written — export --format hf writes the adapters merged"
        )
    return f"PEFT's logits on the base equal the LoRA fit's (max |Δ| {difference:.2g} ≤ {tolerance:.1g})"


def _set_padding(directory: Path) -> int | None:
    """A pad token that is no real turn token: transformers builds ``nn.Embedding(padding_idx=pad_token_id)``, which
    never trains that row, so a pad equal to EOS / ``<|im_end|>`` (SmolLM2's) would freeze a token every example
    trains on for anyone continuing from the export. The tokenizer and generation config follow; ``None`` (no
    padding index) when the tokenizer has no spare special token."""
    tokenizer = json.loads((directory / "tokenizer.json").read_text())
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    template = settings.get("chat_template") or ""
    if (directory / "chat_template.jinja").is_file():
        template += (directory / "chat_template.jinja").read_text()

    def content(key: str) -> str | None:
        value = settings.get(key)
        return value.get("content") if isinstance(value, dict) else value

    turn = {content("bos_token"), content("eos_token")}
    spare = [
        token["content"]
        for token in tokenizer.get("added_tokens", [])
        if token.get("special") and token["content"] not in turn and token["content"] not in template
    ]
    preferred = [content("pad_token"), *(t for t in spare if "pad" in t.lower()), content("unk_token"), *spare]
    pad = next((token for token in preferred if token in spare), None)
    ids = {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
    if pad is not None:
        settings["pad_token"] = pad
        settings_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    generation = directory / "generation_config.json"
    if generation.is_file() and pad is not None:
        values = json.loads(generation.read_text())
        values["pad_token_id"] = ids[pad]
        generation.write_text(json.dumps(values, indent=2) + "\n")
    return ids[pad] if pad is not None else None


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """safetensors refuses views into a larger tensor (the q/k/v split makes views)."""
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
