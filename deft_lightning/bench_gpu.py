"""``python -m deft_lightning bench gpu --out DIR [--dry-run]``: the GPU readiness check, one command that proves the
GPU path on a lent H100/H200 in about 8 minutes (``make gpu-check``) and writes ``gpu_check.json`` and
``gpu_check.md`` to DIR after every section, so a check stopped at its time limit still returns what it measured.

Sections (each timed; one that fails is recorded and the next one runs):

- **precision**: what a config without ``trainer.precision`` gets on this host (bf16-mixed on a CUDA GPU with bf16).
- **matmul peak**: measured bf16 TFLOP/s of an 8192³ product, the denominator of MFU next to the spec sheet's.
- **numerics**: every objective's loss and gradients (hidden states and output weight) under ``bf16-mixed``, fused and
  plain, against an fp32 reference of the same inputs; relative errors and whether they hold the stated bounds.
- **loss step** at the Qwen2.5-1.5B head (N = 8192, d = 1536, V = 151,936), each case in a fresh process:
  materialized NLL (the baseline), reference-style DEFT, fused NLL/DEFT/Cayley/EAFT and Liger-Kernel's fused linear
  cross-entropy — time and CUDA peak memory as ratios to the baseline.
- **fit throughput**: a random-init Qwen2.5-1.5B, ``bf16-mixed``, sequences of 2048, fused and plain: tokens/s, MFU,
  CUDA peak memory; ``litgpt finetune_full`` on the same model and token counts as the peer.
- **strategies**: a few steps with ``BlockFSDPStrategy`` (FSDP1) and ``FSDP2Strategy`` on the one GPU, fused on,
  then a resume from the sharded checkpoint.
- **generation**: greedy tokens/s at batch 1, 8 and 64.

``--dry-run`` runs the same code on the CPU at toy sizes (tests/test_bench_gpu.py), so the check cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: relative error bounds that bf16-mixed results must hold against fp32 (gradients: Frobenius norm per tensor)
BF16_LOSS_BOUND, BF16_GRADIENT_BOUND = 1e-2, 2e-2
#: dense bf16 peak of the H100 / H200 SXM spec sheet (TFLOP/s), the other MFU denominator
SPEC_BF16_TFLOPS = 989.4
TINY = {
    "name": "tiny",
    "block_size": 256,
    "vocab_size": 320,
    "padded_vocab_size": 320,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 64,
}


@dataclass(frozen=True)
class Scale:
    """The sizes of one run of the check."""

    device: str
    numerics: tuple[int, int, int]  # tokens, hidden size, vocabulary
    loss_size: str  # a deft_lightning.bench.SIZES key
    loss_repeats: int
    model: dict[str, Any]  # DeftModule's model_name / model_config
    seq_len: int
    batch: int
    micro: int
    fit_steps: int
    warmup: int
    strategy_model: dict[str, Any]
    generation_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    matmul: int


GPU = Scale(
    "cuda", (2048, 1536, 151_936), "qwen1.5b", 3, {"model_name": "Qwen2.5-1.5B"}, 2048, 8, 2, 10, 3,
    {"model_name": "Qwen2.5-0.5B"}, (1, 8, 64), 128, 64, 8192,
)  # fmt: skip
DRY_RUN = Scale(
    "cpu", (64, 32, 1000), "tiny", 1, {"model_config": TINY}, 64, 4, 2, 3, 1, {"model_config": TINY}, (1, 4), 16,
    8, 256,
)  # fmt: skip


@dataclass
class Report:
    scale: str
    device: str
    sections: dict[str, Any] = field(default_factory=dict)

    def write(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(asdict(self), indent=1, default=str) + "\n")
        (out / "gpu_check.md").write_text(markdown(self) + "\n")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------- sections


def check_precision(scale: Scale) -> dict[str, Any]:
    import torch

    from deft_lightning.cli import resolve_precision

    cuda = torch.cuda.is_available()
    precision, reason = resolve_precision("auto", cuda, cuda and torch.cuda.is_bf16_supported())
    name = torch.cuda.get_device_name() if cuda else "cpu"
    return {"device": name, "torch": torch.__version__, "precision": precision, "reason": reason}


def check_matmul_peak(scale: Scale) -> dict[str, Any]:
    import torch

    size, dtype = scale.matmul, torch.bfloat16 if scale.device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=scale.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(scale.device)
    started, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        a @ b
    _sync(scale.device)
    seconds = (time.perf_counter() - started) / repeats
    return {"size": size, "dtype": str(dtype), "tflops": 2 * size**3 / seconds / 1e12}


def check_numerics(scale: Scale) -> dict[str, Any]:
    import torch

    from deft_lightning.fused import fused_objective_loss
    from deft_lightning.objectives import DEFT, DFT, EAFT, NLL, Cayley, CayleyReference, Prob, QLog
    from deft_lightning.statistics import target_log_probs

    n, d, v = scale.numerics
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator).to(scale.device)
    weight = (torch.randn(v, d, generator=generator) * d**-0.5).to(scale.device)
    targets = torch.randint(0, v, (n,), generator=generator).to(scale.device)
    targets[: n // 10] = -100
    kept = int((targets != -100).sum())

    def plain(objective, h, w):
        logp, stats = target_log_probs(h @ w.T, targets, objective.needs)
        return objective.token_loss(logp, stats).sum() / kept

    def fused(objective, h, w):
        return fused_objective_loss(h, w, targets, objective, 1 / kept)[0]

    def run(path: Callable, objective, autocast: bool) -> tuple[float, Any, Any]:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(scale.device, dtype=torch.bfloat16, enabled=autocast):
            loss = path(objective, h, w)
        loss.backward()
        return float(loss), h.grad.float(), w.grad.float()

    rows = []
    objectives = [NLL(), Prob(), QLog(0.5), DFT(), EAFT(), Cayley(), DEFT(), CayleyReference()]
    for objective in objectives:
        loss, grad_h, grad_w = run(plain, objective, autocast=False)  # the fp32 reference
        for name, path in (("fused", fused), ("plain", plain)):
            if name == "fused" and objective.batch_dependent:
                continue
            got_loss, got_h, got_w = run(path, objective, autocast=True)
            errors = {
                "loss": abs(got_loss - loss) / abs(loss),
                "grad_hidden": float((got_h - grad_h).norm() / grad_h.norm()),
                "grad_weight": float((got_w - grad_w).norm() / grad_w.norm()),
            }
            holds = errors["loss"] <= BF16_LOSS_BOUND and max(errors["grad_hidden"], errors["grad_weight"]) <= (
                BF16_GRADIENT_BOUND
            )
            rows.append({"objective": repr(objective), "path": name, **errors, "holds": holds})
    return {
        "tokens": n,
        "hidden": d,
        "vocab": v,
        "bounds": {"loss": BF16_LOSS_BOUND, "gradients": BF16_GRADIENT_BOUND},
        "all_hold": all(row["holds"] for row in rows),
        "rows": rows,
    }


def check_loss_step(scale: Scale) -> dict[str, Any]:
    from deft_lightning.bench import loss_rows

    cases = ["reference DEFT", "fused NLL", "fused DEFT", "fused Cayley", "fused EAFT", "liger FLCE"]
    rows = loss_rows(scale.loss_size, scale.loss_repeats, cases, scale.device)
    by_case = {row["case"]: row for row in rows if "error" not in row}
    result: dict[str, Any] = {"size": scale.loss_size, "repeats": scale.loss_repeats, "rows": rows}
    if "fused DEFT" in by_case and "liger FLCE" in by_case:
        deft, liger = by_case["fused DEFT"], by_case["liger FLCE"]
        result["fused DEFT vs Liger"] = {
            "time": deft["seconds"] / liger["seconds"],
            "memory": deft["peak_bytes"] / liger["peak_bytes"],
        }
    return result


def _synthetic_data(scale: Scale, vocab: int, steps: int):
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    class Synthetic(L.LightningDataModule):
        """Random token ids, every position a target: throughput without a tokenizer or files."""

        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            batches = []
            for _ in range(steps):
                ids = torch.randint(0, vocab, (scale.batch, scale.seq_len), generator=generator)
                batches.append({"input_ids": ids, "labels": ids.clone()})
            return DataLoader(batches, batch_size=None)

    return Synthetic()


def _trainer(scale: Scale, precision: str, steps: int, callbacks: list, root: Path, **kwargs):
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if scale.device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the checks read the last step's metrics
        default_root_dir=str(root),
        callbacks=callbacks,
        **kwargs,
    )


def _flops_per_token(config: Any, seq_len: int) -> float:
    """6 × parameters in matmuls (all but the input embedding) + causal attention's 6 × layers × seq × width."""
    import torch
    from litgpt import GPT

    with torch.device("meta"):
        model = GPT(config)
    params = sum(p.numel() for p in model.parameters()) - model.transformer.wte.weight.numel()
    return 6 * params + 6 * config.n_layer * seq_len * config.n_embd


