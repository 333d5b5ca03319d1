"""Sources, the SFT DataModule, caching, batching and resumable loader state (tiny tokenizer, offline)."""

import json
import random
from pathlib import Path

import pytest
import torch

from deft_lightning.data import (
    FigFontSource,
    FileSource,
    HubSource,
    MixtureSource,
    ReasoningGymMathSource,
    SFTDataModule,
)
from deft_lightning.data.module import GlobalBatchSampler, padding_fraction
from deft_lightning.data.sources import BadRowError, RowReport, mixture_counts
from deft_lightning.data.tokenizer import train_byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/tiny/tokenizer"


def module(tmp_path, train, **kwargs) -> SFTDataModule:
    args = {
        "tokenizer_dir": TOKENIZER,
        "prompt_style": "alpaca",
        "max_seq_length": 256,
        "batch_size": 4,
        "cache_dir": tmp_path / "cache",
    }
    return SFTDataModule(train=train, **{**args, **kwargs})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"rows.jsonl:2: invalid JSON"),
        (b'{"instruction": "a"}\n', r"rows.jsonl:1: missing field 'output'"),
        (b'{"instruction": "a", "output": 3}\n', r"rows.jsonl:1: field 'output' must be a string, got int"),
        (b'{"instruction": "a", "input": [1], "output": "b"}\n', r"rows.jsonl:1: field 'input' must be a string"),
        (b'{"instruction": "a", "output": "  "}\n', r"rows.jsonl:1: field 'output' is empty"),
        (b'["a", "b"]\n', r"rows.jsonl:1: expected an object"),
        (b'{"instruction": "\xff", "output": "b"}\n', r"rows.jsonl:1: not valid UTF-8"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadRowError, match=message):
        list(FileSource(path).rows(RowReport()))
    with pytest.raises(BadRowError, match=message):  # before any training: in setup
        module(tmp_path, FileSource(path)).setup("fit")


def test_on_bad_row_skip_counts(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\nnot json\n{"instruction": "c", "output": "d"}\n'
    )
    data = module(tmp_path, FileSource(path), on_bad_row="skip")
    data.setup("fit")
    assert data.reports["train"].examples == 2 and data.reports["train"].bad_rows_skipped == 2


def test_field_mapping_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"problem": ["1+1?", "2+2?"], "solution": ["\\boxed{2}", "\\boxed{4}"]}), tmp_path / "m.parquet"
    )
    rows = list(FileSource(tmp_path / "m.parquet", {"instruction": "problem", "output": "solution"}).rows(RowReport()))
    assert rows == [{"instruction": "1+1?", "output": "\\boxed{2}"}, {"instruction": "2+2?", "output": "\\boxed{4}"}]
    with pytest.raises(BadRowError, match=r"m.parquet: row 0: missing field 'question'"):
        list(FileSource(tmp_path / "m.parquet", {"instruction": "question"}).rows(RowReport()))


def test_masking_eos_and_truncation_accounting(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"instruction": "short", "output": "yes"},
        {"instruction": "long answer", "output": "cut " * 100},  # response partly truncated
        {"instruction": "word " * 400, "output": "no"},
    ]  # response truncated away
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = module(tmp_path, FileSource(path), max_seq_length=120)
    data.setup("fit")
    report = data.reports["train"]
    assert (report.examples, report.truncated, report.dropped_truncated) == (2, 1, 1)
    eos = data.tokenizer.eos_id
    for example in data.datasets["train"]:
        ids, labels = example["input_ids"], example["labels"]
        prompt_length = len(data.prompter.prompt_ids(example))
        assert all(label == -100 for label in labels[:prompt_length])  # no prompt token has a label
        assert labels[prompt_length:] == ids[prompt_length:]
    first = data.datasets["train"][0]
    assert first["labels"][-1] == eos  # EOS has a label
    assert report.trainable_tokens == sum(sum(x != -100 for x in e["labels"][1:]) for e in data.datasets["train"])


