"""``python -m deft_lightning bench data``: data preparation and packed training at the users' scale, side by side.

On generated long-tailed chat rows (``messages`` with one user and one assistant turn; response lengths
log-normal around a median of ~300 tokens, tail to ~3,000), in one run:

* preparation: rows/s and peak memory (PSS of the process and its workers, sampled) of our preparation
  (``SFTDataModule``, every core) vs ``datasets.load_dataset`` + ``Dataset.map`` tokenizing with the tokenizer's chat
  template as TRL does, with one process and with ``num_proc`` = the cores, each case in a fresh process;
* training: trained tokens/s of ``fit`` on the same rows, packed vs padded (random order) vs length-grouped.

Every figure is also printed as a ratio against the case it is compared with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_TOKENIZER = Path("checkpoints/SmolLM2-135M-Instruct")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fi", "go", "hu", "ja", "ze", "po", "ki",
             "rex", "sol", "tan", "ver", "wix", "on", "el", "ar", "um")  # fmt: skip
#: tokens per generated word with SmolLM2's tokenizer (measured on 2,000 rows): response words = tokens / this
TOKENS_PER_WORD = 2.1


def write_chat_rows(path: Path, count: int, seed: int = 0, median_tokens: int = 300, max_tokens: int = 3000) -> Path:
    """``count`` JSONL chat rows with log-normal response lengths (σ 0.8: median ``median_tokens``, p99 ≈ 6×)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(5000)])
    with path.open("w") as handle:
        for start in range(0, count, 10_000):
            size = min(10_000, count - start)
            tokens = np.minimum(max_tokens, rng.lognormal(math.log(median_tokens), 0.8, size))
            response_words = np.maximum(1, (tokens / TOKENS_PER_WORD).astype(int))
            prompt_words = rng.integers(8, 60, size)
            picks = words[rng.integers(0, len(words), int(response_words.sum() + prompt_words.sum()))]
            cursor = 0
            lines = []
            for n_prompt, n_response in zip(prompt_words.tolist(), response_words.tolist(), strict=True):
                prompt = " ".join(picks[cursor : cursor + n_prompt]) + "?"
                response = " ".join(picks[cursor + n_prompt : cursor + n_prompt + n_response]) + "."
                cursor += n_prompt + n_response
                turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                lines.append(json.dumps({"messages": turns}))
            handle.write("\n".join(lines) + "\n")
    return path


