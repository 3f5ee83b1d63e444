"""The pruning-method interface: what a new pruning method needs, in one place.

A method is a subclass of :class:`PruningMethod` decorated with :func:`register`, imported
in ``fedasr/methods/__init__.py`` (that import is its registration line). It is selected
by ``pruning.method: NAME`` and configured by ``pruning.NAME: {...}``, which the method
layer (:func:`fedasr.methods.method_blocks`; the config parser keeps it raw) parses into the
method's ``Config`` dataclass (``validate(prefix)`` and, optionally, ``check_common(pruning,
prefix)`` raise a one-line FedasrError naming the field); the common keys
(``target_sparsity``, ``include``, ``exclude``) live in ``pruning`` itself. The engine
builds one instance on the server and one in every client worker
(:func:`fedasr.methods.make_method`); the server's holds all state.

A federated round (:func:`fedasr.fl.round.run_round`) calls the hooks in this order::

    server  init(ctx)                          -> Masks, once, before round 1 (ctx.masks: an
                                                  --init-from checkpoint's, or none)
    for each phase p in phases(r):             evaluate-only client phases before training
      server  phase_instructions(p, ctx)       -> (Instructions, masks to send or None)
      client  client_phase(p, model, weights, masks, batches, instructions) -> Report
                                                  (forward passes only, on the client's data)
      server  phase_aggregator(p, ctx)         -> aggregator: add(report, weight) per client
      server  end_phase(p, ctx, aggregator)    -> MethodUpdate
    server  configure(ctx)                     -> Instructions for training
    client  client_hooks(masks, instructions)  -> ClientHooks: after_backward / after_step in
                                                  every local step, report() at the end
    server  report_aggregator(ctx)             -> aggregator: add(report, weight) per client
    server  aggregate_update(ctx, aggregator, mean) -> the clients' averaged update, as the
                                                  server optimiser is to apply it (default:
                                                  unchanged; FedDST averages each position
                                                  over the clients that kept it)
    server  update(ctx, aggregator)            -> MethodUpdate: the next round's masks (+
                                                  positions to reset, + units to keep: a
                                                  smaller architecture, + metrics)

- ``ctx`` is a :class:`RoundContext`: the round, the dense master weights (a pruned
  position keeps its last value there and the server optimiser freezes it; clients train
  ``weights x masks``), the masks, the server's model (its group table and widths), and
  ``server_batches`` (the server's own data, when the federation holds some: a method that
  needs it sets ``needs_server_data``, and the run is refused without server data).
- A client's update travels under ``hooks.upload_masks()`` (default: the masks it
  received; a position outside them is not sent and counts as a zero update).
- Masks are boolean tensors keyed by parameter name (True: kept), for names among
  ``self.names`` (the prunable parameters of ``pruning.include``/``exclude``).
- An aggregator is any object with ``add(report, weight)`` (raise ``ValueError`` on a bad
  report: the client is dropped and nothing of it is kept) and whatever the method reads
  back; :class:`MeanAggregator` (weighted means, pooled BatchNorm statistics) is the
  default.
- Everything sent is encoded by :mod:`fedasr.codec` (instructions and reports as their own
  tensors: a top-K report travels as K indices + K values) and counted as bytes.
- ``state_dict``/``load_state_dict`` hold every piece of state between rounds (schedules,
  candidate pools, last reports), so a resumed run is bit-identical.
- ``check_run(run)`` checks what the method needs of the rest of the run config (FedTiny:
  BatchNorm in the conv modules); ``whole_unit_masks(cfg)`` says why the masks are never
  whole units (then ``fl.client_model: compact`` is refused), or None. Both run in
  :func:`fedasr.methods.validate`, before anything is written.
- ``tests/test_method_contract.py`` runs every registered method through these hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from fedasr.aggregate import WeightedMean
from fedasr.errors import FedasrError
from fedasr.prune.masks import Masks, apply_masks, mask_gradients, masks_like_parameters, prunable_names

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
    the masks after every optimizer step, so pruned weights stay exactly zero. The masks
    are moved to the parameters' device (as multipliers in their dtype) once, at the first
    step, not copied to the device at every step."""

    def __init__(self, masks: Masks):
        self.masks = masks
        self._on_device: Masks | None = None

    def device_masks(self, model: nn.Module) -> Masks:
        """The masks as multipliers on the parameters' device (made at the first call)."""
        if self._on_device is None:
            self._on_device = masks_like_parameters(model, self.masks)
        return self._on_device

    def after_backward(self, model: nn.Module) -> None:
        if self.masks:
            mask_gradients(model, self.device_masks(model))

    def after_step(self, model: nn.Module) -> None:
        if self.masks:
            apply_masks(model, self.device_masks(model))

    def report(self) -> Report:
        return Report()

    def upload_masks(self) -> Masks:
        """The masks the client's update travels under (called after :meth:`report`): the
        masks it received, unless the client changed its own (FedDST)."""
        return self.masks


