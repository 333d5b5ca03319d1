"""The analysis numbers against independent computations (autograd, full log-softmax), and each ``analyze``
command on tiny models: the CSVs are checked, not the pixels."""

import csv
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_fit_command, write_tiny_checkpoint

from deft_lightning.analysis.run import main as analyze
from deft_lightning.analysis.tokens import (
    forgetting_fractions,
    gradient_shares,
    probability_fractions,
    token_statistics,
)
from deft_lightning.data.preparation import encode_example
from deft_lightning.loading import load_weights, resolve_model
from deft_lightning.objectives import DEFT, EAFT, NLL, Cayley, Needs, Prob
from deft_lightning.prompting import Prompter
from deft_lightning.statistics import target_log_probs

OBJECTIVES = {"NLL": NLL(), "−p": Prob(), "EAFT": EAFT(k=5), "Cayley": Cayley(), "DEFT": DEFT()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_gradient_shares_are_the_autograd_logit_gradient_norms():
    torch.manual_seed(0)
    logits = torch.randn(40, 12, dtype=torch.float64) * 3
    logits[0, 4] = 40.0  # p ≈ 1 on a target
    targets = torch.randint(0, 12, (40,))
    targets[0] = 4
    _, stats = target_log_probs(logits, targets, Needs(entropy=True, collision=True, top_k=5), ignore_index=None)
    shares = gradient_shares(stats, OBJECTIVES)
    for name, objective in OBJECTIVES.items():
        z = logits.clone().requires_grad_(True)
        objective(z, targets).sum().backward()
        norms = z.grad.norm(dim=1)
        torch.testing.assert_close(shares[name], norms / norms.sum(), rtol=1e-9, atol=1e-12, msg=name)
        assert torch.isfinite(shares[name]).all()


def test_probability_and_forgetting_fractions():
    p = torch.tensor([1e-5, 5e-4, 0.2, 0.6, 0.9])
    assert probability_fractions(p) == {"p<0.001": pytest.approx(0.4), "p>0.5": pytest.approx(0.4)}
    before = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.3, 0.7])
    after = torch.tensor([0.95, 0.5, 0.4, 0.1, 0.3, 0.2])  # learned: 0, 2; forgotten: 1, 3, 5; unchanged: 4
    fractions = forgetting_fractions(before, after, confident=0.5)
    assert fractions["learned"] == pytest.approx(2 / 6) and fractions["forgotten"] == pytest.approx(3 / 6)
    assert fractions["learned_high_confidence"] == pytest.approx(1 / 2)
    assert fractions["forgotten_high_confidence"] == pytest.approx(2 / 3)
    assert fractions["forgotten_low_confidence"] == pytest.approx(1 / 3)


def rows(count: int = 6) -> list[dict[str, str]]:
    import json

    lines = (ROOT / "data/tiny/train.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def direct_target_probs(model, prompter, examples, max_seq_length=512) -> torch.Tensor:
    """Target probabilities by one full forward and log-softmax per example (no batching, no chunking)."""
    values = []
    for row in examples:
        input_ids, labels, _ = encode_example(prompter, row, max_seq_length)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([input_ids]))[0].double(), dim=-1)
        for position in range(len(labels) - 1):
            if labels[position + 1] != -100:
                values.append(logp[position, labels[position + 1]].exp())
    return torch.stack(values).float()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_tiny_checkpoint(root / "a", seed=0), write_tiny_checkpoint(root / "b", seed=1)


def test_token_statistics_align_with_a_direct_forward(two_models):
    ref = resolve_model("a", two_models[0], prompt_style="alpaca")
    model = load_weights(ref, torch.device("cpu"), torch.float32)
    prompter = Prompter(ref.tokenizer_dir, "alpaca")
    stats = token_statistics(model, prompter, rows(), Needs(entropy=True), max_seq_length=512, batch_size=4)
    torch.testing.assert_close(stats.prob, direct_target_probs(model, prompter, rows()), rtol=1e-4, atol=1e-6)
    assert stats.entropy.shape == stats.prob.shape


