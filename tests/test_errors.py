"""Expected failures through the real CLI, the way users meet them: one line ``error: …`` on stderr naming what is
wrong and what to do, exit status 2, no traceback (``--debug`` shows it); one message in a 2-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_fit_command

pytestmark = pytest.mark.slow  # one process start each


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def rows(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"instruction": "say hi", "output": "hi"}


def write_sharded_checkpoint(path: Path) -> None:
    """A small FSDP2-layout sharded checkpoint: a torch.distributed.checkpoint directory plus Lightning's meta.pt."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    save({"state_dict": {"model.w": torch.zeros(2)}}, storage_writer=FileSystemWriter(path), no_dist=True)
    torch.save({"global_step": 4, "loops": {}}, path / "meta.pt")


def fit_case(name: str, tmp: Path) -> tuple[list[str], str]:
    """(extra fit arguments, expected message) for failure kind ``name``; files are made under ``tmp``."""
    data = "--data.init_args.train.init_args.path="
    if name == "invalid JSON":
        return [data + str(write(tmp / "bad.jsonl", rows(GOOD, '{"instruction": ')))], r"bad.jsonl:2: invalid JSON"
    if name == "invalid JSON mid-line":  # the column an editor shows: characters, not bytes (é is two)
        path = write(tmp / "bad.jsonl", rows(GOOD, '{"instruction": "café", "output": }'))
        return [data + str(path)], r"bad.jsonl:2: invalid JSON \(Expecting value at column 35\)"
    if name == "missing field":
        path = write(tmp / "bad.jsonl", rows(GOOD, {"instruction": "a"}))
        return [data + str(path)], r"bad.jsonl:2: missing field 'output'; the record's fields are \['instruction'\]"
    if name == "mistyped field":
        path = write(tmp / "bad.jsonl", rows({"instruction": "a", "output": 3}))
        return [data + str(path)], r"bad.jsonl:1: field 'output' must be a string, got int"
    if name == "empty file":
        return [data + str(write(tmp / "empty.jsonl", ""))], r"train source empty.jsonl has no rows"
    if name == "non-UTF-8 file":
        return [
            data + str(write(tmp / "latin.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n'))
        ], "not valid UTF-8"
    if name == "missing file":
        return [data + str(tmp / "nope.jsonl")], r"data file not found: .*nope.jsonl"
    if name == "unknown objective":
        return ["--model.objective=NoSuchLoss"], r"NoSuchLoss is not an objective; use one of ASFT, .*DEFT.*PSFT, QLog"
    if name == "unimportable objective":
        return ["--model.objective=my_losses.Focal"], r"no module named 'my_losses' .* PYTHONPATH"
    if name == "option typo":
        return ["--trainer.max_stepz=3"], r"unknown option --trainer.max_stepz; did you mean --trainer.max_steps\?"
    if name == "abbreviated option":
        return ["--trainer.max_step=3"], r"unknown option --trainer.max_step; did you mean --trainer.max_steps\?"
    if name == "LoRA option typo":
        return ["--model.lora.rr=3"], r"--model.lora: unknown option --rr; did you mean --r\?"
    if name == "missing config file":
        return ["--config", str(tmp / "nope.yaml")], r"--config: File does not exist: .*nope.yaml"
    if name == "bad objective argument":
        return ["--model.objective=QLog", "--model.objective.alpha=-1"], r"QLog alpha must be >= 0"
    if name == "fp16":
        return ["--trainer.precision=16-true"], r"precision=16-true \(fp16\) is not supported.*32-true \(T4, V100"
    if name == "FSDP1 with LoRA":
        strategy = '--trainer.strategy={"class_path": "deft_lightning.strategies.BlockFSDPStrategy"}'
        return [strategy, "--model.lora.r=4"], r"model.lora under BlockFSDPStrategy \(FSDP1\).*use .*FSDP2Strategy"
    if name == "anchored objective under FSDP1":
        strategy = '--trainer.strategy={"class_path": "deft_lightning.strategies.BlockFSDPStrategy"}'
        return [strategy, "--model.objective=ASFT"], r"ASFT\(kl_weight=0.1\) reads a reference model.*FSDP2Strategy"
    if name == "PSFT with LoRA":
        return [
            "--model.objective=PSFT",
            "--model.lora.r=4",
        ], r"PSFT\(.*\) with model.lora: .*fine-tune the whole model"
    if name == "sharded checkpoint without a sharded strategy":
        write_sharded_checkpoint(tmp / "run/checkpoints/last.ckpt")
        return ["--ckpt_path=last"], r"last.ckpt' is a sharded checkpoint written by FSDP2; resume it with .*FSDP2S"
    if name == "sequence longer than the context":
        return ["--data.init_args.max_seq_length=1024"], r"max_seq_length=1024 exceeds the model's block_size=256"
    if name == "default model not prepared":
        return [f"--data.init_args.tokenizer_dir={tmp / 'absent'}"], r"absent' does not exist; .* prepare-model"
    if name == "missing checkpoint directory":
        return [f"--model.checkpoint_dir={tmp / 'absent'}"], r"absent' does not exist"
    if name == "resume with nothing to resume":
        return ["--ckpt_path=last"], r"--ckpt_path last: no .*last.ckpt to resume from"
    if name == "fresh start into a used run directory":
        write(tmp / "run/checkpoints/step=2.ckpt", b"x")
        return [], r"already holds checkpoints of an earlier run; resume it with --ckpt_path last"
    if name == "truncated last.ckpt":
        write(tmp / "run/checkpoints/last.ckpt", b"PK\x03\x04 cut short")
        return ["--ckpt_path=last"], r"last.ckpt' is truncated or corrupt"
    if name == "offline hub":
        hub = '{"class_path": "deft_lightning.data.HubSource", "init_args": {"dataset": "gaotang/figlet_font"}}'
        return [f"--data.init_args.train={hub}"], r"cannot load 'gaotang/figlet_font' .* Offline\?"
    raise AssertionError(name)


FIT_FAILURES = [
    "invalid JSON",
    "invalid JSON mid-line",
    "missing field",
    "mistyped field",
    "empty file",
    "non-UTF-8 file",
    "missing file",
    "unknown objective",
    "unimportable objective",
    "option typo",
    "abbreviated option",
    "LoRA option typo",
    "missing config file",
    "bad objective argument",
    "fp16",
    "FSDP1 with LoRA",
    "anchored objective under FSDP1",
    "PSFT with LoRA",
    "sharded checkpoint without a sharded strategy",
    "sequence longer than the context",
    "default model not prepared",
    "missing checkpoint directory",
    "resume with nothing to resume",
    "fresh start into a used run directory",
    "truncated last.ckpt",
    "offline hub",
]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    import re

    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]


@pytest.mark.parametrize("kind", FIT_FAILURES)
def test_fit_failures_are_one_clear_line(tmp_path, kind):
    """The `error:` line is all that is printed (no seed, device or progress lines before it), and a run directory
    the failed launch created is gone (one that held an earlier run's files is left as it was)."""
    extra, message = fit_case(kind, tmp_path)
    existed = (tmp_path / "run").exists()
    result = run(tiny_fit_command(tmp_path / "run", "--trainer.max_steps=2", *extra))
    assert_clean_failure(result, message)
    printed = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(printed) == 1 and printed[0].startswith("error:"), printed
    assert (tmp_path / "run").exists() == existed


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["evaluate", "--models", "{m: nowhere.ckpt}", "--benchmarks", "[]"], r"no benchmarks given"),
        (
            ["evaluate", "--config", "configs/eval/smollm2.yaml", "--models", "{m: x.ckpt}", "--backend", "vllm"],
            r"needs vLLM",
        ),
        (["export", "nowhere.ckpt", "--out", "x", "--format", "hf"], r"nowhere.ckpt' does not exist"),
        (["analyze", "landscape", "--model", "nowhere", "--data", "nowhere.jsonl", "--out", "OUT"], r"nowhere"),
        (["sweep", "--config", "nowhere.yaml"], r"nowhere.yaml"),
        (["prepare-model", "--out", "OUT/SmolLM2-x"], None),
    ],
)
def test_other_subcommands_fail_the_same_way(tmp_path, command, message):
    command = [part.replace("OUT", str(tmp_path)) for part in command]
    if command[0] == "prepare-model":  # refuses to overwrite a file that is not a checkpoint directory
        write(tmp_path / "SmolLM2-x", "not a directory")
        message = r"SmolLM2-x' is a file, not a directory"
    result = run([sys.executable, "-m", "deft_lightning", *command])
    assert_clean_failure(result, message)


def test_debug_shows_the_traceback(tmp_path):
    extra, _ = fit_case("missing file", tmp_path)
    result = run([*tiny_fit_command(tmp_path / "run", *extra), "--debug"])
    assert result.returncode != 0 and "Traceback" in result.stderr and "FileNotFoundError" in result.stderr


def test_two_process_fit_reports_one_message(tmp_path):
    extra, message = fit_case("missing field", tmp_path)
    command = tiny_fit_command(tmp_path / "run", "--trainer.devices=2", "--trainer.strategy=ddp", *extra)
    result = run(command)
    assert_clean_failure(result, message)
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
