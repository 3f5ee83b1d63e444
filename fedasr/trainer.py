"""The local trainer: one optimisation loop used by centralized runs and by every
federated client.

Loss = RNN-T loss (+ ``ctc_weight`` x CTC loss on the encoder output; the auxiliary CTC
loss keeps the predictor from dominating early training of a small model). AdamW (or
SGD), warm-up + inverse-square-root ("noam") or constant learning rate, gradient-norm
clipping, SpecAugment and duration-bucketed batches come from the config.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fedasr.config import PRECISIONS, TrainSection
from fedasr.data.batching import AsrDataset, Batch, prefetch
from fedasr.errors import FedasrError
from fedasr.model.loss import prune_ranges, rnnt_loss, rnnt_loss_pruned, rnnt_loss_simple
from fedasr.model.transducer import Transducer


def forward_batch(model: Transducer, batch: Batch):
    """The model's outputs on ``batch``: its features and targets moved to the model's
    device, its lengths read where they are (the CPU copy: no wait for the device)."""
    dev = batch.to(next(model.parameters()).device, non_blocking=True)
    return model(dev.feats, batch.feat_lens, dev.targets, batch.target_lens)


def pruned_loss_scale(cfg: TrainSection, step: int) -> float:
    """The pruned loss' weight at 0-based ``step``: 1, or during ``prune_warmup_steps`` a
    linear rise from 0.1 (icefall's ramp of the pruned loss scale, without its simple-loss
    part: the band comes from a simple loss that has not learnt the alignment yet)."""
    w = cfg.prune_warmup_steps
    return 1.0 if step >= w else 0.1 + 0.9 * step / w


def transducer_loss(model: Transducer, batch: Batch, ctc_weight: float = 0.0,
                    simple_weight: float = 0.0, *, loss: str = "full", prune_range: int = 5,
                    pruned_scale: float = 1.0, precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    """The training loss of ``batch`` and its parts (floats).

    ``loss="pruned"`` (needs the model's simple head and ``simple_weight > 0``): the RNN-T
    term is :func:`rnnt_loss_pruned` on the joiner evaluated only in the band of
    ``prune_range`` label positions per frame that the simple loss' node occupation picks
    (:func:`prune_ranges`), weighted by ``pruned_scale``; the (B, T, U+1, V) joint tensor
    is never built. ``precision="bf16"``: the model's forward under bfloat16 autocast (the
    losses are computed in float32 or float64 from its bfloat16 outputs).
    """
    total, parts = loss_parts(model, batch, ctc_weight, simple_weight, loss=loss, prune_range=prune_range,
                              pruned_scale=pruned_scale, precision=precision)
    return total, dict(zip(parts, torch.stack(list(parts.values())).tolist()))  # one read of the device


def _mean(losses: torch.Tensor) -> torch.Tensor:
    """The batch mean of per-utterance losses, in float32 at least (a bfloat16 model's losses
    come in bfloat16)."""
    return losses.float().sum() / losses.shape[0]


def loss_parts(model: Transducer, batch: Batch, ctc_weight: float = 0.0, simple_weight: float = 0.0, *,
               loss: str = "full", prune_range: int = 5, pruned_scale: float = 1.0, precision: str = "fp32"
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`transducer_loss` with its parts as detached 0-d float32 tensors on the device
    (``loss`` last), so that the caller reads them when it wants (a training step: once).
    Nothing here waits for the device: lengths and targets are read from ``batch`` as given
    (the CPU copy of a batch), features and targets are copied to the device without
    blocking."""
    if loss not in ("full", "pruned"):
        raise FedasrError(f"train.loss: unknown {loss!r} (full, pruned)")
    if loss == "pruned" and (not model.cfg.simple_head or not simple_weight > 0):
        raise FedasrError("train.loss: pruned needs the model's simple head (model.overrides: "
                          "{simple_head: true}) and train.simple_loss_weight > 0")
    if precision not in PRECISIONS:
        raise FedasrError(f"train.precision: unknown {precision!r} ({', '.join(PRECISIONS)})")
    device = next(model.parameters()).device
    dev = batch.to(device, non_blocking=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        out = model(dev.feats, batch.feat_lens, dev.targets, batch.target_lens, joint=loss == "full")
    U = int(batch.target_lens.max())
    targets = batch.targets[:, :U].int()  # the host's copy: the losses check and copy it
    enc_lens, target_lens = out.enc_lens.int(), batch.target_lens.int()
    parts: dict[str, torch.Tensor] = {}
    loss_simple = None
    # the losses outside autocast: each reads bfloat16 logits in float32 (float64 for the
    # simple loss' lattice) and returns per-utterance losses, averaged here in float32
    if loss == "pruned":
        simple, occupation = rnnt_loss_simple(out.simple_am, out.simple_lm, targets, enc_lens, target_lens,
                                              blank=model.blank_id, reduction="none", return_occupation=True)
        loss_simple = _mean(simple)
        ranges = prune_ranges(occupation, enc_lens, target_lens, prune_range)
        with autocast:
            logits = model.joiner.forward_pruned(out.enc, out.pred, ranges)  # (B, T, S, V)
        rnnt = _mean(rnnt_loss_pruned(logits, targets, ranges, enc_lens, target_lens, blank=model.blank_id,
                                      reduction="none", check_ranges=False))  # (prune_ranges' bands are valid)
        parts["rnnt"] = rnnt.detach()
        total = pruned_scale * rnnt
    else:
        total = _mean(rnnt_loss(out.logits, targets, enc_lens, target_lens, blank=model.blank_id, reduction="none"))
        parts["rnnt"] = total.detach()
    if ctc_weight > 0 and out.ctc_logits is not None:
        log_probs = out.ctc_logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, V)
        # lengths on the host: ctc_loss reads them there (on the device it would copy them back)
        loss_ctc = F.ctc_loss(log_probs, dev.targets[:, :U], out.enc_lens, batch.target_lens,
                              blank=model.blank_id, reduction="sum", zero_infinity=True) / len(batch)
        total = total + ctc_weight * loss_ctc
        parts["ctc"] = loss_ctc.detach()
    if simple_weight > 0 and out.simple_am is not None:
        if loss_simple is None:
            loss_simple = _mean(rnnt_loss_simple(out.simple_am, out.simple_lm, targets, enc_lens, target_lens,
                                                 blank=model.blank_id, reduction="none"))
        total = total + simple_weight * loss_simple
        parts["simple"] = loss_simple.detach()
    parts["loss"] = total.detach()
    return total, {k: v.float() for k, v in parts.items()}