def test_token_statistics_of_conversations_cover_only_assistant_turns(two_models):
    """analyze --data on conversation rows: statistics for exactly the assistant turns' tokens."""
    import json

    ref = resolve_model("a", two_models[0], prompt_style="chat_template")
    model = load_weights(ref, torch.device("cpu"), torch.float32)
    prompter = Prompter(ref.tokenizer_dir, "chat_template")
    chats = [json.loads(line) for line in (ROOT / "data/chat/train.jsonl").read_text().splitlines()[:4]]
    stats = token_statistics(model, prompter, chats, Needs(), max_seq_length=512)
    trained = sum(sum(prompter.conversation_ids(chat["messages"])[1][1:]) for chat in chats)
    assert stats.prob.numel() == trained
    torch.testing.assert_close(stats.prob, direct_target_probs(model, prompter, chats), rtol=1e-4, atol=1e-6)


def analysis_args(tmp_path: Path, kind: str, *extra: str) -> list[str]:
    return [kind, "--data", str(ROOT / "data/tiny/train.jsonl"), "--limit", "6", "--prompt-style", "alpaca",
            "--out", str(tmp_path), *extra]  # fmt: skip


def test_landscape_command_csv_holds_each_objectives_gradient_shares(tmp_path, two_models):
    analyze(analysis_args(tmp_path, "landscape", "--model", str(two_models[0])))
    table = read_csv(tmp_path / "landscape.csv")
    assert (tmp_path / "landscape.png").stat().st_size > 0
    ref = resolve_model("a", two_models[0], prompt_style="alpaca")
    model = load_weights(ref, torch.device("cpu"), torch.float32)
    prompter = Prompter(ref.tokenizer_dir, "alpaca")
    p = direct_target_probs(model, prompter, rows())
    assert len(table) == len(p)
    torch.testing.assert_close(torch.tensor([float(r["p"]) for r in table]), p, rtol=1e-4, atol=1e-6)
    for name in OBJECTIVES:
        column = torch.tensor([float(r[f"share_{name}"]) for r in table])
        assert column.sum() == pytest.approx(1, abs=1e-4)
    # NLL's share is proportional to √(1 − 2p + Σp²); −p's to p times that: their ratio is ∝ p
    nll, prob = (torch.tensor([float(r[f"share_{n}"]) for r in table]) for n in ("NLL", "−p"))
    ratio = prob / nll
    torch.testing.assert_close(ratio / ratio.sum(), p / p.sum(), rtol=1e-3, atol=1e-6)


def test_probabilities_and_forgetting_commands_on_a_constructed_pair(tmp_path, two_models, capsys):
    a, b = two_models
    analyze(analysis_args(tmp_path, "probabilities", "--models", f"a={a}", f"b={b}"))
    table = read_csv(tmp_path / "probabilities.csv")
    for name in ("a", "b"):
        assert sum(float(r["fraction"]) for r in table if r["model"] == name) == pytest.approx(1, abs=1e-4)
    assert "p<1e-3" in capsys.readouterr().out

    analyze(analysis_args(tmp_path, "forgetting", "--before", str(a), "--after", str(b), "--confident", "0.01"))
    per_token = read_csv(tmp_path / "forgetting.csv")
    fractions = {r["quantity"]: float(r["fraction"]) for r in read_csv(tmp_path / "forgetting_fractions.csv")}
    prompter = Prompter(ROOT / "data/tiny/tokenizer", "alpaca")
    p_a, p_b = (
        direct_target_probs(load_weights(resolve_model(n, m, prompt_style="alpaca"), torch.device("cpu"),
                                         torch.float32), prompter, rows())
        for n, m in (("a", a), ("b", b))
    )  # fmt: skip
    torch.testing.assert_close(torch.tensor([float(r["delta_p"]) for r in per_token]), p_b - p_a, rtol=1e-3, atol=1e-6)
    learned = p_b > p_a
    assert fractions["learned"] == pytest.approx(float(learned.float().mean()), abs=1e-6)
    high = p_a >= 0.01
    assert fractions["learned_high_confidence"] == pytest.approx(float((learned & high).sum() / learned.sum()))