def check_fit(scale: Scale, peak_tflops: float | None, precision: str, workdir: Path) -> dict[str, Any]:
    import torch

    from deft_lightning.callbacks import StepStats
    from deft_lightning.model import DeftModule
    from deft_lightning.objectives import DEFT

    rows = []
    checkpoint = workdir / "litgpt-checkpoint"
    for fused in (True, False):
        _reset_peak(scale.device)
        module = DeftModule(objective=DEFT(), micro_batch_size=scale.micro, fused=fused, **scale.model)
        timer = StepStats(str(workdir / f"steps-{fused}"))
        data = _synthetic_data(scale, module.config.vocab_size, scale.fit_steps)
        _trainer(scale, precision, scale.fit_steps, [timer], workdir / "fit").fit(module, data)
        step = statistics.median(timer.times[scale.warmup :] or timer.times)
        tokens_per_s = scale.batch * scale.seq_len / step
        flops = _flops_per_token(module.config, scale.seq_len) * tokens_per_s
        rows.append(
            {
                "run": f"deft_lightning fit, DEFT, {'fused' if fused else 'plain'}",
                "step_s": step,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_all_steps": scale.batch * scale.seq_len * len(timer.times) / sum(timer.times),
                "mfu_measured_peak": flops / (peak_tflops * 1e12) if peak_tflops else None,
                "mfu_spec_peak": flops / (SPEC_BF16_TFLOPS * 1e12) if scale.device == "cuda" else None,
                "peak_bytes": _peak_bytes(scale.device),
            }
        )
        if fused:  # the peer starts from these weights (no second random init of the model)
            checkpoint.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in module.model.state_dict().items()}, checkpoint / "lit_model.pth")
        config = module.config
        del module
    rows.append(_litgpt_peer(scale, config, precision, workdir))
    ours = rows[0]
    rows[-1]["ours_vs_litgpt"] = ours["tokens_per_s_all_steps"] / rows[-1]["tokens_per_s"]  # both with warm-up
    return {"model": scale.model, "seq_len": scale.seq_len, "batch": scale.batch, "micro": scale.micro, "rows": rows}


