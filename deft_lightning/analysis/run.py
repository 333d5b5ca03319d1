"""``python -m deft_lightning analyze <kind>``: the paper's token-level figures for your runs, as PNG + CSV.

trajectory RUN_DIR [RUN_DIR ...]
    Fig. 5: step-mean α = Σp² (DEFT's focus index) and mean target probability p over training, from each run's
    metrics.csv (no pass over data); with the fit-time TokenHistograms callback, also p's distribution per step.
landscape --model PATH --data FILE
    Fig. 2: every trainable token at (p, entropy), coloured by its share of the total logit-gradient magnitude
    under NLL, −p, EAFT, Cayley and DEFT (same tokens, side by side).
probabilities --models NAME=PATH ... --data FILE
    Figs. 3, 4, 6: distribution of target-token probabilities per model; fractions below 1e-3 and above 0.5.
forgetting --before PATH --after PATH --data FILE
    Fig. 1: per-token ΔP and ΔL between two checkpoints; shares of learned / forgotten tokens and of high- vs
    low-confidence tokens (p_before ≥ 0.5) among each.
prior --model PATH --data FILE [--lab runs/lab/summary.json]
    Where your model on your data sits on the paper's axis — mean p, Σp² (DEFT's α at step 0), share of tokens
    with p < 0.1 — beside the regime lab's regimes and the paper's Model-Strong/Weak, with what the lab found for
    the nearest regime: which objective to use for this model and data.

Models are LitGPT checkpoint directories or a fit's .ckpt files; data is a JSONL/JSON/Parquet file of SFT rows
(``--fields instruction=problem output=solution`` maps columns) or a YAML file naming any data Source by
``class_path``/``init_args`` (e.g. a run's training source), read with the model's prompt format.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import math
from pathlib import Path

import torch

from deft_lightning.tables import format_table

KINDS = ("trajectory", "landscape", "probabilities", "forgetting", "prior")
#: DEFT's α at the start of training in the paper's Fig. 5 (Llama-3.1-8B)
PAPER_PRIORS = {"paper Model-Strong (MATH, Llama-3.1-8B)": 0.65, "paper Model-Weak (FigFont, Llama-3.1-8B)": 0.04}
LANDSCAPE_OBJECTIVES = {"NLL": "NLL", "−p": "Prob", "EAFT": "EAFT", "Cayley": "Cayley", "DEFT": "DEFT"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- trajectory (from logs)


def read_trajectory(run_dir: Path) -> list[tuple[int, float, float]]:
    """``(step, α, p)`` per logged training step of a run (α = Σp², or ``train/alpha`` in older logs)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the run directory of a fit (it holds metrics.csv)")
    with path.open() as handle:
        reader = csv.DictReader(handle)
        alpha_column = next((c for c in ("train/collision", "train/alpha") if c in (reader.fieldnames or [])), None)
        if alpha_column is None or "train/p" not in (reader.fieldnames or []):
            raise ValueError(f"{path} has no train/p and train/collision columns (was it written by this fit?)")
        points = [
            (int(row["step"]), float(row[alpha_column]), float(row["train/p"]))
            for row in reader
            if row.get("train/p") and row.get(alpha_column)
        ]
    if not points:
        raise ValueError(f"{path} has no logged training steps")
    return points


