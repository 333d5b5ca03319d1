"""Expected failures end a command with one line, ``error: <what is wrong and what to do>``, on stderr and exit
status 2, without a traceback: bad data, a bad config or option, a missing or corrupt checkpoint, an unreachable
hub, a missing optional dependency. ``--debug`` (or ``DEFT_LIGHTNING_DEBUG=1``) shows the traceback; anything else
is a bug and keeps it. In a multi-process run only global rank 0 prints the message; the other ranks stop quietly
with the same status, also when their collectives broke because rank 0 stopped.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

#: exception types that mean "the input cannot work" rather than "the code is wrong"
EXPECTED: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


class CommandError(ValueError):
    """A command cannot go on as asked (a run directory in the way, nothing to resume, a failed sub-run); the
    message says what to do instead."""


def is_expected(error: BaseException) -> bool:
    return isinstance(error, EXPECTED) or type(error).__name__ == "MisconfigurationException"  # Lightning's


def _global_rank() -> int:
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run_command(entry: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run a subcommand's ``main(argv)``; expected failures become ``error: …`` and exit status 2."""
    debug = "--debug" in argv or os.environ.get("DEFT_LIGHTNING_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        entry(argv)
    except BaseException as error:
        rank = _global_rank()
        if debug or not (is_expected(error) or (rank > 0 and _peer_gone(error))):
            raise
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _peer_gone(error: BaseException) -> bool:
    """A collective failed because another rank stopped (which reports why)."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("Connection closed by peer" in text or "remote worker" in text)