class PeakMemory:
    """Samples the proportional set size (PSS) of this process and every descendant (shared pages counted once
    across them) every ``interval`` seconds; ``peak`` is the largest sum seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_pss(pid) for pid in _tree(os.getpid())))
            self._stop.wait(self.interval)


def _tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                pending += [int(child) for child in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return pids


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prepare_case(case: str, rows: Path, tokenizer_dir: Path, workers: int, max_seq_length: int, out: Path) -> dict:
    """One preparation in this process (run in a fresh one per case): seconds, peak PSS, examples, tokens."""
    cache = Path(tempfile.mkdtemp(prefix="bench-data-", dir=out))
    os.environ["HF_DATASETS_CACHE"] = str(cache / "hf")
    with PeakMemory() as memory:
        started = time.perf_counter()
        if case == "ours":
            from deft_lightning.data import FileSource, SFTDataModule

            data = SFTDataModule(
                FileSource(rows), tokenizer_dir, max_seq_length=max_seq_length, cache_dir=cache, num_proc=workers
            )
            dataset = data.split("train")
            examples, tokens = len(dataset), data.reports["train"].tokens
        else:
            import datasets
            from transformers import AutoTokenizer

            datasets.disable_progress_bars()
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

            def tokenize(example: dict) -> dict:  # TRL's conversational tokenization (SFTTrainer, one example)
                return tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)

            raw = datasets.load_dataset("json", data_files=str(rows), split="train", cache_dir=str(cache / "hf"))
            dataset = raw.map(tokenize, num_proc=workers if workers > 1 else None, remove_columns=["messages"])
            examples, tokens = len(dataset), sum(len(ids) for ids in dataset.data.column("input_ids").to_pylist())
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_bytes": memory.peak, "examples": examples, "tokens": tokens}


def _run_case(case: str, rows: Path, tokenizer_dir: Path, workers: int, max_seq_length: int, out: Path) -> dict:
    command = [sys.executable, "-m", "deft_lightning.bench_data", "--case", case, "--rows-file", str(rows),
               "--tokenizer-dir", str(tokenizer_dir), "--workers", str(workers), "--max-seq-length",
               str(max_seq_length), "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        from deft_lightning.errors import CommandError

        raise CommandError(f"bench data case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_preparation(sizes: list[int], tokenizer_dir: Path, max_seq_length: int, baseline_max: int, out: Path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cases = [("ours", cores, f"ours ({cores} processes)"), ("map", 1, "datasets.map"),
             ("map", cores, f"datasets.map num_proc={cores}")]  # fmt: skip
    results: dict[tuple[int, str], dict] = {}
    for size in sizes:
        rows = write_chat_rows(out / f"chat-{size}.jsonl", size)
        for case, workers, label in cases:
            if case == "map" and size > baseline_max:
                continue
            print(f"  preparing {size:,} rows: {label}", file=sys.stderr, flush=True)
            results[size, label] = _run_case(case, rows, tokenizer_dir, workers, max_seq_length, out)
        rows.unlink()
    print(f"\npreparation of generated chat rows, tokenizer {tokenizer_dir}, max_seq_length {max_seq_length}, "
          f"{cores} cores; peak memory = PSS of the process and its workers")  # fmt: skip
    header = f"{'rows':>9}  {'case':<28}{'seconds':>9}{'rows/s':>9}{'× map':>8}{'× map np':>10}{'peak MiB':>10}"
    print(header + f"{'× at ' + format(sizes[0], ','):>12}")
    for size in sizes:
        for _, _, label in cases:
            if (size, label) not in results:
                continue
            r = results[size, label]
            rate = r["examples"] / r["seconds"]
            ratios = []
            for base in (cases[1][2], cases[2][2]):
                b = results.get((size, base))
                ratios.append(f"{rate / (b['examples'] / b['seconds']):.2f}" if b else "-")
            first = results[sizes[0], label]["peak_bytes"]
            print(f"{size:>9,}  {label:<28}{r['seconds']:>9.1f}{rate:>9.0f}{ratios[0]:>8}{ratios[1]:>10}"
                  f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / first:>12.2f}")  # fmt: skip
    largest = max(size for size, label in results if label == cases[0][2])
    ours = results[largest, cases[0][2]]
    if largest < 1_000_000:
        estimate = 1_000_000 / (ours["examples"] / ours["seconds"])
        print(f"extrapolated to 1,000,000 rows (ours at {largest:,} rows/s, memory flat): {estimate / 60:.1f} min")
    return results


#: the training comparison's model: 4 blocks of width 256 with the tokenizer's vocabulary (set by --set)
TRAIN_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256}
TRAIN_CASES = {
    "padded (random order)": ["--data.init_args.packing=false", "--data.init_args.length_grouping=false"],
    "length-grouped": ["--data.init_args.packing=false", "--data.init_args.length_grouping=true"],
    "packed": ["--data.init_args.packing=true", "--data.init_args.length_grouping=false"],
}


def bench_training(
    rows: int, tokenizer_dir: Path, max_seq_length: int, batch_size: int, steps: int, warmup: int, out: Path,
    overrides: list[str],
) -> dict[str, dict]:  # fmt: skip
    """``fit`` on the same generated rows per batching case (a fresh process each): trained tokens/s."""
    from transformers import AutoTokenizer

    path = write_chat_rows(out / f"train-{rows}.jsonl", rows, seed=1)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    model = {**TRAIN_MODEL, "name": "bench", "block_size": max_seq_length, "vocab_size": vocab,
             "padded_vocab_size": -(-vocab // 64) * 64}  # fmt: skip
    results = {}
    for label, case in TRAIN_CASES.items():
        stats = out / f"train-{label.split()[0]}"
        probe = {"class_path": "deft_lightning.callbacks.StepStats", "init_args": {"out": str(stats), "warmup": warmup}}
        command = [sys.executable, "-m", "deft_lightning", "fit", "--config", "configs/tiny.yaml",
                   f"--model.model_config={json.dumps(model)}", "--model.objective=NLL", "--model.micro_batch_size=4",
                   f"--data.init_args.train.init_args.path={path}", "--data.init_args.val=null",
                   f"--data.init_args.tokenizer_dir={tokenizer_dir}", "--data.init_args.prompt_style=chat_template",
                   f"--data.init_args.max_seq_length={max_seq_length}", f"--data.init_args.batch_size={batch_size}",
                   f"--data.init_args.cache_dir={out / 'train-cache'}", f"--trainer.max_steps={steps}",
                   "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                   "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false",
                   "--trainer.limit_val_batches=0", "--summary.enabled=false",
                   f"--trainer.default_root_dir={out / 'train-run'}", f"--trainer.callbacks+={json.dumps(probe)}",
                   *case, *(f"--{option}" for option in overrides)]  # fmt: skip
        print(f"  training: {label}", file=sys.stderr, flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            from deft_lightning.errors import CommandError

            raise CommandError(f"bench data training case {label} failed:\n{result.stderr[-3000:]}")
        results[label] = json.loads(Path(f"{stats}.rank0.json").read_text())
    print(f"\ntraining on {rows:,} generated chat rows, max_seq_length {max_seq_length}, {batch_size} rows a step "
          f"(packed: {batch_size} packed rows), model {TRAIN_MODEL} + vocab {vocab}, NLL, fused, fp32 CPU, "
          f"{steps - warmup} steps after {warmup}")  # fmt: skip
    print(f"{'case':<24}{'trained tok/s':>14}{'× padded':>10}{'positions/step':>16}{'trained share':>15}{'s/step':>9}")
    base = results["padded (random order)"]["trained_tokens_per_s"]
    for label, r in results.items():
        share = r["trained_per_step"] / r["positions_per_step"]
        print(f"{label:<24}{r['trained_tokens_per_s']:>14.0f}{r['trained_tokens_per_s'] / base:>10.2f}"
              f"{r['positions_per_step']:>16.0f}{share:>15.1%}{r['step_s']:>9.2f}")  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deft_lightning bench data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000], help="rows per case")
    parser.add_argument("--baseline-max", type=int, default=160_000, help="largest size datasets.map is run at")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--max-seq-length", type=int, default=4096)
    parser.add_argument("--out", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--train-rows", type=int, default=2000, help="rows of the training comparison (0: skip it)")
    parser.add_argument("--train-max-seq-length", type=int, default=1024)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-warmup", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fit options for the training cases")
    parser.add_argument("--skip-preparation", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case in this process (the benchmark's children)
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-data-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.case:
        result = prepare_case(args.case, args.rows_file, args.tokenizer_dir, args.workers, args.max_seq_length, out)
        print(json.dumps(result))
        return
    if not (args.tokenizer_dir / "tokenizer.json").is_file():
        from deft_lightning.errors import CommandError

        raise CommandError(f"--tokenizer-dir {args.tokenizer_dir} has no tokenizer.json (run prepare-model first)")
    if not args.skip_preparation:
        bench_preparation(args.sizes, args.tokenizer_dir, args.max_seq_length, args.baseline_max, out)
    if args.train_rows:
        bench_training(args.train_rows, args.tokenizer_dir, args.train_max_seq_length, args.train_batch_size,
                       args.train_steps, args.train_warmup, out, args.set)  # fmt: skip


if __name__ == "__main__":
    main()