def _litgpt_peer(scale: Scale, config: Any, precision: str, workdir: Path) -> dict[str, Any]:
    """``litgpt finetune_full`` from the same random-init weights, sequences of the same length (the tiny
    tokenizer's ids are valid in any vocabulary); its tokens/s include its first steps, as it reports them."""
    import shutil

    from litgpt.utils import save_config

    from deft_lightning.bench import litgpt_finetune

    checkpoint = workdir / "litgpt-checkpoint"  # lit_model.pth written by check_fit
    save_config(config, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "data/tiny/tokenizer" / name, checkpoint / name)
    words = " ".join(f"w{i % 97}" for i in range(scale.seq_len))  # ≥ seq_len tokens once truncated
    rows = [{"instruction": "Repeat.", "input": "", "output": words} for _ in range(scale.batch * scale.fit_steps * 2)]
    (workdir / "litgpt-data.json").write_text(json.dumps(rows))
    tokens, seconds = litgpt_finetune(
        str(checkpoint), str(workdir / "litgpt-data.json"), scale.fit_steps, scale.batch, scale.micro,
        scale.seq_len, str(workdir), precision=precision, prompt_style="alpaca",
    )  # fmt: skip
    return {"run": "litgpt finetune_full (NLL)", "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def check_strategies(scale: Scale, precision: str, workdir: Path) -> dict[str, Any]:
    from deft_lightning.model import DeftModule
    from deft_lightning.objectives import DEFT
    from deft_lightning.strategies import BlockFSDPStrategy, FSDP2Strategy

    rows = []
    for name, strategy in (("FSDP1 (BlockFSDPStrategy)", BlockFSDPStrategy), ("FSDP2 (FSDP2Strategy)", FSDP2Strategy)):
        started = time.perf_counter()
        root = workdir / name.split()[0]
        module = DeftModule(objective=DEFT(), micro_batch_size=scale.micro, **scale.strategy_model)
        data = _synthetic_data(scale, module.config.vocab_size, 6)
        trainer = _trainer(scale, precision, 3, [], root, strategy=strategy())
        trainer.fit(module, data)
        checkpoint = root / "step3.ckpt"
        trainer.save_checkpoint(checkpoint)
        loss = float(trainer.callback_metrics["train/loss"])
        resumed = DeftModule(objective=DEFT(), micro_batch_size=scale.micro, **scale.strategy_model)
        again = _trainer(scale, precision, 5, [], root, strategy=strategy())
        again.fit(resumed, _synthetic_data(scale, resumed.config.vocab_size, 6), ckpt_path=str(checkpoint))
        rows.append(
            {
                "strategy": name,
                "fused": module.uses_fused_path(),
                "steps_after_resume": again.global_step,
                "loss_step3": loss,
                "loss_step5": float(again.callback_metrics["train/loss"]),
                "sharded_checkpoint": checkpoint.is_dir(),
                "seconds": time.perf_counter() - started,
                "ok": again.global_step == 5 and math.isfinite(loss),
            }
        )
    return {"model": scale.strategy_model, "rows": rows}


def check_generation(scale: Scale) -> dict[str, Any]:
    import torch
    from litgpt import GPT

    from deft_lightning.generation import SamplingConfig, generate
    from deft_lightning.model import resolve_model_config

    config = resolve_model_config(scale.model.get("model_name"), scale.model.get("model_config"), None)
    dtype = torch.bfloat16 if scale.device == "cuda" else torch.float32
    with torch.device(scale.device):
        model = GPT(config).to(dtype).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in scale.generation_batches:
        prompts = torch.randint(0, config.vocab_size, (batch, scale.prompt_len), generator=generator).tolist()
        sampling = SamplingConfig(max_new_tokens=scale.new_tokens, batch_size=batch)
        generate(model, prompts[:1], -1, SamplingConfig(max_new_tokens=2))  # warm-up
        _sync(scale.device)
        started = time.perf_counter()
        outputs = generate(model, prompts, -1, sampling)  # eos -1: every row generates all its tokens
        _sync(scale.device)
        seconds = time.perf_counter() - started
        new = sum(len(sample) for output in outputs for sample in output)
        rows.append({"batch": batch, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds})
    return {"model": scale.model, "prompt_len": scale.prompt_len, "dtype": str(dtype), "rows": rows}


# ---------------------------------------------------------------- the check


def run_gpu_check(out: Path, dry_run: bool = False) -> Report:
    import torch

    scale = DRY_RUN if dry_run else GPU
    if not dry_run and not torch.cuda.is_available():
        raise ValueError("bench gpu needs a CUDA GPU; use --dry-run to run the same check on the CPU at toy sizes")
    report = Report("dry-run" if dry_run else "gpu", scale.device)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    precision = "bf16-mixed"

    def section(name: str, run: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = {"result": run(), "seconds": time.perf_counter() - started}
        except Exception as error:  # record it and go on: the other sections still report
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
        report.sections[name] = result
        report.write(out)
        return result.get("result")

    section("precision", lambda: check_precision(scale))
    peak = (section("matmul peak", lambda: check_matmul_peak(scale)) or {}).get("tflops")
    section("numerics", lambda: check_numerics(scale))
    section("loss step", lambda: check_loss_step(scale))
    section("fit throughput", lambda: check_fit(scale, peak, precision, workdir))
    section("strategies", lambda: check_strategies(scale, precision, workdir))
    section("generation", lambda: check_generation(scale))
    return report


def markdown(report: Report) -> str:
    lines = [f"# GPU check ({report.scale}, {report.device})", ""]
    for name, section in report.sections.items():
        lines += [f"## {name} ({section['seconds']:.1f} s)", ""]
        if "error" in section:
            lines += [f"failed: `{section['error']}`", ""]
            continue
        result = section["result"]
        rows = result.get("rows") if isinstance(result, dict) else None
        facts = {k: v for k, v in result.items() if k != "rows"} if isinstance(result, dict) else {"value": result}
        lines += [f"- {key}: {_cell(value)}" for key, value in facts.items()]
        if rows:
            columns = list(dict.fromkeys(key for row in rows for key in row))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(key)) for key in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return "-" if value is None else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning bench gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="where the JSON and Markdown go")
    parser.add_argument("--dry-run", action="store_true", help="the same check on the CPU at toy sizes")
    args = parser.parse_args(argv)
    report = run_gpu_check(args.out, args.dry_run)
    print(markdown(report), flush=True)
