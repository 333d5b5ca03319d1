"""Packing (data.packing): best-fit decreasing bins, packed rows with restarting positions, attention confined to each
example, and a packed step that equals the unpacked step on the same examples for every objective, fused and plain."""

import itertools
import random

import pytest
import torch

from deft_lightning.data.module import collate
from deft_lightning.data.packing import PackedRows, best_fit_decreasing
from deft_lightning.model import DeftModule
from deft_lightning.objectives import DEFT, DFT, EAFT, NLL, Cayley, CayleyReference, Prob, QLog
from deft_lightning.packed import document_mask, packed_positions

TINY = {"name": "t", "block_size": 64, "vocab_size": 320, "padded_vocab_size": 320, "n_layer": 2, "n_head": 2,
        "n_embd": 32, "bias": False}  # fmt: skip


def examples(count: int, seed: int = 0, longest: int = 40) -> list[dict[str, list[int]]]:
    """Random token ids with a masked prompt of 2-10 tokens: lengths 6 to ``longest``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(6, longest)
        ids = [rng.randrange(1, 320) for _ in range(length)]
        prompt = rng.randint(2, min(10, length - 2))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


class Rows(list):
    """Stands in for the Arrow split PackedRows reads: indexing with a list gives columns."""

    def __getitem__(self, index):
        if isinstance(index, list):
            return {name: [list.__getitem__(self, i)[name] for i in index] for name in ("input_ids", "labels")}
        return list.__getitem__(self, index)


def packed_batch(rows: list[dict], capacity: int = 64) -> dict[str, torch.Tensor]:
    bins = best_fit_decreasing([len(row["input_ids"]) for row in rows], capacity)
    packed = PackedRows(Rows(rows), bins)
    return collate(packed.__getitems__(list(range(len(bins)))))


@pytest.mark.parametrize(("count", "capacity", "seed"), [(1, 8, 0), (50, 64, 1), (300, 128, 2), (1000, 4096, 3)])
def test_best_fit_decreasing_places_every_example_once_within_capacity(count, capacity, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, capacity) for _ in range(count)]
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for bin_ in bins for i in bin_) == list(range(count))
    assert all(sum(lengths[i] for i in bin_) <= capacity for bin_ in bins)
    assert bins == best_fit_decreasing(lengths, capacity)  # deterministic
    lower_bound = -(-sum(lengths) // capacity)
    assert len(bins) <= 11 / 9 * lower_bound + 1  # BFD's worst-case bound


def test_best_fit_takes_the_fullest_bin_that_fits():
    # 7 opens a bin (room 3), 6 another (room 4), 5 a third (room 5); 3 goes where room is 3, not 4 or 5
    assert best_fit_decreasing([7, 6, 5, 3], 10) == [[0, 3], [1], [2]]
    with pytest.raises(ValueError, match=r"lengths must be in \[1, 10\]"):
        best_fit_decreasing([11], 10)


def test_packed_rows_restart_positions_and_mask_each_first_label():
    rows = examples(12, seed=4)
    batch = packed_batch(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    seen = []
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True):
        starts = [*(positions == 0).nonzero().squeeze(1).tolist(), len(positions)]
        for start, end in itertools.pairwise(starts):
            assert positions[start:end].tolist() == list(range(end - start))
            assert labels[start] == -100  # a packed row never predicts one example's first token from the last
            seen.append((ids[start:end].tolist(), labels[start + 1 : end].tolist()))
    for row in rows:  # every example whole, its other labels unchanged (the padding is an example without labels)
        assert (row["input_ids"], row["labels"][1:]) in seen
    trainable = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    assert (batch["labels"][:, 1:] != -100).sum() == trainable  # the global token count is the unpacked one


def test_document_mask_is_causal_within_each_example():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = document_mask(positions)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def tiny_module(objective=None, fused: bool = True, seed: int = 0) -> DeftModule:
    torch.manual_seed(seed)
    module = DeftModule(objective=objective, model_config=TINY, fused=fused)
    module.configure_model()
    with torch.no_grad():  # embeddings of std 0.02: targets get p ≈ 1/V, not e⁻²⁹ (gates of every objective alive)
        module.model.transformer.wte.weight.normal_(0, 0.02)
    return module


def test_no_attention_crosses_an_example():
    """Changing one example of a packed row moves its own logits only; every example's logits equal those of the
    example forwarded alone."""
    module = tiny_module()
    rows = examples(3, seed=5, longest=20)
    ids = torch.tensor([[token for row in rows for token in row["input_ids"]]])
    positions = torch.cat([torch.arange(len(row["input_ids"])) for row in rows])[None]
    bounds = [0, *torch.tensor([len(row["input_ids"]) for row in rows]).cumsum(0).tolist()]
    with torch.no_grad():
        logits = module(ids, positions)
        for row, (start, end) in zip(rows, itertools.pairwise(bounds), strict=True):
            alone = module(torch.tensor([row["input_ids"]]))
            torch.testing.assert_close(logits[0, start:end], alone[0], rtol=1e-5, atol=1e-6)
        changed = ids.clone()
        changed[0, bounds[1] : bounds[2]] = (changed[0, bounds[1] : bounds[2]] + 7) % 320
        moved = module(changed, positions)
    assert torch.equal(moved[0, : bounds[1]], logits[0, : bounds[1]])
    assert not torch.allclose(moved[0, bounds[1] : bounds[2]], logits[0, bounds[1] : bounds[2]])
    torch.testing.assert_close(moved[0, bounds[2] :], logits[0, bounds[2] :], rtol=0, atol=1e-6)


def step(module: DeftModule, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """One micro-batch's loss (the global token mean) and gradients, through the path a fit takes."""
    module.zero_grad()
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    needs = module.objective.needs
    if module.uses_fused_path():
        loss, *_ = module._fused_step(batch, needs, 1 / tokens)
    else:
        token_loss, _, _ = module._token_losses(batch, needs)
        loss = token_loss.sum() / tokens
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