def batchnorms(model: torch.nn.Module) -> dict[str, torch.nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches) -> int:
    """Recompute every BatchNorm's running statistics from scratch over ``batches``
    (cumulative average, forward passes only; nothing else changes, dropout is off).
    Returns the number of utterances seen."""
    model.eval()
    saved = {}
    for bn in batchnorms(model).values():
        saved[bn] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
        bn.train()
    seen = 0
    try:
        for batch in batches:
            forward_batch(model, batch)
            seen += len(batch)
    finally:
        for bn, momentum in saved.items():
            bn.momentum = momentum
        model.eval()
    return seen


def lr_at(cfg: TrainSection, step: int) -> float:
    """Learning rate for 0-based ``step``: linear warm-up, then

    - ``noam``: 1/sqrt decay from the end of the warm-up;
    - ``constant``;
    - ``eden`` (icefall's Eden, step part): ``((s² + D²) / D²)^-1/4`` with D =
      ``lr_decay_steps``: flat for s ≪ D, then 1/sqrt(s) decay.
    """
    s = step + 1
    w = max(1, cfg.warmup_steps)
    warm = min(s / w, 1.0)
    if cfg.lr_schedule == "noam":
        return cfg.lr * min(s / w, math.sqrt(w / s))
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    if cfg.lr_schedule == "eden":
        d = float(cfg.lr_decay_steps)
        return cfg.lr * warm * ((s * s + d * d) / (d * d)) ** -0.25
    raise FedasrError(f"train.lr_schedule: unknown schedule {cfg.lr_schedule!r} (noam, constant, eden)")


def make_optimizer(model: torch.nn.Module, cfg: TrainSection) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise FedasrError(f"train.optimizer: unknown optimizer {cfg.optimizer!r} (adamw, sgd)")


def batch_stream(dataset: AsrDataset, cfg: TrainSection, seed: int, skip: int = 0,
                 pin: bool = False) -> Iterator[tuple[int, Batch]]:
    """Endless (epoch, batch) stream over ``dataset``, reshuffled each epoch; the first
    ``skip`` batches are drawn and dropped (a resumed stream continues where it was).
    ``cfg.prefetch`` batches are collated ahead by a background thread (the same batches in
    the same order); ``pin``: in page-locked memory (for a CUDA device)."""
    return prefetch(_skip(_batch_stream(dataset, cfg, seed), skip), cfg.prefetch, _pinned if pin else None)


def _skip(items: Iterator, n: int) -> Iterator:
    for i, item in enumerate(items):
        if i >= n:
            yield item


def _pinned(item: tuple[int, Batch]) -> tuple[int, Batch]:
    return item[0], item[1].pin_memory()


class BatchStream:
    """A persistent :func:`batch_stream` that counts the batches it handed out
    (``consumed``, saved in checkpoints: a resumed stream skips that many) and can take
    one back (an epoch boundary read by a loop that stops there)."""

    def __init__(self, dataset: AsrDataset, cfg: TrainSection, seed: int, consumed: int = 0, pin: bool = False):
        self._it = batch_stream(dataset, cfg, seed, skip=consumed, pin=pin)
        self._held: tuple[int, Batch] | None = None
        self.consumed = consumed

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[int, Batch]:
        item, self._held = (self._held, None) if self._held is not None else (next(self._it), None)
        self.consumed += 1
        return item

    def push_back(self, item: tuple[int, Batch]) -> None:
        self._held = item
        self.consumed -= 1


