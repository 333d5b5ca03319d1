"""Conversation rows (OpenAI ``messages``, ShareGPT ``conversations``): validation naming file:line and turn,
assistant-only masks found by template prefixes, the Tulu-3 layout, mixtures with single-turn rows, the mixed
regime end to end. The tiny tokenizer's ChatML-style template here; SmolLM2's and a Qwen2.5-style one in
tests/test_default_model.py."""

import json
import shutil
from pathlib import Path

import pytest

from deft_lightning.data import FileSource, MixtureSource, SFTDataModule
from deft_lightning.data.preparation import IGNORE_INDEX, encode_example
from deft_lightning.data.sources import BadRowError, RowReport
from deft_lightning.prompting import Prompter, TemplateError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/tiny/tokenizer"
THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "5 × 4 = 20."},
    {"role": "user", "content": "Even?"},
    {"role": "assistant", "content": "Yes."},
]


def trained_spans(prompter: Prompter, messages, train_on="all_assistant") -> list[str]:
    """The trained tokens, decoded run by run (special tokens kept)."""
    ids, trained = prompter.conversation_ids(messages, train_on)
    runs, current = [], []
    for token, keep in zip(ids, trained, strict=True):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [prompter.tokenizer.processor.decode(run, skip_special_tokens=False) for run in runs]


def test_assistant_turns_and_their_end_of_turn_tokens_are_trained():
    prompter = Prompter(TOKENIZER, "chat_template")
    eos = "<|endoftext|>"
    assert trained_spans(prompter, THREE_TURNS) == ["2 + 3 = 5." + eos, "5 × 4 = 20." + eos, "Yes." + eos]
    assert trained_spans(prompter, THREE_TURNS, "last_assistant") == ["Yes." + eos]
    ids, _ = prompter.conversation_ids(THREE_TURNS)
    assert ids == prompter._hf_tokenizer.apply_chat_template(THREE_TURNS, tokenize=True)["input_ids"]
    prompt = prompter.prompt_ids({"messages": THREE_TURNS})  # what a model answers: up to the last assistant turn
    assert (
        prompt
        == prompter._hf_tokenizer.apply_chat_template(THREE_TURNS[:-1], tokenize=True, add_generation_prompt=True)[
            "input_ids"
        ]
    )


def with_template(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER, directory)
    shutil.copy(ROOT / "tests/fixtures" / name, directory / "chat_template.jinja")
    return directory


def test_a_template_that_rewrites_earlier_turns_is_an_error_naming_it_and_the_turn(tmp_path):
    prompter = Prompter(with_template(tmp_path, "drops_past_reasoning_chat_template.jinja"), "chat_template")
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>work</think> A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    with pytest.raises(TemplateError, match=r"tokenizer' renders assistant turn 1 differently"):
        prompter.conversation_ids(messages)
    assert trained_spans(prompter, messages, "last_assistant") == ["A2<|endoftext|>"]  # the last turn is stable


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}],
            r"turn 1 of 'messages' has unknown role",
        ),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], r"turn 1 .* got empty"),
        ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}], r"turn 0 .* got list"),
        ([{"role": "user", "content": "hi"}], r"'messages' has no assistant turn"),
        ([{"role": "user", "content": "hi"}, "assistant: x"], r"turn 1 of 'messages' must be an object"),
        ([{"speaker": "user", "text": "hi"}], r"turn 0 .* neither role/content nor from/value"),
        ([], r"field 'messages' must be a non-empty list of turns"),
    ],
)
def test_bad_conversations_name_file_line_and_turn(tmp_path, turns, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, {"messages": turns}])
    with pytest.raises(BadRowError, match=rf"chat.jsonl:2: {message}"):
        list(FileSource(path).rows(RowReport()))
    report = RowReport()
    assert len(list(FileSource(path).rows(report, on_bad_row="skip"))) == 1 and len(report.skipped) == 1


