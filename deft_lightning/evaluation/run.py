"""``python -m deft_lightning evaluate --config <yaml>``: models × benchmarks → one table per suite.

Models are LitGPT checkpoint directories (the base model) or ``.ckpt`` files written by ``fit``; a fit's
tokenizer and prompt style are read from its run directory's ``config.yaml``. Everything is checked (paths,
benchmark files and rows, prompt lengths) before the first model is loaded. Results go to ``out_dir``:

- ``results.json``: every (model, benchmark) cell with its metrics, sampling, seed, throughput and a key;
- ``results.csv``: the same metrics, one ``model, suite, benchmark, metric, value`` row each;
- ``generations/<model>/<benchmark>.jsonl``: every prompt (the text fed, special tokens included, and its
  ``prompt_ids``), reference, sample, extracted answer and score;
- ``tables.md``: the printed tables.

Files are replaced atomically after every cell; a rerun reuses cells whose key (model file, benchmark, sampling,
seed, prompt settings, precision) is unchanged, so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from deft_lightning.evaluation.backends import BACKENDS, Backend, Generator, load_generator, require_vllm
from deft_lightning.evaluation.benchmarks import Benchmark, Item
from deft_lightning.loading import resolve_device, resolve_model
from deft_lightning.prompting import Prompter
from deft_lightning.tables import format_table, write_atomic

RESULTS_FORMAT = 1


def item_seed(seed: int, benchmark: str, item_id: str) -> int:
    return int(hashlib.sha256(f"{seed}/{benchmark}/{item_id}".encode()).hexdigest()[:15], 16)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_benchmark(
    generator: Generator,
    prompter: Prompter,
    benchmark: Benchmark,
    items: list[Item],
    seed: int,
    batch_size: int,
    progress: str | None = None,
    prompts: list[list[int]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, float]]:
    """Generate, score and aggregate one benchmark: ``(metrics, per-item records, throughput)``.

    ``generator``: a generation backend (:mod:`deft_lightning.evaluation.backends`), e.g.
    ``functools.partial(generate, model)``. ``prompts``: the items' prompt ids when already rendered by ``prompter``.
    """
    prompts = prompts or [prompter.prompt_ids(item.row) for item in items]
    sampling = benchmark.sampling(batch_size)
    started = time.perf_counter()
    outputs = generator(
        prompts,
        prompter.tokenizer.eos_id,
        sampling,
        seeds=[item_seed(seed, benchmark.name, item.id) for item in items],
        progress=progress,
    )
    seconds = time.perf_counter() - started
    records, scores = [], []
    for item, prompt, samples in zip(items, prompts, outputs, strict=True):
        texts = [prompter.decode(ids) for ids in samples]
        item_scores = [benchmark.scorer.score(text, item.reference) for text in texts]
        scores.append(item_scores)
        records.append(
            {
                "id": item.id,
                "prompt": prompter.text(prompt),  # special tokens kept: re-tokenized, it gives prompt_ids
                "prompt_ids": prompt,
                "reference": item.reference,
                "samples": [{"output": t, **s} for t, s in zip(texts, item_scores, strict=True)],
            }
        )
    new_tokens = sum(len(ids) for samples in outputs for ids in samples)
    throughput = {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / max(seconds, 1e-9)}
    return benchmark.aggregate(scores), records, throughput


def suite_tables(cells: list[dict[str, Any]], benchmarks: list[Benchmark], models: list[str]) -> str:
    """One table per suite, laid out like the paper's: models as rows, benchmarks (and their average) as columns."""
    by_cell = {(c["model"], c["benchmark"]): c["metrics"] for c in cells}
    suites: dict[str, list[Benchmark]] = {}
    for benchmark in benchmarks:
        suites.setdefault(benchmark.suite, []).append(benchmark)
    sections = []
    for suite, members in suites.items():
        if len(members) == 1:
            columns = [(members[0].name, metric) for metric in members[0].table_metrics]
            header = ["model", *(f"{name} {metric}" for name, metric in columns)]
        else:
            columns = [(b.name, b.table_metrics[0]) for b in members]
            header = ["model", *(name for name, _ in columns), "Avg"]
        rows = []
        for model in models:
            values = [by_cell.get((model, name), {}).get(metric) for name, metric in columns]
            row = [model, *("-" if v is None else f"{v:.2f}" for v in values)]
            if len(members) > 1:
                row.append("-" if None in values else f"{sum(values) / len(values):.2f}")
            rows.append(row)
        metrics = ", ".join(sorted({metric for _, metric in columns}))
        sections.append(f"{suite} ({metrics}, %)\n{format_table(header, rows)}")
    return "\n\n".join(sections)


