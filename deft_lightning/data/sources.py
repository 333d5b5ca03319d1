"""Where SFT rows come from: local files, the Hugging Face hub, offline generators, and mixtures of these.

Every source yields rows ``{"instruction", "output", "input"?, "system"?}`` (the names the prompter reads) and
has a ``fingerprint`` that changes whenever its rows could, so tokenized datasets can be cached by it.
A ``fields`` mapping renames the source's own columns to these names, e.g. ``{instruction: problem,
output: solution}``. Rows are validated as they are read: errors name the file, line (or row) and field, and
``on_bad_row: skip`` counts and skips bad rows instead.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_FIELDS = ("input", "system")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
#: the reference's FigFont system prompt, word for word (luludus/DEFT data/data_process_figfont.py)
FIGFONT_SYSTEM_PROMPT = (
    "You are an expert at decoding Figlet Font ASCII art. When given Figlet Font text, identify the word it "
    "represents and output only that without any explanations or additional text."
)


class BadRowError(ValueError):
    """A source row is malformed; the message names where and which field."""


@dataclass
class RowReport:
    """What reading a source found; filled while rows are read."""

    read: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per skipped bad row


#: the roles of a conversation turn, as chat templates name them
ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT speakers (``from``) → roles; a source's ``roles`` mapping adds or overrides entries
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


def conversation_column(raw: Mapping[str, Any], fields: Mapping[str, str]) -> str | None:
    """The column holding a conversation: ``fields['messages']`` if mapped, else ``messages`` or ShareGPT's
    ``conversations`` when the record has one; None for a single-turn record."""
    if "messages" in fields:
        return fields["messages"]
    return next((column for column in ("messages", "conversations") if column in raw), None)


def validate_conversation(
    turns: Any, column: str, where: str, roles: Mapping[str, str], system: Any = None
) -> dict[str, Any]:
    """A conversation row ``{"messages": [{"role", "content"}, ...], "output": last assistant content}`` from
    OpenAI-style (``role``/``content``) or ShareGPT-style (``from``/``value``) turns, or :class:`BadRowError`
    naming ``where`` and the turn."""
    if not isinstance(turns, list) or not turns:
        raise BadRowError(f"{where}: field '{column}' must be a non-empty list of turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadRowError(f"{where}: turn {index} of '{column}' must be an object, got {type(turn).__name__}")
        if "role" in turn:
            speaker, content = turn["role"], turn.get("content")
            role = speaker
        elif "from" in turn:
            speaker, content = turn["from"], turn.get("value")
            role = {**SHAREGPT_ROLES, **roles}.get(speaker)
        else:
            raise BadRowError(f"{where}: turn {index} of '{column}' has neither role/content nor from/value")
        if role not in ROLES:
            raise BadRowError(
                f"{where}: turn {index} of '{column}' has unknown role {speaker!r} (roles: {', '.join(ROLES)}; "
                "map other speakers with the source's roles:, e.g. roles: {bot: assistant})"
            )
        if not isinstance(content, str) or not content.strip():
            got = "empty" if isinstance(content, str) else type(content).__name__
            raise BadRowError(f"{where}: turn {index} of '{column}' ({role}) needs non-empty text content, got {got}")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRowError(f"{where}: '{column}' has no assistant turn, so nothing to train on")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    last = next(message["content"] for message in reversed(messages) if message["role"] == "assistant")
    return {"messages": messages, "output": last}


def row_weight(raw: Mapping[str, Any], fields: Mapping[str, str], where: str) -> float | None:
    """The record's optional loss weight (``weight``, or the field ``fields`` maps it to): a finite number >= 0."""
    column = fields.get("weight", "weight")
    value = raw.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BadRowError(
            f"{where}: field '{column}' (the row's loss weight) must be a finite number >= 0, got {value!r}"
        )
    return float(value)


