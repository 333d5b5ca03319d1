"""Rendering SFT examples to token ids — one code path for training and evaluation.

``prompt_style: chat_template`` uses the backbone's own chat template through transformers (the reference for
what an instruct model saw in training); any other value names a LitGPT prompt style (``litgpt.prompts``).

BOS is decided explicitly: with a chat template the rendered text is tokenized without special tokens, exactly as
``apply_chat_template(..., tokenize=True)`` does, so the template alone decides whether a BOS-like token
starts the prompt. With a LitGPT prompt style, LitGPT's own rule applies (``add_bos_token`` in
``tokenizer_config.json``), as in ``litgpt finetune``. Responses are tokenized without special tokens and end
with the tokenizer's EOS, which is trained.

Conversations (rows with ``messages``) are rendered whole by the chat template and tokenized once; the trained
tokens are each assistant turn's content and its end-of-turn token. The spans are found without
``{% generation %}`` markers (most templates lack them): the conversation up to a turn, rendered with the
generation prompt, and up to the end of that turn must each be a prefix of the whole rendering, and the span lies
between them. A template that rewrites earlier turns once later ones follow (some drop past reasoning) fails that
check and is an error naming the template and the turn, never a silently wrong mask.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Any, Literal

from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

CHAT_TEMPLATE = "chat_template"
#: which assistant turns of a conversation are trained
TrainOn = Literal["all_assistant", "last_assistant"]


class TemplateError(ValueError):
    """A chat template cannot render a conversation so that its assistant turns can be located."""


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

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """A conversation with ``system_prompt`` as its first turn when it has no system turn of its own (as single-turn
        rows get it), instead of whatever default the chat template would insert."""
        if self.system_prompt and not any(message["role"] == "system" for message in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_ids(self, example: dict[str, Any]) -> list[int]:
        """The prompt a model answers: a row's rendered prompt, or a conversation up to its last assistant turn."""
        if example.get("messages"):
            messages = self.with_system(example["messages"])
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return self._encode_plain(self._render(messages[:last], generation_prompt=True))
        text = self.prompt_text(example)
        if self._style is None:
            return self._encode_plain(text)
        return self.tokenizer.encode(text).tolist()

    def conversation_ids(self, messages: list[dict[str, str]], train_on: TrainOn = "all_assistant"):
        """Token ids of the whole conversation (equal to ``apply_chat_template(messages, tokenize=True)``) and,
        for each, whether it is trained: the content and end-of-turn token of every assistant turn, or of the
        last one only (``train_on: last_assistant``)."""
        ids, spans = self.conversation_spans(messages, train_on)
        trained = [False] * len(ids)
        for tokens in spans:
            trained[tokens.start : tokens.stop] = [True] * len(tokens)
        return ids, trained

    def conversation_spans(
        self, messages: list[dict[str, str]], train_on: TrainOn = "all_assistant"
    ) -> tuple[list[int], list[range]]:
        """Token ids of the whole conversation and the token ranges that are trained (see :meth:`conversation_ids`)."""
        if self._style is not None:
            raise ValueError(f"conversation rows need data.prompt_style: {CHAT_TEMPLATE} (got '{self.prompt_style}')")
        messages = self.with_system(messages)
        text = self._render(messages)
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        spans = []
        for turn in turns[-1:] if train_on == "last_assistant" else turns:
            before = self._render(messages[:turn], generation_prompt=True)
            through = text if turn == len(messages) - 1 else self._render(messages[: turn + 1])
            if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
                raise TemplateError(
                    f"the chat template of '{self.tokenizer_dir}' renders assistant turn {turn} differently once "
                    "later turns follow (it rewrites earlier turns, e.g. drops their reasoning), so its trained "
                    "tokens cannot be located; train on single turns or use data.train_on: last_assistant"
                )
            spans.append((len(before), len(through.rstrip())))  # content + end-of-turn, not the newline after
        encoding = self._encode_with_offsets(text)
        return encoding.ids, [_tokens_within(encoding, start, end) for start, end in spans]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
        try:
            return self._hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:
            raise TemplateError(
                f"the chat template of '{self.tokenizer_dir}' cannot render turns 0–{len(messages) - 1} "
                f"({type(err).__name__}: {err})"
            ) from None

    def _encode_with_offsets(self, text: str) -> Any:
        if self.tokenizer.backend != "huggingface":
            raise ValueError(f"conversations need a tokenizer.json tokenizer; '{self.tokenizer_dir}' has none")
        return self.tokenizer.processor.encode(text, add_special_tokens=False)

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

    def text(self, ids: list[int]) -> str:
        """The text of token ids with their special tokens (``decode`` drops them): what the model was fed."""
        if self.tokenizer.backend == "huggingface":
            return self.tokenizer.processor.decode(ids, skip_special_tokens=False)
        return self.decode(ids)


def _tokens_within(encoding: Any, start: int, end: int) -> range:
    """The tokens whose characters lie within ``[start, end)`` of the encoded text: token offsets increase along
    the text, so they are one run, found by bisection (a test per token cost as much as the tokenizer itself)."""
    chars, count = encoding.token_to_chars, len(encoding.ids)
    first = bisect_left(range(count), start, key=lambda token: chars(token)[0])
    stop = bisect_right(range(count), end, key=lambda token: chars(token)[1])
    return range(first, max(first, stop))
