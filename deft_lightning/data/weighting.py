"""Per-token loss weights: a row's ``weight`` times ``response_weight`` on its trained tokens and ``prompt_weight``
on the others (``prompt_weight > 0`` makes them targets too; an example's first token never is). The model divides
the step's Σ weight · token loss by the step's Σ weight over every rank, so the loss stays a global (weighted) token
mean, and with every weight 1 it is the plain one.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def token_weights(example: dict[str, Any], prompt_weight: float, response_weight: float) -> dict[str, torch.Tensor]:
    """``input_ids``, ``labels`` (prompt tokens unmasked where ``prompt_weight > 0``) and ``token_weights``."""
    input_ids, labels = torch.as_tensor(example["input_ids"]), torch.as_tensor(example["labels"])
    response = labels != IGNORE_INDEX
    weights = torch.where(response, response_weight, prompt_weight) * float(example.get("weight", 1.0))
    if prompt_weight > 0:
        labels = torch.where(response, labels, input_ids)
        labels[0] = IGNORE_INDEX
    weights = torch.where(labels == IGNORE_INDEX, 0.0, weights).float()
    return {"input_ids": input_ids, "labels": labels, "token_weights": weights}


class WeightedExamples(torch.utils.data.Dataset):
    """A tokenized split (``input_ids``, ``labels``, ``weight`` per example) with :func:`token_weights`."""

    def __init__(self, examples: Any, prompt_weight: float, response_weight: float) -> None:
        self.examples, self.prompt_weight, self.response_weight = examples, prompt_weight, response_weight

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | list[int]) -> dict[str, Any]:
        """An example, or for a list of indices the columns of those examples (as an Arrow split is indexed)."""
        if not isinstance(index, list):
            return self.__getitems__([index])[0]
        examples = self.__getitems__(index)
        return {name: [example[name] for example in examples] for name in examples[0]} if examples else {}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        rows = self.examples[list(indices)]
        examples = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
        return [token_weights(example, self.prompt_weight, self.response_weight) for example in examples]