def test_mismatched_tokenizers_are_refused(tmp_path, two_models):
    other = write_tiny_checkpoint(tmp_path / "c")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")  # any byte difference
    with pytest.raises(ValueError, match="different tokenizers"):
        analyze(analysis_args(tmp_path, "forgetting", "--before", str(two_models[0]), "--after", str(other)))


def test_trajectory_from_a_metrics_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "epoch,step,train/collision,train/p,val/loss\n0,0,0.1,0.2,\n0,1,0.3,0.4,\n0,1,,,2.0\n0,2,0.5,0.6,\n"
    )
    analyze(["trajectory", str(run), "--labels", "r", "--out", str(tmp_path / "out")])
    table = read_csv(tmp_path / "out/trajectory.csv")
    assert [(r["step"], r["alpha"], r["p"]) for r in table] == [
        ("0", "0.1", "0.2"),
        ("1", "0.3", "0.4"),
        ("2", "0.5", "0.6"),
    ]
    with pytest.raises(ValueError, match="trajectory.png and .*trajectory.csv exist from an earlier analysis"):
        analyze(["trajectory", str(run), "--labels", "r", "--out", str(tmp_path / "out")])  # nothing overwritten
    with pytest.raises(FileNotFoundError, match="metrics.csv not found"):
        analyze(["trajectory", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--force"])


@pytest.mark.slow
def test_fit_time_token_histograms_and_their_trajectory(tmp_path):
    run = tmp_path / "run"
    extra = ["--trainer.max_steps=6", "--trainer.callbacks+=deft_lightning.callbacks.TokenHistograms",
             "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.sample_size=64"]  # fmt: skip
    done = subprocess.run(tiny_fit_command(run, *extra), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    histograms = read_csv(run / "token_histograms.csv")
    assert sorted({int(r["step"]) for r in histograms}) == [0, 2, 4]
    assert {r["quantity"] for r in histograms} == {"p", "collision", "alpha", "weight", "entropy"}
    for step in (0, 2, 4):
        for quantity in ("p", "entropy"):
            total = sum(
                float(r["fraction"]) for r in histograms if r["quantity"] == quantity and int(r["step"]) == step
            )
            assert total == pytest.approx(1, abs=1e-4)
    metrics = read_csv(run / "metrics.csv")
    assert all(r["train/collision"] == r["train/alpha"] for r in metrics if r.get("train/p"))  # DEFT: α = Σp²
    analyze(["trajectory", str(run), "--out", str(tmp_path / "out")])
    assert len(read_csv(tmp_path / "out/trajectory.csv")) == 6


def test_data_can_be_any_source_described_in_yaml(tmp_path, two_models):
    source = tmp_path / "source.yaml"
    source.write_text(
        f"class_path: deft_lightning.data.FileSource\ninit_args: {{path: {ROOT / 'data/tiny/train.jsonl'}}}\n"
    )
    analyze(["probabilities", "--data", str(source), "--limit", "6", "--prompt-style", "alpaca",
             "--models", f"a={two_models[0]}", "--out", str(tmp_path / "yaml")])  # fmt: skip
    analyze(analysis_args(tmp_path / "file", "probabilities", "--models", f"a={two_models[0]}"))
    assert (tmp_path / "yaml/probabilities.csv").read_text() == (tmp_path / "file/probabilities.csv").read_text()


def test_shipped_source_files_parse():
    from deft_lightning.analysis.run import source_from_yaml
    from deft_lightning.data import FigFontSource, SelfDistilledSource

    assert isinstance(source_from_yaml(ROOT / "configs/sources/miniature-weak.yaml"), FigFontSource)
    strong = source_from_yaml(ROOT / "configs/sources/miniature-strong.yaml")
    assert isinstance(strong, SelfDistilledSource) and strong.noise_fraction == 0.2


def test_rolling_mean():
    from deft_lightning.analysis.run import rolling_mean

    assert rolling_mean([1.0, 2.0, 3.0, 6.0], 2) == [1.0, 1.5, 2.5, 4.5]
    assert rolling_mean([1.0, 2.0], 1) == [1.0, 2.0]
