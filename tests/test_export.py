"""export to LitGPT and Hugging Face directories, and evaluation through the hf backend: logits and greedy
outputs equal the module's, tied heads handled, bad input refused with nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_fit_command

from deft_lightning.export import export
from deft_lightning.loading import load_weights, read_state_dict, resolve_model
from deft_lightning.model import DeftModule
from deft_lightning.prepare_model import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
LLAMA = (
    "--model.model_config={name: t, block_size: 256, vocab_size: 320, padded_vocab_size: 320, n_layer: 2, "
    "n_head: 4, n_query_groups: 2, n_embd: 64, mlp_class_name: LLaMAMLP, intermediate_size: 96, "
    "norm_class_name: RMSNorm, bias: false, rotary_percentage: 1.0, parallel_residual: false}"
)


def fit(run_dir: Path, *extra: str) -> Path:
    command = tiny_fit_command(run_dir, "--trainer.max_steps=2", *extra)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> Path:
    """The tiny.yaml model (GPT-NeoX layout) after 2 DEFT steps."""
    return fit(tmp_path_factory.mktemp("neox") / "run")


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory) -> Path:
    """A LLaMA-layout tiny model trained with tied embeddings (its head equals its embeddings)."""
    return fit(tmp_path_factory.mktemp("llama") / "run", LLAMA, "--model.tie_embeddings=true")


def hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def module_logits(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_weights(resolve_model("m", checkpoint), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return model(ids)


def test_hf_export_of_a_fit_gives_the_modules_logits(neox, tmp_path):
    from transformers import AutoTokenizer

    out = export(neox, tmp_path / "hf", "hf")
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(out, ids) - module_logits(neox, ids)).abs().max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["tie_word_embeddings"] is False
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.encode("abc") == AutoTokenizer.from_pretrained(ROOT / "data/tiny/tokenizer").encode("abc")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names


def test_a_tied_model_whose_heads_are_equal_stays_tied(llama_tied, tmp_path):
    from safetensors import safe_open

    out = export(llama_tied, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    with safe_open(out / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in set(weights.keys())
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(1))
    assert (hf_logits(out, ids) - module_logits(llama_tied, ids)).abs().max() <= 1e-4


def test_litgpt_export_round_trips_into_a_new_fit(neox, tmp_path):
    out = export(neox, tmp_path / "lit", "litgpt")
    names = {p.name for p in out.iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json", "tokenizer_config.json"} <= names
    module = DeftModule(checkpoint_dir=out)  # what a new fit from it starts with
    module.configure_model()
    trained = read_state_dict(resolve_model("m", neox))
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_bad_input_is_refused_and_nothing_is_written(neox, tmp_path):
    with pytest.raises(CheckpointError, match="neither a LitGPT checkpoint directory nor a fit's .ckpt"):
        export(tmp_path / "missing.ckpt", tmp_path / "a", "hf")
    corrupt = tmp_path / "run/checkpoints/broken.ckpt"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(neox.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read .* as a fit checkpoint"):
        export(corrupt, tmp_path / "b", "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --force"):
        export(neox, tmp_path / "taken", "hf")
    assert (tmp_path / "taken/keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    command = [sys.executable, "-m", "deft_lightning", "export", str(neox), "--out", str(tmp_path / "taken")]
    result = subprocess.run([*command, "--format", "hf"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "pass --force" in result.stderr and "Traceback" not in result.stderr
    export(neox, tmp_path / "taken", "hf", force=True)
    assert not (tmp_path / "taken/keep.txt").exists() and (tmp_path / "taken/config.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_hf_backend_greedy_outputs_equal_litgpt_backends(neox, tmp_path):
    from deft_lightning.data import FileSource
    from deft_lightning.evaluation import Continuation
    from deft_lightning.evaluation.run import evaluate

    benchmark = [Continuation("tiny", FileSource(ROOT / "data/tiny/val.jsonl"), limit=12, max_new_tokens=8)]
    runs = {
        backend: evaluate({"m": neox}, benchmark, tmp_path / backend, backend=backend, prompt_style="alpaca")
        for backend in ("litgpt", "hf")
    }
    samples = {}
    for backend in runs:
        lines = (tmp_path / backend / "generations/m/tiny.jsonl").read_text().splitlines()
        samples[backend] = [[s["output"] for s in json.loads(line)["samples"]] for line in lines]
    assert samples["hf"] == samples["litgpt"] and any(any(s) for s in samples["hf"])
    assert runs["hf"]["cells"][0]["metrics"] == runs["litgpt"]["cells"][0]["metrics"]


def test_vllm_backend_without_vllm_says_how_to_install(neox, tmp_path):
    from deft_lightning.evaluation import FigFont
    from deft_lightning.evaluation.run import evaluate

    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]"'):
        evaluate({"m": neox}, [FigFont(limit=1)], tmp_path / "v", backend="vllm")
    assert not (tmp_path / "v").exists()


def test_a_fit_exports_its_final_model(tmp_path):
    run_dir = tmp_path / "run"
    fit(run_dir, "--export.format=hf")
    final = run_dir / "final"
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(2))
    assert (hf_logits(final, ids) - module_logits(run_dir / "checkpoints/last.ckpt", ids)).abs().max() <= 1e-4
    state = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert state["global_step"] == 2  # exported from the final state
