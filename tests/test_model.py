"""The LightningModule: global token-mean reduction, non-finite steps, checkpoint loading, schedule, errors."""

import copy
import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from litgpt import GPT, Config
from litgpt.utils import save_config
from torch.utils.data import DataLoader

from deft_lightning.data import FileSource, SFTDataModule
from deft_lightning.model import DeftModule, cosine_with_warmup, shift_labels
from deft_lightning.objectives import DEFT, NLL, CayleyReference, Objective
from deft_lightning.prepare_model import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "t",
    "block_size": 128,
    "vocab_size": 320,
    "padded_vocab_size": 320,
    "n_layer": 1,
    "n_head": 2,
    "n_embd": 16,
}


def tiny_data(**kwargs) -> SFTDataModule:
    args = {
        "train": FileSource(ROOT / "data/tiny/train.jsonl"),
        "tokenizer_dir": ROOT / "data/tiny/tokenizer",
        "prompt_style": "alpaca",
        "max_seq_length": 128,
        "batch_size": 6,
    }
    return SFTDataModule(**{**args, **kwargs})


def trainer(**kwargs) -> L.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **kwargs})


class GradientCapture(L.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def uneven_batch(vocab: int = 320) -> dict[str, torch.Tensor]:
    """Three sequences with 1, 9 and 4 trainable tokens."""
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 12))
    labels = torch.full_like(input_ids, -100)
    labels[0, 11] = input_ids[0, 11]
    labels[1, 3:12] = input_ids[1, 3:12]
    labels[2, 5:9] = input_ids[2, 5:9]
    return {"input_ids": input_ids, "labels": labels}


class OneBatch(L.LightningDataModule):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def train_dataloader(self):
        return DataLoader([self.batch], batch_size=None)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("objective", [NLL(), DEFT(), CayleyReference()], ids=repr)
def test_step_gradient_is_global_token_mean(objective, fused):
    """Any micro-batch split gives the gradient of Σ token losses / (all trainable tokens of the step)."""
    batch = uneven_batch()
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
    reference = GPT(Config(**TINY))
    logits = reference(batch["input_ids"])
    targets = shift_labels(batch["labels"])
    kept = targets != -100
    if isinstance(objective, CayleyReference):  # its floor is a per-micro-batch mean: only the whole batch compares
        grads = grads[:1]
    loss = objective(logits[kept], targets[kept]).sum() / kept.sum()
    loss.backward()
    expected = {f"model.{n}": p.grad for n, p in reference.named_parameters()}
    for got in grads:
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7)


def test_zero_trainable_tokens_is_an_error():
    batch = uneven_batch()
    batch["labels"][:] = -100
    module = DeftModule(model_config=TINY)
    with pytest.raises(RuntimeError, match="no trainable tokens"):
        trainer().fit(module, datamodule=OneBatch(batch))


class Poisoned(Objective):
    """NLL times NaN while ``poisoned`` is set."""

    poisoned = True

    def token_loss(self, logp, stats):
        return -logp * (float("nan") if self.poisoned else 1.0)


def test_non_finite_gradient_skips_the_step():
    """No update and no optimizer state, but the step counts (global_step = Lightning's row index)."""
    batch = uneven_batch()
    module = DeftModule(objective=Poisoned(), model_config=TINY)
    module.configure_model()
    before = copy.deepcopy(module.model.state_dict())
    fit = trainer(max_steps=1, max_epochs=1)
    fit.fit(module, datamodule=OneBatch(batch))
    assert module.skipped_steps == 1 and module.global_step == 1
    assert not fit.optimizers[0].state  # AdamW saw no gradient: no moments, no step count
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    module.objective.poisoned = False
    trainer(max_steps=1, max_epochs=1).fit(module, datamodule=OneBatch(batch))
    assert module.global_step == 1 and module.skipped_steps == 1
    assert any(not torch.equal(value, before[name]) for name, value in module.model.state_dict().items())