def validate_row(
    raw: Any, fields: Mapping[str, str], where: str, roles: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Map a raw record to an SFT row (single-turn, or a conversation), or raise :class:`BadRowError` naming
    ``where`` and the field (and turn)."""
    if not isinstance(raw, Mapping):
        raise BadRowError(f"{where}: expected an object, got {type(raw).__name__}")
    weight = row_weight(raw, fields, where)
    column = conversation_column(raw, fields)
    if column is not None:
        if column not in raw:
            raise BadRowError(f"{where}: missing field '{column}'; the record's fields are {sorted(raw)}")
        row = validate_conversation(raw[column], column, where, roles or {}, raw.get(fields.get("system", "system")))
        return row if weight is None else {**row, "weight": weight}
    row = {} if weight is None else {"weight": weight}
    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        column = fields.get(name, name)
        if column not in raw or raw[column] is None:
            if name in REQUIRED_FIELDS:
                raise BadRowError(
                    f"{where}: missing field '{column}'; the record's fields are {sorted(raw)} "
                    f"(map yours with fields:, e.g. fields: {{{name}: <field>}})"
                )
            continue
        if not isinstance(raw[column], str):
            raise BadRowError(f"{where}: field '{column}' must be a string, got {type(raw[column]).__name__}")
        row[name] = raw[column]
    if not row["output"].strip():
        raise BadRowError(f"{where}: field '{fields.get('output', 'output')}' is empty")
    return row


class Source:
    """Base class: ``rows()`` yields validated rows; ``fingerprint()`` identifies their content."""

    name: str = "source"
    fields: Mapping[str, str] = {}
    roles: Mapping[str, str] = {}

    def rows(self, report: RowReport, on_bad_row: Literal["error", "skip"] = "error") -> Iterator[dict[str, str]]:
        """Validated rows, streamed (nothing is held but the row at hand)."""
        return (row for _, row in self.located_rows(report, on_bad_row))

    def located_rows(
        self, report: RowReport, on_bad_row: Literal["error", "skip"] = "error"
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """``(where, row)``: each validated row with where it was read (``file:line``), for later errors."""
        for where, raw in self.records():
            try:
                if isinstance(raw, BadRowError):
                    raise raw
                row = validate_row(raw, self.fields, where, self.roles)
            except BadRowError as err:
                if on_bad_row == "error":
                    raise
                report.skipped.append(str(err))
                continue
            report.read += 1
            yield where, row

    def records(self) -> Iterator[tuple[str, Any]]:
        """``(where, raw record)`` pairs; a record may be a :class:`BadRowError` for unreadable lines."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def expected_rows(self) -> int | None:
        """How many rows ``rows()`` will read, when known up front (a progress bar's total)."""
        return self.exact_rows() or getattr(self, "limit", None)

    def exact_rows(self) -> int | None:
        """How many rows ``rows()`` yields, when the source knows without reading them (generated sources)."""
        return None


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class FileSource(Source):
    """Local JSONL, JSON (a list of objects) or Parquet file(s).

    Args:
        path: a file, or a directory whose ``*.jsonl``/``*.json``/``*.parquet`` files are read in name order.
        fields: our field name → the file's column name (``instruction``, ``output``, ``input``, ``system``).
        system: system prompt for rows that have none.
        limit: read at most this many rows.
        coerce: read non-text values of the mapped fields as the Qwen2.5-Math evaluation harness does: a number
            as its text (AMC23's ``27.0`` → ``27``), a list as its first element (OlympiadBench's
            ``final_answer``). Off by default: a non-string field is then a bad row.
        roles: ShareGPT speakers → roles, added to :data:`SHAREGPT_ROLES` (e.g. ``{bot: assistant}``).

    Records are single-turn (``instruction``/``output``) or conversations: a ``messages`` (OpenAI: ``role``,
    ``content``) or ``conversations`` (ShareGPT: ``from``, ``value``) list, or the column ``fields: {messages: …}``
    names.
    """

    def __init__(
        self,
        path: Path,
        fields: dict[str, str] | None = None,
        system: str | None = None,
        limit: int | None = None,
        coerce: bool = False,
        roles: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.roles = dict(roles or {})
        self.fields = dict(fields or {})
        self.system = system
        self.limit = limit
        self.coerce = coerce
        self.name = self.path.name

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
            if not files:
                raise FileNotFoundError(f"no .jsonl/.json/.parquet files in {self.path}")
            return files
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path}")
        return [self.path]

    def records(self) -> Iterator[tuple[str, Any]]:
        count = 0
        for path in self._files():
            for where, raw in _read_file(path):
                if self.limit is not None and count >= self.limit:
                    return
                if self.system and isinstance(raw, dict) and not raw.get(self.fields.get("system", "system")):
                    raw = {**raw, self.fields.get("system", "system"): self.system}
                if self.coerce and isinstance(raw, dict):
                    columns = [self.fields.get(name, name) for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS)]
                    raw = {**raw, **{c: _as_text(raw[c]) for c in columns if raw.get(c) is not None}}
                count += 1
                yield where, raw

    def fingerprint(self) -> str:
        contents = [(path.name, _file_digest(path)) for path in self._files()]  # content, not size and mtime
        return _digest("file", contents, self.fields, self.system, self.limit, self.coerce, self.roles)


