"""Every strategy with 2 processes on CPU (gloo), the way users run them: FSDP2 and FSDP1 train with the fused
loss like one process with the same global batch (length-grouped), clip by the global norm, resume exactly and
survive kill -9 during a sharded save; DDP synchronizes gradients once per step."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_fit_command

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "fsdp2": ['--trainer.strategy={"class_path": "deft_lightning.strategies.FSDP2Strategy"}'],
    "fsdp1": ['--trainer.strategy={"class_path": "deft_lightning.strategies.BlockFSDPStrategy"}'],
    "ddp": ["--trainer.strategy=ddp"],
}
pytestmark = pytest.mark.slow


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def command(run_dir: Path, steps: int, per_rank_batch: int, *extra: str) -> list[str]:
    return tiny_fit_command(
        run_dir,
        f"--trainer.max_steps={steps}",
        "--checkpoint.every_n_train_steps=4",
        f"--data.init_args.batch_size={per_rank_batch}",
        "--data.init_args.length_grouping=true",
        "--model.micro_batch_size=4",  # 2 micro-batches per rank and step
        "--trainer.callbacks+=probes.GradNormPerRank",
        *extra,
    )


def fit(run_dir: Path, steps: int, per_rank_batch: int, *extra: str) -> None:
    args = command(run_dir, steps, per_rank_batch, *extra)
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment())
    assert result.returncode == 0, result.stderr[-4000:]


def two_ranks(strategy: str) -> list[str]:
    return ["--trainer.devices=2", *STRATEGIES[strategy]]


def trajectory(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


def rank_norms(run_dir: Path, rank: int) -> dict[int, float]:
    lines = (run_dir / f"grad_norm.rank{rank}").read_text().split("\n")
    return {int(step): float(norm) for step, norm in (line.split() for line in lines if line)}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, global batch 16 (= 2 ranks × 8), 8 steps then a resume to 12."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    fit(run_dir, 8, 16)
    fit(run_dir, 12, 16, "--ckpt_path=last")
    return run_dir


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp1"])
def test_two_ranks_match_one_process_and_resume(tmp_path, single, strategy):
    """Fused loss under FSDP, length grouping across ranks, 2 micro-batches per step, a sharded checkpoint and a
    resume: the same trajectory as one process; the clipping norm is global (equal on both ranks and to the
    one-process norm)."""
    run_dir = tmp_path / strategy
    fit(run_dir, 8, 8, *two_ranks(strategy))
    assert (run_dir / "checkpoints/last.ckpt").is_dir()  # a sharded checkpoint (published as a symlink)
    fit(run_dir, 12, 8, *two_ranks(strategy), "--ckpt_path=last")
    for name in ("train/loss", "train/nll", "train/p", "train/alpha", "train/grad_norm"):
        one, two = trajectory(single, name), trajectory(run_dir, name)
        assert len(one) == len(two) == 12
        assert two == pytest.approx(one, rel=2e-4, abs=1e-6), name
    norms = [rank_norms(run_dir, rank) for rank in range(2)]
    assert sorted(norms[0]) == list(range(12)) and norms[0] == norms[1]
    assert list(norms[0].values()) == pytest.approx(list(rank_norms(single, 0).values()), rel=2e-4)
    # the sharded checkpoint exports (one process reads the shards) to the weights one process trained
    from deft_lightning.export import export
    from deft_lightning.loading import read_state_dict, resolve_model

    exported = export(run_dir / "checkpoints/last.ckpt", tmp_path / "export", "litgpt")
    sharded = read_state_dict(resolve_model("m", exported))
    for name, want in read_state_dict(resolve_model("m", single / "checkpoints/last.ckpt")).items():
        assert (sharded[name] - want).norm() <= 1e-3 * want.norm(), name


def test_fsdp2_fused_equals_plain_tied_and_untied(tmp_path):
    """Same loss and weights after 3 FSDP2 steps, fused vs plain, NLL / DEFT / EAFT, tied and untied head, one
    rank with an empty micro-batch; activation checkpointing changes nothing."""
    script = str(ROOT / "tests/fsdp_equivalence.py")
    subprocess.run([sys.executable, script, "--checkpoint", str(tmp_path / "start")], check=True, timeout=120)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29617"]
    result = subprocess.run(
        [*launch, script, str(tmp_path / "start"), str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = torch.load(tmp_path / "results.pt")
    start = torch.load(tmp_path / "start/lit_model.pth")
    for objective in ("NLL", "DEFT", "EAFT"):
        for head in ("untied", "tied"):
            fused, plain = runs[f"{objective}-{head}-fused"], runs[f"{objective}-{head}-plain"]
            assert fused["losses"] == pytest.approx(plain["losses"], rel=1e-5)
            for name, want in plain["weights"].items():
                got = fused["weights"][name]
                assert (got - want).norm() <= 1e-5 * want.norm(), (objective, head, name)
                assert not torch.equal(want, start[name]), (objective, head, name)  # it trained
    checkpointed, stored = runs["DEFT-untied-fused-checkpointed"], runs["DEFT-untied-fused"]
    for name, want in stored["weights"].items():
        torch.testing.assert_close(checkpointed["weights"][name], want, rtol=1e-6, atol=0)


def test_a_packed_step_equals_the_unpacked_step_on_one_and_two_ranks(tmp_path):
    """The same 16 examples packed and padded, NLL and DEFT, fused, 2 micro-batches per rank: one step's loss and
    every gradient agree packed vs padded in one process and under DDP and FSDP2 with 2 processes, and 2 processes
    agree with one."""
    start = tmp_path / "start"
    subprocess.run([sys.executable, str(ROOT / "tests/fsdp_equivalence.py"), "--checkpoint", str(start)], check=True)
    script = [str(ROOT / "tests/packing_equivalence.py"), str(start), str(tmp_path)]
    single = subprocess.run([sys.executable, *script], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29619"]
    double = subprocess.run([*launch, *script], capture_output=True, text=True, timeout=900)
    assert double.returncode == 0, double.stderr[-4000:]
    runs = {**torch.load(tmp_path / "results-1.pt"), **torch.load(tmp_path / "results-2.pt")}

    def assert_same(got: dict, want: dict) -> None:
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        for name, gradient in want["gradients"].items():
            assert (got["gradients"][name] - gradient).norm() <= 1e-5 * gradient.norm(), name

    for objective in ("NLL", "DEFT"):
        reference = runs[f"single-{objective}-padded"]
        for setup in ("single", "ddp", "fsdp2"):
            assert_same(runs[f"{setup}-{objective}-packed"], runs[f"{setup}-{objective}-padded"])
            assert_same(runs[f"{setup}-{objective}-packed"], reference)


def test_anchored_objectives_under_fsdp2_match_one_process(tmp_path):
    """ASFT (a sharded frozen copy; LoRA: the base with adapters off) and PSFT (a sharded snapshot refreshed at step 2):
    3 FSDP2 steps on 2 ranks give one process's losses and weights; the anchor acted (ASFT ≠ DFT)."""
    start = tmp_path / "start"
    subprocess.run([sys.executable, str(ROOT / "tests/fsdp_equivalence.py"), "--checkpoint", str(start)], check=True)
    script = [str(ROOT / "tests/anchored_equivalence.py"), str(start), str(tmp_path)]
    single = subprocess.run([sys.executable, *script], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-4000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29621"]
    double = subprocess.run([*launch, *script], capture_output=True, text=True, timeout=900)
    assert double.returncode == 0, double.stderr[-4000:]
    one, two = torch.load(tmp_path / "anchored-1.pt"), torch.load(tmp_path / "anchored-2.pt")
    for name in ("ASFT", "ASFT-LoRA", "PSFT"):
        assert len(two[name]["losses"]) == 3
        assert two[name]["losses"] == pytest.approx(one[name]["losses"], rel=1e-5), name
        for key, want in one[name]["weights"].items():
            assert (two[name]["weights"][key] - want).norm() <= 1e-5 * want.norm(), (name, key)
    for anchored, plain in (("ASFT", "DFT"), ("ASFT-LoRA", "DFT-LoRA")):
        assert one[anchored]["losses"][1:] != pytest.approx(one[plain]["losses"][1:], rel=1e-4)


def collectives(run_dir: Path) -> list[int]:
    return [int(line) for line in (run_dir / "collectives.rank0").read_text().split()]


def test_gradient_collectives_per_step(tmp_path):
    """DDP: one gradient all-reduce per bucket and step, however many micro-batches (no_sync on the others).
    FSDP2: one reduce-scatter per unit (2 blocks + the root) and micro-batch — deferring it would hold unsharded
    gradients."""
    probe = "--trainer.callbacks+=probes.GradientCollectives"
    counts = {}
    for name, micro in (("ddp-1", 8), ("ddp-4", 2), ("fsdp2-2", 4)):
        run_dir = tmp_path / name
        strategy = "fsdp2" if name.startswith("fsdp2") else "ddp"
        fit(run_dir, 3, 8, *two_ranks(strategy), probe, f"--model.micro_batch_size={micro}")
        counts[name] = collectives(run_dir)
    assert counts["ddp-1"] == counts["ddp-4"] == [1, 1, 1]
    assert counts["fsdp2-2"] == [3 * 2] * 3


def test_kill_during_a_sharded_save_leaves_a_resumable_checkpoint(tmp_path, single):
    """kill -9 of both ranks while the second sharded last.ckpt (step 8) is being written, after step=8.ckpt was
    published: the first last.ckpt (step 4) stays whole, `last` resumes from the newer step=8.ckpt, the resumed runs
    follow the one-process trajectory, and no unpublished directory is left behind."""
    run_dir = tmp_path / "run"
    stalling = ["--trainer.devices=2", '--trainer.strategy={"class_path": "fault_injection.StallingShardedSave"}']
    process = subprocess.Popen(
        command(run_dir, 8, 8, *stalling),
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: both ranks are killed together
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints/stalled").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert any(path.name.startswith(".last.ckpt.") for path in (run_dir / "checkpoints").iterdir())  # unpublished
    fit(run_dir, 8, 8, *two_ranks("fsdp2"), "--ckpt_path=last")  # step=8.ckpt was whole: nothing left to train
    assert trajectory(run_dir, "train/loss") == pytest.approx(trajectory(single, "train/loss")[:8], rel=2e-4)
    fit(run_dir, 10, 8, *two_ranks("fsdp2"), "--ckpt_path=last")
    assert trajectory(run_dir, "train/loss") == pytest.approx(trajectory(single, "train/loss")[:10], rel=2e-4)
    folder = run_dir / "checkpoints"
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".link")]
    assert sorted(p.resolve() for p in leftovers) == sorted(p.resolve() for p in folder.glob("*.ckpt"))


