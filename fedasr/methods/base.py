"""The pruning-method interface: one class per method, registered by name.

A federated round, as every engine runs it (:mod:`fedasr.fl.protocol`)::

    server  phases(r)                     evaluate-only client phases before training (may be none)
            for each phase p:
    server    phase_instructions(r, p)    -> Instructions (tensors + JSON meta), sent with the weights
    client    client_phase(p, ...)        -> Report (forward passes only, on the client's data)
    server    phase_aggregator(r, p)      streaming: add(report, weight) ... then end_phase(r, p, agg)
    server  configure(r)                  -> Instructions for training (sent with weights and masks)
    client  client_hooks(instructions)    -> ClientHooks: after_backward / after_step during local
                                             training, report() at the end
    server  report_aggregator(r)          streaming: add(report, weight) per client
    server  update(r, weights, agg)       -> MethodUpdate: masks for the next round (+ positions to
                                             reset, + units to keep: a smaller architecture)

Everything sent is encoded by :mod:`fedasr.codec` (instructions and reports as their own
tensors: a top-K report travels as K indices + K values) and counted where it is encoded.
A method owns its state (schedules, candidate pools, last reports) in ``state_dict`` for
exact resume. The server's weights are the *dense master* copy: a pruned position keeps
its last value there (and the server optimiser freezes it), clients receive and train
``weights x masks``.

A method has its own config block: ``pruning.method: NAME`` selects it and
``pruning.NAME: {...}`` configures it (a dataclass, ``Config``); the common keys
(``target_sparsity``, ``include``, ``exclude``) live in ``pruning`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from fedasr.prune.masks import Masks, apply_masks, mask_gradients, prunable_names

Tensors = dict[str, torch.Tensor]


@dataclass
class Instructions:
    """What a method sends down besides the weights and masks: tensors and a JSON object."""

    tensors: Tensors = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Report:
    """What a client sends up besides its update: tensors and a JSON object."""

    tensors: Tensors = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tensors) or bool(self.meta)


@dataclass
class MethodUpdate:
    masks: Masks
    # positions (True) where the server zeroes the weight and resets its optimiser state
    # (e.g. FedTiny's regrown weights start from zero)
    reset: Masks = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # added to the round's metrics row
    # a smaller architecture: per group-table family, the units to keep (the server compacts
    # the model, its optimiser state and the masks; clients get the smaller model)
    keep: dict[str, torch.Tensor] | None = None


class ClientHooks:
    """Client side, inside local training: masks gradients after backward and re-applies
    the masks after every optimizer step, so pruned weights stay exactly zero."""

    def __init__(self, masks: Masks):
        self.masks = masks

    def after_backward(self, model: nn.Module) -> None:
        if self.masks:
            mask_gradients(model, self.masks)

    def after_step(self, model: nn.Module) -> None:
        if self.masks:
            apply_masks(model, self.masks)

    def report(self) -> Report:
        return Report()


class GradientMeanHooks(ClientHooks):
    """Masks as usual; sums ``contribution(name, grad)`` of each local step's gradient
    (taken before masking) for ``names`` and reports through ``mean(name)``, the sum over
    the steps divided by their count."""

    def __init__(self, masks: Masks, names):
        super().__init__(masks)
        self.grad_names = list(names)
        self._sum: dict[str, torch.Tensor] = {}
        self._steps = 0

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def after_backward(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n in self.grad_names:
            g = params[n].grad
            if g is not None:
                c = self.contribution(n, g.detach())
                acc = self._sum.get(n)
                self._sum[n] = c if acc is None else acc + c
        self._steps += 1
        super().after_backward(model)

    def mean(self, name: str) -> torch.Tensor:
        return self._sum[name] / max(1, self._steps)


class MeanAggregator:
    """Streaming weighted mean of report tensors (float64 sums; memory does not grow with
    the number of clients)."""

    def __init__(self):
        self.sums: Tensors = {}
        self.weight = 0.0
        self.count = 0

    def add(self, report: Report, weight: float) -> None:
        for k, v in report.tensors.items():  # validate everything first: a rejected report adds nothing
            if k in self.sums and tuple(v.shape) != tuple(self.sums[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)}, the others sent {tuple(self.sums[k].shape)}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{k}: non-finite values")
        for k, v in report.tensors.items():
            v = v.double() * weight
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.weight += weight
        self.count += 1

    def result(self) -> Tensors:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


@dataclass
class RoundContext:
    """What the server side of a method may read (and, for ``weights``, modify in place)."""

    rnd: int
    total_rounds: int
    weights: Tensors  # the dense master weights and buffers, by state-dict name
    masks: Masks
    model: nn.Module | None = None  # the server's model (its architecture: group table, widths)


class PruningMethod:
    """Base class; also the method ``none`` (dense training; a pruned checkpoint given to
    ``--init-from`` keeps its masks fixed)."""

    name: ClassVar[str] = "none"
    Config: ClassVar[type | None] = None

    def __init__(self, cfg, common, model: nn.Module, total_rounds: int, seed: int):
        self.cfg = cfg  # this method's config block (None for `none`)
        self.common = common  # the pruning section: target_sparsity, include, exclude
        self.total_rounds = total_rounds
        self.seed = seed
        self.names = prunable_names(model, common.include, common.exclude)  # reported even when dense

    @classmethod
    def whole_unit_masks(cls, cfg) -> str | None:
        """Why this method's masks (with config block ``cfg``) never remove whole units
        only, so that clients cannot train a compacted model (``fl.client_model: compact``);
        None when they may (it is then checked each round)."""
        return None

    # ------------------------------------------------------------------ server
    def init(self, ctx: RoundContext) -> Masks:
        """Masks for round 1 (``ctx.masks``: those of an --init-from checkpoint, or none)."""
        return ctx.masks

    def phases(self, rnd: int) -> list[str]:
        return []

    def phase_instructions(self, phase: str, ctx: RoundContext) -> tuple[Instructions, Masks | None]:
        """Instructions of an evaluate-only phase, and the masks to send the weights with
        (None: the round's masks)."""
        raise NotImplementedError(phase)

    def phase_aggregator(self, phase: str, ctx: RoundContext):
        return MeanAggregator()

    def end_phase(self, phase: str, ctx: RoundContext, aggregator) -> MethodUpdate:
        raise NotImplementedError(phase)

    def configure(self, ctx: RoundContext) -> Instructions:
        return Instructions()

    def report_aggregator(self, ctx: RoundContext):
        return MeanAggregator()

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        return MethodUpdate(ctx.masks)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass

    # ------------------------------------------------------------------ client
    def client_phase(self, phase: str, model: nn.Module, weights: Tensors, masks: Masks, batches: Callable,
                     instructions: Instructions) -> Report:
        """An evaluate-only phase on a client: ``batches()`` yields the client's batches."""
        raise NotImplementedError(phase)

    def client_hooks(self, masks: Masks, instructions: Instructions) -> ClientHooks:
        return ClientHooks(masks)


_REGISTRY: dict[str, type[PruningMethod]] = {"none": PruningMethod}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make a method selectable as ``pruning.method: cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[PruningMethod]]:
    from fedasr import methods  # noqa: F401 - importing the package registers every method

    return dict(_REGISTRY)
