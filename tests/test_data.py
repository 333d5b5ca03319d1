"""The minimal JSONL SFT data path: validation errors name file, line and field; masking; zero-token examples."""

from pathlib import Path

import pytest

from deft_lightning.data import SFTJsonData, read_sft_jsonl
from deft_lightning.data.tokenizer import train_byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/tiny/tokenizer"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r":2: invalid JSON"),
        (b'{"instruction": "a"}\n', r":1: missing field 'output'"),
        (b'{"instruction": "a", "output": 3}\n', r":1: field 'output' must be a string, got int"),
        (b'{"instruction": "a", "input": [1], "output": "b"}\n', r":1: field 'input' must be a string"),
        (b'{"instruction": "a", "output": "  "}\n', r":1: field 'output' is empty"),
        (b'["a", "b"]\n', r":1: expected a JSON object"),
        (b'{"instruction": "\xff", "output": "b"}\n', r":1: not valid UTF-8"),
        (b"\n\n", r"no rows"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_sft_jsonl(path)
    assert str(path) in str(error.value)


def test_prompt_is_masked_and_eos_trained(tmp_path):
    data = SFTJsonData(ROOT / "data/tiny/train.jsonl", TOKENIZER, max_seq_length=128)
    data.setup("fit")
    example = data.datasets["train"][0]
    trained = example["labels"] != -100
    assert trained.any() and not trained[0]
    assert example["labels"][-1] == data.tokenizer.eos_id  # the response ends with EOS, which is trained
    first = int(trained.nonzero()[0])
    assert (example["labels"][first:] == example["input_ids"][first:]).all()
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == data.batch_size


def test_truncated_responses_are_dropped_and_all_truncated_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(
        '{"instruction": "short", "output": "yes"}\n'
        '{"instruction": "' + "very long prompt " * 50 + '", "output": "no"}\n'
    )
    data = SFTJsonData(path, TOKENIZER, max_seq_length=100)
    data.setup("fit")
    assert len(data.datasets["train"]) == 1
    data = SFTJsonData(path, TOKENIZER, max_seq_length=2)
    with pytest.raises(ValueError, match="every example's response is truncated away"):
        data.setup("fit")


def test_missing_inputs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json"):
        SFTJsonData(ROOT / "data/tiny/train.jsonl", tmp_path)
    data = SFTJsonData(tmp_path / "nope.jsonl", TOKENIZER)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.setup("fit")
    with pytest.raises(ValueError, match="`test` needs data.test_file"):
        SFTJsonData(ROOT / "data/tiny/train.jsonl", TOKENIZER).setup("test")


def test_tokenizer_builder_round_trips(tmp_path):
    from litgpt.tokenizer import Tokenizer

    train_byte_level_bpe(["hello world", "hello there"] * 10, tmp_path, vocab_size=270)
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("hello world", eos=True)
    assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids[:-1]) == "hello world"