def _batch_stream(dataset: AsrDataset, cfg: TrainSection, seed: int) -> Iterator[tuple[int, Batch]]:
    epoch = 0
    while True:
        empty = True
        for batch in dataset.batches(cfg.max_duration, seed=seed, epoch=epoch, shuffle=True,
                                     num_buckets=cfg.num_buckets, max_cuts=cfg.max_batch):
            empty = False
            yield epoch, batch
        if empty:
            raise FedasrError("training data: no batch could be formed (empty client?)")
        epoch += 1


@dataclass
class TrainResult:
    steps: int
    examples: int
    loss: float  # mean training loss over the steps
    time: float  # seconds
    epochs: int
    stats: dict


def train_step(model: Transducer, optimizer: torch.optim.Optimizer, batch: Batch, cfg: TrainSection, step: int, *,
               after_backward: Callable[[Transducer], None] | None = None,
               after_step: Callable[[Transducer], None] | None = None) -> tuple[torch.Tensor, dict]:
    """One optimisation step on ``batch`` at 0-based schedule position ``step`` (the learning
    rate and the pruned loss' scale follow it): loss, backward, ``after_backward`` (before
    clipping), gradient-norm clipping, the optimizer step, ``after_step``. Returns the loss
    and its parts (:func:`transducer_loss`). A non-finite loss or gradient norm raises
    :class:`FloatingPointError` before the optimizer step. On a GPU the host waits for the
    device once per step (the loss parts and the gradient norm are read together, before
    the optimizer step): ``scripts/bench_host_syncs.py`` counts it."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(cfg, step)
    loss, parts = loss_parts(model, batch, cfg.ctc_weight, cfg.simple_loss_weight, loss=cfg.loss,
                             prune_range=cfg.prune_range, pruned_scale=pruned_loss_scale(cfg, step),
                             precision=cfg.precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    # clip (or, without clipping, just measure: max_norm=inf scales by 1)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    # the step's one wait for the device: the loss parts and the gradient norm, read together
    *values, norm_value = torch.stack([*parts.values(), norm.detach().float()]).tolist()
    stats = dict(zip(parts, values))
    if not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"non-finite training loss {stats['loss']} at step {step}")
    if not math.isfinite(norm_value):
        raise FloatingPointError(f"non-finite gradient norm {norm_value} at step {step}")
    optimizer.step()
    if after_step is not None:
        after_step(model)
    return loss, stats


def train_steps(
    model: Transducer,
    optimizer: torch.optim.Optimizer,
    dataset: AsrDataset,
    cfg: TrainSection,
    *,
    seed: int,
    num_steps: int | None = None,
    num_epochs: int | None = None,
    global_step: int = 0,
    after_backward: Callable[[Transducer], None] | None = None,
    after_step: Callable[[Transducer], None] | None = None,
    stream: BatchStream | None = None,
) -> TrainResult:
    """Run ``num_steps`` optimizer steps (or ``num_epochs`` passes) on ``dataset``.

    ``global_step`` positions the step within the learning-rate schedule;
    ``after_backward`` runs before clipping (pruning masks gradients there) and
    ``after_step`` after every optimizer step (pruning re-applies its masks there).
    ``stream``: batches to draw from (a persistent :class:`BatchStream`, so that epochs
    continue across calls) instead of a fresh stream over ``dataset`` seeded by ``seed``;
    ``num_epochs`` then counts epoch changes of the stream.
    A non-finite loss or gradient raises :class:`FloatingPointError` before the
    optimizer step, so the weights are never updated with it.
    """
    if (num_steps is None) == (num_epochs is None):
        raise ValueError("give exactly one of num_steps and num_epochs")
    model.train()
    t0 = time.perf_counter()
    total, steps, examples = 0.0, 0, 0
    sums: dict[str, float] = {}
    first_epoch = last_epoch = None
    source = stream if stream is not None else batch_stream(dataset, cfg, seed,
                                                            pin=next(model.parameters()).is_cuda)
    try:
        for epoch, batch in source:
            if first_epoch is None:
                first_epoch = epoch
            if num_epochs is not None and epoch >= first_epoch + num_epochs:
                if stream is not None:
                    stream.push_back((epoch, batch))
                break
            last_epoch = epoch
            _, stats = train_step(model, optimizer, batch, cfg, global_step + steps, after_backward=after_backward,
                                  after_step=after_step)
            steps += 1
            examples += len(batch)
            total += stats["loss"]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            if num_steps is not None and steps >= num_steps:
                break
    finally:
        if stream is None:
            source.close()  # stops its prefetching thread
    return TrainResult(steps=steps, examples=examples, loss=total / max(1, steps),
                       time=time.perf_counter() - t0,
                       epochs=0 if first_epoch is None else last_epoch - first_epoch + 1,
                       stats={k: v / max(1, steps) for k, v in sums.items()})