def test_sharegpt_rows_with_a_role_mapping(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    (row,) = FileSource(write_jsonl(tmp_path / "a.jsonl", rows)).rows(RowReport())
    assert row["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    custom = [{"dialog": [{"from": "person", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    source = FileSource(
        write_jsonl(tmp_path / "b.jsonl", custom),
        fields={"messages": "dialog"},
        roles={"person": "user", "bot": "assistant"},
    )
    assert next(iter(source.rows(RowReport())))["output"] == "yo"


def test_tulu3_layout_from_parquet_mixed_with_single_turn_rows(tmp_path):
    """allenai/tulu-3-sft-mixture's schema {id, messages, source}, read from a local Parquet file, in a mixture
    with single-turn rows; the data table counts the conversations."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chats = [json.loads(line) for line in (ROOT / "data/chat/train.jsonl").read_text().splitlines()[:12]]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "tulu.parquet")
    mixture = MixtureSource(
        [FileSource(tmp_path / "tulu.parquet"), FileSource(ROOT / "data/tiny/train.jsonl")], [1, 1], 16
    )
    data = SFTDataModule(mixture, TOKENIZER, prompt_style="chat_template", max_seq_length=256, cache_dir=tmp_path)
    data.setup("fit")
    report = data.reports["train"]
    assert report.examples == 16 and report.conversations == 8
    examples = data.examples("train", 16)
    assert sum("messages" in row for row in examples) == 8
    conversation = next(row for row in examples if "messages" in row)
    assert conversation["output"] == conversation["messages"][-1]["content"]


def test_truncation_that_cuts_every_assistant_token_drops_the_conversation(tmp_path):
    long_user = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [long_user, short])
    data = SFTDataModule(
        FileSource(path), TOKENIZER, prompt_style="chat_template", max_seq_length=64, cache_dir=tmp_path
    )
    data.setup("fit")
    assert data.reports["train"].examples == 1 and data.reports["train"].dropped_truncated == 1
    prompter = Prompter(TOKENIZER, "chat_template")
    _, labels, truncated = encode_example(prompter, long_user, 64)
    assert truncated and all(label == IGNORE_INDEX for label in labels)


def test_conversations_need_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": THREE_TURNS}])
    data = SFTDataModule(FileSource(path), TOKENIZER, prompt_style="alpaca", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"chat.jsonl:1: conversation rows need data.prompt_style"):
        data.setup("fit")


def test_mixed_regime_fits_on_the_shipped_conversations(tmp_path):
    """configs/mixed.yaml through the real CLI (tiny model and tokenizer): conversations + math, held-out chats."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deft_lightning",
            "fit",
            "--config",
            str(ROOT / "configs/mixed.yaml"),
            "--model.checkpoint_dir=null",
            "--model.model_config={name: t, block_size: 1024, vocab_size: 320, padded_vocab_size: 320, "
            "n_layer: 1, n_head: 2, n_embd: 16}",
            f"--data.init_args.tokenizer_dir={TOKENIZER}",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=3",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
            f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout + result.stderr
    assert "chats" in table and "val/nll" in table


def test_data_system_prompt_reaches_conversations_without_a_system_turn():
    """As for single-turn rows: a conversation without a system turn gets data.system_prompt (not the template's
    default); one with its own keeps it."""
    prompter = Prompter(TOKENIZER, "chat_template", system_prompt="Answer in French.")
    without_system = THREE_TURNS[1:]
    ids, _ = prompter.conversation_ids(without_system)
    expected = [{"role": "system", "content": "Answer in French."}, *without_system]
    assert ids == prompter._hf_tokenizer.apply_chat_template(expected, tokenize=True)["input_ids"]
    assert trained_spans(prompter, without_system) == trained_spans(Prompter(TOKENIZER, "chat_template"), expected)
    assert prompter.text(prompter.prompt_ids({"messages": without_system})).startswith("<|im_start|>system\nAnswer")
    own, _ = prompter.conversation_ids(THREE_TURNS)
    assert own == prompter._hf_tokenizer.apply_chat_template(THREE_TURNS, tokenize=True)["input_ids"]
    single = prompter.prompt_ids({"instruction": "Hi", "output": "Salut"})
    assert prompter.text(single).startswith("<|im_start|>system\nAnswer in French.")