def test_all_truncated_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "word " * 400, "output": "no"}) + "\n")
    with pytest.raises(ValueError, match="no example has a trainable token"):
        module(tmp_path, FileSource(path), max_seq_length=50).setup("fit")


def test_figfont_items_equal_reasoning_gym_with_sorted_fonts():
    import reasoning_gym

    from deft_lightning.data.sources import FIGFONT_SYSTEM_PROMPT, sorted_figlet_fonts

    reference = reasoning_gym.create_dataset(
        "figlet_font", size=10, seed=42, min_word_len=2, max_word_len=5, space_letters=True
    )
    rows = list(FigFontSource(start=40_000, count=3).rows(RowReport()))
    with sorted_figlet_fonts():
        items = [reference[40_000 + offset] for offset in range(3)]
    for row, item in zip(rows, items, strict=True):
        assert (row["instruction"], row["output"]) == (item["question"], item["answer"])
        assert row["system"] == FIGFONT_SYSTEM_PROMPT  # the reference's wording
    assert FIGFONT_SYSTEM_PROMPT.endswith("output only that without any explanations or additional text.")
    shipped = [json.loads(line) for line in (ROOT / "data/figfont/test.jsonl").read_text().splitlines()[:2]]
    assert shipped == rows[:2]


def test_figfont_items_do_not_depend_on_directory_order(monkeypatch):
    """reasoning-gym lists fonts in directory order; another filesystem's order must give the same items."""
    from reasoning_gym.cognition import figlet_fonts

    source = FigFontSource(start=0, count=20)
    expected, fingerprint = list(source.rows(RowReport())), source.fingerprint()
    shuffled = list(figlet_fonts.OK_FONTS)
    random.Random(7).shuffle(shuffled)
    monkeypatch.setattr(figlet_fonts, "OK_FONTS", shuffled)
    assert list(source.rows(RowReport())) == expected and source.fingerprint() == fingerprint
    monkeypatch.setattr(figlet_fonts, "OK_FONTS", shuffled[:-1])  # a different font set changes the fingerprint
    assert source.fingerprint() != fingerprint


def test_math_stand_in_has_boxed_answers():
    rows = list(ReasoningGymMathSource(count=3).rows(RowReport()))
    assert all("\\boxed{}" in r["instruction"] and "\\boxed{" in r["output"] for r in rows)


@pytest.mark.parametrize(("weights", "total"), [([0.5, 0.5], 11), ([3, 1, 1], 17), ([0.2, 0.3, 0.5], 100)])
def test_mixture_counts_within_one(weights, total):
    counts = mixture_counts(weights, total)
    assert sum(counts) == total
    assert all(abs(c - total * w / sum(weights)) <= 1 for c, w in zip(counts, weights, strict=True))


def test_mixture_is_deterministic_and_proportional():
    general = FileSource(ROOT / "data/general/train.jsonl")
    math = ReasoningGymMathSource(count=40)
    mixture = MixtureSource([general, math], [1, 3], total=20, seed=5)
    first, second = list(mixture.rows(RowReport())), list(mixture.rows(RowReport()))
    assert first == second and len(first) == 20
    assert sum("\\boxed" in r["output"] for r in first) == 15
    assert MixtureSource([general, math], [1, 3], total=20, seed=6).fingerprint() != mixture.fingerprint()
    with pytest.raises(ValueError, match="has only"):
        list(MixtureSource([general, math], [1, 0], total=100).rows(RowReport()))


def test_cache_restores_identical_tokens(tmp_path):
    source = FileSource(ROOT / "data/tiny/train.jsonl")
    first = module(tmp_path, source)
    first.setup("fit")
    second = module(tmp_path, source)
    second.setup("fit")
    assert second.reports["train"].from_cache and not first.reports["train"].from_cache
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    assert module(tmp_path, source, max_seq_length=100)._cache_key(source) != first._cache_key(source)