OBJECTIVES = [NLL(), Prob(), QLog(0.5), DFT(), EAFT(), Cayley(), DEFT(), CayleyReference()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda objective: type(objective).__name__)
def test_a_packed_step_equals_the_unpacked_step(objective, fused):
    module = tiny_module(objective, fused)
    rows = examples(16, seed=6)
    want_loss, want = step(module, collate(rows))
    got_loss, got = step(module, packed_batch(rows))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert set(got) == set(want)
    for name, gradient in want.items():
        assert (got[name] - gradient).norm() <= 1e-5 * gradient.norm(), name


def test_a_packed_step_under_bf16_autocast_stays_close_to_the_unpacked_one():
    """What a GPU run does (bf16-mixed), on the CPU's autocast: the boolean document mask works with bf16 attention
    and the losses agree to bf16's precision."""
    module = tiny_module(DEFT())
    rows = examples(8, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = step(module, collate(rows))
        got_loss, got = step(module, packed_batch(rows))
    assert got_loss == pytest.approx(want_loss, rel=2e-2)
    for name, gradient in want.items():
        assert (got[name] - gradient).norm() <= 5e-2 * gradient.norm(), name


def test_packed_positions_leaves_the_model_as_it_was():
    module = tiny_module()
    with packed_positions(module.model, torch.zeros(1, 4, dtype=torch.long)):
        assert "forward" in vars(module.model)
    assert "forward" not in vars(module.model)


def test_models_whose_attention_takes_no_document_mask_are_refused_by_name():
    module = DeftModule(model_config={**TINY, "sliding_window_size": 16})

    class Packed:
        packing, max_seq_length, vocab_size = True, 64, 320

    class Trainer:
        precision, strategy = "32-true", None

    with pytest.raises(ValueError, match="data.packing: t uses sliding-window attention"):
        module.check_run(Trainer(), Packed())
