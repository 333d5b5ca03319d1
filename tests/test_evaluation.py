"""Scorers on hand-written cases, Average@n / pass@k arithmetic, MCQ layouts, and the evaluate command end to end
on tiny models (a base checkpoint directory and fit checkpoints)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_tiny_checkpoint

from deft_lightning.evaluation import Choice, ChoiceScorer, FigFontScorer, Math, MathScorer, extract_boxed, pass_at_k
from deft_lightning.evaluation.benchmarks import choice_item
from deft_lightning.evaluation.run import evaluate, parse_config, suite_tables

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ scorers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{ \\sqrt{\\frac{a}{b}} }", "\\sqrt{\\frac{a}{b}}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
        ("first \\boxed{3} then \\boxed{4", None),  # cut off: not the earlier box
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("output", "reference", "correct"),
    [
        ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "The solution ... \\boxed{\\frac12}", 1.0),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
        ("\\boxed{35}", "36", 0.0),
        ("35", "35", 0.0),  # no \\boxed{}: wrong under the paper's protocol
        ("\\boxed{3} and then \\boxed{4}", "4", 1.0),  # the last box is the answer
    ],
)
def test_math_scorer(output, reference, correct):
    assert MathScorer().score(output, reference)["correct"] == correct


@pytest.mark.parametrize(
    ("output", "extracted", "correct"),
    [
        ("so the result is \\boxed 5$ and", "5", 1.0),  # the harness reads \\boxed 5
        ("We get 3 apples, then 5 more, 5 in all.", "5", 1.0),  # no box: the last number
        ("The answer is 5.", "5", 1.0),
        ("first \\boxed{3} then \\boxed{5", "5", 1.0),  # cut off: the harness keeps the partial box
        ("no number at all", None, 0.0),
    ],
)
def test_math_scorer_reference_extraction(output, extracted, correct):
    score = MathScorer(extraction="reference").score(output, "5")
    assert (score["extracted"], score["correct"]) == (extracted, correct)


OPTIONS = {"A": "Pancreas", "B": "Liver", "C": "Kidney", "D": "Spleen"}


@pytest.mark.parametrize(
    ("output", "letter"),
    [
        ("The answer is (C).", "C"),
        ("C", "C"),
        ("(B)", "B"),
        ("D. Spleen", "D"),
        ("Answer: A", "A"),
        ("the correct answer is b", "B"),
        ("**C**", "C"),
        ("\\boxed{D}", "D"),
        ("Liver", "B"),
        ("A patient with diabetes... so the answer is (D)", "D"),
        ("I am not sure.", None),
        ("E", None),  # not an option
        ("The answer is a hormone-secreting organ, (C)", "C"),  # "a" is an article
        ("I think (B)… actually C", "C"),  # the last one
        ("Option C", "C"),
        ("The answer is C because B is wrong", "C"),  # an explicit answer wins
        ("I'm fairly sure it's B", "B"),
    ],
)
def test_choice_letter_extraction(output, letter):
    assert ChoiceScorer.extract(output, OPTIONS) == letter


TEN = dict(zip("ABCDEFGHIJ", ["Warfarin", "Heparin", "Aspirin", "Vitamin K antagonist", *"EFGHIJ"], strict=True))


@pytest.mark.parametrize(
    ("output", "letter"),
    [("I would choose B", "B"), ("A vitamin K antagonist", "D"), ("I", "I"), ("(I)", "I")],
)
def test_choice_extraction_reads_articles_and_pronouns_as_words(output, letter):
    """With ten options "A" and "I" are letters too; as article or pronoun they are not the answer."""
    assert ChoiceScorer.extract(output, TEN) == letter


@pytest.mark.parametrize(
    ("prediction", "target", "jaro_winkler", "textbook"),
    [
        ("MARTHA", "MARHTA", 0.9611, 0.9611),
        ("dixon", "DICKSONX", 0.8133, 0.8133),
        ("BOS", "BOS", 1.0, 1.0),
        ("", "ABC", 0.0, 0.0),
        ("AB", "AC", 0.7, 0.6667),  # the reference adds the prefix bonus below Jaro 0.7 too
        ("AXYZ", "ABCD", 0.55, 0.5),
    ],
)
def test_figfont_scorer_is_the_reference(prediction, target, jaro_winkler, textbook):
    score = FigFontScorer().score(prediction, target)
    assert score["jaro_winkler"] == pytest.approx(jaro_winkler, abs=1e-4)
    assert score["jaro_winkler_textbook"] == pytest.approx(textbook, abs=1e-4)
    assert score["exact"] == float(prediction == target)
    assert score["exact_lower"] == float(prediction.lower() == target.lower())
    padded = FigFontScorer().score(f" {prediction}\n", target)  # the reference compares raw outputs exactly
    assert padded["exact"] == padded["exact_lower"] == 0.0
    assert padded["jaro_winkler"] == score["jaro_winkler"]  # ... and strips for Jaro-Winkler


def test_pass_at_k_and_average_at_n():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 − C(3,2)/C(4,2)
    assert pass_at_k(4, 3, 2) == 1.0
    benchmark = Math("m", source=None, num_samples=4)
    scores = [[{"correct": c} for c in item] for item in ([1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0])]
    metrics = benchmark.aggregate(scores)
    assert metrics["avg@4"] == pytest.approx(100 * (0.25 + 1 + 0) / 3)  # every sample, not the first one
    assert metrics["pass@1"] == pytest.approx(metrics["avg@4"])
    assert metrics["pass@4"] == pytest.approx(100 * 2 / 3)
    assert metrics["pass@2"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="pass_k"):
        Math("m", source=None, num_samples=4, pass_k=[8])


def test_multiple_choice_layouts(tmp_path):
    rows = [
        {"question": "Q1?", "options": {"A": "x", "B": "y"}, "answer_idx": "B"},  # MedQA
        {"question": "Q2?", "opa": "p", "opb": "q", "opc": "r", "opd": "s", "cop": 2},  # MedMCQA (0-based)
        {"QUESTION": "Q3?", "CONTEXTS": ["c1", "c2"], "final_decision": "maybe"},  # PubMedQA
        {"question": "Q4?\nA. one\nB. two\nAnswer with the letter of the correct option.", "answer": "A"},
    ]
    path = tmp_path / "mcq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = Choice("mcq", path).items()
    assert [i.reference["answer"] for i in items] == ["B", "C", "C", "A"]
    assert items[0].row["instruction"] == "Q1?\nA. x\nB. y\nAnswer with the letter of the correct option."
    assert items[2].reference["options"] == {"A": "yes", "B": "no", "C": "maybe"}
    assert items[2].row["instruction"].startswith("c1\nc2\n\nQ3?")
    assert items[3].row["instruction"] == rows[3]["question"]  # options and instruction already written
    path.write_text(json.dumps({"question": "Q?", "opa": "p", "opb": "q", "opc": "r", "opd": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"mcq.jsonl:1: not a 'medmcqa' multiple-choice record \(KeyError"):
        Choice("mcq", path).items()
    path.write_text(json.dumps({"question": "Q?", "options": {"A": "x"}, "answer_idx": "E"}) + "\n")
    with pytest.raises(ValueError, match=r"mcq.jsonl:1: answer 'E' is not one of the options \['A'\]"):
        Choice("mcq", path).items()
    with pytest.raises(ValueError, match="unknown multiple-choice layout"):
        choice_item({}, "mmlu", "x")


# ------------------------------------------------------------------ the evaluate command


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base"))


def math_file(tmp_path: Path) -> Path:
    path = tmp_path / "math.jsonl"
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def benchmarks(tmp_path: Path) -> list:
    from deft_lightning.data import FileSource

    source = FileSource(math_file(tmp_path), fields={"instruction": "problem", "output": "answer"})
    return [
        Math("add", source, num_samples=3, max_new_tokens=8),
        Choice("med", ROOT / "data/medical/train.jsonl", limit=4, max_new_tokens=4),
    ]


def test_evaluate_writes_results_generations_and_tables(tmp_path, base_checkpoint, capsys):
    out = tmp_path / "eval"
    result = evaluate({"base": base_checkpoint}, benchmarks(tmp_path), out, prompt_style="alpaca")
    document = json.loads((out / "results.json").read_text())
    assert set(document) == {"format", "benchmarks", "cells"}
    cells = {c["benchmark"]: c for c in document["cells"]}
    assert set(cells["add"]["metrics"]) == {"avg@3", "pass@1", "pass@2"}
    assert set(cells["med"]["metrics"]) == {"accuracy"}
    for cell in document["cells"]:
        assert cell["new_tokens"] > 0 and cell["tokens_per_s"] > 0
        assert cell["sampling"]["num_samples"] == (3 if cell["benchmark"] == "add" else 1)
    records = [json.loads(line) for line in (out / cells["add"]["generations"]).read_text().splitlines()]
    assert len(records) == 5 and all(len(r["samples"]) == 3 for r in records)
    # the reported metric is recomputable from the saved generations
    correct = [s["correct"] for r in records for s in r["samples"]]
    assert cells["add"]["metrics"]["avg@3"] == pytest.approx(100 * sum(correct) / len(correct))
    assert "What is 3 + 3?" in records[3]["prompt"] and records[3]["reference"] == "6"
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0] == "model,suite,benchmark,metric,value" and len(csv) == 1 + 4
    printed = capsys.readouterr().out
    assert "math (avg@3, %)" in printed and "medical (accuracy, %)" in printed and "tokens/s" in printed
    assert result["tables"] == (out / "tables.md").read_text().strip()


def test_evaluation_is_seeded_and_reuses_finished_cells(tmp_path, base_checkpoint):
    out, marks = tmp_path / "eval", benchmarks(tmp_path)
    first = evaluate({"base": base_checkpoint}, marks, out, prompt_style="alpaca", seed=3)
    generations = (out / "generations/base/add.jsonl").read_text()
    again = evaluate({"base": base_checkpoint}, marks, out, prompt_style="alpaca", seed=3)
    assert all(c["reused"] for c in again["cells"])
    assert [c["metrics"] for c in again["cells"]] == [c["metrics"] for c in first["cells"]]
    fresh = evaluate({"base": base_checkpoint}, marks, tmp_path / "b", prompt_style="alpaca", seed=3, batch_size=2)
    assert (tmp_path / "b/generations/base/add.jsonl").read_text() == generations  # same seed, same samples
    assert not any(c.get("reused") for c in fresh["cells"])
    other = evaluate({"base": base_checkpoint}, marks, out, prompt_style="alpaca", seed=4)
    assert not any(c.get("reused") for c in other["cells"] if c["benchmark"] == "add")  # the seed is in the key
    assert (out / "generations/base/add.jsonl").read_text() != generations
    evaluate({"other": base_checkpoint}, marks[1:], out, prompt_style="alpaca", seed=4)
    kept = json.loads((out / "results.json").read_text())["cells"]  # earlier models' cells are not dropped
    assert {(c["model"], c["benchmark"]) for c in kept} == {("other", "med"), ("base", "add"), ("base", "med")}
    math_file(tmp_path)  # rewritten with the same content: still the same benchmark
    assert all(c.get("reused") for c in evaluate({"base": base_checkpoint}, marks, out, seed=4,
                                                   prompt_style="alpaca")["cells"][:1])  # fmt: skip
    with (tmp_path / "math.jsonl").open("a") as handle:  # a changed benchmark file is evaluated again
        handle.write(json.dumps({"problem": "What is 9 + 9?", "answer": "18"}) + "\n")
    assert not any(c.get("reused") for c in evaluate({"base": base_checkpoint}, marks, out, seed=4,
                                                       prompt_style="alpaca")["cells"][:1])  # fmt: skip
    bf16 = evaluate({"base": base_checkpoint}, marks[1:], out, seed=4, prompt_style="alpaca", precision="bf16-true")
    assert not any(c.get("reused") for c in bf16["cells"])  # another precision is another cell


def test_bad_input_fails_before_any_model_is_loaded(tmp_path, base_checkpoint):
    with pytest.raises(ValueError, match="missing.ckpt' does not exist"):
        evaluate({"base": base_checkpoint, "x": tmp_path / "missing.ckpt"}, benchmarks(tmp_path), tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?\\nA. x\\nB. y", "answer": "A"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        evaluate({"base": base_checkpoint}, [Choice("bad", bad)], tmp_path / "o", prompt_style="alpaca")
    with pytest.raises(ValueError, match="exceeds model 'base' block_size 512"):
        evaluate({"base": base_checkpoint}, [Choice("m", ROOT / "data/medical/train.jsonl", max_new_tokens=500)],
                 tmp_path / "o", prompt_style="alpaca")  # fmt: skip
    assert not (tmp_path / "o").exists()  # nothing was written


def test_shipped_evaluation_configs_parse():
    paper = parse_config(["--config", str(ROOT / "configs/eval/paper.yaml")])
    assert [b.suite for b in paper["benchmarks"]] == ["math"] * 5 + ["medical"] * 3 + ["figfont"]
    assert all(b.num_samples == 16 and b.max_new_tokens == 4096 for b in paper["benchmarks"][:5])
    assert all(b.extraction == "reference" for b in paper["benchmarks"][:5])
    medical = paper["benchmarks"][5:8]
    assert all(b.max_new_tokens == 8000 and b.instruction.endswith("within \\boxed{}.") for b in medical)


def test_harness_answer_files_load_with_coerce(tmp_path):
    """The Qwen2.5-Math harness's AMC23 (numeric `answer`) and OlympiadBench (`final_answer` list) layouts."""
    from deft_lightning.data import FileSource

    amc, olympiad = tmp_path / "amc.jsonl", tmp_path / "olympiad.jsonl"
    amc.write_text(json.dumps({"id": 0, "problem": "What is 20 + 7?", "answer": 27.0}) + "\n")
    olympiad.write_text(json.dumps({"id": 1, "question": "Half of one?", "final_answer": ["$\\frac{1}{2}$"]}) + "\n")
    strict = Math("AMC23", FileSource(amc, fields={"instruction": "problem", "output": "answer"}))
    with pytest.raises(ValueError, match="field 'answer' must be a string, got float"):
        strict.items()
    with pytest.raises(
        ValueError, match=r"missing field 'solution'; the record's fields are \['answer', 'id', 'problem'\]"
    ):
        Math("x", FileSource(amc, fields={"instruction": "problem", "output": "solution"})).items()
    cases = (
        (amc, {"instruction": "problem", "output": "answer"}, "27", "so \\boxed{27}"),
        (olympiad, {"instruction": "question", "output": "final_answer"}, "$\\frac{1}{2}$", "\\boxed{0.5}"),
    )
    for path, fields, reference, output in cases:
        benchmark = Math("m", FileSource(path, fields=fields, coerce=True), extraction="reference")
        (item,) = benchmark.items()
        assert item.reference == reference
        assert benchmark.scorer.score(output, item.reference)["correct"] == 1.0
    smol = parse_config(["--config", str(ROOT / "configs/eval/smollm2.yaml")])
    assert [len(b.items()) for b in smol["benchmarks"]] == [200, 50, 16]
    assert smol["benchmarks"][0].items()[0].id == "40000"


