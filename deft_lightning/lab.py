"""``python -m deft_lightning lab``: which objective wins when — a laboratory where the model's prior is *made*.

The paper's answer to "which token-level objective?" depends on the model's prior on the target task: with a weak
prior NLL learns what probability-weighted objectives cannot; with a strong one they sharpen past NLL; DEFT is
meant to adapt. Real models cannot show that cleanly (their priors are unknown and one run costs hours), so the lab
builds priors on purpose and measures every objective in each, over several seeds, in minutes on a CPU.

**The language.** ``BOS marker x1..xL SEP y1..yL EOS`` over ``symbols`` content symbols, trained on the answer
``y1..yL EOS`` only. Marker A: a fixed symbol map ``y_i = A(x_i)`` with ``noise`` of the answers replaced by a
wrong symbol (the prior is right but not sharp); marker B: another clean map (a retention probe, never
fine-tuned); marker R: uniformly random answers (a diffuse prior).

**Per seed**: pretrain a tiny random-init LitGPT on A, B and R with NLL (cached under ``<out>/pretrained``), then
fine-tune a copy with each objective in each regime, through :class:`~deft_lightning.model.DeftModule` and a
Lightning ``Trainer`` (the fused path users train with), on an in-memory datamodule:

- ``weak``: marker R with a new clean map — the model rates every target ~1/symbols;
- ``strong``: marker A with its noise — right but unsharp, p(correct) ≈ 0.75;
- ``conflict``: marker A remapped — confident and wrong (the paper's confident conflicts, Prop. 10).

**Measured** on held-out items every ``evaluate.every`` steps: token accuracy, greedy exact match (all answer
tokens right under greedy decoding), sampled exact match at T = 1 (the exact probability ∏p that one sample is
fully right, the analogue of Average@k), mean p, the probability given to the noisy training labels, retention of
task B, symbol coverage (share of symbols whose map is learned to ≥ 0.9 accuracy), and the prior at step 0
(mean p, Σp²: where the regime sits on the paper's axis; DEFT's α is Σp²).

**Reported** in ``<out>/summary.md`` and ``summary.json``: mean ± std per objective × regime × metric, paired
differences against NLL with the per-seed signs, one verdict per paper prediction (reproduced / not separated /
reversed, by a paired t-test over seeds), and plots (accuracy and retention vs step with seed bands; DEFT's α and
p vs step). Runs are deterministic: the same command gives the same numbers.

Add an objective: name it under ``objectives:`` in ``configs/lab.yaml`` (any ``class_path``) or pass a class path
to ``--objectives``. Add a regime: an entry under ``regimes:`` (which marker, which map, how much noise, the
headline metric).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from torch import Tensor

from deft_lightning.errors import CommandError
from deft_lightning.model import IGNORE_INDEX, DeftModule
from deft_lightning.objectives import ascii_objective_arguments, named_in

PAD, BOS, SEP, EOS = 0, 1, 2, 3
MARKERS = {"A": 4, "B": 5, "R": 6}
FIRST_SYMBOL = 7
CACHE_FORMAT = 1  # bump when pretraining changes
#: every metric the probe reports, in table order
METRICS = (
    "token_acc",
    "greedy_em",
    "sampled_em",
    "mean_p",
    "noisy_label_p",
    "retention",
    "coverage",
    "learning_auc",
    "prior_p",
    "prior_collision",
)


@dataclass
class Language:
    """The synthetic language: ``symbols`` content symbols, ``length`` of them per question and answer."""

    symbols: int = 64
    length: int = 8
    noise: float = 0.2  # share of task-A answer symbols replaced by a wrong one

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols

    @property
    def sequence_length(self) -> int:
        return 2 * self.length + 4

    def maps(self, seed: int) -> dict[str, Tensor]:
        """The symbol maps of a seed: A and B (pretrained), W (the weak regime's new map), C (A remapped: every
        symbol's answer differs from A's, so the pretrained model is confidently wrong on all of them)."""
        generator = torch.Generator().manual_seed(10_000 + seed)
        maps = {name: torch.randperm(self.symbols, generator=generator) for name in ("A", "B", "W")}
        shift = torch.randint(1, self.symbols, (1,), generator=generator).item()
        maps["C"] = maps["A"][(torch.arange(self.symbols) + shift) % self.symbols]
        return maps

    def sequences(
        self, marker: str, mapping: Tensor | None, count: int, noise: float, generator: torch.Generator
    ) -> dict[str, Tensor]:
        """``count`` rows: ``input_ids`` and ``labels`` (answer and EOS), the question symbols ``x``, the answers
        the map gives ``clean`` and where ``noisy`` labels replaced them. ``mapping=None``: random answers."""
        x = torch.randint(0, self.symbols, (count, self.length), generator=generator)
        clean = mapping[x] if mapping is not None else torch.randint(0, self.symbols, x.shape, generator=generator)
        noisy = torch.rand(x.shape, generator=generator) < noise
        wrong = (clean + torch.randint(1, self.symbols, x.shape, generator=generator)) % self.symbols
        y = torch.where(noisy, wrong, clean)
        column = torch.full((count, 1), 0, dtype=torch.long)
        ids = torch.cat(
            [column + BOS, column + MARKERS[marker], x + FIRST_SYMBOL, column + SEP, y + FIRST_SYMBOL, column + EOS],
            dim=1,
        )
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, self.length + 3 :] = ids[:, self.length + 3 :]
        return {"input_ids": ids, "labels": labels, "x": x, "clean": clean, "noisy": noisy, "y": y}


@dataclass
class Regime:
    """A fine-tuning regime: rows with ``marker`` answered by ``map`` (a key of :meth:`Language.maps`, or ``random``),
    with ``noise``; ``headline`` is the metric that decides which objective suits it."""

    marker: str
    map: str
    noise: float = 0.0
    headline: str = "greedy_em"
    description: str = ""


@dataclass
class Settings:
    """``configs/lab.yaml``; every field can be overridden on the command line."""

    seeds: int = 5
    out: str = "runs/lab"
    language: Language = field(default_factory=Language)
    model: dict[str, Any] = field(default_factory=lambda: {"n_layer": 2, "n_embd": 64, "n_head": 4})
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    regimes: dict[str, Regime] = field(default_factory=dict)
    objectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    run: dict[str, list[str]] = field(default_factory=dict)  # the regimes and objectives a plain `lab` runs

    @classmethod
    def from_file(cls, path: Path) -> Settings:
        if not Path(path).is_file():
            raise CommandError(f"lab: config file '{path}' does not exist")
        raw = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CommandError(f"lab: {path}: unknown keys {unknown}")
        raw["language"] = Language(**raw.get("language", {}))
        raw["regimes"] = {name: Regime(**spec) for name, spec in (raw.get("regimes") or {}).items()}
        return cls(**raw)

    def model_config(self) -> dict[str, Any]:
        vocab = self.language.vocab_size
        return {
            "name": "lab",
            "block_size": self.language.sequence_length,
            "vocab_size": vocab,
            "padded_vocab_size": vocab,
            "bias": False,
            **self.model,
        }


# ---------------------------------------------------------------------------------------------------- data


class TokenRows(L.LightningDataModule):
    """Token-id rows held in memory, shuffled per epoch with a seeded generator (what ``SFTDataModule`` yields)."""

    def __init__(self, rows: dict[str, Tensor], batch_size: int, seed: int) -> None:
        super().__init__()
        self.rows = {"input_ids": rows["input_ids"], "labels": rows["labels"]}
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.StackDataset(**self.rows)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(dataset, self.batch_size, shuffle=True, generator=generator, drop_last=True)


@dataclass
class Probe:
    """The held-out rows a regime is measured on, plus the retention probe and the noisy training rows."""

    task: dict[str, Tensor]
    retention: dict[str, Tensor]
    noisy_training: dict[str, Tensor] | None


def regime_data(settings: Settings, regime: Regime, seed: int) -> tuple[dict[str, Tensor], Probe]:
    """Training rows and probe of ``regime`` for ``seed`` (the same for every objective: comparisons are paired)."""
    language = settings.language
    maps = language.maps(seed)
    mapping = None if regime.map == "random" else maps[regime.map]
    generator = torch.Generator().manual_seed(20_000 + seed)
    count = settings.finetune.get("train_items", 512)
    train = language.sequences(regime.marker, mapping, count, regime.noise, generator)
    items = settings.evaluate.get("items", 256)
    task = language.sequences(regime.marker, mapping, items, 0.0, generator)
    retention = language.sequences("B", maps["B"], items, 0.0, generator)
    return train, Probe(task, retention, train if regime.noise > 0 else None)


def pretraining_rows(settings: Settings, seed: int) -> dict[str, Tensor]:
    """Equal shares of A (with its noise), B (clean) and R (random answers), interleaved."""
    language = settings.language
    maps = language.maps(seed)
    generator = torch.Generator().manual_seed(30_000 + seed)
    third = settings.pretrain.get("items", 6000) // 3
    parts = [
        language.sequences("A", maps["A"], third, language.noise, generator),
        language.sequences("B", maps["B"], third, 0.0, generator),
        language.sequences("R", None, third, 0.0, generator),
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in ("input_ids", "labels")}


# ---------------------------------------------------------------------------------------------------- measuring


def answer_statistics(model: torch.nn.Module, rows: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """Per answer symbol (EOS left out): the probability of the labelled symbol, of the map's symbol, whether the
    argmax is the map's symbol, and Σp² — teacher-forced, so greedy decoding is right on a row exactly when every
    argmax is (by induction over its positions) and a T = 1 sample is fully right with probability ∏p."""
    with torch.no_grad():
        logits = model(rows["input_ids"])[:, length + 2 : 2 * length + 2].float()  # the positions predicting y_i
    probs = logits.softmax(-1)
    y, clean = rows["y"] + FIRST_SYMBOL, rows["clean"] + FIRST_SYMBOL
    return {
        "p_label": probs.gather(-1, y[..., None])[..., 0],
        "p_clean": probs.gather(-1, clean[..., None])[..., 0],
        "correct": logits.argmax(-1) == clean,
        "collision": (probs**2).sum(-1),
    }


def measure(model: torch.nn.Module, probe: Probe, language: Language) -> dict[str, float]:
    was_training = model.training
    model.eval()
    task = answer_statistics(model, probe.task, language.length)
    kept = answer_statistics(model, probe.retention, language.length)
    per_symbol = torch.zeros(language.symbols).index_add_(
        0, probe.task["x"].flatten(), task["correct"].flatten().float()
    )
    seen = torch.bincount(probe.task["x"].flatten(), minlength=language.symbols).clamp(min=1)
    metrics = {
        "token_acc": task["correct"].float().mean(),
        "greedy_em": task["correct"].all(1).float().mean(),
        "sampled_em": task["p_clean"].prod(1).mean(),
        "mean_p": task["p_clean"].mean(),
        "collision": task["collision"].mean(),
        "retention": kept["correct"].float().mean(),
        "coverage": (per_symbol / seen >= 0.9).float().mean(),
        "low_p_share": (task["p_clean"] < 0.1).float().mean(),
    }
    if probe.noisy_training is not None:
        noisy = answer_statistics(model, probe.noisy_training, language.length)
        metrics["noisy_label_p"] = noisy["p_label"][probe.noisy_training["noisy"]].mean()
    model.train(was_training)
    return {name: float(value) for name, value in metrics.items()}


class LabProbe(L.Callback):
    """Measures the probe at step 0 and every ``every`` steps (and at the end); records DEFT's α and p per step."""

    def __init__(self, probe: Probe, language: Language, every: int) -> None:
        self.probe, self.language, self.every = probe, language, every
        self.points: list[dict[str, float]] = []
        self.steps: list[dict[str, float]] = []

    def _measure(self, trainer: L.Trainer, pl_module: DeftModule) -> None:
        self.points.append({"step": trainer.global_step, **measure(pl_module.model, self.probe, self.language)})

    def on_train_start(self, trainer: L.Trainer, pl_module: DeftModule) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DeftModule, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the steps DeftModule logs
            logged = trainer.callback_metrics
            values = {name: float(logged[f"train/{name}"]) for name in ("alpha", "p") if f"train/{name}" in logged}
            self.steps.append({"step": trainer.global_step, **values})
        if trainer.global_step % self.every == 0 or trainer.global_step == trainer.max_steps:
            self._measure(trainer, pl_module)


