"""The LightningModule: a LitGPT ``GPT`` trained with a swappable token-level :class:`Objective`.

One dataloader batch is one optimizer step. The batch is split into micro-batches (``micro_batch_size``) that
are forwarded and backpropagated one after another, and every micro-batch's summed token loss is divided by
the number of trainable tokens in the *whole* step across all ranks — so the gradient is that of a global
token mean, whatever the accumulation depth, the sequence lengths or the number of devices.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from litgpt import GPT, Config
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torchmetrics import MeanMetric

from deft_lightning.fused import fused_log_probs, fused_objective_loss
from deft_lightning.generation import SamplingConfig, generate
from deft_lightning.lora import LoRA, adapters_off, as_lora, head_weight, plain
from deft_lightning.loss_head import head_computes
from deft_lightning.objectives import NLL, Objective, objective_from_spec
from deft_lightning.packed import packed_positions, packing_unsupported
from deft_lightning.prepare_model import CheckpointError, load_state_dict, validate_checkpoint_dir
from deft_lightning.statistics import DEFAULT_CHUNK_ELEMENTS, Needs, TokenStats, target_log_probs
from deft_lightning.strategies import (
    AtomicShardedSaves,
    BlockFSDPStrategy,
    checkpoint_blocks,
    clip_grad_norm,
    shard_blocks,
    sharded,
)

IGNORE_INDEX = -100
#: statistics for monitoring only, computed on logging steps (collision Σp² is DEFT's α, logged for every objective)
MONITOR_NEEDS = Needs(entropy=True, collision=True, correct=True)
PROGRESS_BAR_METRICS = {"train/loss", "train/nll", "train/p", "train/alpha", "train/tokens_per_s"}


def resolve_model_config(
    model_name: str | None, model_config: dict[str, Any] | None, checkpoint_dir: Path | None
) -> Config:
    """A litgpt ``Config`` from a checkpoint directory, a registered name (with overrides) or explicit fields."""
    overrides = dict(model_config or {})
    if checkpoint_dir is not None:
        checkpoint_dir = validate_checkpoint_dir(checkpoint_dir, ("lit_model.pth", "model_config.yaml"))
        try:
            config = Config.from_file(checkpoint_dir / "model_config.yaml")
        except Exception as err:
            path = checkpoint_dir / "model_config.yaml"
            raise CheckpointError(f"'{path}' is not a valid LitGPT config: {err}") from None
        return Config(**{**config.__dict__, **overrides}) if overrides else config
    try:
        if model_name is not None:
            return Config.from_name(model_name, **overrides)
        if overrides:
            return Config(**overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid model.model_name / model.model_config: {err}") from err
    raise ValueError("set one of model.checkpoint_dir, model.model_name or model.model_config")


def _unsharded(tensor: Tensor) -> Tensor:
    """A whole tensor from an FSDP2 shard (an all-gather; every rank calls it at the same point), else itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _target_weights(batch: dict[str, Tensor]) -> Tensor | None:
    """The loss weight of each position's target (``token_weights`` shifted like the labels), if the batch has them."""
    weights = batch.get("token_weights")
    return None if weights is None else F.pad(weights[:, 1:], (0, 1), value=0.0)


