"""export to LitGPT and Hugging Face directories, and evaluation through the hf backend: logits and greedy
outputs equal the module's, tied heads handled, bad input refused with nothing written."""

import json
import re
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
    with pytest.raises(CheckpointError, match="missing.ckpt' does not exist"):
        export(tmp_path / "missing.ckpt", tmp_path / "a", "hf")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(CheckpointError, match="neither a LitGPT checkpoint directory nor a fit's .ckpt"):
        export(tmp_path / "notes.txt", tmp_path / "a", "hf")
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


BASE_FIELDS = {"block_size": 64, "vocab_size": 320, "padded_vocab_size": 320, "n_layer": 2, "n_head": 4, "n_embd": 64}
LLAMA_FIELDS = {"mlp_class_name": "LLaMAMLP", "norm_class_name": "RMSNorm", "bias": False, "intermediate_size": 96}
EXACT = {"rotary_percentage": 1.0, "parallel_residual": False}
#: layout → (LitGPT fields over LitGPT's defaults, the text of the refusal or None for an exact export)
LAYOUTS = {
    "llama, LitGPT's default rotary and residual": ({**LLAMA_FIELDS, "n_query_groups": 2}, "rotary_percentage: 0.25"),
    "llama, parallel residual": ({**LLAMA_FIELDS, "rotary_percentage": 1.0}, "parallel_residual: True"),
    "llama, GQA": ({**LLAMA_FIELDS, **EXACT, "n_query_groups": 2}, None),
    "llama, MQA, tied": ({**LLAMA_FIELDS, **EXACT, "n_query_groups": 1, "tied": True}, None),
    "llama, biases everywhere": ({**LLAMA_FIELDS, **EXACT, "bias": True}, None),
    "llama, GELU gate": ({**LLAMA_FIELDS, **EXACT, "mlp_class_name": "GemmaMLP", "gelu_approximate": "tanh"}, None),
    "qwen2 under another name": ({**LLAMA_FIELDS, **EXACT, "n_query_groups": 2, "attn_bias": True}, None),
    "neox, parallel residual": ({"bias": True}, None),
    "neox, sequential residual, tied": ({"bias": True, "parallel_residual": False, "tied": True}, None),
    "neox, shared attention norm": ({"shared_attention_norm": True}, "shared_attention_norm: True"),
    "neox with GQA": ({"n_query_groups": 2}, "n_query_groups: 2"),
    "gemma-like": (
        {
            **LLAMA_FIELDS,
            **EXACT,
            "mlp_class_name": "GemmaMLP",
            "scale_embeddings": True,
            "final_logit_softcapping": 30.0,
            "post_attention_norm": True,
        },
        "post_attention_norm: True; final_logit_softcapping: 30.0; scale_embeddings: True",
    ),
    "named Gemma": ({**LLAMA_FIELDS, **EXACT, "name": "Gemma-tiny"}, "RMSNorm with a unit offset"),
}


def random_checkpoint(directory: Path, fields: dict, seed: int = 0) -> Path:
    """A LitGPT checkpoint directory of a random model with large weights (std 0.3: wrong mappings show)."""
    import shutil

    from litgpt import GPT, Config
    from litgpt.utils import save_config

    fields = dict(fields)
    tied = fields.pop("tied", False)
    config = Config(**{"name": "random", **BASE_FIELDS, **fields})
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
        if tied:
            model.lm_head.weight.copy_(model.transformer.wte.weight)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "lit_model.pth")
    save_config(config, directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "data/tiny/tokenizer" / name, directory / name)
    return directory


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_exports_exactly_or_is_refused_by_name(tmp_path, layout):
    fields, refusal = LAYOUTS[layout]
    checkpoint = random_checkpoint(tmp_path / "lit", fields)
    out = tmp_path / "hf"
    if refusal is not None:
        with pytest.raises(CheckpointError, match="cannot express") as error:
            export(checkpoint, out, "hf")
        assert refusal in str(error.value) and not out.exists()
        return
    export(checkpoint, out, "hf")
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(3))
    expected = module_logits(checkpoint, ids)
    assert (hf_logits(out, ids) - expected).abs().max() <= 1e-4 * expected.abs().max()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] and config["architectures"][0].endswith("ForCausalLM")  # vLLM needs it
    assert config["tie_word_embeddings"] is bool(fields.get("tied"))
    assert config["pad_token_id"] == 0  # the tiny tokenizer's <|pad|>, not its EOS


