"""Rendering SFT examples to token ids — one code path for training and evaluation.

``prompt_style: chat_template`` uses the backbone's own chat template through transformers (the reference for
what an instruct model saw in training); any other value names a LitGPT prompt style (``litgpt.prompts``).

BOS is decided explicitly: with a chat template the rendered text is tokenized without special tokens, exactly as
``apply_chat_template(..., tokenize=True)`` does, so the template alone decides whether a BOS-like token
starts the prompt. With a LitGPT prompt style, LitGPT's own rule applies (``add_bos_token`` in
``tokenizer_config.json``), as in ``litgpt finetune``. Responses are tokenized without special tokens and end
with the tokenizer's EOS, which is trained.
"""

from __future__ import annotations

from pathlib import Path

from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

CHAT_TEMPLATE = "chat_template"


class Prompter:
    """Turns ``{"instruction", "input", "output", "system"?}`` rows into prompt and response token ids."""

    def __init__(self, tokenizer_dir: Path, prompt_style: str = CHAT_TEMPLATE, system_prompt: str | None = None):
        self.tokenizer_dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer(self.tokenizer_dir)
        if self.tokenizer.eos_id is None:
            raise ValueError(f"the tokenizer in '{self.tokenizer_dir}' defines no EOS token")
        self.prompt_style = prompt_style
        self.system_prompt = system_prompt
        if prompt_style == CHAT_TEMPLATE:
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
            if not self._hf_tokenizer.chat_template:
                raise ValueError(
                    f"prompt_style '{CHAT_TEMPLATE}' but '{self.tokenizer_dir}' has no chat template; "
                    "name a LitGPT prompt style instead (e.g. alpaca)"
                )
            self._style = None
        else:
            self._style = PromptStyle.from_name(prompt_style)

    def messages(self, example: dict[str, str]) -> list[dict[str, str]]:
        user = example["instruction"] + (f"\n\n{example['input']}" if example.get("input") else "")
        system = example.get("system") or self.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def prompt_text(self, example: dict[str, str]) -> str:
        if self._style is None:
            return self._hf_tokenizer.apply_chat_template(
                self.messages(example), tokenize=False, add_generation_prompt=True
            )
        system = example.get("system") or self.system_prompt  # LitGPT styles take it as sys_prompt
        fields = {k: v for k, v in example.items() if k not in ("output", "system", "instruction")}
        return self._style.apply(example["instruction"], sys_prompt=system, **fields)

    def prompt_ids(self, example: dict[str, str]) -> list[int]:
        text = self.prompt_text(example)
        if self._style is None:
            return self._encode_plain(text)
        return self.tokenizer.encode(text).tolist()

    def response_ids(self, response: str) -> list[int]:
        return [*self._encode_plain(response), self.tokenizer.eos_id]

    def _encode_plain(self, text: str) -> list[int]:
        processor = self.tokenizer.processor
        if self.tokenizer.backend == "huggingface":
            return processor.encode(text, add_special_tokens=False).ids
        return processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        import torch

        return self.tokenizer.decode(torch.tensor(ids, dtype=torch.long))
