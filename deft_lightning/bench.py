"""Side-by-side benchmarks; every figure is a ratio against a baseline measured in the same run.

python -m deft_lightning bench loss [--size smollm2|qwen1.5b] [--repeats 5] [--cases ...]
    forward+backward of the loss step (output projection included) per implementation, each case in a fresh
    process: median time over --repeats runs after one warm-up, and peak memory above the inputs
    (CUDA: max allocated; CPU: peak RSS), as ratios to materialized-logits NLL (F.cross_entropy).
python -m deft_lightning bench fit [--config configs/tiny.yaml] [--objectives NLL DEFT] [--paths fused plain]
        [--devices 2 --strategy fsdp2] [--set model.model_config.padded_vocab_size=131072 ...]
        [--variants model.activation_checkpointing=false model.activation_checkpointing=true]
    per-rank step time (forward, backward, optimizer) and peak memory of `fit` per objective and loss path, each in
    fresh processes, interleaved rounds, ratios to the first case.
python -m deft_lightning bench litgpt [--checkpoint-dir ...] [--steps 6]
    training tokens/s of `fit` (NLL and DEFT) vs `litgpt finetune_full` on the same model, data and batch.
python -m deft_lightning bench data [--sizes 10000 40000 160000] [--train-rows 2000]
    preparation rows/s and peak memory vs `datasets.map` with the chat template (1 and all cores), and training
    tokens/s packed vs padded vs length-grouped (deft_lightning/bench_data.py).
python -m deft_lightning bench gpu --out DIR [--dry-run]
    the GPU readiness check (deft_lightning/bench_gpu.py; `make gpu-check` on a GPU host).
python -m deft_lightning bench generate [--checkpoint-dir ...] [--items 32] [--batch-sizes 1 16] [--samples 1]
        [--backends litgpt hf]
    generation tokens/s on FigFont test prompts (greedy, or n samples each) per backend and batch size, ratio to the
    first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from deft_lightning.errors import CommandError

SIZES = {
    "smollm2": (4096, 576, 49_152),
    "qwen1.5b": (8192, 1536, 151_936),
    "tiny": (256, 32, 1000),
    "tiny-131k": (4096, 64, 131_072),  # a per-rank micro-batch of 4 × 1024 tokens, 131,072-row head, tiny model
}
LOSS_CASES = [
    "materialized NLL",
    "litgpt chunked CE",
    "reference DEFT",
    "plain DEFT",
    "fused NLL",
    "fused DEFT",
    "fused Cayley",
    "fused EAFT",
    "fused DEFT, logging step",
]
#: peers' fused losses, run where they are installed (Liger-Kernel needs CUDA and Triton)
PEER_LOSS_CASES = ["liger FLCE"]


def _loss_case(name: str) -> Callable:  # (hidden, weight, targets) -> scalar loss; imports stay in the child
    import torch
    import torch.nn.functional as F

    from deft_lightning import objectives
    from deft_lightning.fused import fused_objective_loss
    from deft_lightning.statistics import Needs, target_log_probs

    def materialized_nll(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t, ignore_index=-100)

    def litgpt_chunked(h, w, t):
        from litgpt.utils import chunked_cross_entropy

        return chunked_cross_entropy(h @ w.T, t, chunk_size=128)

    def reference_deft(h, w, t):  # the public code: full fp32 log-softmax, a second softmax for α, α + 1e-6
        logits = (h @ w.T).float()
        keep = t != -100
        logp = torch.log_softmax(logits, -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
        alpha = (torch.softmax(logits, -1) ** 2).sum(-1).detach()
        loss = -(torch.exp(alpha * logp) - 1) / (alpha + 1e-6)
        return (loss * keep).sum() / keep.sum()

    def liger_flce(h, w, t):  # Liger-Kernel's fused linear cross-entropy (NLL), the peer of the fused pass
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=-100)(w, h, t)

    def plain(objective):
        def run(h, w, t):
            logp, stats = target_log_probs(h @ w.T, t, objective.needs)
            return objective.token_loss(logp, stats).sum() / (t != -100).sum()

        return run

    def fused(objective, needs=None):
        def run(h, w, t):
            return fused_objective_loss(h, w, t, objective, 1.0 / int((t != -100).sum()), needs)[0]

        return run

    return {
        "materialized NLL": materialized_nll,
        "litgpt chunked CE": litgpt_chunked,
        "reference DEFT": reference_deft,
        "plain DEFT": plain(objectives.DEFT()),
        "fused NLL": fused(objectives.NLL()),
        "fused DEFT": fused(objectives.DEFT()),
        "fused Cayley": fused(objectives.Cayley()),
        "fused EAFT": fused(objectives.EAFT()),
        # the statistics a training step adds on logging steps (entropy, Σp², accuracy)
        "fused DEFT, logging step": fused(objectives.DEFT(), Needs(entropy=True, collision=True, correct=True)),
        "liger FLCE": liger_flce,
    }[name]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_loss_case(name: str, size: str, repeats: int, device: str) -> dict:
    """In this (fresh) process: time and peak memory of one loss implementation."""
    import resource

    import torch

    n, d, v = SIZES[size]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 on CPU is far slower than fp32
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=generator).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=generator) * d**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=generator).to(device)
    targets[: n // 10] = -100  # some prompt tokens
    loss_fn = _loss_case(name)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _resident_bytes()
    times = []
    for _ in range(repeats + 1):
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss_fn(hidden, weight, targets).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"case": name, "seconds": statistics.median(times[1:]), "peak_bytes": peak}


def loss_rows(size: str, repeats: int, cases: list[str], device: str) -> list[dict]:
    """Each case in a fresh process (materialized NLL, the baseline, first): time and peak memory, or its error."""
    rows = []
    for name in [LOSS_CASES[0], *(case for case in cases if case != LOSS_CASES[0])]:
        result = subprocess.run(
            [sys.executable, "-m", "deft_lightning.bench", "_loss_case", name, size, str(repeats), device],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            rows.append({"case": name, "error": (result.stderr.strip().splitlines() or ["?"])[-1][:120]})
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"  {name}: {rows[-1]['seconds']:.3f} s", file=sys.stderr, flush=True)
    base = rows[0]
    for row in rows:
        if "error" not in row and "error" not in base:
            row["time_ratio"] = row["seconds"] / base["seconds"]
            row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    return rows


def loss_table(rows: list[dict], size: str, device: str, repeats: int) -> str:
    n, d, v = SIZES[size]
    lines = [
        f"loss step, forward + backward, N={n} d={d} V={v}, {device}, median of {repeats} after warm-up",
        f"{'case':<26}{'time (s)':>10}{'× NLL':>8}{'peak (MiB)':>12}{'× NLL':>8}",
    ]
    for row in rows:
        if "error" in row or "time_ratio" not in row:
            lines.append(f"{row['case']:<26}  failed: {row.get('error', 'the baseline failed')}")
            continue
        lines.append(
            f"{row['case']:<26}{row['seconds']:>10.3f}{row['time_ratio']:>8.2f}"
            f"{row['peak_bytes'] / 2**20:>12.0f}{row['memory_ratio']:>8.2f}"
        )
    return "\n".join(lines)


def bench_loss(size: str, repeats: int, cases: list[str]) -> None:
    device = "cuda" if _cuda_available() else "cpu"
    print("\n" + loss_table(loss_rows(size, repeats, cases, device), size, device, repeats))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


FIT_STRATEGIES = {
    "ddp": ["--trainer.strategy=ddp"],
    "fsdp2": ['--trainer.strategy={"class_path": "deft_lightning.strategies.FSDP2Strategy"}'],
    "fsdp1": ['--trainer.strategy={"class_path": "deft_lightning.strategies.BlockFSDPStrategy"}'],
}


def bench_fit(
    config: str,
    objectives: list[str],
    paths: list[str],
    steps: int,
    warmup: int,
    rounds: int,
    devices: int,
    strategy: str | None,
    overrides: list[str],
    variants: list[str],
) -> None:
    """Each (objective, loss path, variant) fit in fresh processes, interleaved rounds; per-rank step time and
    peak RSS. A variant is a comma-separated list of ``option=value`` added to that case's command."""
    import tempfile

    out_dir = tempfile.mkdtemp(prefix="bench-fit-")
    cases = [(objective, path, variant) for objective in objectives for path in paths for variant in variants]
    samples: dict[tuple[str, str, str], list[dict]] = {case: [] for case in cases}
    for round_index in range(rounds):  # interleaved, so machine noise hits every case alike
        for case_index, (objective, path, variant) in enumerate(cases):
            out = f"{out_dir}/{case_index}-{round_index}"
            probe = {"class_path": "deft_lightning.callbacks.StepStats", "init_args": {"out": out, "warmup": warmup}}
            command = [
                sys.executable,
                "-m",
                "deft_lightning",
                "fit",
                "--config",
                config,
                f"--model.objective={objective}",
                f"--model.fused={path == 'fused'}",
                f"--trainer.max_steps={steps}",
                f"--trainer.devices={devices}",
                *(FIT_STRATEGIES[strategy] if strategy else []),
                "--trainer.enable_progress_bar=false",
                "--trainer.limit_val_batches=0",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.enable_model_summary=false",
                "--summary.enabled=false",
                f"--trainer.default_root_dir={out_dir}/run",
                f"--trainer.callbacks+={json.dumps(probe)}",
                *overrides,
                *(f"--{option}" for option in variant.split(",") if option),
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CommandError(f"fit failed ({objective}, {path}, {variant}):\n{result.stderr[-3000:]}")
            samples[objective, path, variant].append(
                [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(devices)]
            )
            print(f"  {objective} {path} {variant} round {round_index + 1}/{rounds}", file=sys.stderr, flush=True)
    setup = f"{devices} process{'es' if devices > 1 else ''}" + (f", {strategy}" if strategy else "")
    print(
        f"\nfit steps (forward, backward, optimizer), {config} {' '.join(overrides)}, {setup}, "
        f"median of {rounds} rounds × {steps - warmup} steps after {warmup}"
    )
    width = max(len(variant) for variant in variants) + 2
    print(f"{'objective':<12}{'path':<7}{'variant':<{width}}{'rank':>5}{'step (ms)':>11}{'× first':>9}", end="")
    print(f"{'peak (MiB)':>12}{'× first':>9}")

    def median(case: tuple[str, str, str], rank: int, key: str) -> float:
        return statistics.median(run[rank][key] for run in samples[case])

    for case in cases:
        for rank in range(devices):
            step, peak = median(case, rank, "step_s"), median(case, rank, "peak_bytes")
            step0, peak0 = median(cases[0], rank, "step_s"), median(cases[0], rank, "peak_bytes")
            print(
                f"{case[0]:<12}{case[1]:<7}{case[2] or '-':<{width}}{rank:>5}{step * 1e3:>11.1f}{step / step0:>9.3f}"
                f"{peak / 2**20:>12.0f}{peak / peak0:>9.3f}"
            )


def litgpt_finetune(
    checkpoint_dir: str,
    data: str,
    steps: int,
    batch: int,
    micro: int,
    length: int,
    out: str,
    precision: str = "32-true",
    prompt_style: str = "smollm2",
) -> tuple[int, float]:
    """``litgpt finetune_full`` on a JSON file: (tokens trained on, training seconds) as it reports them."""
    import re

    command = [
        *(sys.executable, "-m", "litgpt", "finetune_full", checkpoint_dir, "--data", "JSON"),
        *("--data.json_path", data, "--data.val_split_fraction", "0.05", "--data.prompt_style", prompt_style),
        *("--data.mask_prompt", "true", "--train.global_batch_size", str(batch)),
        *("--train.micro_batch_size", str(micro), "--train.max_steps", str(steps)),
        *("--train.max_seq_length", str(length), "--train.log_interval", "1", "--eval.interval", "100000"),
        *("--eval.initial_validation", "false", "--eval.final_validation", "false", "--precision", precision),
        *("--devices", "1", "--out_dir", f"{out}/litgpt", "--logger_name", "csv"),
    ]
    litgpt = subprocess.run(command, capture_output=True, text=True)
    if litgpt.returncode != 0:
        raise CommandError(f"litgpt finetune_full failed:\n{litgpt.stderr[-2000:]}")
    tokens = int(re.search(r"Tokens w/ Prompt\s*:\s*(\d+)", litgpt.stdout).group(1))
    seconds = float(re.search(r"Training Time\s*:\s*([\d.]+)", litgpt.stdout).group(1))
    return tokens, seconds


def bench_litgpt(checkpoint_dir: str, data: str, steps: int, batch: int, micro: int, length: int) -> None:
    import tempfile

    out = tempfile.mkdtemp(prefix="bench-litgpt-")
    tokens, seconds = litgpt_finetune(checkpoint_dir, data, steps, batch, micro, length, out)
    rows = [("litgpt finetune_full (NLL)", tokens, seconds)]
    for objective in ("NLL", "DEFT"):
        ours = subprocess.run(
            [
                sys.executable,
                "-m",
                "deft_lightning",
                "fit",
                "--config",
                "configs/quickstart.yaml",
                f"--model.checkpoint_dir={checkpoint_dir}",
                f"--data.init_args.tokenizer_dir={checkpoint_dir}",
                f"--data.init_args.train.init_args.path={data}",
                "--data.init_args.prompt_style=smollm2",
                f"--data.init_args.max_seq_length={length}",
                f"--data.init_args.batch_size={batch}",
                f"--model.micro_batch_size={micro}",
                f"--model.objective={objective}",
                f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false",
                "--summary.enabled=false",
                f"--trainer.default_root_dir={out}/ours",
                "--trainer.callbacks+=deft_lightning.callbacks.TrainingThroughput",
            ],
            capture_output=True,
            text=True,
        )
        if ours.returncode != 0:
            raise CommandError(f"fit failed:\n{ours.stderr[-2000:]}")
        result = json.loads([line for line in ours.stdout.splitlines() if line.startswith('{"tokens"')][-1])
        rows.append((f"deft_lightning fit ({objective})", result["tokens"], result["seconds"]))
    base = rows[0][1] / rows[0][2]
    print(
        f"\ntraining throughput, {checkpoint_dir}, {data}, {steps} steps of {batch} (micro {micro}), "
        f"max {length} tokens, fp32, first step included"
    )
    print(f"{'run':<30}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'× litgpt':>10}")
    for name, tokens, seconds in rows:
        print(f"{name:<30}{tokens:>8}{seconds:>10.1f}{tokens / seconds:>10.1f}{tokens / seconds / base:>10.3f}")


def bench_generate(
    checkpoint_dir: str,
    items: int,
    max_new_tokens: int,
    batch_sizes: list[int],
    device: str,
    rounds: int,
    samples: int,
    backends: list[str],
) -> None:
    import tempfile

    import torch

    from deft_lightning.evaluation import FigFont
    from deft_lightning.evaluation.backends import load_generator
    from deft_lightning.generation import SamplingConfig
    from deft_lightning.loading import inference_dtype, resolve_device, resolve_model
    from deft_lightning.prompting import Prompter

    ref = resolve_model("model", checkpoint_dir)
    target = resolve_device(device)
    dtype = inference_dtype(target)
    export_dir = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    generators = {backend: load_generator(backend, ref, target, dtype, export_dir) for backend in backends}
    prompter = Prompter(ref.tokenizer_dir, ref.prompt_style)
    prompts = [prompter.prompt_ids(item.row) for item in FigFont(limit=items).items()]
    eos = prompter.tokenizer.eos_id
    for generator in generators.values():
        generator(prompts[:2], eos, SamplingConfig(max_new_tokens=4))  # warm-up
    temperature = 0.0 if samples == 1 else 1.0
    cases = [(backend, size) for backend in backends for size in batch_sizes]
    times: dict[tuple[str, int], list[float]] = {case: [] for case in cases}
    tokens: dict[tuple[str, int], int] = {}
    for _ in range(rounds):  # interleaved, so machine noise hits every case alike
        for backend, size in cases:
            sampling = SamplingConfig(max_new_tokens, temperature, 1.0, samples, size)
            started = time.perf_counter()
            outputs = generators[backend](prompts, eos, sampling)
            if target.type == "cuda":
                torch.cuda.synchronize()
            times[backend, size].append(time.perf_counter() - started)
            tokens[backend, size] = sum(len(sample) for o in outputs for sample in o)
    print(
        f"\ngeneration, {checkpoint_dir}, {items} FigFont test prompts "
        f"({min(map(len, prompts))}–{max(map(len, prompts))} tokens), "
        f"{'greedy' if samples == 1 else f'{samples} samples each at T = 1'}, ≤ {max_new_tokens} new tokens, "
        f"{dtype}, {device}, median of {rounds}"
    )
    print(f"{'backend':<9}{'batch size':<12}{'new tokens':>11}{'seconds':>10}{'tokens/s':>10}{'× first':>9}")
    base = tokens[cases[0]] / statistics.median(times[cases[0]])
    for backend, size in cases:
        seconds = statistics.median(times[backend, size])
        rate = tokens[backend, size] / seconds
        print(f"{backend:<9}{size:<12}{tokens[backend, size]:>11}{seconds:>10.2f}{rate:>10.1f}{rate / base:>9.2f}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_loss_case":  # internal: one case in a fresh process
        name, size, repeats, device = argv[1], argv[2], int(argv[3]), argv[4]
        print(json.dumps(run_loss_case(name, size, repeats, device)))
        return
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{loss,fit,litgpt,generate,data,gpu}")
    modes.add_parser("data", help="preparation and packing: python -m deft_lightning bench data --help")
    modes.add_parser("gpu", help="the GPU readiness check: python -m deft_lightning bench gpu --help")
    loss = modes.add_parser("loss")
    loss.add_argument("--size", choices=list(SIZES), default="smollm2")
    loss.add_argument("--repeats", type=int, default=5)
    loss.add_argument(
        "--cases", nargs="+", choices=LOSS_CASES + PEER_LOSS_CASES, default=LOSS_CASES, help="(materialized NLL always)"
    )
    fit = modes.add_parser("fit")
    fit.add_argument("--config", default="configs/tiny.yaml")
    fit.add_argument("--objectives", nargs="+", default=["NLL", "DEFT", "Cayley", "EAFT"])
    fit.add_argument("--paths", nargs="+", choices=["fused", "plain"], default=["fused"], help="loss paths to compare")
    fit.add_argument("--steps", type=int, default=200)
    fit.add_argument("--warmup", type=int, default=20)
    fit.add_argument("--rounds", type=int, default=3)
    fit.add_argument("--devices", type=int, default=1, help="processes (CPU: gloo)")
    fit.add_argument("--strategy", choices=list(FIT_STRATEGIES), help="with --devices > 1")
    fit.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="fit options for every case")
    fit.add_argument(
        "--variants", nargs="+", default=[""], metavar="OPTION=VALUE,...", help="cases that differ in these options"
    )
    versus = modes.add_parser("litgpt")
    versus.add_argument("--checkpoint-dir", default="checkpoints/SmolLM2-135M-Instruct")
    versus.add_argument("--data", default="data/figfont/train.jsonl")
    versus.add_argument("--steps", type=int, default=6)
    versus.add_argument("--batch-size", type=int, default=8)
    versus.add_argument("--micro-batch-size", type=int, default=4)
    versus.add_argument("--max-seq-length", type=int, default=384)
    gen = modes.add_parser("generate")
    gen.add_argument("--checkpoint-dir", default="checkpoints/SmolLM2-135M-Instruct")
    gen.add_argument("--items", type=int, default=32)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    gen.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    gen.add_argument("--rounds", type=int, default=3)
    gen.add_argument("--samples", type=int, default=1, help="> 1: that many samples per prompt at temperature 1")
    gen.add_argument("--backends", nargs="+", choices=["litgpt", "hf", "vllm"], default=["litgpt"])
    args = parser.parse_args(argv)
    if args.mode == "generate":
        bench_generate(
            args.checkpoint_dir,
            args.items,
            args.max_new_tokens,
            args.batch_sizes,
            args.device,
            args.rounds,
            args.samples,
            args.backends,
        )
    elif args.mode == "loss":
        bench_loss(args.size, args.repeats, args.cases)
    elif args.mode == "fit":
        bench_fit(
            args.config,
            args.objectives,
            args.paths,
            args.steps,
            args.warmup,
            args.rounds,
            args.devices,
            args.strategy,
            [f"--{option.lstrip('-')}" for option in args.set],
            [variant.replace("--", "") for variant in args.variants],
        )
    else:
        bench_litgpt(
            args.checkpoint_dir, args.data, args.steps, args.batch_size, args.micro_batch_size, args.max_seq_length
        )


if __name__ == "__main__":
    main()