def throughput_table(cells: list[dict[str, Any]]) -> str:
    rows = [
        (
            c["model"],
            c["benchmark"],
            c["items"],
            c["sampling"]["num_samples"],
            c["new_tokens"],
            f"{c['seconds']:.1f}",
            f"{c['tokens_per_s']:.1f}",
            "earlier run" if c.get("reused") else "this run",
        )
        for c in cells
    ]
    header = ("model", "benchmark", "items", "samples", "new tokens", "seconds", "tokens/s", "generated in")
    return "generation\n" + format_table(header, rows)


def evaluate(
    models: dict[str, Path],
    benchmarks: list[Benchmark],
    out_dir: Path = Path("runs/eval"),
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    precision: str | None = None,
    tokenizer_dir: Path | None = None,
    prompt_style: str | None = None,
    reuse: bool = True,
    backend: Backend = "litgpt",
    limit: int | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Evaluate every model on every benchmark and write the results (see the module docstring).

    Args:
        models: table row name → LitGPT checkpoint directory or a fit's ``.ckpt`` file.
        benchmarks: the benchmarks (``class_path`` + ``init_args`` in YAML); grouped into tables by ``suite``.
        out_dir: where results, generations and tables are written.
        seed: sampling seed (each item draws from its own generator derived from it).
        batch_size: sequences generated together (samples of one prompt included).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``32-true`` or ``bf16-true``; default bf16 on CUDA, fp32 on CPU.
        tokenizer_dir, prompt_style: override what is read from each model's checkpoint or run directory.
        reuse: reuse cells of an earlier run in ``out_dir`` whose key is unchanged.
        backend: ``litgpt`` (default), ``hf`` (transformers on an exported directory) or ``vllm`` (GPU hosts, an
            optional extra); same prompts, seeds, sampling settings and scorers (see
            :mod:`deft_lightning.evaluation.backends`).
        limit: at most this many items per benchmark (a quick look; cells are keyed by their item count).
        dry_run: check models, benchmarks and prompt lengths, print what would run, and stop before loading a model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"evaluate: backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "vllm":
        require_vllm()
    if not models:
        raise ValueError("evaluate: no models given (models: {name: checkpoint dir or .ckpt})")
    if not benchmarks:
        raise ValueError("evaluate: no benchmarks given")
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: benchmark names must be unique, got {names}")
    device_ = resolve_device(device)
    precision = precision or ("bf16-true" if device_.type == "cuda" else "32-true")
    dtypes = {"32-true": torch.float32, "bf16-true": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"evaluate: precision must be one of {sorted(dtypes)}, got '{precision}'")

    # everything that can be wrong is checked before the first model is loaded
    refs = [resolve_model(n, p, tokenizer_dir, prompt_style) for n, p in models.items()]
    if limit is not None and limit < 1:
        raise ValueError(f"evaluate: --limit must be >= 1, got {limit}")
    items = {b.name: b.items()[:limit] for b in benchmarks}
    # once per run: a spec fingerprints its source (file contents, the hub's current revision)
    specs = {b.name: b.spec() for b in benchmarks}
    prompters: dict[tuple[Path, str, str | None], Prompter] = {}
    prompts: dict[tuple[tuple[Path, str, str | None], str], list[list[int]]] = {}  # rendered once per format
    for ref in refs:
        key = (ref.tokenizer_dir, ref.prompt_style, ref.system_prompt)
        if key not in prompters:
            prompters[key] = Prompter(*key)
            for benchmark in benchmarks:
                prompts[key, benchmark.name] = [prompters[key].prompt_ids(item.row) for item in items[benchmark.name]]
        for benchmark in benchmarks:
            longest = max(map(len, prompts[key, benchmark.name]))
            if longest + benchmark.max_new_tokens > ref.config.block_size:
                raise ValueError(
                    f"benchmark '{benchmark.name}': a prompt of {longest} tokens + max_new_tokens "
                    f"{benchmark.max_new_tokens} exceeds model '{ref.name}' block_size "
                    f"{ref.config.block_size}"
                )

    if dry_run:
        plan = [(r.name, str(r.path), r.prompt_style) for r in refs]
        rows = [
            (b.name, b.suite, len(items[b.name]), b.max_new_tokens, b.sampling(batch_size).num_samples)
            for b in benchmarks
        ]
        print(format_table(("model", "checkpoint", "prompt style"), plan), flush=True)
        print(format_table(("benchmark", "suite", "items", "max new tokens", "samples"), rows), flush=True)
        return {"cells": [], "tables": ""}
    out_dir = Path(out_dir)
    results_file = out_dir / "results.json"
    previous = json.loads(results_file.read_text()).get("cells", []) if results_file.is_file() else []
    earlier = {c["key"]: c for c in previous} if reuse else {}
    # cells of other models or benchmarks evaluated earlier into this directory stay in results.json
    this_run = {(r.name, b.name) for r in refs for b in benchmarks}
    others = [c for c in previous if (c["model"], c["benchmark"]) not in this_run]
    cells: list[dict[str, Any]] = []

    def save() -> None:
        document = {
            "format": RESULTS_FORMAT,
            "benchmarks": list(specs.values()),
            "cells": cells + others,
        }
        write_atomic(results_file, json.dumps(document, indent=1, default=str))

    for ref in refs:
        prompt_format = (ref.tokenizer_dir, ref.prompt_style, ref.system_prompt)
        generator = None
        for benchmark in benchmarks:
            sampling = benchmark.sampling(batch_size)
            spec = specs[benchmark.name]
            count = len(items[benchmark.name])
            key = _digest([ref.fingerprint(), ref.system_prompt, spec, sampling, seed, precision, backend, count])
            generations = Path("generations") / ref.name / f"{benchmark.name}.jsonl"
            if key in earlier and (out_dir / generations).is_file():
                cells.append({**earlier[key], "reused": True})
                continue
            if generator is None:
                generator = load_generator(backend, ref, device_, dtypes[precision], out_dir / "exported")
            metrics, records, throughput = run_benchmark(
                generator,
                prompters[prompt_format],
                benchmark,
                items[benchmark.name],
                seed,
                batch_size,
                f"{ref.name}/{benchmark.name}",
                prompts[prompt_format, benchmark.name],
            )
            write_atomic(out_dir / generations, "".join(json.dumps(r, default=str) + "\n" for r in records))
            cells.append(
                {
                    "model": ref.name,
                    "path": str(ref.path),
                    "suite": benchmark.suite,
                    "benchmark": benchmark.name,
                    "metrics": metrics,
                    "items": len(records),
                    "sampling": vars(sampling),
                    "seed": seed,
                    "precision": precision,
                    "backend": backend,
                    "device": str(device_),
                    **throughput,
                    "generations": str(generations),
                    "key": key,
                }
            )
            save()
        del generator
    save()
    csv_lines = ["model,suite,benchmark,metric,value"]
    for cell in cells:
        for metric, value in cell["metrics"].items():
            csv_lines.append(f"{cell['model']},{cell['suite']},{cell['benchmark']},{metric},{value:.6g}")
    write_atomic(out_dir / "results.csv", "\n".join(csv_lines) + "\n")
    tables = suite_tables(cells, benchmarks, [c.name for c in refs])
    write_atomic(out_dir / "tables.md", tables + "\n")
    print(f"\n{tables}\n\n{throughput_table(cells)}\n\nresults: {results_file}", flush=True)
    return {"cells": cells, "tables": tables}


def parse_config(argv: list[str] | None = None) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from the command line (``--config`` and overrides), classes instantiated."""
    from argparse import ArgumentError

    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python -m deft_lightning evaluate", description=__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(evaluate)
    try:
        init = parser.instantiate_classes(parser.parse_args(argv))
    except ArgumentError as err:  # a bad config: say which file and key, without a traceback
        raise ValueError(f"evaluate {' '.join(argv or [])}: {err}") from None
    return {k: v for k, v in vars(init).items() if k not in ("config", "__default_config__")}


def main(argv: list[str] | None = None) -> None:
    evaluate(**parse_config(argv))