def _as_text(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, list) and value:
        return _as_text(value[0])
    return value


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):  # streamed, not the whole table
            for raw in batch.to_pylist():
                yield f"{path}: row {index}", raw
                index += 1
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            yield f"{path}", BadRowError(f"{path}: not a valid UTF-8 JSON file ({err})")
            return
        if not isinstance(data, list):
            yield f"{path}", BadRowError(f"{path}: expected a JSON list of objects")
            return
        for index, raw in enumerate(data):
            yield f"{path}: item {index}", raw
        return
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, BadRowError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, BadRowError(f"{where}: invalid JSON ({err.msg} at column {err.colno})")


class HubSource(Source):
    """A Hugging Face dataset (needs the network, or a populated ``HF_HOME`` cache).

    Args:
        dataset: the dataset id, e.g. ``gaotang/numina-cot-subset-67k``.
        split: the split to read.
        config_name: the dataset configuration, if it has several.
        fields: our field name → the dataset's column name.
        system: system prompt for rows that have none.
        limit: read at most this many rows.
        revision: a branch, tag or commit of the dataset repository (default: its main branch, resolved to the
            current commit when the hub is reachable, so an updated dataset is tokenized anew).
        roles: ShareGPT speakers → roles, as for :class:`FileSource`.

    Conversational datasets work as they are: ``allenai/tulu-3-sft-mixture`` rows (``id``, ``messages``,
    ``source``) need no ``fields``.
    """

    def __init__(
        self,
        dataset: str,
        split: str = "train",
        config_name: str | None = None,
        fields: dict[str, str] | None = None,
        system: str | None = None,
        limit: int | None = None,
        revision: str | None = None,
        roles: dict[str, str] | None = None,
    ) -> None:
        self.roles = dict(roles or {})
        self.dataset, self.split, self.config_name = dataset, split, config_name
        self.fields = dict(fields or {})
        self.system = system
        self.limit = limit
        self.revision = revision
        self.name = dataset

    def _load(self):
        import datasets

        try:
            data = datasets.load_dataset(self.dataset, self.config_name, split=self.split, revision=self.revision)
        except Exception as err:
            raise ConnectionError(
                f"cannot load '{self.dataset}' from the Hugging Face hub ({type(err).__name__}: {err}). Offline? "
                "Download it on a connected machine and read the files with deft_lightning.data.FileSource."
            ) from None
        conversation = conversation_column(dict.fromkeys(data.column_names), self.fields)
        needed = [conversation] if conversation else [self.fields.get(n, n) for n in REQUIRED_FIELDS]
        missing = [column for column in needed if column not in data.column_names]
        if missing:
            raise BadRowError(
                f"'{self.dataset}' has no column(s) {missing}; its columns are {data.column_names} — "
                "map them with `fields:` (e.g. fields: {instruction: problem, output: solution})"
            )
        return data if self.limit is None else data.select(range(min(self.limit, len(data))))

    def records(self) -> Iterator[tuple[str, Any]]:
        for index, raw in enumerate(self._load()):
            if self.system and not raw.get(self.fields.get("system", "system")):
                raw = {**raw, self.fields.get("system", "system"): self.system}
            yield f"{self.dataset}[{self.split}] row {index}", raw

    def fingerprint(self) -> str:
        settings = (self.dataset, self.split, self.config_name, self.fields, self.system, self.limit, self.roles)
        return _digest("hub", *settings, self._commit())

    def _commit(self) -> str:
        """The commit ``revision`` names now, or ``revision`` itself when the hub cannot be asked (offline)."""
        try:
            from huggingface_hub import HfApi

            return HfApi().dataset_info(self.dataset, revision=self.revision, timeout=10).sha or str(self.revision)
        except Exception:
            return str(self.revision)


