"""The command line: ``python -m deft_lightning <command>`` and the installed ``deft-lightning`` script are this.

Expected failures print ``error: …`` and exit with status 2 (:mod:`deft_lightning.errors`; ``--debug`` shows the
traceback). Imports stay lazy: ``--help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
import sys

from deft_lightning.errors import run_command

#: command → (the module whose ``main(argv)`` runs it, what it does); fit/validate/test go to LightningCLI
COMMANDS = {
    "fit": ("deft_lightning.cli", "fine-tune a model (--config <yaml>; --ckpt_path last|auto resumes)"),
    "validate": ("deft_lightning.cli", "score a model on the validation split of a fit config"),
    "test": ("deft_lightning.cli", "score a model on the test split of a fit config"),
    "data": ("deft_lightning.data.show", "show what a config trains on: rendered examples, trained tokens, stats"),
    "evaluate": ("deft_lightning.evaluation.run", "models × benchmarks (--config configs/eval/<name>.yaml)"),
    "export": ("deft_lightning.export", "a checkpoint as a LitGPT, Hugging Face or PEFT directory (self-checked)"),
    "lab": ("deft_lightning.lab", "the regime lab: which objective wins when (≈4 min on a CPU)"),
    "analyze": ("deft_lightning.analysis.run", "token-level figures; `analyze prior` places your model and data"),
    "sweep": ("deft_lightning.sweep", "objectives × regimes fitted, evaluated and tabulated"),
    "prepare-model": ("deft_lightning.prepare_model", "build the offline default model (SmolLM2-135M-Instruct)"),
    "bench": ("deft_lightning.bench", "benchmarks: loss, fit, litgpt, generate, data, gpu (the GPU readiness check)"),
}
LIGHTNING = ("fit", "validate", "test")

USAGE = "usage: python -m deft_lightning <command> [options]   (or: deft-lightning <command> [options])"


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`<command> --help` describes each; every failure the input causes is one `error:` line (--debug:"]
    lines += ["the traceback). Start with `make run` (the quick start) or README.md."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    if command is None or command in ("-h", "--help"):
        print(overview())
        return
    if command not in COMMANDS:
        run_command(_unknown, argv)
    elif command in LIGHTNING:
        from deft_lightning.cli import main as lightning_main

        run_command(lambda args: lightning_main(args), argv)
    elif command == "bench" and argv[1:2] in (["gpu"], ["data"]):  # benchmarks that are modules of their own
        run_command(importlib.import_module(f"deft_lightning.bench_{argv[1]}").main, argv[2:])
    else:
        run_command(importlib.import_module(COMMANDS[command][0]).main, argv[1:])


def _unknown(argv: list[str]) -> None:
    import difflib

    guess = difflib.get_close_matches(argv[0], COMMANDS, n=1)
    hint = f"; did you mean `{guess[0]}`?" if guess else ""
    raise ValueError(f"unknown command '{argv[0]}'{hint} — commands: {', '.join(COMMANDS)}")
