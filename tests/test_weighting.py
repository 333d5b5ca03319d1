"""Row and prompt/response loss weights: read from the data, carried per token into the batch (packed too), and kept
in the global token mean — the step's gradient is that of Σ weight · loss / Σ weight over every micro-batch."""

import json

import lightning as L
import pytest
import torch
from test_data import module
from test_model import TINY, GradientCapture, OneBatch, trainer, uneven_batch

from deft_lightning.data import FileSource
from deft_lightning.data.module import collate
from deft_lightning.data.sources import BadRowError, RowReport
from deft_lightning.data.weighting import token_weights
from deft_lightning.model import DeftModule, shift_labels
from deft_lightning.objectives import DEFT, NLL


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("value", ["2", -1, float("nan"), True])
def test_a_bad_row_weight_names_file_line_and_field(tmp_path, value):
    path = write_rows(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b", "weight": value}])
    with pytest.raises(BadRowError, match=r"rows.jsonl:1: field 'weight' \(the row's loss weight\) must be a finite"):
        list(FileSource(path).rows(RowReport()))


def test_token_weights_of_prompt_and_response():
    example = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9], "weight": 2.0}
    plain = token_weights(example, 0.0, 1.0)
    assert plain["labels"].tolist() == example["labels"] and plain["token_weights"].tolist() == [0, 0, 0, 2, 2]
    both = token_weights(example, 0.25, 1.5)
    assert both["labels"].tolist() == [-100, 6, 7, 8, 9]  # the prompt trains too, never the first token
    assert both["token_weights"].tolist() == [0, 0.5, 0.5, 3, 3]


@pytest.mark.parametrize("packing", [False, True])
def test_batches_carry_the_weights_of_their_rows(tmp_path, packing):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}", "weight": float(i % 3)} for i in range(12)]
    data = module(tmp_path, FileSource(write_rows(tmp_path / "rows.jsonl", rows)), packing=packing, batch_size=12)
    data.setup("fit")
    assert data.weighted()
    batch = next(iter(data.train_dataloader()))
    weights, labels = batch["token_weights"], batch["labels"]
    assert weights.shape == labels.shape and (weights[labels == -100] == 0).all()
    assert sorted(set(weights[labels != -100].tolist())) == [0.0, 1.0, 2.0]
    unweighted = module(tmp_path, FileSource(write_rows(tmp_path / "plain.jsonl", [{**r, "weight": 1} for r in rows])))
    unweighted.setup("fit")
    assert not unweighted.weighted() and "token_weights" not in next(iter(unweighted.train_dataloader()))


def test_weight_options_are_checked(tmp_path):
    source = FileSource(write_rows(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}]))
    with pytest.raises(ValueError, match="data.prompt_weight must be a finite number >= 0"):
        module(tmp_path, source, prompt_weight=-0.5)
    with pytest.raises(ValueError, match="both 0: no token would train"):
        module(tmp_path, source, response_weight=0)


def weighted_batch() -> dict[str, torch.Tensor]:
    batch = uneven_batch()
    generator = torch.Generator().manual_seed(3)
    labels = batch["labels"].clone()
    labels[1, 1:3] = batch["input_ids"][1, 1:3]  # two prompt tokens trained at a low weight
    weights = torch.rand(labels.shape, generator=generator) * 2
    weights[labels == -100] = 0
    weights[1, 1:3] = 0.1
    return {**batch, "labels": labels, "token_weights": weights}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("objective", [NLL(), DEFT()], ids=repr)
def test_step_gradient_is_the_weighted_global_token_mean(objective, fused):
    batch = weighted_batch()
    grads = []
    for micro in (None, 1, 2):
        L.seed_everything(0)
        module = DeftModule(
            objective=objective, model_config=TINY, micro_batch_size=micro, gradient_clip=0, fused=fused
        )
        capture = GradientCapture()
        trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(batch))
        grads.append(capture.grads[0])
    L.seed_everything(0)
    model = DeftModule(objective=objective, model_config=TINY)
    model.configure_model()
    logits = model.model(batch["input_ids"])
    targets = shift_labels(batch["labels"])
    weights = torch.nn.functional.pad(batch["token_weights"][:, 1:], (0, 1))
    kept = targets != -100
    loss = (objective(logits[kept], targets[kept]) * weights[kept]).sum() / weights[kept].sum()
    loss.backward()
    for got in grads:
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(got[name], parameter.grad, rtol=1e-4, atol=1e-7)


def test_unit_weights_change_nothing_and_zero_weights_are_refused():
    batch = uneven_batch()
    grads = []
    for weighted in (False, True):
        L.seed_everything(0)
        module = DeftModule(objective=DEFT(), model_config=TINY, micro_batch_size=2, gradient_clip=0)
        capture = GradientCapture()
        ones = {**batch, "token_weights": (batch["labels"] != -100).float()} if weighted else batch
        trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(ones))
        grads.append(capture.grads[0])
    for name, grad in grads[0].items():
        assert torch.equal(grads[1][name], grad), name
    zero = {**batch, "token_weights": torch.zeros(batch["labels"].shape)}
    with pytest.raises(RuntimeError, match="every trainable token has loss weight 0"):
        trainer().fit(DeftModule(model_config=TINY), datamodule=OneBatch(zero))


def test_collate_pads_weights_with_zero():
    batch = collate(
        [
            {
                "input_ids": torch.tensor([1, 2, 3]),
                "labels": torch.tensor([-100, 2, 3]),
                "token_weights": torch.ones(3),
            },
            {"input_ids": torch.tensor([1]), "labels": torch.tensor([-100]), "token_weights": torch.zeros(1)},
        ]
    )
    assert batch["token_weights"].tolist() == [[1, 1, 1], [0, 0, 0]]