def test_suite_table_layout():
    class Stub:
        def __init__(self, name, suite, metrics):
            self.name, self.suite, self.table_metrics = name, suite, metrics

    marks = [Stub("M500", "math", ("avg@16",)), Stub("AIME", "math", ("avg@16",)), Stub("FF", "figfont", ("jw", "em"))]
    cells = [
        {"model": "nll", "benchmark": "M500", "metrics": {"avg@16": 10.0}},
        {"model": "nll", "benchmark": "AIME", "metrics": {"avg@16": 20.0}},
        {"model": "nll", "benchmark": "FF", "metrics": {"jw": 50.0, "em": 5.0}},
        {"model": "deft", "benchmark": "M500", "metrics": {"avg@16": 30.0}},
    ]
    lines = suite_tables(cells, marks, ["nll", "deft"]).splitlines()
    assert lines[1].split() == ["model", "M500", "AIME", "Avg"]
    assert lines[3].split() == ["nll", "10.00", "20.00", "15.00"]
    assert lines[4].split() == ["deft", "30.00", "-", "-"]
    assert lines[7].split() == ["model", "FF", "jw", "FF", "em"]


@pytest.mark.slow
def test_evaluate_command_compares_fit_checkpoints_and_fit_logs_a_benchmark(tmp_path):
    """Two tiny fits (one with the fit-time benchmark callback), then ``evaluate`` on both checkpoints."""
    from conftest import tiny_fit_command

    math = math_file(tmp_path)
    runs = {}
    for objective in ("DEFT", "NLL"):
        run = tmp_path / objective
        extra = [f"--model.objective={objective}", "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=4"]
        if objective == "NLL":  # fine-tuned from a checkpoint directory: evaluate reads the config from it
            base = write_tiny_checkpoint(tmp_path / "base", block_size=256)
            extra += [f"--model.checkpoint_dir={base}", "--model.model_config=null"]
        if objective == "DEFT":
            extra += [
                "--trainer.callbacks+=deft_lightning.callbacks.BenchmarkValidation",
                "--trainer.callbacks.every_n_steps=2",
                "--trainer.callbacks.limit=3",
                f"--trainer.callbacks.benchmarks=[{{class_path: deft_lightning.evaluation.Choice, init_args: "
                f"{{name: med, path: {ROOT / 'data/medical/train.jsonl'}, max_new_tokens: 4}}}}]",
            ]
        done = subprocess.run(tiny_fit_command(run, *extra), capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[objective] = run / "checkpoints/last.ckpt"
    logged = (tmp_path / "DEFT/metrics.csv").read_text().splitlines()
    assert "eval/med/accuracy" in logged[0].split(",")
    steps_with_eval = [row.split(",") for row in logged[1:]]
    column = logged[0].split(",").index("eval/med/accuracy")
    assert sum(1 for row in steps_with_eval if len(row) > column and row[column]) == 2  # steps 2 and 4

    config = {
        "models": {name.lower(): str(path) for name, path in runs.items()},
        "benchmarks": [
            {
                "class_path": "deft_lightning.evaluation.Math",
                "init_args": {
                    "name": "add",
                    "source": {
                        "class_path": "deft_lightning.data.FileSource",
                        "init_args": {"path": str(math), "fields": {"instruction": "problem", "output": "answer"}},
                    },
                    "num_samples": 2,
                    "max_new_tokens": 6,
                },
            }
        ],
        "out_dir": str(tmp_path / "eval"),
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "deft_lightning", "evaluate", "--config", str(tmp_path / "eval.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("math (avg@2, %)") :].splitlines()
    assert [line.split()[0] for line in table[3:5]] == ["deft", "nll"]
    bad = subprocess.run([*command, "--models", "{x: nowhere.ckpt}"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "error: model 'x': 'nowhere.ckpt' does not exist" in bad.stderr


def test_similarity_scorer():
    from deft_lightning.evaluation import SimilarityScorer

    assert SimilarityScorer().score(" abc \n", "abc") == {"extracted": "abc", "similarity": 1.0, "exact": 1.0}
    assert SimilarityScorer().score("abcd", "abce")["similarity"] == pytest.approx(0.75)  # Indel: 1 − 2/8
    assert SimilarityScorer().score("", "abc")["similarity"] == 0.0


def test_self_distilled_source_generates_once_and_corrupts_a_controlled_fraction(tmp_path, base_checkpoint):
    from deft_lightning.data import FileSource, SelfDistilledSource
    from deft_lightning.data.sources import RowReport

    prompts = FileSource(ROOT / "data/tiny/train.jsonl", limit=6)

    def source(noise: float, seed: int = 1) -> SelfDistilledSource:
        return SelfDistilledSource(prompts, base_checkpoint, max_new_tokens=12, noise_fraction=noise, seed=seed,
                                   prompt_style="alpaca", cache_dir=tmp_path / "cache")  # fmt: skip

    clean = list(source(0.0).rows(RowReport()))
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and len(clean) > 0
    noisy = list(source(0.5).rows(RowReport()))
    assert list((tmp_path / "cache").iterdir()) == cached  # the continuations were generated once
    assert [r["instruction"] for r in noisy] == [r["instruction"] for r in clean]
    for clean_row, noisy_row in zip(clean, noisy, strict=True):
        words, changed = clean_row["output"].split(), noisy_row["output"].split()
        assert len(changed) == len(words)
        assert sum(a != b for a, b in zip(words, changed, strict=True)) <= round(0.5 * len(words))
    assert sum(c["output"] != n["output"] for c, n in zip(clean, noisy, strict=True)) > 0
    assert source(0.5).fingerprint() != source(0.0).fingerprint() != source(0.0, seed=2).fingerprint()
    assert list(source(0.5).rows(RowReport())) == noisy  # seeded
    with pytest.raises(ValueError, match="noise_fraction"):
        source(1.0)


def test_generations_log_the_prompt_as_fed(tmp_path, base_checkpoint):
    """The logged prompt keeps its special tokens (the chat template's end-of-turn is one): re-tokenized it gives the
    prompt ids the model answered, which are logged too."""
    from tokenizers import Tokenizer

    out = tmp_path / "eval"
    evaluate({"base": base_checkpoint}, benchmarks(tmp_path)[:1], out, prompt_style="chat_template")
    records = [json.loads(line) for line in (out / "generations/base/add.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.from_file(str(base_checkpoint / "tokenizer.json"))
    for record in records:
        assert "<|endoftext|>" in record["prompt"]
        assert tokenizer.encode(record["prompt"], add_special_tokens=False).ids == record["prompt_ids"]
