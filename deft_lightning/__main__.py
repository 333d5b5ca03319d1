"""``python -m deft_lightning {fit,validate,test} --config <yaml>``, or one of ``evaluate``, ``analyze``, ``sweep``,
``export``, ``prepare-model``, ``bench``. Expected failures print ``error: …`` and exit with status 2
(:mod:`deft_lightning.errors`; ``--debug`` shows the traceback)."""

import importlib
import sys

from deft_lightning.errors import run_command

#: subcommand → the module whose ``main(argv)`` runs it; anything else goes to LightningCLI (fit, validate, ...)
COMMANDS = {
    "prepare-model": "deft_lightning.prepare_model",
    "bench": "deft_lightning.bench",
    "analyze": "deft_lightning.analysis.run",
    "sweep": "deft_lightning.sweep",
    "export": "deft_lightning.export",
    "evaluate": "deft_lightning.evaluation.run",
    "lab": "deft_lightning.lab",
}

command = sys.argv[1] if len(sys.argv) > 1 else None
if command in COMMANDS:
    run_command(importlib.import_module(COMMANDS[command]).main, sys.argv[2:])
else:
    from deft_lightning.cli import main

    run_command(lambda argv: main(argv), sys.argv[1:])