def shift_labels(labels: Tensor) -> Tensor:
    """Position t predicts token t+1: drop the first label and pad the end with IGNORE_INDEX (no logits copy)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up reaching 1 after ``warmup_steps`` steps, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DeftModule(L.LightningModule):
    """Supervised fine-tuning of a LitGPT model with a token-level objective.

    Args:
        objective: the token loss (``class_path`` in YAML); NLL when omitted.
        model_name: a litgpt config name (``Config.from_name``), e.g. ``Qwen2.5-1.5B``.
        model_config: explicit litgpt ``Config`` fields, or overrides of ``model_name`` / the checkpoint's config.
        checkpoint_dir: a LitGPT checkpoint directory (``lit_model.pth`` + ``model_config.yaml``) to start from.
        micro_batch_size: sequences per forward/backward; a dataloader batch (one optimizer step) is split into
            micro-batches of this size. ``None`` uses the whole batch at once.
        learning_rate, weight_decay, betas: AdamW.
        warmup_ratio: fraction of the total steps spent in linear warm-up before the cosine decay.
        min_lr_ratio: final learning rate as a fraction of ``learning_rate``.
        gradient_clip: max global gradient norm (``0`` disables clipping; non-finite norms always skip the step).
        loss_chunk_elements: fp32 elements per chunk of logits when computing the loss and its statistics.
        activation_checkpointing: recompute each transformer block in the backward pass instead of keeping its
            activations, under every strategy (FSDP1: with :class:`~deft_lightning.strategies.BlockFSDPStrategy`).
        fused: train through the fused projection + objective pass (:mod:`deft_lightning.fused`), which never
            holds the ``[tokens × vocab]`` logits, under every strategy. ``false`` materializes them (the plain
            path, for debugging). Batch-dependent objectives, soft-capped logits and a biased head use the plain
            path either way; validation never materializes them.
        tie_embeddings: share one matrix between the input embeddings and the output head, as the Hugging Face
            originals of SmolLM2, Qwen2.5-0.5B/1.5B and Llama-3.2 do (LitGPT unties them on import, so a fine-tune
            would train an untied copy: 162 M parameters instead of SmolLM2's 135 M). ``auto`` (default): tie when
            the checkpoint's head equals its embeddings; ``true`` requires that; ``false`` never ties.
        lora: train LoRA adapters instead of the whole model (:mod:`deft_lightning.lora`), e.g.
            ``--model.lora.r 8 --model.lora.alpha 16``.

    Anchored objectives (ASFT, PSFT: ``objective.needs.reference``) read a frozen reference model at the same
    positions: ``reference``, a copy of the starting weights sharded like the model (kept in checkpoints where the
    objective refreshes it from the trained weights), or under LoRA the model itself with its adapters off.
    """

    def __init__(
        self,
        objective: Objective | None = None,
        model_name: str | None = None,
        model_config: dict[str, Any] | None = None,
        checkpoint_dir: Path | None = None,
        micro_batch_size: int | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.0,
        gradient_clip: float = 1.0,
        loss_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        activation_checkpointing: bool = False,
        fused: bool = True,
        tie_embeddings: bool | Literal["auto"] = "auto",
        lora: LoRA | None = None,
    ) -> None:
        super().__init__()
        self.objective = objective_from_spec(objective) if objective is not None else NLL()
        self.lora = as_lora(lora)
        self.config = resolve_model_config(model_name, model_config, checkpoint_dir)
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.save_hyperparameters(ignore=["objective", "lora"])
        self.hparams["objective"] = self.objective.spec()  # plain data, so `weights_only` loading works
        self.hparams["lora"] = plain(self.lora)
        self.strict_loading = self.lora is None  # LoRA checkpoints may hold the adapters only
        self.automatic_optimization = False  # we accumulate micro-batches ourselves (global token mean)
        self.model: GPT | None = None
        self.reference: GPT | None = None  # anchored objectives' frozen model (full fine-tuning)
        self.tied = False  # whether configure_model shared the head with the embeddings
        self._checked = False  # check_run passed (the CLI runs it before fit; setup would again)
        self.skipped_steps = 0
        self.tokens_seen = 0  # trained target tokens so far, all ranks (kept in checkpoints)
        #: > 0: keep a random sample of this many trainable tokens' statistics of the next step in `token_sample`
        self.token_sample_size = 0
        self.token_sample: dict[str, Tensor] | None = None
        for stage in ("val", "test"):
            for name in ("loss", "nll", "p", "acc"):
                setattr(self, f"{stage}_{name}", MeanMetric())

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.lora is None:
            self.model = GPT(self.config)
        else:
            import litgpt.lora

            self.model = litgpt.lora.GPT(self.lora.litgpt_config(self.config))
            litgpt.lora.mark_only_lora_as_trainable(self.model)
        if self.hparams.checkpoint_dir is not None:
            state = load_state_dict(self.hparams.checkpoint_dir)
            try:
                missing, unexpected = self.model.load_state_dict(state, strict=False)
                if unexpected or [name for name in missing if "lora_" not in name]:
                    raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            except RuntimeError as err:
                raise CheckpointError(
                    f"'{self.hparams.checkpoint_dir}/lit_model.pth' does not fit its model_config.yaml: "
                    f"{str(err).splitlines()[0]}"
                ) from None
        tie = self.hparams.tie_embeddings
        self.tied = self._heads_equal() if tie == "auto" else bool(tie)
        if self.tied:
            self._tie_embeddings()
        if self.objective.needs.reference and self.lora is None:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)  # a tied head stays tied
        strategy = self.trainer.strategy if self._trainer else None
        if self.hparams.activation_checkpointing and not isinstance(strategy, FSDPStrategy):
            checkpoint_blocks(self.model)  # FSDP1 wraps first, then checkpoints (BlockFSDPStrategy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            shard_blocks(self.model, self.device_mesh["data_parallel"])
            if self.reference is not None:
                shard_blocks(self.reference, self.device_mesh["data_parallel"])

    def _heads_equal(self) -> bool:
        """The checkpoint's output head equals its input embeddings (a tied original, untied by LitGPT on import)."""
        linear = getattr(self.model.lm_head, "linear", self.model.lm_head)
        embeddings = self.model.transformer.wte.weight
        return (
            self.hparams.checkpoint_dir is not None
            and embeddings.shape == linear.weight.shape
            and torch.equal(embeddings, linear.weight)
        )

    def _tie_embeddings(self) -> None:
        linear = getattr(self.model.lm_head, "linear", self.model.lm_head)  # a LoRA head wraps the linear
        embeddings, head = self.model.transformer.wte.weight, linear.weight
        if embeddings.shape != head.shape or (self.hparams.checkpoint_dir and not torch.equal(embeddings, head)):
            raise CheckpointError(
                f"model.tie_embeddings: the checkpoint's output head differs from its input embeddings "
                f"({tuple(head.shape)} vs {tuple(embeddings.shape)}, or different values): it was trained untied"
            )
        linear.weight = embeddings

    def setup(self, stage: str) -> None:
        self.check_run(self.trainer, getattr(self.trainer, "datamodule", None), stage)

    def check_run(self, trainer: L.Trainer, datamodule: Any, stage: str = "fit") -> None:
        """Refuse settings that cannot work together, from the config alone (the CLI calls this before any data is
        prepared or weights are read; ``setup`` again for runs driven from Python)."""
        if self._checked:
            return
        precision = str(trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"trainer.precision={precision} (fp16) is not supported: the fused pass rounds each logit gradient "
                "to the compute dtype before a loss scaler could act, so small gradients would vanish in fp16; use "
                "bf16-mixed on GPUs with bf16 (Ampere and newer) or 32-true (T4, V100, CPU)"
            )
        if precision == "bf16-true" and stage == "fit":
            rank_zero_warn(
                "trainer.precision=bf16-true keeps the weights in bf16: AdamW updates smaller than a weight's bf16 "
                "spacing (|Δw| < |w|/256, e.g. lr 5e-5 on weights above ~0.01) round to nothing, so most weights "
                "barely train. Use bf16-mixed (fp32 weights, bf16 compute) unless you know your updates are large."
            )
        vocab_size = getattr(datamodule, "vocab_size", None)
        if vocab_size is not None and vocab_size > self.config.padded_vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} tokens but the model's vocabulary has "
                f"{self.config.padded_vocab_size}; set model.model_config.vocab_size / padded_vocab_size"
            )
        strategy = trainer.strategy
        if self.objective.needs.reference and isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"{self.objective!r} reads a reference model, which FSDP1 (FSDPStrategy) would flatten together with "
                "the trained one; use deft_lightning.strategies.FSDP2Strategy"
            )
        if self.objective.refresh_reference_every and self.lora is not None:
            raise ValueError(
                f"{self.objective!r} with model.lora: its reference is a snapshot of the trained weights, and under "
                "LoRA the reference is the base with the adapters off; fine-tune the whole model (no model.lora)"
            )
        if isinstance(strategy, FSDPStrategy) and self.lora is not None:
            raise ValueError(
                f"model.lora under {type(strategy).__name__} (FSDP1): FSDP1 flattens a block's frozen weights and its "
                "adapters into one parameter, so it would keep and reduce-scatter gradients for every frozen weight; "
                "use deft_lightning.strategies.FSDP2Strategy, which shards per parameter and keeps gradients only "
                "for the adapters"
            )
        if (
            self.hparams.activation_checkpointing
            and isinstance(strategy, FSDPStrategy)
            and not isinstance(strategy, BlockFSDPStrategy)
        ):
            raise ValueError(
                "model.activation_checkpointing under FSDPStrategy needs deft_lightning.strategies.BlockFSDPStrategy "
                "(it checkpoints every Block after wrapping)"
            )
        if stage == "fit" and sharded(strategy) and not isinstance(strategy, AtomicShardedSaves):
            rank_zero_warn(
                f"{type(strategy).__name__} writes sharded checkpoints in place: a process killed mid-save can leave a "
                "broken last.ckpt; deft_lightning.strategies.FSDP2Strategy and BlockFSDPStrategy save atomically"
            )
        unsupported = packing_unsupported(self.config)
        if getattr(datamodule, "packing", False) and unsupported is not None:
            raise ValueError(f"data.packing: {self.config.name} uses {unsupported}; set data.packing: false")
        max_seq_length = getattr(datamodule, "max_seq_length", None)
        if max_seq_length is not None and max_seq_length > self.config.block_size:
            raise ValueError(
                f"data.max_seq_length={max_seq_length} exceeds the model's block_size={self.config.block_size}"
            )
        self._checked = True

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Logits; ``position_ids`` (restarting at 0 per example) mark a packed batch (:mod:`deft_lightning.packed`)."""
        with packed_positions(self.model, position_ids):
            return self.model(input_ids)

    def generate(self, prompts: list[list[int]], eos_id: int, sampling: SamplingConfig) -> list[list[list[int]]]:
        """Completions of token-id prompts with the KV cache (see :func:`deft_lightning.generation.generate`)."""
        return generate(self.model, prompts, eos_id, sampling)

    def _head_is_fusable(self) -> bool:
        return self.config.final_logit_softcapping is None and not self.config.lm_head_bias

    def uses_fused_path(self) -> bool:
        # a head adapter's dropout acts on the hidden states, which no merged weight can express
        dropout_on_head = self.lora is not None and "head" in self.lora.targets and self.lora.dropout > 0
        return (
            self.hparams.fused
            and not self.objective.batch_dependent
            and self._head_is_fusable()
            and not dropout_on_head
        )

    def _in_forward(self, batch: dict[str, Tensor], loss: Any, model: GPT | None = None) -> Any:
        """``loss(hidden [N, d], head weight)`` computed inside ``model``'s forward (see :mod:`loss_head`)."""
        model = self.model if model is None else model
        flat = lambda hidden, weight: loss(hidden.reshape(-1, hidden.shape[-1]), weight)  # noqa: E731
        with head_computes(model, flat), packed_positions(model, batch.get("position_ids")):
            return model(batch["input_ids"])

    def _reference_forward(self, batch: dict[str, Tensor], head: Any) -> Any:
        """``head(hidden, weight)`` inside the reference's forward (LoRA: the model, adapters off), no gradient."""
        with torch.no_grad(), adapters_off(self.model) if self.reference is None else nullcontext():
            out = self._in_forward(batch, head, self.reference)
        if isinstance(self.reference, FSDPModule):  # FSDP2 keeps a root unsharded for a backward that never comes
            self.reference.reshard()
        return out

    def _reference_hidden(self, batch: dict[str, Tensor]) -> tuple[Tensor, Callable[[], Tensor]]:
        """The reference model's last hidden states ``[N, d]`` for ``batch``, and a function that returns its head
        weight when called inside the trained model's forward (a sharded head is gathered for that call only)."""
        hidden = self._reference_forward(batch, lambda hidden, weight: hidden)
        if self.reference is None:  # LoRA: the base head, adapters off
            return hidden, lambda: getattr(self.model.lm_head, "linear", self.model.lm_head).weight.detach()
        return hidden, lambda: _unsharded(head_weight(self.reference.lm_head)).detach()

    def _fused_step(self, batch: dict[str, Tensor], needs: Needs, scale: float):
        """Scaled loss sum (for backward), per-token losses, log p and statistics, without materialized logits."""
        targets = shift_labels(batch["labels"]).reshape(-1)
        chunk = self.hparams.loss_chunk_elements
        reference = self._reference_hidden(batch) if needs.reference else None
        weights = _target_weights(batch)

        def loss(hidden: Tensor, weight: Tensor):
            anchor = None if reference is None else (reference[0], reference[1]())
            return fused_objective_loss(
                hidden, weight, targets, self.objective, scale, needs, IGNORE_INDEX, chunk, anchor, weights
            )

        return self._in_forward(batch, loss)

    def _token_losses(self, batch: dict[str, Tensor], needs: Needs) -> tuple[Tensor, Tensor, TokenStats]:
        """Per-token objective loss, differentiable log p and statistics of the trainable tokens."""
        logits = self(batch["input_ids"], batch.get("position_ids"))
        reference = None
        if needs.reference:
            reference = self._reference_forward(batch, lambda hidden, weight: hidden @ weight.T)
        targets = shift_labels(batch["labels"]).reshape(-1)
        logp, stats = target_log_probs(
            logits.reshape(-1, logits.shape[-1]),
            targets,
            needs,
            IGNORE_INDEX,
            self.hparams.loss_chunk_elements,
            reference,
        )
        return self.objective.token_loss(logp, stats), logp, stats

    # ---------------------------------------------------------------- training

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        started = time.perf_counter()
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        micro = self.hparams.micro_batch_size or batch["input_ids"].shape[0]
        columns = {name: values.split(micro) for name, values in batch.items()}  # input_ids, labels, position_ids?
        micro_batches = [{name: parts[i] for name, parts in columns.items()} for i in range(len(columns["labels"]))]

        kept = shift_labels(batch["labels"]) != IGNORE_INDEX
        weights = _target_weights(batch)
        local = torch.stack([kept.sum(), kept.sum() if weights is None else weights[kept].sum()]).double()  # exact
        global_tokens, global_weight = self._sum_over_ranks(local).tolist()  # one host sync per step
        global_tokens = int(global_tokens)
        if global_tokens == 0:
            raise RuntimeError(
                f"training batch {batch_idx} has no trainable tokens on any rank (every label is masked); "
                "check data.max_seq_length against prompt lengths"
            )
        if global_weight <= 0:
            raise RuntimeError(
                f"training batch {batch_idx}: every trainable token has loss weight 0 (row weights and "
                "data.prompt_weight / data.response_weight); nothing would train"
            )
        # DDP/FSDP average gradients over ranks, hence the world-size factor in the global (weighted) token mean
        scale = self.trainer.world_size / global_weight
        self.tokens_seen += global_tokens

        every = self.objective.refresh_reference_every
        if every and self.global_step % every == 0:
            self._refresh_reference()

        sampling = self.token_sample_size > 0
        log_now = self._is_logging_step()
        needs = self.objective.needs | (MONITOR_NEEDS if log_now or sampling else Needs())
        fused = self.uses_fused_path()
        sums: dict[str, Tensor] = {}
        samples: list[dict[str, Tensor]] = []
        for index, micro_batch in enumerate(micro_batches):
            micro_weights = None
            if weights is not None:  # the trained targets' weights, in the order of the token losses
                micro_weights = _target_weights(micro_batch)[shift_labels(micro_batch["labels"]) != IGNORE_INDEX]
            with self._gradient_sync(last=index == len(micro_batches) - 1):
                if fused:
                    loss, token_loss, gate, logp, stats = self._fused_step(micro_batch, needs, scale)
                    self.manual_backward(loss)
                else:
                    token_loss, logp, stats = self._token_losses(micro_batch, needs)
                    weighted = token_loss if micro_weights is None else token_loss * micro_weights
                    self.manual_backward(weighted.sum() * scale)
                    gate = self.objective.weight(logp, stats)
            per_token = self._train_metric_values(token_loss, gate, logp, stats)
            for name, values in per_token.items():
                sums[name] = sums.get(name, 0) + values.sum()
            if micro_weights is not None:  # logged over global_tokens like the rest: Σ weight · loss / Σ weight
                weighted_sum = (token_loss.detach() * micro_weights).sum() * (global_tokens / global_weight)
                sums["weighted_loss"] = sums.get("weighted_loss", 0) + weighted_sum
            if sampling:
                samples.append(per_token)
        if sampling:
            self.token_sample = self._sample_tokens(samples)

        grad_norm = clip_grad_norm(
            self.model, self.hparams.gradient_clip if self.hparams.gradient_clip > 0 else math.inf
        )
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses
        if not torch.isfinite(grad_norm):
            # no update, but the step counts (as AMP's GradScaler skips): AdamW leaves parameters without a
            # gradient untouched, and global_step stays equal to Lightning's logged row index across resumes
            optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_now:  # Lightning writes rows only then; logging every step costs ~0.75 ms a metric and a collective
            self._log_step(sums, global_tokens, batch, started, grad_norm, learning_rate)

    def _log_step(
        self, sums: dict[str, Tensor], global_tokens: int, batch: dict, started: float, grad_norm: Tensor, lr: float
    ) -> None:
        names = list(sums)
        totals = self._sum_over_ranks(torch.stack([sums[n].float() for n in names]))
        metrics = {f"train/{n}": totals[i] / global_tokens for i, n in enumerate(names)}
        seconds = time.perf_counter() - started
        processed = batch["input_ids"].numel() * self.trainer.world_size  # every position the model computed
        metrics["train/tokens_per_s"] = processed / seconds
        metrics["train/trained_tokens_per_s"] = global_tokens / seconds
        metrics["train/grad_norm"] = grad_norm.float()
        metrics["train/lr"] = lr
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        metrics["train/tokens_seen"] = torch.tensor(self.tokens_seen, dtype=torch.float64)  # exact to 2**53
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in PROGRESS_BAR_METRICS, rank_zero_only=True)

    def _sample_tokens(self, per_micro_batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        merged = {name: torch.cat([values[name] for values in per_micro_batch]) for name in per_micro_batch[0]}
        count = merged["p"].numel()
        generator = torch.Generator().manual_seed(self.global_step)  # reproducible, leaves the global RNG alone
        chosen = torch.randperm(count, generator=generator)[: self.token_sample_size].to(merged["p"].device)
        return {name: values.detach()[chosen].float().cpu() for name, values in merged.items()}

    def _train_metric_values(
        self, token_loss: Tensor, gate: Tensor, logp: Tensor, stats: TokenStats
    ) -> dict[str, Tensor]:
        values = {"loss": token_loss.detach(), "nll": -logp.detach(), "p": stats.prob, "weight": gate}
        alpha = self.objective.focus_index(stats)
        if alpha is not None:
            values["alpha"] = alpha
        for name, stat in (("entropy", "entropy"), ("collision", "collision"), ("acc", "correct")):
            if stat in stats:
                values[name] = getattr(stats, stat)
        return values

    @torch.no_grad()
    def _refresh_reference(self) -> None:
        """π_old ← π_θ (PSFT): the trained weights into the reference, shard by shard under FSDP2."""
        for old, current in zip(self.reference.parameters(), self.model.parameters(), strict=True):
            old.copy_(current)

    def _gradient_sync(self, last: bool) -> Any:
        """DDP all-reduces gradients once per step, on the last micro-batch; the others accumulate locally.

        FSDP reduce-scatters every micro-batch: deferring it would hold a full unsharded fp32 gradient per rank
        (4 bytes × parameters), which is what sharding exists to avoid.
        """
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return nullcontext() if last or block is None or sharded(self.trainer.strategy) else block()

    def _is_logging_step(self) -> bool:
        """A step whose metrics.csv row Lightning writes (every ``log_every_n_steps``), and the first step."""
        return self.global_step == 0 or (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        if self.trainer.world_size == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    # ---------------------------------------------------------------- evaluation

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        needs = self.objective.needs | Needs(correct=True)
        if self._head_is_fusable():  # chunked, no [tokens × vocab] logits; any objective (no gradient here)
            targets = shift_labels(batch["labels"]).reshape(-1)
            chunk = self.hparams.loss_chunk_elements
            reference = self._reference_hidden(batch) if needs.reference else None

            def statistics(hidden: Tensor, weight: Tensor) -> tuple[Tensor, TokenStats]:
                anchor = None if reference is None else (reference[0], reference[1]())
                return fused_log_probs(hidden, weight, targets, needs, IGNORE_INDEX, chunk, anchor)

            logp, stats = self._in_forward(batch, statistics)
            token_loss = self.objective.token_loss(logp, stats)
        else:
            token_loss, logp, stats = self._token_losses(batch, needs)
        values = {"loss": token_loss, "nll": -logp, "p": stats.prob, "acc": stats.correct}
        for name, value in values.items():
            metric = getattr(self, f"{stage}_{name}")
            metric.update(value)  # token-weighted over the whole epoch and all ranks
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("loss", "nll"))

    # ---------------------------------------------------------------- optimization

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            [parameter for parameter in self.parameters() if parameter.requires_grad],  # LoRA: the adapters only
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        total_steps = self._total_steps()
        warmup_steps = math.ceil(self.hparams.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: cosine_with_warmup(step, warmup_steps, total_steps, self.hparams.min_lr_ratio),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        """Optimizer steps of the whole fit, for the cosine schedule.

        Not ``trainer.estimated_stepping_batches``: reading it sets up the train dataloader before Lightning
        restores its saved position, and a resumed run would restart the epoch (Lightning #20550).
        """
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        datamodule = self.trainer.datamodule
        if datamodule is None or self.trainer.max_epochs is None or self.trainer.max_epochs < 0:
            raise ValueError("set trainer.max_steps (or trainer.max_epochs with a DataModule) for the LR schedule")
        per_epoch = len(datamodule.train_dataloader())
        return max(1, per_epoch * self.trainer.max_epochs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["tied_embeddings"] = self.tied
        checkpoint["working_directory"] = os.getcwd()  # relative paths of the config (loading resolves them here)
        # LoRA: the frozen base is read back from checkpoint_dir, except under sharded strategies, whose
        # distributed-checkpoint loader needs every key it is given
        if self.lora is not None and self.hparams.checkpoint_dir is not None and not sharded(self.trainer.strategy):
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if "lora_" in k or not k.startswith("model.")}
        if self._reference_is_rebuilt():  # the starting weights, read back from checkpoint_dir
            state = checkpoint["state_dict"]
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("reference.")}

    def _reference_is_rebuilt(self) -> bool:
        """The reference is the starting weights of ``checkpoint_dir`` (never refreshed), rebuilt by configure_model:
        checkpoints leave it out (sharded ones keep it: their loader needs every key)."""
        return (
            self.reference is not None
            and not self.objective.refresh_reference_every
            and self.hparams.checkpoint_dir is not None
            and not sharded(self.trainer.strategy)
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._reference_is_rebuilt() and "state_dict" in checkpoint:
            state = checkpoint["state_dict"]
            for name, value in self.reference.state_dict().items():
                state.setdefault(f"reference.{name}", value)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        trained_tied = checkpoint.get("tied_embeddings")
        state = checkpoint.get("state_dict", {})
        head, embeddings = state.get("model.lm_head.weight"), state.get("model.transformer.wte.weight")
        if trained_tied is None and head is not None and embeddings is not None:  # written before the flag
            trained_tied = torch.equal(head, embeddings)
        if trained_tied is not None and trained_tied != self.tied:  # loading would silently overwrite one of them
            raise CheckpointError(
                f"the checkpoint was trained with {'tied' if trained_tied else 'untied'} embeddings and this run "
                f"{'ties' if self.tied else 'unties'} them; resume with --model.tie_embeddings "
                f"{str(trained_tied).lower()}"
            )