def batches(loader, count):
    iterator = iter(loader)
    return [next(iterator)["input_ids"] for _ in range(count)]


@pytest.mark.parametrize("length_grouping", [False, True])
def test_order_is_seeded_and_loader_state_round_trips_mid_epoch(tmp_path, length_grouping):
    source = FileSource(ROOT / "data/tiny/train.jsonl")
    data = module(tmp_path, source, length_grouping=length_grouping)
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    state = loader.state_dict()
    expected = [next(iterator)["input_ids"] for _ in range(3)]

    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 3), expected, strict=True))

    again = module(tmp_path, source, length_grouping=length_grouping)
    again.setup("fit")
    reference = batches(data.train_dataloader(), 8)
    assert all(torch.equal(a, b) for a, b in zip(batches(again.train_dataloader(), 8), reference, strict=True))
    other_seed = module(tmp_path, source, length_grouping=length_grouping, seed=2)
    other_seed.setup("fit")
    assert not torch.equal(batches(other_seed.train_dataloader(), 1)[0], reference[0])


def grouped(lengths, batch_size, seed, num_replicas=1, rank=0) -> GlobalBatchSampler:
    return GlobalBatchSampler(lengths, batch_size, seed, num_replicas, rank, length_grouping=True)


def test_length_grouping_cuts_padding_and_covers_every_index():
    torch.manual_seed(0)
    lengths = torch.randint(5, 500, (1000,)).tolist()
    sampler = grouped(lengths, batch_size=8, seed=1)
    order = sampler.order(0)
    assert sorted(order) == list(range(1000)) and order != sampler.order(1)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    assert padding_fraction(lengths, order, 8) < padding_fraction(lengths, shuffled, 8) / 3


def rank_batches(sampler: GlobalBatchSampler, epoch: int) -> list[list[int]]:
    order = sampler.order(epoch)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


