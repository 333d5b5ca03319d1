"""Generation and prompting on the tiny model and tokenizer; prepare-model's error paths (no 135M model needed)."""

import importlib.metadata
from pathlib import Path

import pytest
import torch
from litgpt import GPT, Config

from deft_lightning import prepare_model as pm
from deft_lightning.generation import SamplingConfig, generate
from deft_lightning.prompting import Prompter

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data/tiny/tokenizer"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(Config(name="t", block_size=64, vocab_size=320, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=32))


def naive_greedy(model, prompt, steps, eos_id):
    """Greedy decoding by full forward passes, no KV cache: the reference for the cached, batched path."""
    tokens = list(prompt)
    for _ in range(steps):
        token = int(model(torch.tensor([tokens]))[0, -1].argmax())
        if token == eos_id:
            break
        tokens.append(token)
    return tokens[len(prompt) :]


def test_ragged_batched_greedy_equals_full_forward_decoding(tiny_model):
    prompts = [[5, 6, 7], [8, 9, 10, 30, 31, 32, 33], [11, 12], [13, 14, 15, 16], [40]]
    config = SamplingConfig(max_new_tokens=6, batch_size=4)  # mixed lengths in one batch, and a second batch
    batched = generate(tiny_model, prompts, eos_id=1, sampling=config)
    assert batched == [[naive_greedy(tiny_model, p, 6, eos_id=1)] for p in prompts]
    assert all(len(c[0]) <= 6 and 1 not in c[0] for c in batched)
    assert tiny_model.training  # restored


def test_generation_stops_each_row_at_its_own_eos(tiny_model):
    prompt = [5, 6, 7]
    free = naive_greedy(tiny_model, prompt, 6, eos_id=-1)
    eos = free[2]  # make the third greedy token the EOS of this request
    out = generate(tiny_model, [prompt, [8, 9]], eos_id=eos, sampling=SamplingConfig(max_new_tokens=6))
    assert out[0] == [free[: free.index(eos)]]
    assert out[1] == [naive_greedy(tiny_model, [8, 9], 6, eos_id=eos)]


def test_sampling_is_seeded_per_request_whatever_the_batching(tiny_model):
    prompts = [[5, 6], [7, 8, 9], [10, 11, 12, 13]]
    config = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, num_samples=3, batch_size=8)
    first = generate(tiny_model, prompts, eos_id=1, sampling=config, seeds=[3, 4, 5])
    one_by_one = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, num_samples=3, batch_size=1)
    assert generate(tiny_model, prompts[::-1], eos_id=1, sampling=one_by_one, seeds=[5, 4, 3]) == first[::-1]
    assert [len(samples) for samples in first] == [3, 3, 3]
    assert len({tuple(s) for samples in first for s in samples}) > 3  # samples differ
    assert generate(tiny_model, prompts, eos_id=1, sampling=config, seeds=[6, 4, 5])[0] != first[0]


def test_generation_errors(tiny_model):
    with pytest.raises(ValueError, match="identical samples"):
        SamplingConfig(num_samples=2)
    with pytest.raises(ValueError, match="exceeds the model's block_size 64"):
        generate(tiny_model, [[5] * 60], eos_id=1, sampling=SamplingConfig(max_new_tokens=10))


def test_generation_leaves_the_model_trainable(tiny_model):
    generate(tiny_model, [[5, 6]], eos_id=1, sampling=SamplingConfig(max_new_tokens=3))
    tiny_model(torch.tensor([[5, 6, 7]])).sum().backward()  # rope cache must not be an inference tensor


def test_generation_keeps_the_rope_dtype_of_a_bf16_model():
    torch.manual_seed(0)
    model = GPT(Config(name="t", block_size=64, vocab_size=320, padded_vocab_size=320, n_layer=1, n_head=2, n_embd=32))
    model = model.to(torch.bfloat16)
    before = model.cos.clone()
    generate(model, [[5, 6]], eos_id=1, sampling=SamplingConfig(max_new_tokens=3))
    assert model.cos.dtype == model.sin.dtype == torch.bfloat16 and torch.equal(model.cos, before)


def test_litgpt_prompt_styles_keep_the_row_system_prompt():
    prompter = Prompter(TOKENIZER, "alpaca", system_prompt="Default system.\n\n")
    assert prompter.prompt_text({"instruction": "Hi", "system": "Row system.\n\n"}).startswith("Row system.")
    assert prompter.prompt_text({"instruction": "Hi"}).startswith("Default system.")


def test_litgpt_prompt_style_and_eos():
    prompter = Prompter(TOKENIZER, "alpaca")
    ids = prompter.prompt_ids({"instruction": "Reverse the letters of the word.", "input": "abc"})
    assert "### Input:\nabc" in prompter.decode(ids)
    assert prompter.response_ids("cba")[-1] == prompter.tokenizer.eos_id


def test_chat_template_style_needs_a_template(tmp_path):
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, tmp_path / name)
    with pytest.raises(ValueError, match="has no chat template"):
        Prompter(tmp_path, "chat_template")


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(pm.CheckpointError, match="make model"):
        pm.find_gguf()


def test_corrupt_gguf_is_detected(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(pm.CheckpointError, match="corrupt"):
        pm.verify_sha256(path, "not-the-hash")


def test_interrupted_conversion_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (tmp_path / ".model.partial-999").mkdir()  # left by a conversion killed with SIGKILL
    for name in (*pm.REQUIRED_FILES, "generation_config.json"):
        (out / name).write_text("previous")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(pm, "find_gguf", lambda: (gguf, ""))

    def killed(source, staging):
        (staging / "lit_model.pth").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pm, "convert", killed)
    with pytest.raises(KeyboardInterrupt):
        pm.prepare_model(out, force=True)
    assert (out / "lit_model.pth").read_text() == "previous"
    assert {p.name for p in tmp_path.iterdir()} == {"model", "x.gguf"}  # no staging directory left behind
    assert not pm.is_prepared(out)  # no completion marker: a later run rebuilds it
