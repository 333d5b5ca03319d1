"""Per-step time of a fit with each objective, side by side against NLL, interleaved over rounds.

    .venv/bin/python benchmarks/fit_overhead.py --config configs/tiny.yaml --objectives NLL DEFT --steps 200

Times every optimizer step (forward + backward + optimizer, data loading excluded) with a callback and reports
the median after `--warmup` steps, pooled over `--rounds` interleaved fits; ratios are against the first objective.
"""

import argparse
import statistics
import time

import lightning as L

from deft_lightning.cli import main


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


def time_fit(config: str, objective: str, steps: int, log_every: int) -> list[float]:
    timer = StepTimer()
    cli = main(
        [
            "--config",
            config,
            f"--model.objective={objective}",
            f"--trainer.max_steps={steps}",
            f"--trainer.log_every_n_steps={log_every}",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_model_summary=false",
            "--summary.enabled=false",
        ],
        run=False,
    )
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.times


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--objectives", nargs="+", default=["NLL", "DEFT"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=1, help="trainer.log_every_n_steps (monitoring cost)")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {name: [] for name in args.objectives}
    for _ in range(args.rounds):
        for name in args.objectives:
            samples[name] += time_fit(args.config, name, args.steps, args.log_every)[args.warmup :]
    baseline = statistics.median(samples[args.objectives[0]])
    print(
        f"\n{'objective':<18}{'median step (ms)':>18}{'ratio':>8}   ({args.rounds} rounds x "
        f"{args.steps - args.warmup} steps, log_every_n_steps={args.log_every})"
    )
    for name, times in samples.items():
        median = statistics.median(times)
        print(f"{name:<18}{median * 1e3:>18.2f}{median / baseline:>8.3f}")