class GradientMeanHooks(ClientHooks):
    """Masks as usual; sums ``contribution(name, grad)`` of each local step's gradient
    (taken before masking) for ``names`` and reports through ``mean(name)``, the sum over
    the steps divided by their count."""

    def __init__(self, masks: Masks, names):
        super().__init__(masks)
        self.grad_names = list(names)
        self._sum: dict[str, torch.Tensor] = {}
        self._steps = 0
        self._pruned: Masks = {}  # at_pruned's multipliers, on the device

    def contribution(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def at_pruned(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` at the pruned positions of ``name`` only (zero elsewhere); the multipliers
        are made on the gradient's device once, not copied there every step."""
        if name not in self._pruned:
            self._pruned[name] = (~self.masks[name]).to(device=grad.device, dtype=grad.dtype)
        return grad * self._pruned[name]

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
    """The default aggregator of client reports: the streaming weighted mean of their
    tensors (:class:`fedasr.aggregate.WeightedMean`); ``pool_batchnorm``: BatchNorm
    statistics become those of the pooled data."""

    def __init__(self, pool_batchnorm: bool = False):
        self.mean = WeightedMean(pool_batchnorm=pool_batchnorm)

    @property
    def weight(self) -> float:
        return self.mean.weight

    def add(self, report: Report, weight: float) -> None:
        self.mean.add(report.tensors, weight)  # (validated first: a rejected report adds nothing)

    def result(self) -> Tensors:
        return self.mean.result()


@dataclass
class RoundContext:
    """What the server side of a method may read (and, for ``weights``, modify in place)."""

    rnd: int
    total_rounds: int
    weights: Tensors  # the dense master weights and buffers, by state-dict name
    masks: Masks
    model: nn.Module | None = None  # the server's model (its architecture: group table, widths)
    # the server's own batches (a fresh iterator each call; no SpecAugment), or None when the
    # federation holds no server data
    server_batches: Callable[[], Iterable] | None = None


def require_server_batches(ctx: RoundContext, method: str) -> Callable[[], Iterable]:
    """``ctx.server_batches``, or a one-line error naming the method that needs them."""
    if ctx.server_batches is None:
        raise FedasrError(f"pruning.method: {method} needs the server's own data "
                          "(shard the federation with --server-split)")
    return ctx.server_batches


class PruningMethod:
    """Base class; also the method ``none`` (dense training; a pruned checkpoint given to
    ``--init-from`` keeps its masks fixed)."""

    name: ClassVar[str] = "none"
    Config: ClassVar[type | None] = None
    needs_server_data: ClassVar[bool] = False  # reads ctx.server_batches (the run checks the federation)

    def __init__(self, cfg, common, model: nn.Module, total_rounds: int, seed: int):
        self.cfg = cfg  # this method's config block (None for `none`)
        self.common = common  # the pruning section: target_sparsity, include, exclude
        self.total_rounds = total_rounds
        self.seed = seed
        self.names = prunable_names(model, common.include, common.exclude)  # reported even when dense

    @classmethod
    def check_run(cls, run) -> None:
        """What this method needs of the rest of the run config ``run`` (e.g. of the model):
        raise a one-line FedasrError naming the field; called by :func:`fedasr.methods.validate`."""

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

    def aggregate_update(self, ctx: RoundContext, aggregator, mean: Tensors) -> Tensors:
        """The clients' weighted mean update (deltas; BatchNorm statistics as values), as
        the server optimiser is to apply it; called after every report is in."""
        return mean

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