def test_fsdp_config_parses_with_a_regime_config():
    from deft_lightning.strategies import BlockFSDPStrategy

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deft_lightning",
            "fit",
            "--config",
            "configs/strong.yaml",
            "--config",
            "configs/fsdp.yaml",
            "--print_config",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deft_lightning.strategies.BlockFSDPStrategy" in result.stdout and "bf16-mixed" in result.stdout
    assert BlockFSDPStrategy().sharding_strategy.name == "FULL_SHARD"


def test_fsdp2_lora_fit_resumes_and_exports(tmp_path):
    from conftest import write_tiny_checkpoint

    from deft_lightning.export import export

    base = write_tiny_checkpoint(tmp_path / "base")
    lora = ["--model.model_config=null", f"--model.checkpoint_dir={base}", "--model.lora.r=4", "--model.lora.alpha=8"]
    run_dir = tmp_path / "run"
    fit(run_dir, 4, 8, *two_ranks("fsdp2"), *lora, "--model.lora.targets=[query, value, head]")
    fit(run_dir, 6, 8, *two_ranks("fsdp2"), *lora, "--model.lora.targets=[query, value, head]", "--ckpt_path=last")
    assert len(trajectory(run_dir, "train/loss")) == 6
    assert (export(run_dir / "checkpoints/last.ckpt", tmp_path / "hf", "hf") / "model.safetensors").is_file()