@pytest.mark.parametrize("count", [1000, 1003, 37])
def test_length_grouping_across_ranks_is_the_one_process_order(count):
    """The union of 2 ranks' batches at step k is one process's batch k (global batch 2 × 8); ranks take equally
    many steps; the partial last batch stays last (padding 1.4 % elsewhere, not ~20 %)."""
    torch.manual_seed(0)
    lengths = torch.randint(5, 500, (count,)).tolist()
    single = grouped(lengths, batch_size=16, seed=3)
    ranks = [grouped(lengths, batch_size=8, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for epoch in range(2):
        expected = rank_batches(single, epoch)
        per_rank = [rank_batches(sampler, epoch) for sampler in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(expected)
        assert [len(ranks[r].order(epoch)) for r in range(2)] == [len(ranks[0]), len(ranks[1])]
        for step, batch in enumerate(expected):
            union = per_rank[0][step] + per_rank[1][step]
            assert set(union) == set(batch) and len(union) >= len(batch)  # repeats only in a partial batch
            assert len(union) == len(batch) or step == len(expected) - 1
        assert sorted(single.order(epoch)) == list(range(count))
    assert grouped(lengths, 8, 3, 2, 1).order(0) == ranks[1].order(0)  # deterministic per seed
    assert grouped(lengths, 8, 4, 2, 1).order(0) != ranks[1].order(0)
    if count == 1003:  # 1003 = 62 × 16 + 11: a partial batch in the middle would shift every later boundary
        shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(3)).tolist()
        assert padding_fraction(lengths, single.order(0), 16) < padding_fraction(lengths, shuffled, 16) / 3


@pytest.mark.parametrize("grouping", [False, True])
def test_sampler_positions_carry_over_to_another_number_of_ranks(grouping):
    """After 3 global batches on 2 ranks (whole per-rank batches taken, as loaders do), the state is the same on
    both ranks and resumes one process with the global batch size at global batch 4 of the same epoch order."""
    lengths = torch.randint(5, 500, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    states = []
    for rank in range(2):
        sampler = GlobalBatchSampler(lengths, 4, 5, num_replicas=2, rank=rank, length_grouping=grouping)
        iterator = iter(sampler)
        head = [next(iterator) for _ in range(3 * 4)]
        states.append(sampler.state_dict())
        tail = list(iterator)
        resumed = GlobalBatchSampler(lengths, 4, 5, num_replicas=2, rank=rank, length_grouping=grouping)
        resumed.load_state_dict(states[-1])
        assert head + list(resumed) == head + tail == sampler.order(0)
    assert states[0] == states[1] and states[0]["global_batches"] == 3
    single = GlobalBatchSampler(lengths, 8, 5, length_grouping=grouping)
    single.load_state_dict(states[0])
    assert list(single) == [i for batch in single.global_batches(0)[3:] for i in batch]
    with pytest.raises(ValueError, match=r"global batches of 8 rows \(data.batch_size 4 × 2 rank\(s\)\)"):
        GlobalBatchSampler(lengths, 4, 5, length_grouping=grouping).load_state_dict(states[0])


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="Offline\\?.*FileSource"):
        list(HubSource("gaotang/numina-cot-subset-67k").rows(RowReport()))
    pinned = HubSource("gaotang/numina-cot-subset-67k", revision="v1").fingerprint()
    assert pinned != HubSource("gaotang/numina-cot-subset-67k").fingerprint()  # the revision is in the cache key


def test_missing_inputs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks tokenizer.json"):
        SFTDataModule(FileSource(tmp_path / "x.jsonl"), tokenizer_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        module(tmp_path, FileSource(tmp_path / "nope.jsonl")).setup("fit")
    with pytest.raises(ValueError, match="`test` needs data.test"):
        module(tmp_path, FileSource(ROOT / "data/tiny/train.jsonl")).setup("test")


def test_tokenizer_builder_round_trips(tmp_path):
    from litgpt.tokenizer import Tokenizer

    train_byte_level_bpe(["hello world", "hello there"] * 10, tmp_path, vocab_size=270)
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("hello world", eos=True)
    assert ids[-1] == tokenizer.eos_id and tokenizer.decode(ids[:-1]) == "hello world"


def test_a_second_writer_finishing_first_does_not_break_the_first(tmp_path, monkeypatch):
    """Two preparations of one cache entry overlap (ranks of a first multi-GPU fit): B starts after A and publishes
    while A is still writing. Each writes its own staging folder; A then reads B's entry (same tokens)."""
    from deft_lightning.data import module as data_module

    source = FileSource(ROOT / "data/tiny/train.jsonl")
    first, second = module(tmp_path, source), module(tmp_path, source)
    tokenize_source = data_module.tokenize_source
    overlapped = []

    def slow_tokenize(*args, **kwargs):
        report = tokenize_source(*args, **kwargs)
        if not overlapped:
            overlapped.append(args[2])
            second.setup("fit")  # B prepares and publishes the same entry before A finishes
        return report

    monkeypatch.setattr(data_module, "tokenize_source", slow_tokenize)
    first.setup("fit")
    assert overlapped and first.datasets["train"]["input_ids"] == second.datasets["train"]["input_ids"]
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".partial" in p.name] == []


def test_cache_key_covers_every_input_of_the_token_ids(tmp_path):
    """A chat_template.jinja, on_bad_row, LitGPT's name-based BOS rule and the file's content (same size and
    mtime) each change the key; nothing else does."""
    import os
    import shutil

    tokenizer = tmp_path / "tok"
    shutil.copytree(TOKENIZER, tokenizer)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "say hi", "output": "hi"}) + "\n")
    source = FileSource(rows)

    def key(**kwargs) -> str:
        return module(tmp_path, source, tokenizer_dir=kwargs.pop("tokenizer_dir", tokenizer), **kwargs)._cache_key(
            source
        )

    base = key()
    assert key() == base
    assert key(on_bad_row="skip") != base
    renamed = tmp_path / "SmolLM2-1-Instruct"  # LitGPT adds BOS for this name whatever the config says
    shutil.copytree(tokenizer, renamed)
    assert key(tokenizer_dir=renamed) != base
    (tokenizer / "chat_template.jinja").write_text("{{ messages }}")
    assert key() != base
    (tokenizer / "chat_template.jinja").unlink()
    stat = rows.stat()
    rows.write_text(json.dumps({"instruction": "say ho", "output": "hi"}) + "\n")  # same size
    os.utime(rows, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert rows.stat().st_size == stat.st_size and key() != base


def chat_rows(path: Path, count: int) -> Path:
    from deft_lightning.bench_data import write_chat_rows

    return write_chat_rows(path, count, median_tokens=40, max_tokens=200)


def test_preparation_on_two_processes_writes_what_one_process_writes(tmp_path):
    """Rows stream through forked workers in batches and come back in order: the same token ids, labels, texts and
    accounting as one process, truncation and dropped rows included."""
    rows = chat_rows(tmp_path / "chat.jsonl", 1200)
    prepared = {}
    for processes in (1, 2):
        data = module(tmp_path, FileSource(rows), prompt_style="chat_template", max_seq_length=96, num_proc=processes,
                      cache_dir=tmp_path / f"cache{processes}")  # fmt: skip
        data.setup("fit")
        prepared[processes] = (data.datasets["train"].to_dict(), {**vars(data.reports["train"]), "seconds": 0})
    assert prepared[1] == prepared[2]
    report = prepared[2][1]
    assert report["examples"] + report["dropped_truncated"] == 1200 and report["truncated"] > 0
    assert report["dropped_truncated"] > 0  # a prompt longer than 96 tokens leaves no target


def test_a_bad_row_deep_in_a_large_file_is_named_while_workers_run(tmp_path):
    rows = chat_rows(tmp_path / "rows.jsonl", 1500)
    lines = rows.read_text().splitlines()
    lines[899] = '{"messages": [{"role": "user", "content": "hi"}]}'  # no assistant turn
    rows.write_text("\n".join(lines) + "\n")
    data = module(tmp_path, FileSource(rows), prompt_style="chat_template", num_proc=2)
    with pytest.raises(BadRowError, match=r"rows.jsonl:900: 'messages' has no assistant turn"):
        data.setup("fit")
    assert not [path for path in (tmp_path / "cache").iterdir() if ".partial" in path.name]  # nothing half-written
    skipping = module(tmp_path, FileSource(rows), prompt_style="chat_template", num_proc=2, on_bad_row="skip")
    skipping.setup("fit")
    report = skipping.reports["train"]
    assert (report.examples + report.dropped_truncated, report.bad_rows_skipped) == (1499, 1)


def test_a_row_a_worker_cannot_encode_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"instruction": "say hi", "output": "hi"})
    chat = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    path.write_text("\n".join([good] * 700 + [chat] + [good] * 100) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:701: conversation rows need data.prompt_style: chat_template"):
        module(tmp_path, FileSource(path), num_proc=2).setup("fit")


def test_a_mixture_streams_its_sources_and_keeps_its_proportions(tmp_path):
    chat = FileSource(chat_rows(tmp_path / "chat.jsonl", 300))
    math = ReasoningGymMathSource(count=100)  # knows its size: no counting pass
    mixture = MixtureSource([chat, math], [3, 1], total=200, seed=2)
    report = RowReport()
    rows = list(mixture.rows(report))
    assert rows == list(mixture.rows(RowReport())) and report.read == 200
    assert sum("\\boxed" in row["output"] for row in rows) == 50
    assert len({(row["instruction"] if "instruction" in row else row["output"]) for row in rows}) == 200  # no repeats
    assert sum("\\boxed" in row["output"] for row in rows[:100]) not in (0, 100)  # interleaved, not concatenated