def read_histograms(run_dir: Path, quantity: str) -> tuple[list[int], list[float], list[list[float]]] | None:
    """``(steps, bin edges, fractions[step][bin])`` of a run's token_histograms.csv, if it has one."""
    path = Path(run_dir) / "token_histograms.csv"
    if not path.is_file():
        return None
    table: dict[int, dict[float, float]] = {}
    edges: set[float] = set()
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row["quantity"] == quantity:
                left, right = float(row["bin_left"]), float(row["bin_right"])
                table.setdefault(int(row["step"]), {})[left] = float(row["fraction"])
                edges |= {left, right}
    if not table:
        return None
    bins = sorted(edges)
    steps = sorted(table)
    return steps, bins, [[table[s].get(left, 0.0) for left in bins[:-1]] for s in steps]


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window) : i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def trajectory(run_dirs: list[Path], labels: list[str], out: Path, smooth: int = 1) -> list[list[object]]:
    plt = _pyplot()
    rows = []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(run_dirs, labels, strict=True):
        points = read_trajectory(run)
        rows += [[label, step, alpha, p] for step, alpha, p in points]
        steps = [s for s, _, _ in points]
        axes[0].plot(steps, rolling_mean([a for _, a, _ in points], smooth), label=label)
        axes[1].plot(steps, rolling_mean([p for _, _, p in points], smooth), label=label)
    window = f", rolling mean of {smooth}" if smooth > 1 else ""
    axes[0].set(xlabel="step", ylabel="mean α = Σ p²", title=f"focus index α (step mean{window})")
    axes[1].set(xlabel="step", ylabel="mean p(target)", title=f"target probability (step mean{window})")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    _write_csv(out.with_suffix(".csv"), ["run", "step", "alpha", "p"], rows)
    histograms = {label: read_histograms(run, "p") for run, label in zip(run_dirs, labels, strict=True)}
    histograms = {label: h for label, h in histograms.items() if h is not None}
    if histograms:  # runs fitted with the TokenHistograms callback: p's distribution per step
        _plot_histograms(histograms, out.with_name(out.name + "_histograms.png"))
    return [[label, len([r for r in rows if r[0] == label]), *_first_last(rows, label)] for label in labels]