@contextmanager
def sorted_figlet_fonts() -> Iterator[list[str]]:
    """reasoning-gym's FigFont fonts, sorted by name, for as long as the block runs.

    reasoning-gym draws each item's font from pyfiglet's font files listed in directory order, which differs
    between filesystems: the same install gave item 0 ``coil_cop`` on one machine and ``triad_st`` on another.
    Sorting keeps every draw of its random stream (word, font index, prompt template) and makes the font the
    index selects the same everywhere.
    """
    from reasoning_gym.cognition import figlet_fonts

    listed = figlet_fonts.OK_FONTS
    figlet_fonts.OK_FONTS = sorted(listed)
    try:
        yield figlet_fonts.OK_FONTS
    finally:
        figlet_fonts.OK_FONTS = listed


class FigFontSource(Source):
    """The weak regime: FigFont puzzles from reasoning-gym, generated as the reference does, on any filesystem.

    Items are ``create_dataset('figlet_font', seed=seed, min_word_len=2, max_word_len=5, space_letters=True)``
    indexed from ``start`` (each index draws from its own ``Random(seed + index)``): 0–39,999 is the training
    split, 40,000–44,999 the test split. Words and prompt templates are the reference's; fonts come from the
    sorted font list (:func:`sorted_figlet_fonts`), where the reference's came from its machine's directory order,
    which it did not record — so an item's font is the one at the same index of a differently ordered list.
    """

    def __init__(self, start: int = 0, count: int = 40_000, seed: int = 42, system: str = FIGFONT_SYSTEM_PROMPT):
        self.start, self.count, self.seed, self.system = start, count, seed, system
        self.name = f"figfont[{start}:{start + count}]"

    def records(self) -> Iterator[tuple[str, Any]]:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(
            "figlet_font", size=10, seed=self.seed, min_word_len=2, max_word_len=5, space_letters=True
        )
        with sorted_figlet_fonts():
            for index in range(self.start, self.start + self.count):
                item = dataset[index]
                yield (
                    f"figlet_font item {index}",
                    {"instruction": item["question"], "output": item["answer"], "system": self.system},
                )

    def exact_rows(self) -> int:
        return self.count

    def fingerprint(self) -> str:
        import pyfiglet
        import reasoning_gym

        with sorted_figlet_fonts() as fonts:
            versions = (reasoning_gym.__version__, pyfiglet.__version__, fonts)
        return _digest("figfont", self.start, self.count, self.seed, self.system, *versions)