def test_bf16_true_warns_that_small_updates_are_lost():
    with pytest.warns(UserWarning, match="bf16-true keeps the weights in bf16"):
        trainer(precision="bf16-true").fit(DeftModule(model_config=TINY), datamodule=OneBatch(uneven_batch()))


def test_loads_litgpt_checkpoint_directory(tmp_path):
    config = Config(**TINY)
    source = GPT(config)
    torch.save(source.state_dict(), tmp_path / "lit_model.pth")
    save_config(config, tmp_path)
    module = DeftModule(checkpoint_dir=tmp_path)
    module.configure_model()
    for name, value in source.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value)


def test_checkpoint_directory_errors_name_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DeftModule(checkpoint_dir=tmp_path / "absent")
    (tmp_path / "model_config.yaml").write_text("name: x\n")
    with pytest.raises(CheckpointError, match=r"is missing lit_model.pth"):
        DeftModule(checkpoint_dir=tmp_path)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    config = Config(**TINY)
    save_config(config, tmp_path)
    torch.save(GPT(config).state_dict(), tmp_path / "lit_model.pth")
    data = (tmp_path / "lit_model.pth").read_bytes()
    (tmp_path / "lit_model.pth").write_bytes(data[: len(data) // 2])  # a copy killed half-way
    module = DeftModule(checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        module.configure_model()
    torch.save(GPT(Config(**{**TINY, "n_embd": 32})).state_dict(), tmp_path / "lit_model.pth")
    with pytest.raises(CheckpointError, match="does not fit its model_config.yaml"):
        DeftModule(checkpoint_dir=tmp_path).configure_model()


def test_model_config_errors():
    with pytest.raises(ValueError, match="set one of model.checkpoint_dir"):
        DeftModule()
    with pytest.raises(ValueError, match="model.model_name"):
        DeftModule(model_name="no-such-model")
    with pytest.raises(ValueError, match="model.model_config"):
        DeftModule(model_config={"no_such_field": 1})


def test_vocab_and_length_mismatch_fail_before_training():
    small = {**TINY, "vocab_size": 100, "padded_vocab_size": 100}
    with pytest.raises(ValueError, match="tokenizer has 320 tokens"):
        trainer().fit(DeftModule(model_config=small), datamodule=tiny_data())
    with pytest.raises(ValueError, match="exceeds the model's block_size=128"):
        trainer().fit(DeftModule(model_config=TINY), datamodule=tiny_data(max_seq_length=256))


def test_fp16_precision_is_refused():
    with pytest.raises(ValueError, match=r"precision=16-true \(fp16\) is not supported"):
        trainer(precision="16-true").fit(DeftModule(model_config=TINY), datamodule=tiny_data())


def test_cosine_with_warmup():
    values = [cosine_with_warmup(s, warmup_steps=2, total_steps=10, min_lr_ratio=0.1) for s in range(11)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(values[2:]))
    assert values[10] == pytest.approx(0.1)


class GradientSaver(L.Callback):
    """Saves rank 0's gradients (already averaged over ranks by DDP) for the parent process to read."""

    def __init__(self, path):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 0:
            torch.save({n: p.grad.clone() for n, p in pl_module.named_parameters()}, self.path)


class BatchPerRank(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader([self.batches[self.trainer.global_rank]], batch_size=None)


@pytest.mark.slow
def test_two_rank_gradient_is_global_token_mean(tmp_path):
    """Ranks with 1 and 13 trainable tokens (DDP, gloo): the gradient equals the single-process global mean."""
    batch = uneven_batch()
    rank_batches = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    L.seed_everything(0)
    module = DeftModule(objective=DEFT(), model_config=TINY, gradient_clip=0)
    trainer(strategy="ddp_spawn", devices=2, callbacks=[GradientSaver(tmp_path / "ddp.pt")]).fit(
        module, datamodule=BatchPerRank(rank_batches)
    )
    L.seed_everything(0)
    single = DeftModule(objective=DEFT(), model_config=TINY, gradient_clip=0)
    capture = GradientCapture()
    trainer(callbacks=[capture]).fit(single, datamodule=OneBatch(batch))
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, grad in capture.grads[0].items():
        torch.testing.assert_close(ddp[name], grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("objective", [NLL(), DEFT(), CayleyReference()], ids=repr)
def test_validation_metrics_are_chunked_and_exact(objective):
    """Validation runs the fused forward (no [tokens × vocab] logits), batch-dependent objectives included, and
    its token-weighted metrics equal the materialized computation."""
    batch = uneven_batch()

    class Val(L.LightningDataModule):
        def val_dataloader(self):
            return DataLoader([batch], batch_size=None)

    L.seed_everything(0)
    module = DeftModule(objective=objective, model_config=TINY)
    metrics = trainer().validate(module, Val(), verbose=False)[0]
    logits = module.model(batch["input_ids"])
    targets = shift_labels(batch["labels"])
    kept = targets != -100
    logp = torch.log_softmax(logits[kept].double(), -1).gather(1, targets[kept][:, None]).squeeze(1)
    assert metrics["val/nll"] == pytest.approx(-logp.mean().item(), rel=1e-5)
    assert metrics["val/loss"] == pytest.approx(objective(logits[kept], targets[kept]).mean().item(), rel=1e-5)


def test_activation_checkpointing_wraps_blocks_and_keeps_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    batch = uneven_batch()
    grads = []
    for checkpointing in (False, True):
        L.seed_everything(0)
        module = DeftModule(objective=DEFT(), model_config=TINY, activation_checkpointing=checkpointing)
        capture = GradientCapture()
        trainer(callbacks=[capture]).fit(module, datamodule=OneBatch(batch))
        assert all(isinstance(block, CheckpointWrapper) == checkpointing for block in module.model.transformer.h)
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): g for n, g in capture.grads[0].items()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=0)


def test_tie_embeddings_shares_one_matrix_and_refuses_an_untied_checkpoint(tmp_path):
    module = DeftModule(model_config=TINY, tie_embeddings=True)
    module.configure_model()
    assert module.model.lm_head.weight is module.model.transformer.wte.weight
    config = Config(**TINY)
    torch.save(GPT(config).state_dict(), tmp_path / "lit_model.pth")  # independent head and embeddings
    save_config(config, tmp_path)
    with pytest.raises(CheckpointError, match="trained untied"):
        DeftModule(checkpoint_dir=tmp_path, tie_embeddings=True).configure_model()


def test_tie_embeddings_auto_ties_exactly_the_checkpoints_whose_heads_are_equal(tmp_path):
    """LitGPT unties a tied original on import (SmolLM2: 162 M parameters trained instead of 135 M): `auto` ties
    again when the two matrices are equal, leaves trained-apart heads alone, and a resume refuses a checkpoint
    trained the other way (loading it would overwrite one matrix with the other)."""
    config = Config(**TINY)
    untied = GPT(config).state_dict()
    tied = {**untied, "lm_head.weight": untied["transformer.wte.weight"].clone()}
    for name, state in (("tied", tied), ("untied", untied)):
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "lit_model.pth")
        save_config(config, tmp_path / name)
    module = DeftModule(checkpoint_dir=tmp_path / "tied")
    module.configure_model()
    assert module.tied and module.model.lm_head.weight is module.model.transformer.wte.weight
    unique = sum(p.numel() for p in module.model.parameters())
    assert unique == sum(v.numel() for k, v in tied.items() if k != "lm_head.weight")
    apart = DeftModule(checkpoint_dir=tmp_path / "untied")
    apart.configure_model()
    assert not apart.tied and apart.model.lm_head.weight is not apart.model.transformer.wte.weight
    saved = {"state_dict": {f"model.{k}": v for k, v in untied.items()}}  # written before the flag existed
    with pytest.raises(CheckpointError, match="trained with untied embeddings .* --model.tie_embeddings false"):
        module.on_load_checkpoint(saved)
    apart.on_load_checkpoint({**saved, "tied_embeddings": False})