def _plot_histograms(histograms: dict[str, tuple], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    figure, axes = plt.subplots(1, len(histograms), figsize=(5.5 * len(histograms), 3.8), squeeze=False)
    for axis, (label, (steps, bins, fractions)) in zip(axes[0], histograms.items(), strict=True):
        centers = [(left + right) / 2 for left, right in itertools.pairwise(bins)]
        image = axis.pcolormesh(
            steps, centers, torch.tensor(fractions).T.numpy(), shading="nearest", cmap="magma", norm=LogNorm(1e-3, 1)
        )
        axis.set(xlabel="step", ylabel="p(target)", title=f"{label}: distribution of p (sampled tokens)")
        figure.colorbar(image, ax=axis, label="fraction of tokens")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _first_last(rows: list[list[object]], label: str) -> list[str]:
    mine = [r for r in rows if r[0] == label]
    return [f"{mine[0][2]:.3f} → {mine[-1][2]:.3f}", f"{mine[0][3]:.3f} → {mine[-1][3]:.3f}"]


# ---------------------------------------------------------------- passes over data


def source_from_yaml(path: Path):
    """A data Source from a YAML file holding its ``class_path`` and ``init_args``."""
    from jsonargparse import ArgumentParser

    from deft_lightning.data.sources import Source

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--source", type=Source)
    return parser.instantiate_classes(parser.parse_args(["--source", path.read_text()])).source


def _load_rows(path: Path, fields: dict[str, str], limit: int) -> list[dict[str, str]]:
    """Rows of a JSONL/JSON/Parquet file, or of any Source described by a YAML file (``class_path``/``init_args``)."""
    from deft_lightning.data.sources import FileSource, RowReport

    if path.suffix in (".yaml", ".yml"):
        rows = [row for _, row in zip(range(limit), source_from_yaml(path).rows(RowReport()), strict=False)]
    else:
        rows = list(FileSource(path, fields=fields, limit=limit).rows(RowReport()))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _statistics(models: dict[str, Path], args: argparse.Namespace, needs) -> dict[str, object]:
    """Per-model token statistics on the same rows and tokens (the models must share tokenizer and prompt)."""
    from deft_lightning.analysis.tokens import token_statistics
    from deft_lightning.loading import inference_dtype, load_weights, resolve_device, resolve_model
    from deft_lightning.prompting import Prompter

    refs = [resolve_model(name, path, args.tokenizer_dir, args.prompt_style) for name, path in models.items()]
    formats = {
        (hashlib.sha256((r.tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest(), r.prompt_style) for r in refs
    }
    if len(formats) > 1:
        raise ValueError("the models use different tokenizers or prompt styles, so their tokens do not align")
    rows = _load_rows(args.data, args.fields, args.limit)
    prompter = Prompter(refs[0].tokenizer_dir, refs[0].prompt_style, refs[0].system_prompt)
    device = resolve_device(args.device)
    dtype = inference_dtype(device)
    results = {}
    for ref in refs:
        model = load_weights(ref, device, dtype)
        results[ref.name] = token_statistics(
            model, prompter, rows, needs, args.max_seq_length, args.batch_size, progress=f"{ref.name}: tokens"
        )
        del model
    return results


def landscape(args: argparse.Namespace, out: Path) -> list[list[object]]:
    from deft_lightning.analysis.tokens import gradient_shares
    from deft_lightning.objectives import EAFT, Needs, objective_from_spec

    objectives = {
        label: objective_from_spec({"class_path": f"deft_lightning.objectives.{name}"})
        for label, name in LANDSCAPE_OBJECTIVES.items()
    }
    needs = Needs(entropy=True, collision=True, top_k=EAFT().k)
    stats = _statistics({"model": args.model}, args, needs)["model"]
    shares = gradient_shares(stats, objectives)
    p, entropy = stats.prob, stats.entropy
    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    figure, axes = plt.subplots(1, len(objectives), figsize=(4 * len(objectives), 3.8), sharey=True)
    for axis, (label, share) in zip(axes, shares.items(), strict=True):
        image = axis.hexbin(
            p.numpy(), entropy.numpy(), C=share.numpy(), reduce_C_function=np.sum, gridsize=25, cmap="viridis",
            norm=LogNorm(vmin=1e-5, vmax=1),
        )  # fmt: skip
        axis.set(title=label, xlabel="p(target)")
        figure.colorbar(image, ax=axis, label="share of |logit gradient|")
    axes[0].set_ylabel("predictive entropy (nats)")
    figure.suptitle(f"gradient landscape: {len(p):,} tokens of {args.data.name}")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    header = ["p", "entropy", *(f"share_{label}" for label in shares)]
    _write_csv(
        out.with_suffix(".csv"),
        header,
        [[f"{p[i]:.6g}", f"{entropy[i]:.6g}", *(f"{s[i]:.6g}" for s in shares.values())] for i in range(len(p))],
    )
    bands = [(0, 0.1), (0.1, 0.5), (0.5, 1.01)]
    return [
        [label, *(f"{float(share[(p >= lo) & (p < hi)].sum()):.1%}" for lo, hi in bands)]
        for label, share in shares.items()
    ]


def probabilities(args: argparse.Namespace, out: Path) -> list[list[object]]:
    from deft_lightning.analysis.tokens import probability_fractions
    from deft_lightning.objectives import Needs

    stats = _statistics(dict(args.models), args, Needs())
    edges = torch.logspace(-8, 0, 33)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    rows, summary = [], []
    for name, model_stats in stats.items():
        p = model_stats.prob.clamp(1e-8, 1)
        counts = torch.histogram(p, bins=edges).hist
        fractions = counts / counts.sum()
        axis.stairs(fractions.numpy(), edges.numpy(), label=name)
        rows += [[name, f"{edges[i]:.3g}", f"{edges[i + 1]:.3g}", f"{fractions[i]:.6g}"] for i in range(len(counts))]
        shares = probability_fractions(model_stats.prob)
        summary.append([name, len(p), f"{float(model_stats.prob.mean()):.3f}", *(f"{v:.1%}" for v in shares.values())])
    axis.set(
        xscale="log", xlabel="p(target)", ylabel="fraction of tokens", title=f"target probabilities: {args.data.name}"
    )
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    _write_csv(out.with_suffix(".csv"), ["model", "bin_left", "bin_right", "fraction"], rows)
    return summary


def forgetting(args: argparse.Namespace, out: Path) -> list[list[object]]:
    from deft_lightning.analysis.tokens import forgetting_fractions
    from deft_lightning.objectives import Needs

    stats = _statistics({"before": args.before, "after": args.after}, args, Needs())
    before, after = stats["before"], stats["after"]
    delta_p, delta_loss = after.prob - before.prob, before.logp - after.logp
    fractions = forgetting_fractions(before.prob, after.prob, args.confident)
    plt = _pyplot()
    figure, (scatter, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    high = before.prob >= args.confident
    for mask, label, color in ((~high, "low confidence", "tab:blue"), (high, "high confidence", "tab:red")):
        scatter.scatter(delta_p[mask].numpy(), delta_loss[mask].numpy(), s=3, alpha=0.4, label=label, color=color)
    scatter.axhline(0, color="gray", lw=0.5)
    scatter.axvline(0, color="gray", lw=0.5)
    scatter.set(xlabel="ΔP (after − before)", ylabel="ΔL (after − before)", title="per-token change")
    scatter.legend(markerscale=4, title=f"p_before ≥ {args.confident:g}?")
    names = ["learned", "forgotten"]
    bars.bar(names, [fractions[n] for n in names], color="lightgray", label="all")
    bars.bar(names, [fractions[n] * fractions[f"{n}_high_confidence"] for n in names], hatch="//", color="tab:red",
             alpha=0.5, label="high confidence")  # fmt: skip
    bars.set(ylabel="fraction of tokens", title="learned vs forgotten")
    bars.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    _write_csv(
        out.with_suffix(".csv"),
        ["p_before", "p_after", "delta_p", "delta_loss"],
        [[f"{before.prob[i]:.6g}", f"{after.prob[i]:.6g}", f"{delta_p[i]:.6g}", f"{delta_loss[i]:.6g}"]
         for i in range(len(delta_p))],
    )  # fmt: skip
    _write_csv(
        out.with_name(out.name + "_fractions.csv"), ["quantity", "fraction"], [[k, v] for k, v in fractions.items()]
    )
    return [[k, "-" if math.isnan(v) else f"{v:.1%}"] for k, v in fractions.items()]


# ---------------------------------------------------------------- command line


def prior(args: argparse.Namespace, out: Path) -> str:
    """The prior table and the lab's answer for the nearest regime (see the module docstring)."""
    import json

    from deft_lightning.lab import regime_standing
    from deft_lightning.objectives import Needs

    stats = _statistics({"model": args.model}, args, Needs(collision=True))["model"]
    ours = {
        "mean_p": float(stats.prob.mean()),
        "collision": float(stats.collision.mean()),
        "low_p_share": float((stats.prob < 0.1).float().mean()),
    }
    rows = [[f"{args.model.name} on {args.data.name} ({len(stats.prob):,} tokens)", *_prior_cells(ours)]]
    lab = json.loads(args.lab.read_text()) if args.lab.is_file() else None
    for regime, values in (lab or {}).get("priors", {}).items():
        rows.append([f"lab: {regime} ({values['description']})", *_prior_cells(values)])
    rows += [[name, "–", f"{alpha:.2f}", "–"] for name, alpha in PAPER_PRIORS.items()]
    _write_csv(out.with_suffix(".csv"), ["where", "mean p", "Σp²", "p<0.1"], rows)
    table = format_table(["where", "mean p", "Σp² (DEFT's α₀)", "share p < 0.1"], rows)
    if lab is None:
        return f"{table}\n\nno regime lab results at {args.lab}: run `make lab` (≈4 min) to place these numbers"
    distance = {
        regime: math.dist((values["mean_p"], values["collision"]), (ours["mean_p"], ours["collision"]))
        for regime, values in lab["priors"].items()
    }
    nearest = sorted(distance, key=distance.get)
    lines = [table, "", f"nearest lab regime: {nearest[0]} (distance {distance[nearest[0]]:.2f} in (mean p, Σp²))"]
    between = len(nearest) > 1 and distance[nearest[1]] < 1.5 * distance[nearest[0]]
    if between:
        lines[-1] += f", then {nearest[1]} ({distance[nearest[1]]:.2f}): between the two, weigh both"
    for regime in nearest[: 2 if between else 1]:
        metric, standing = regime_standing(lab, regime)
        best = [name for name, _, tied in standing if tied]
        ranking = ", ".join(f"{name} {mean:.3f}" for name, mean, _ in standing)
        lines.append(f"in the lab's {regime} regime, {' and '.join(best)} did best on {metric} ({ranking})")
    return "\n".join(lines)


def _prior_cells(values: dict[str, float]) -> list[str]:
    return [f"{values['mean_p']:.3f}", f"{values['collision']:.3f}", f"{values['low_p_share']:.1%}"]


def _pairs(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    name, value = text.split("=", 1)
    return name, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    runs = kinds.add_parser("trajectory")
    runs.add_argument("runs", nargs="+", type=Path, help="run directories (each holds metrics.csv)")
    runs.add_argument("--labels", nargs="+", help="legend labels (default: the directory names)")
    runs.add_argument("--smooth", type=int, default=1, help="plot a rolling mean over this many steps")
    for kind in KINDS[1:]:
        sub = kinds.add_parser(kind)
        sub.add_argument("--data", type=Path, required=True, help="JSONL/JSON/Parquet file, or a Source in YAML")
        sub.add_argument("--fields", nargs="*", type=_pairs, default=[], help="our_field=file_column ...")
        sub.add_argument("--limit", type=int, default=64, help="rows to read")
        sub.add_argument("--max-seq-length", type=int, default=1024)
        sub.add_argument("--batch-size", type=int, default=4)
        sub.add_argument("--device", default="auto")
        sub.add_argument("--tokenizer-dir", type=Path)
        sub.add_argument("--prompt-style")
        if kind in ("landscape", "prior"):
            sub.add_argument("--model", type=Path, required=True)
        if kind == "prior":
            sub.add_argument("--lab", type=Path, default=Path("runs/lab/summary.json"), help="the lab's summary")
        elif kind == "probabilities":
            sub.add_argument("--models", nargs="+", type=_pairs, required=True, help="NAME=PATH ...")
        elif kind == "forgetting":
            sub.add_argument("--before", type=Path, required=True)
            sub.add_argument("--after", type=Path, required=True)
            sub.add_argument("--confident", type=float, default=0.5, help="high confidence: p_before >= this")
    for sub in kinds.choices.values():
        sub.add_argument("--out", type=Path, default=Path("runs/analysis"), help="output directory")
        sub.add_argument("--name", help="output file stem (default: the kind)")
        sub.add_argument("--force", action="store_true", help="replace outputs of an earlier analysis")
    args = parser.parse_args(argv)
    out = args.out / (args.name or args.kind)
    taken = [str(path) for path in (out.with_suffix(".png"), out.with_suffix(".csv")) if path.exists()]
    if taken and not args.force:
        raise ValueError(
            f"{' and '.join(taken)} exist from an earlier analysis; choose another --name (or --out), or pass --force "
            "to replace them"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "trajectory":
        labels = args.labels or [run.name for run in args.runs]
        if len(labels) != len(args.runs):
            raise ValueError(f"{len(args.runs)} runs but {len(labels)} labels")
        table = format_table(
            ["run", "logged steps", "α first → last", "p first → last"],
            trajectory(args.runs, labels, out, args.smooth),
        )
    else:
        args.fields = dict(args.fields)
        if args.kind == "landscape":
            table = format_table(["objective", "share at p<0.1", "0.1≤p<0.5", "p≥0.5"], landscape(args, out))
        elif args.kind == "probabilities":
            table = format_table(["model", "tokens", "mean p", "p<1e-3", "p>0.5"], probabilities(args, out))
        elif args.kind == "prior":
            print(f"\n{prior(args, out)}\n\nwrote {out.with_suffix('.csv')}", flush=True)
            return
        else:
            table = format_table(["quantity", "fraction"], forgetting(args, out))
    print(f"\n{table}\n\nwrote {out.with_suffix('.png')} and {out.with_suffix('.csv')}", flush=True)