class ReasoningGymMathSource(Source):
    """An offline stand-in for the strong (math) regime: reasoning-gym problems with ``\\boxed{}`` answers.

    The prompt is the problem followed by the reference's instruction to reason step by step and box the
    answer; the target is a short solution ending in ``\\boxed{answer}``.
    """

    def __init__(
        self,
        task: str = "basic_arithmetic",
        start: int = 0,
        count: int = 1000,
        seed: int = 1,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.start, self.count, self.seed = task, start, count, seed
        self.options = dict(options or {})
        self.name = f"{task}[{start}:{start + count}]"

    def records(self) -> Iterator[tuple[str, Any]]:
        import reasoning_gym

        dataset = reasoning_gym.create_dataset(self.task, size=self.start + self.count, seed=self.seed, **self.options)
        for index in range(self.start, self.start + self.count):
            item = dataset[index]
            yield (
                f"{self.task} item {index}",
                {
                    "instruction": f"{item['question']}\n{BOXED_INSTRUCTION}",
                    "output": f"The final answer is \\boxed{{{item['answer']}}}.",
                },
            )

    def exact_rows(self) -> int:
        return self.count

    def fingerprint(self) -> str:
        import reasoning_gym

        return _digest("rg", self.task, self.start, self.count, self.seed, self.options, reasoning_gym.__version__)


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """Largest-remainder allocation: counts sum to ``total`` and each is within 1 of ``total · w / Σw``."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum, got {weights}")
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSource(Source):
    """A weighted mixture: ``total`` rows, ``weights``-proportional from each source, drawn by ``seed``.

    Each source contributes a seeded random subset of its rows without replacement (an error if it has too few),
    and the chosen rows of all sources come interleaved in a seeded random order. Rows are streamed: a first pass
    counts each source's rows (skipped when the source knows its size), the second yields the chosen ones.
    """

    def __init__(self, sources: list[Source], weights: list[float], total: int, seed: int = 1) -> None:
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} mixture sources but {len(weights)} weights")
        self.sources, self.weights, self.total, self.seed = sources, weights, total, seed
        self.counts = mixture_counts(weights, total)
        self.name = "mixture(" + ", ".join(f"{s.name}×{c}" for s, c in zip(sources, self.counts, strict=True)) + ")"

    def located_rows(
        self, report: RowReport, on_bad_row: Literal["error", "skip"] = "error"
    ) -> Iterator[tuple[str, dict[str, str]]]:
        rng = random.Random(self.seed)
        read = RowReport(skipped=report.skipped)  # the sources' reads; this mixture's are the rows it yields
        streams = []
        for source, count in zip(self.sources, self.counts, strict=True):
            size = source.exact_rows()
            if size is None:
                size = sum(1 for _ in source.located_rows(RowReport(), on_bad_row))
            if count > size:
                raise ValueError(f"mixture asks {count} rows of {source.name}, which has only {size}")
            streams.append(_chosen(source.located_rows(read, on_bad_row), set(rng.sample(range(size), count))))
        order = [index for index, count in enumerate(self.counts) for _ in range(count)]
        rng.shuffle(order)
        for index in order:
            report.read += 1
            yield next(streams[index])

    def exact_rows(self) -> int:
        return self.total

    def fingerprint(self) -> str:
        return _digest("mix", [s.fingerprint() for s in self.sources], self.weights, self.total, self.seed)


def _chosen(rows: Iterator[Any], chosen: set[int]) -> Iterator[Any]:
    return (row for index, row in enumerate(rows) if index in chosen)


class SelfDistilledSource(Source):
    """A strong-prior regime built from the model itself: each prompt's target is the base model's own greedy
    continuation, with a fraction of its words replaced by words from other continuations — fluent tokens the
    model is confident are wrong there ("confident conflicts", controlled label noise).

    The continuations are generated once (batched, KV cache) and cached under ``cache_dir`` by the prompts'
    fingerprint, the checkpoint and ``max_new_tokens``; the corruption is seeded per row, so
    ``noise_fraction: 0`` gives the clean references of exactly the same prompts.

    Args:
        prompts: where the prompts come from (their ``output`` is ignored).
        checkpoint_dir: the base model (a LitGPT checkpoint directory with a chat template).
        max_new_tokens: continuation length.
        noise_fraction: share of each continuation's words replaced (0 ≤ f < 1).
        seed: the corruption's seed.
        prompt_style: how prompts are rendered for generation (default: the checkpoint's chat template); use
            the fit's ``prompt_style``.
    """

    def __init__(
        self,
        prompts: Source,
        checkpoint_dir: Path,
        max_new_tokens: int = 48,
        noise_fraction: float = 0.0,
        seed: int = 1,
        prompt_style: str | None = None,
        batch_size: int = 16,
        cache_dir: Path = Path(".cache/deft_lightning/self_distilled"),
    ) -> None:
        if not 0 <= noise_fraction < 1:
            raise ValueError(f"SelfDistilledSource: noise_fraction must be in [0, 1), got {noise_fraction}")
        self.prompts, self.checkpoint_dir, self.max_new_tokens = prompts, Path(checkpoint_dir), max_new_tokens
        self.noise_fraction, self.seed, self.prompt_style = noise_fraction, seed, prompt_style
        self.batch_size, self.cache_dir = batch_size, Path(cache_dir)
        self.name = f"self-distilled({prompts.name}, noise {noise_fraction:g})"

    def _generation_key(self) -> str:
        weights = self.checkpoint_dir / "lit_model.pth"
        stat = weights.stat() if weights.is_file() else None
        return _digest("self", self.prompts.fingerprint(), str(self.checkpoint_dir.resolve()), stat and stat.st_size,
                       stat and stat.st_mtime_ns, self.max_new_tokens, self.prompt_style)  # fmt: skip

    def continuations(self) -> list[dict[str, str]]:
        """``{"instruction", "output"}`` with the base model's greedy continuation, generated once and cached."""
        path = self.cache_dir / f"{self._generation_key()}.jsonl"
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines()]

        from deft_lightning.generation import SamplingConfig, generate
        from deft_lightning.loading import inference_dtype, load_weights, resolve_device, resolve_model
        from deft_lightning.prompting import Prompter

        rows = list(self.prompts.rows(RowReport()))
        ref = resolve_model("base", self.checkpoint_dir, prompt_style=self.prompt_style)
        prompter = Prompter(ref.tokenizer_dir, ref.prompt_style)
        device = resolve_device("auto")
        model = load_weights(ref, device, inference_dtype(device))
        sampling = SamplingConfig(self.max_new_tokens, batch_size=self.batch_size)
        prompts = [prompter.prompt_ids(row) for row in rows]
        outputs = generate(model, prompts, prompter.tokenizer.eos_id, sampling, progress="self-distilled targets")
        result = [
            {**{k: v for k, v in row.items() if k != "output"}, "output": prompter.decode(samples[0]).strip()}
            for row, samples in zip(rows, outputs, strict=True)
        ]
        result = [row for row in result if row["output"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".partial")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in result))
        temporary.replace(path)
        return result

    def records(self) -> Iterator[tuple[str, Any]]:
        rows = self.continuations()
        pool = [word for row in rows for word in row["output"].split()]
        for index, row in enumerate(rows):
            pieces = re.split(r"(\s+)", row["output"])  # words at even indices, whitespace kept between them
            words = [i for i in range(0, len(pieces), 2) if pieces[i]]
            rng = random.Random(self.seed * 1_000_003 + index)
            for position in rng.sample(words, round(self.noise_fraction * len(words))):
                replacement = rng.choice(pool)
                while replacement == pieces[position] and len(set(pool)) > 1:
                    replacement = rng.choice(pool)
                pieces[position] = replacement
            yield f"{self.name} row {index}", {**row, "output": "".join(pieces)}

    def fingerprint(self) -> str:
        return _digest("selfnoise", self._generation_key(), self.noise_fraction, self.seed)
