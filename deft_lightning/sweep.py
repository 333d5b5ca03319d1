"""``python -m deft_lightning sweep --config <grid.yaml>``: objectives × regimes (× backbones × seeds), fitted,
evaluated and tabulated like the paper's Tables 1–3, with the α/p trajectory plot per regime.

A grid file::

    out_dir: runs/sweeps/miniature
    seeds: [1]
    fit: {...}                       # the fit config every cell starts from (as in a fit YAML)
    backbones:                       # name → base checkpoint (+ optional fit overrides)
      smollm2: {checkpoint_dir: checkpoints/SmolLM2-135M-Instruct}
    objectives:                      # table row → objective
      NLL: {class_path: deft_lightning.objectives.NLL}
    regimes:                         # name → fit overrides (data, budget) + the benchmarks that judge it
      weak: {fit: {...}, benchmarks: [...]}
    evaluate: {batch_size: 16}       # other `evaluate` arguments

The string ``${backbone}`` anywhere in ``fit`` or ``benchmarks`` is replaced by the backbone's checkpoint
directory. Each cell is a fit in ``<out_dir>/<regime>/<backbone>/<objective>-seed<seed>/`` whose exact config is
``cell.yaml`` there; it runs in its own process (``fit --ckpt_path auto``, so a killed cell resumes from its last
checkpoint) and is marked finished by ``done.json``. A rerun skips finished cells and evaluation reuses finished
(model, benchmark) cells, so a killed sweep continues where it stopped. A cell whose config changed since it ran
is an error (nothing is overwritten): use another ``out_dir`` or delete the cell.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from deft_lightning.errors import CommandError

GRID_KEYS = {"out_dir", "seeds", "fit", "backbones", "objectives", "regimes", "evaluate"}


class GridError(ValueError):
    pass


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``; nested dicts merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def substitute(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        for name, replacement in variables.items():
            value = value.replace("${" + name + "}", replacement)
        return value
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    return value


def load_grid(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {path} not found")
    grid = yaml.safe_load(path.read_text()) or {}
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(GRID_KEYS)}")
    for key in ("backbones", "objectives", "regimes"):
        if not isinstance(grid.get(key), dict) or not grid[key]:
            raise GridError(f"{path}: '{key}' must map names to settings")
    for name, backbone in grid["backbones"].items():
        if not isinstance(backbone, dict) or "checkpoint_dir" not in backbone:
            raise GridError(f"{path}: backbone '{name}' needs a checkpoint_dir")
    for name, regime in grid["regimes"].items():
        if not isinstance(regime, dict) or not regime.get("benchmarks"):
            raise GridError(f"{path}: regime '{name}' needs a list of benchmarks")
    for name in [*grid["objectives"], *grid["regimes"], *grid["backbones"]]:
        if not name or any(c in str(name) for c in "/\\, \t\n"):
            raise GridError(f"{path}: name '{name}' must not contain '/', '\\\\', ',' or whitespace")
    grid.setdefault("seeds", [1])
    grid.setdefault("fit", {})
    grid.setdefault("evaluate", {})
    grid.setdefault("out_dir", f"runs/sweeps/{path.stem}")
    return grid


def cell_config(grid: dict[str, Any], regime: str, backbone: str, objective: str, seed: int) -> dict[str, Any]:
    """The exact fit config of one cell."""
    settings = grid["backbones"][backbone]
    config = deep_merge(grid["fit"], settings.get("fit") or {})
    config = deep_merge(config, grid["regimes"][regime].get("fit") or {})
    config = deep_merge(
        config,
        {
            "seed_everything": seed,
            "model": {"objective": grid["objectives"][objective], "checkpoint_dir": settings["checkpoint_dir"]},
            "data": {"init_args": {"tokenizer_dir": settings["checkpoint_dir"]}},
        },
    )
    trainer = config.setdefault("trainer", {})
    if "precision" not in trainer:  # bf16 where it is fast, fp32 on CPU
        import torch

        trainer["precision"] = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    return substitute(config, {"backbone": str(settings["checkpoint_dir"])})


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def row_name(objective: str, seed: int, seeds: list[int]) -> str:
    return objective if len(seeds) == 1 else f"{objective}-seed{seed}"


def run_cell(cell_dir: Path, config: dict[str, Any], label: str) -> dict[str, Any]:
    """Fit one cell in its own process (resuming a killed one); returns its ``done.json`` record."""
    done_file = cell_dir / "done.json"
    digest = _digest(config)
    cell_file = cell_dir / "cell.yaml"
    if cell_file.is_file() and _digest(yaml.safe_load(cell_file.read_text())) != digest:
        raise GridError(
            f"{cell_dir} was run with a different config; delete it or choose another out_dir "
            f"(compare {cell_file} with the grid)"
        )
    if done_file.is_file():
        print(f"{label}: finished earlier ({done_file})", flush=True)
        return json.loads(done_file.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    cell_file.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "deft_lightning", "fit", "--config", str(cell_file),
               f"--trainer.default_root_dir={cell_dir}", "--ckpt_path=auto"]  # fmt: skip
    print(f"{label}: fitting (log: {cell_dir / 'fit.log'})", flush=True)
    started = time.perf_counter()
    with (cell_dir / "fit.log").open("a") as log:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    seconds = time.perf_counter() - started
    if done.returncode != 0 or not (cell_dir / "checkpoints/last.ckpt").exists():
        tail = (cell_dir / "fit.log").read_text()[-2500:]
        raise RuntimeError(f"{label}: fit failed (exit {done.returncode}); end of {cell_dir / 'fit.log'}:\n{tail}")
    record = {"seconds": seconds, "config_digest": digest, "checkpoint": str(cell_dir / "checkpoints/last.ckpt")}
    done_file.write_text(json.dumps(record))
    print(f"{label}: done in {seconds:.0f} s", flush=True)
    return record


def dotted(assignment: str) -> dict[str, Any]:
    """``trainer.max_steps=20`` as ``{"trainer": {"max_steps": 20}}`` (the value read as YAML)."""
    key, separator, value = assignment.partition("=")
    if not separator or not key.strip():
        raise GridError(f"--set {assignment!r}: expected key=value, e.g. trainer.max_steps=20")
    nested: Any = yaml.safe_load(value)
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def run_sweep(
    grid_path: Path,
    regimes: list[str] | None = None,
    objectives: list[str] | None = None,
    dry_run: bool = False,
    overrides: list[str] = (),
) -> dict[str, str]:
    """Fit, evaluate and tabulate every selected cell; returns the printed tables per (regime, backbone).
    ``overrides`` (``key=value``) change the fit config every cell starts from, e.g. ``trainer.max_steps=20``."""
    from deft_lightning.analysis.run import trajectory
    from deft_lightning.evaluation.run import evaluate, parse_config
    from deft_lightning.objectives import named_in

    grid = load_grid(grid_path)
    for assignment in overrides:
        grid["fit"] = deep_merge(grid["fit"], dotted(assignment))
    objectives = [named_in(grid["objectives"], name) for name in objectives] if objectives else None
    for chosen, key in ((regimes, "regimes"), (objectives, "objectives")):
        missing = sorted(set(chosen or []) - set(grid[key]))
        if missing:
            raise GridError(f"{grid_path}: no {key} {missing}; the grid has {list(grid[key])}")
    regimes = regimes or list(grid["regimes"])
    objectives = objectives or list(grid["objectives"])
    out = Path(grid["out_dir"])
    cells = [
        (regime, backbone, objective, seed)
        for regime in regimes
        for backbone in grid["backbones"]
        for objective in objectives
        for seed in grid["seeds"]
    ]
    # every config and benchmark list is built (and checked) before the first fit starts
    configs = {cell: cell_config(grid, *cell) for cell in cells}
    evaluations = {}
    for regime in regimes:
        for backbone, settings in grid["backbones"].items():
            variables = {"backbone": str(settings["checkpoint_dir"])}
            runs = {
                row_name(objective, seed, grid["seeds"]): out / regime / backbone / f"{objective}-seed{seed}"
                for objective in objectives
                for seed in grid["seeds"]
            }
            eval_config = {
                **grid["evaluate"],
                "models": {
                    "base": str(settings["checkpoint_dir"]),
                    **{name: str(run / "checkpoints/last.ckpt") for name, run in runs.items()},
                },
                "benchmarks": substitute(grid["regimes"][regime]["benchmarks"], variables),
                "out_dir": str(out / regime / backbone / "eval"),
            }
            evaluations[regime, backbone] = runs
            parse_config(["--config", _write_yaml(out / regime / backbone / "evaluate.yaml", eval_config)])
    if dry_run:
        for cell, config in configs.items():
            print(f"# {'/'.join(map(str, cell))}\n{yaml.safe_dump(config, sort_keys=False, allow_unicode=True)}")
        return {}

    started = time.perf_counter()
    for index, cell in enumerate(cells, start=1):
        regime, backbone, objective, seed = cell
        label = f"[{index}/{len(cells)}] {regime}/{backbone}/{objective} seed {seed}"
        run_cell(out / regime / backbone / f"{objective}-seed{seed}", configs[cell], label)
    tables = {}
    for (regime, backbone), runs in evaluations.items():
        print(f"\nevaluating {regime}/{backbone}", flush=True)
        path = out / regime / backbone / "evaluate.yaml"
        result = evaluate(**parse_config(["--config", str(path)]))
        trajectory(list(runs.values()), list(runs), out / regime / backbone / "trajectory")
        tables[f"{regime} / {backbone}"] = result["tables"]
    summary = [f"# {Path(grid_path).name}: {len(cells)} fits, {time.perf_counter() - started:.0f} s this run\n"]
    for title, table in tables.items():
        regime, backbone = title.split(" / ")
        summary += [f"## {title}\n", "```", table, "```", f"\n![trajectory]({regime}/{backbone}/trajectory.png)\n"]
    (out / "summary.md").write_text("\n".join(summary))
    print("\n" + "\n\n".join(f"== {title} ==\n{table}" for title, table in tables.items()))
    print(f"\nsummary: {out / 'summary.md'}")
    return tables


def _write_yaml(path: Path, value: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="the grid YAML")
    parser.add_argument("--regimes", nargs="+", help="run only these regimes")
    parser.add_argument("--objectives", nargs="+", help="run only these objectives (table rows)")
    parser.add_argument("--dry-run", action="store_true", help="print every cell's config and stop")
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="change every cell's fit config, e.g. trainer.max_steps=20",
    )
    from deft_lightning.objectives import ascii_objective_arguments

    args = parser.parse_args(ascii_objective_arguments(sys.argv[1:] if argv is None else argv))
    try:
        run_sweep(args.config, args.regimes, args.objectives, args.dry_run, args.set)
    except RuntimeError as err:  # a cell's fit or evaluation failed; its output says why
        raise CommandError(str(err)) from None