def test_an_export_that_would_be_silently_wrong_is_refused(tmp_path, monkeypatch):
    """The self-check: a config.json that says another RoPE base than the weights were trained with (as a
    mistaken mapping would) is caught by comparing logits, named, and nothing is published."""
    import deft_lightning.export as export_module

    checkpoint = random_checkpoint(tmp_path / "lit", {**LLAMA_FIELDS, **EXACT})
    mapped = export_module.hf_config
    wrong = {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}
    monkeypatch.setattr(export_module, "hf_config", lambda config: {**mapped(config), **wrong})
    with pytest.raises(CheckpointError, match=r"logits .* differ .* rope_theta 500.0 vs rope_base 10000"):
        export(checkpoint, tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_base_config_json_that_does_not_describe_the_weights_is_refused(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "lit", {**LLAMA_FIELDS, **EXACT})
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 30}))
    with pytest.raises(CheckpointError, match="num_hidden_layers 30 vs n_layer 2"):
        export(checkpoint, tmp_path / "hf", "hf")


def test_lora_fit_exports_a_peft_adapter_with_the_fits_logits(tmp_path):
    """Adapters on every target (fused q/k/v split per projection) load with PEFT onto the base exported to hf."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deft_lightning.loading import read_lora_model

    base = random_checkpoint(tmp_path / "base", {**LLAMA_FIELDS, **EXACT, "n_query_groups": 2, "block_size": 256})
    state = torch.load(base / "lit_model.pth", weights_only=True)  # small weights: the fit trains stably
    torch.save({name: value * 0.1 for name, value in state.items()}, base / "lit_model.pth")
    targets = "[query, key, value, projection, mlp, head]"
    lora = ["--model.model_config=null", f"--model.checkpoint_dir={base}", "--model.lora.r=4"]
    adapters = ["--model.lora.alpha=8", f"--model.lora.targets={targets}", "--model.learning_rate=0.1"]
    checkpoint = fit(tmp_path / "run", *lora, *adapters)
    adapter = export(checkpoint, tmp_path / "adapter", "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    base_hf = export(base, tmp_path / "base-hf", "hf")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32), adapter)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(4))
    lora_model = read_lora_model(resolve_model("m", checkpoint)).eval()
    lora_model.cos, lora_model.sin = lora_model.rope_cache()
    with torch.no_grad():
        expected = lora_model(ids)
        effect = (expected - module_logits(base, ids)).abs().max()
        assert effect > 1e-2  # the adapters changed the logits
        assert (model.eval()(ids).logits - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max())
    full = fit(tmp_path / "full", "--model.model_config=null", f"--model.checkpoint_dir={base}")
    with pytest.raises(CheckpointError, match="trained the whole model"):
        export(full, tmp_path / "x", "peft")


def test_export_and_evaluate_work_from_another_directory(neox, tmp_path):
    """The fit ran in the repository with relative paths (data/tiny/tokenizer): from elsewhere, export resolves
    them as the fit did."""
    command = [sys.executable, "-m", "deft_lightning", "export", str(neox), "--out", "lit", "--format", "litgpt"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "lit/tokenizer.json").read_bytes() == (ROOT / "data/tiny/tokenizer/tokenizer.json").read_bytes()
    assert resolve_model("m", neox).tokenizer_dir.resolve() == (ROOT / "data/tiny/tokenizer").resolve()
    assert resolve_model("m", neox.parent.parent).path == neox  # a run directory: its newest checkpoint


def test_the_export_command_says_its_self_check_passed_and_writes_readable_files(neox, tmp_path):
    """As users run it: a line saying the written model gave the trained logits, and every file mode 0644
    (directories 0755) whatever wrote them, for the other users of a shared machine or a container."""
    command = [sys.executable, "-m", "deft_lightning", "export", str(neox), "--out", str(tmp_path / "hf")]
    result = subprocess.run([*command, "--format", "hf"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"self-check passed: transformers' logits equal the trained model's \(max \|Δ\| ", result.stdout)
    written = [tmp_path / "hf", *(tmp_path / "hf").rglob("*")]
    modes = {path.name: (path.stat().st_mode & 0o777, 0o755 if path.is_dir() else 0o644) for path in written}
    assert len(modes) > 3 and all(mode == wanted for mode, wanted in modes.values()), modes