# ---------------------------------------------------------------------------------------------------- fitting


def _trainer(steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
    )


def _module(settings: Settings, objective: dict[str, Any], stage: dict[str, Any], **kwargs: Any) -> DeftModule:
    return DeftModule(
        objective=objective,
        learning_rate=stage.get("learning_rate", 1e-3),
        weight_decay=stage.get("weight_decay", 0.0),
        warmup_ratio=stage.get("warmup_ratio", 0.1),
        gradient_clip=stage.get("gradient_clip", 1.0),
        **kwargs,
    )


def pretrained(settings: Settings, seed: int, cache: Path) -> Path:
    """A LitGPT checkpoint directory of the seed's pretrained model (built once, then read from ``cache``)."""
    from litgpt.utils import save_config

    key = hashlib.sha256(
        json.dumps(
            [CACHE_FORMAT, dataclasses.asdict(settings.language), settings.model_config(), settings.pretrain, seed],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    directory = cache / f"seed{seed}-{key}"
    if (directory / "lit_model.pth").is_file():
        return directory
    L.seed_everything(seed, verbose=False)
    module = _module(
        settings, {"class_path": "deft_lightning.objectives.NLL"}, settings.pretrain,
        model_config=settings.model_config(),
    )  # fmt: skip
    data = TokenRows(pretraining_rows(settings, seed), settings.pretrain.get("batch_size", 64), seed)
    _trainer(settings.pretrain.get("steps", 1000), []).fit(module, datamodule=data)
    staging = directory.with_name(directory.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(module.model.state_dict(), staging / "lit_model.pth")
    save_config(module.config, staging)
    staging.rename(directory)
    return directory


def finetune(
    settings: Settings,
    base: Path,
    regime: Regime,
    objective: dict[str, Any],
    seed: int,
    callbacks: list[L.Callback] = (),
) -> dict[str, Any]:
    """One cell: the pretrained model fine-tuned in ``regime`` with ``objective``; its probe points and steps."""
    train, probe = regime_data(settings, regime, seed)
    L.seed_everything(seed, verbose=False)
    module = _module(settings, objective, settings.finetune, checkpoint_dir=base)
    data = TokenRows(train, settings.finetune.get("batch_size", 32), seed)
    recorder = LabProbe(probe, settings.language, settings.evaluate.get("every", 25))
    _trainer(settings.finetune.get("steps", 200), [recorder, *callbacks]).fit(module, datamodule=data)
    return {"points": recorder.points, "steps": recorder.steps}


# ---------------------------------------------------------------------------------------------------- reporting

#: (two-sided 95 %) Student t quantiles by degrees of freedom; 1.96 beyond
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T_CRITICAL.update({11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042})


def t_critical(df: int) -> float:
    return T_CRITICAL.get(df) or next((T_CRITICAL[d] for d in sorted(T_CRITICAL) if d >= df), 1.96)


@dataclass
class Prediction:
    """The paper predicts ``a − b`` has sign ``sign`` on ``metric`` in ``regime``."""

    claim: str
    regime: str
    a: str
    b: str
    metric: str
    sign: int


PREDICTIONS = [
    Prediction("weak prior: NLL learns what −p cannot (§6, Table 3)", "weak", "−p", "NLL", "greedy_em", -1),
    Prediction("weak prior: DEFT beats NLL (Table 3)", "weak", "DEFT", "NLL", "greedy_em", 1),
    Prediction("weak prior: DEFT beats −p (Table 3)", "weak", "DEFT", "−p", "greedy_em", 1),
    Prediction("strong prior: −p sharpens past NLL (Table 1)", "strong", "−p", "NLL", "sampled_em", 1),
    Prediction("strong prior: DEFT sharpens past NLL (Table 1)", "strong", "DEFT", "NLL", "sampled_em", 1),
    Prediction("strong prior: NLL fits the label noise more than −p (§4)", "strong", "NLL", "−p", "noisy_label_p", 1),
    Prediction("strong prior: NLL forgets task B more than DEFT (Table 5)", "strong", "NLL", "DEFT", "retention", -1),
    Prediction(
        "confident conflicts: DEFT follows them more slowly (Prop. 10)", "conflict", "DEFT", "NLL", "learning_auc", -1
    ),
    Prediction("confident conflicts: NLL forgets task B more than DEFT", "conflict", "NLL", "DEFT", "retention", -1),
    # the anchored objectives' own papers: an anchor (a KL to the start, a trust region) limits drift
    Prediction(
        "ASFT: its KL anchor keeps task B better than DFT (arXiv 2509.23753)", "strong", "ASFT", "DFT", "retention", 1
    ),
    Prediction("ASFT: anchored, it forgets task B less than NLL", "conflict", "ASFT", "NLL", "retention", 1),
    Prediction(
        "PSFT: its trust region forgets task B less than NLL (arXiv 2508.17784)",
        "conflict",
        "PSFT",
        "NLL",
        "retention",
        1,
    ),
]


def final(cell: dict[str, Any]) -> dict[str, float]:
    """A cell's metrics at the last probe, how fast it learned (``learning_auc``: token accuracy averaged over the
    probes, 1 = right from the start) and the prior (step-0 mean p and Σp²)."""
    points = cell["points"]
    auc = statistics.fmean(point["token_acc"] for point in points)
    return {
        **points[-1],
        "learning_auc": auc,
        "prior_p": points[0]["mean_p"],
        "prior_collision": points[0]["collision"],
    }


def paired(results: dict, regime: str, a: str, b: str, metric: str, seeds: list[int]) -> list[float] | None:
    try:
        return [final(results[regime][a][s])[metric] - final(results[regime][b][s])[metric] for s in seeds]
    except KeyError:
        return None


def verdict(prediction: Prediction, differences: list[float]) -> dict[str, Any]:
    n = len(differences)
    mean = statistics.fmean(differences)
    sd = statistics.stdev(differences) if n > 1 else 0.0
    t = mean / (sd / math.sqrt(n)) if sd > 0 else (math.inf * (1 if mean > 0 else -1) if mean else 0.0)
    separated = n > 1 and abs(t) >= t_critical(n - 1)
    outcome = "not separated"
    if separated:
        outcome = "reproduced" if (mean > 0) == (prediction.sign > 0) else "reversed"
    signs = "".join("+" if d > 0 else "−" if d < 0 else "0" for d in differences)
    evidence = f"{prediction.a} − {prediction.b} {prediction.metric} {_signed(mean)} ± {sd:.3f} ({n} seeds: {signs}"
    evidence += f", t = {_signed(t, 1)})" if math.isfinite(t) else ")"
    return {**dataclasses.asdict(prediction), "outcome": outcome, "mean": mean, "std": sd, "t": t, "evidence": evidence}


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def report(settings: Settings, results: dict, regimes: list[str], objectives: list[str], seeds: list[int]) -> dict:
    """Tables, paired differences against NLL and verdicts, as data."""
    table = []
    for regime in regimes:
        for objective in objectives:
            finals = [final(results[regime][objective][s]) for s in seeds]
            row = {"regime": regime, "objective": objective}
            for metric in METRICS:
                values = [f[metric] for f in finals if metric in f]
                if values:
                    row[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            table.append(row)
    differences = []
    for regime in regimes:
        for objective in (o for o in objectives if o != "NLL" and "NLL" in objectives):
            metric = settings.regimes[regime].headline
            values = paired(results, regime, objective, "NLL", metric, seeds)
            differences.append(
                verdict(Prediction("", regime, objective, "NLL", metric, 1), values) | {"regime": regime}
            )
    verdicts = []
    for prediction in PREDICTIONS:
        values = paired(results, prediction.regime, prediction.a, prediction.b, prediction.metric, seeds)
        if values is not None and prediction.regime in regimes:
            verdicts.append(verdict(prediction, values))
    return {"table": table, "differences": differences, "verdicts": verdicts}


def regime_standing(summary: dict[str, Any], regime: str) -> tuple[str, list[tuple[str, float, bool]]]:
    """A regime's headline metric and every objective's mean on it, best first, each marked whether it is tied with
    the best (not separated from it by the paired test over seeds)."""
    metric = summary["priors"][regime]["headline"]
    cells = summary["cells"][regime]
    seeds = sorted(next(iter(cells.values())), key=int)
    values = {name: [final(by_seed[seed])[metric] for seed in seeds] for name, by_seed in cells.items()}
    ranked = sorted(values, key=lambda name: -statistics.fmean(values[name]))
    best = values[ranked[0]]
    standing = []
    for name in ranked:
        differences = [a - b for a, b in zip(values[name], best, strict=True)]
        tied = (
            name == ranked[0]
            or verdict(Prediction("", regime, name, ranked[0], metric, 1), differences)["outcome"] == "not separated"
        )
        standing.append((name, statistics.fmean(values[name]), tied))
    return metric, standing


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Regime lab — {summary['seeds']} seeds, {summary['wall_s']:.0f} s", ""]
    lines += ["Prior at step 0 (where each regime sits on the paper's axis; DEFT's α₀ is Σp²):", ""]
    lines += ["| regime | mean p | Σp² | what it is |", "|---|---:|---:|---|"]
    for regime, prior in summary["priors"].items():
        lines.append(f"| {regime} | {prior['mean_p']:.3f} | {prior['collision']:.3f} | {prior['description']} |")
    shown = [m for m in METRICS if not m.startswith("prior")]
    lines += ["", "Mean ± std over seeds at the last step:", ""]
    lines += ["| regime | objective | " + " | ".join(shown) + " |", "|---|---|" + "---:|" * len(shown)]
    for row in summary["report"]["table"]:
        cells = [f"{row[m][0]:.3f} ± {row[m][1]:.3f}" if m in row else "–" for m in shown]
        lines.append(f"| {row['regime']} | {row['objective']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences against NLL on each regime's headline metric:", ""]
    lines += [f"- {d['regime']}: {d['evidence']}" for d in summary["report"]["differences"]]
    lines += ["", "The paper's predictions:", ""]
    lines += [f"- **{v['outcome']}** — {v['claim']}: {v['evidence']}" for v in summary["report"]["verdicts"]]
    lines += ["", PLOTS_INTRO, ""]
    lines += ["![accuracy](accuracy.png)", "", "DEFT's α = Σp² and the target probability p on the trained tokens:", ""]
    lines += ["![DEFT's α and p](deft_alpha.png)", "", BANDS.format(seeds=summary["seeds"]), ""]
    return "\n".join(lines)


#: what a regime's headline metric is drawn as, step by step: learning_auc is the mean of token_acc over the
#: probes, so its curve is token_acc's
CURVE_OF = {"learning_auc": "token_acc"}
PLOTS_INTRO = "Each regime's headline metric (top) and retention of task B (bottom) during fine-tuning:"
#: the caption summary.md puts under the plots
BANDS = "Lines: the mean over {seeds} seeds; shaded bands: ± one standard deviation over the seeds."


def plots(
    results: dict, regimes: list[str], objectives: list[str], seeds: list[int], headlines: dict[str, str], out: Path
) -> None:
    """``accuracy.png``: each regime's headline metric (top) and retention of task B (bottom) vs step;
    ``deft_alpha.png``: DEFT's α and p vs step. One legend per panel; the bands are ± one std over seeds."""
    from deft_lightning.analysis.run import _pyplot

    plt = _pyplot()

    def band(axis, cells: list[list[float]], steps: list[int], label: str, style: str = "-") -> None:
        values = torch.tensor(cells)
        mean, sd = values.mean(0), values.std(0) if len(cells) > 1 else torch.zeros(values.shape[1])
        line = axis.plot(steps, mean, style, label=label)[0]
        low, high = (mean - sd).clamp(0, 1), (mean + sd).clamp(0, 1)  # every plotted quantity lies in [0, 1]
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)

    def finish(axis, title: str, ylabel: str) -> None:
        axis.set_title(title, fontsize="medium")
        axis.set_xlabel("fine-tuning step")
        axis.set_ylabel(ylabel)
        axis.set_ylim(-0.02, 1.02)
        axis.legend(fontsize="small", framealpha=0.8)

    figure, axes = plt.subplots(2, len(regimes), figsize=(4.4 * len(regimes), 6.8), squeeze=False)
    for column, regime in enumerate(regimes):
        headline = headlines[regime]
        drawn = CURVE_OF.get(headline, headline)
        for objective in objectives:
            cells = [results[regime][objective][s]["points"] for s in seeds]
            steps = [point["step"] for point in cells[0]]
            band(axes[0][column], [[p[drawn] for p in c] for c in cells], steps, objective)
            band(axes[1][column], [[p["retention"] for p in c] for c in cells], steps, objective)
        title = f"{regime}: {headline}" + (f" (area under {drawn})" if drawn != headline else "")
        finish(axes[0][column], title, drawn)
        finish(axes[1][column], f"{regime}: retention of task B", "retention (token accuracy on B)")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)
    if "DEFT" not in objectives:
        return
    figure, axes = plt.subplots(1, len(regimes), figsize=(4.4 * len(regimes), 3.6), squeeze=False)
    for column, regime in enumerate(regimes):
        cells = [results[regime]["DEFT"][s]["steps"] for s in seeds]
        steps = [step["step"] for step in cells[0]]
        band(axes[0][column], [[step["alpha"] for step in c] for c in cells], steps, "α = Σp²")
        band(axes[0][column], [[step["p"] for step in c] for c in cells], steps, "p", "--")
        finish(axes[0][column], f"DEFT, {regime} (trained tokens)", "mean over trained tokens")
    figure.tight_layout()
    figure.savefig(out / "deft_alpha.png", dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------- command


def run_lab(
    settings: Settings, regimes: list[str], objectives: list[str], out: Path, workers: int = 1, progress: bool = True
) -> dict[str, Any]:
    """Every seed × regime × objective; writes and returns the summary."""
    from tqdm import tqdm

    unknown = [r for r in regimes if r not in settings.regimes]
    if unknown:
        raise CommandError(f"lab: unknown regime(s) {unknown}; the config defines {sorted(settings.regimes)}")
    specs = {name: objective_spec(settings, name) for name in objectives}
    seeds = list(range(1, settings.seeds + 1))
    started = time.perf_counter()
    bar = tqdm(total=len(seeds) * (1 + len(regimes) * len(objectives)), desc="lab", unit=" cell", disable=not progress)
    jobs = [(settings, seed, regimes, specs, out) for seed in seeds]
    results: dict[str, dict[str, dict[int, dict]]] = {r: {o: {} for o in objectives} for r in regimes}
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(min(workers, len(seeds)), mp_context=context, initializer=_one_thread) as pool:
            for seed, cells in zip(seeds, pool.map(_seed_cells, jobs), strict=True):
                _merge(results, seed, cells)
                bar.update(1 + len(regimes) * len(objectives))
    else:
        threads = torch.get_num_threads()
        _one_thread()
        try:
            for job in jobs:
                _merge(results, job[1], _seed_cells(job, bar))
        finally:
            torch.set_num_threads(threads)
    bar.close()
    priors = {}
    for regime in regimes:
        firsts = [results[regime][objectives[0]][s]["points"][0] for s in seeds]
        priors[regime] = {
            "mean_p": statistics.fmean(p["mean_p"] for p in firsts),
            "collision": statistics.fmean(p["collision"] for p in firsts),
            "low_p_share": statistics.fmean(p["low_p_share"] for p in firsts),
            "description": settings.regimes[regime].description,
            "headline": settings.regimes[regime].headline,
        }
    summary = {
        "seeds": len(seeds),
        "regimes": regimes,
        "objectives": {name: specs[name] for name in objectives},
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("regimes", "objectives")},
        "priors": priors,
        "report": report(settings, results, regimes, objectives, seeds),
        "cells": results,
        "wall_s": time.perf_counter() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    plots(results, regimes, objectives, seeds, {r: priors[r]["headline"] for r in regimes}, out)
    return summary


def _one_thread() -> None:
    """Every seed is computed on one thread, so the numbers do not depend on how many workers ran them."""
    torch.set_num_threads(1)


def _seed_cells(job: tuple, bar: Any = None) -> dict[str, dict[str, dict]]:
    """Pretraining and every regime × objective cell of one seed (a worker's unit of work)."""
    settings, seed, regimes, specs, out = job
    cells: dict[str, dict[str, dict]] = {regime: {} for regime in regimes}
    with _Quiet():
        base = pretrained(settings, seed, out / "pretrained")
        if bar is not None:
            bar.update()
        for regime in regimes:
            for name, spec in specs.items():
                if bar is not None:
                    bar.set_postfix_str(f"seed {seed}: {regime} / {name}")
                cells[regime][name] = finetune(settings, base, settings.regimes[regime], spec, seed)
                if bar is not None:
                    bar.update()
    return cells


def _merge(results: dict, seed: int, cells: dict[str, dict[str, dict]]) -> None:
    for regime, by_objective in cells.items():
        for name, cell in by_objective.items():
            results[regime][name][seed] = cell


def objective_spec(settings: Settings, name: str) -> dict[str, Any]:
    """An objective by its name in the config (ASCII ``-p`` for ``−p`` too) or by ``class_path``."""
    if named_in(settings.objectives, name) in settings.objectives:
        return settings.objectives[named_in(settings.objectives, name)]
    if "." in name:
        return {"class_path": name}
    raise CommandError(
        f"lab: unknown objective '{name}'; the config names {', '.join(settings.objectives)}, or give a class_path"
    )


class _Quiet:
    """Lightning's per-Trainer notices (devices, tips) and warnings about what the lab leaves out on purpose."""

    def __enter__(self) -> None:
        self._level = logging.getLogger("lightning.pytorch").level
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        logging.getLogger("lightning.pytorch").setLevel(self._level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deft_lightning lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("configs/lab.yaml"))
    parser.add_argument("--seeds", type=int, help="seeds 1..N (default: the config's)")
    parser.add_argument("--regimes", nargs="+", help="default: the config's run.regimes")
    parser.add_argument(
        "--objectives", nargs="+", help="names from the config, or class paths (default: run.objectives)"
    )
    parser.add_argument("--out", type=Path, help="default: the config's out (runs/lab)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes, one seed each")
    args = parser.parse_args(ascii_objective_arguments(sys.argv[1:] if argv is None else argv))
    settings = Settings.from_file(args.config)
    if args.seeds is not None:
        if args.seeds < 2:
            raise CommandError("lab: --seeds must be >= 2 (the verdicts compare objectives across seeds)")
        settings.seeds = args.seeds
    regimes = args.regimes or settings.run.get("regimes") or list(settings.regimes)
    objectives = args.objectives or settings.run.get("objectives") or list(settings.objectives)
    objectives = [named_in(settings.objectives, name) for name in objectives]
    summary = run_lab(settings, regimes, objectives, args.out or Path(settings.out), args.workers)
    out = args.out or Path(settings.out)
    print(markdown(summary).split(PLOTS_INTRO)[0].rstrip())
    print(f"\nwrote {out / 'summary.md'}, summary.json, accuracy.png, deft_alpha.png")
