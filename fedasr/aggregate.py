"""Weighted means of client tensors: the one piece of arithmetic behind every aggregation.

The federated engine averages client *updates* with it (:class:`fedasr.fl.server.Server`)
and the pruning methods average client *reports* (BatchNorm statistics, gradients) with it
(:class:`fedasr.methods.base.MeanAggregator`). Sums are float64 and streaming, so memory
does not grow with the number of clients; a client's tensors are validated before any is
folded in, so a rejected client leaves nothing behind.

BatchNorm statistics are not averaged like weights: with ``pool_batchnorm`` the mean of the
clients' ``X.running_mean`` stays the weighted mean μ̄ = Σ p_i μ_i, but ``X.running_var``
becomes the variance of the pooled data, Σ p_i (σ²_i + (μ_i − μ̄)²) — the within-client
variances plus the spread of the client means — and ``num_batches_tracked`` the maximum.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_stat(name: str) -> bool:
    """A BatchNorm running statistic (a buffer no gradient trains), by its state-dict name."""
    return name.endswith(BN_STATS)


class WeightedMean:
    """Σ w_i x_i / Σ w_i per tensor name, one client at a time.

    ``reference``: the state every client's tensors must match key for key and shape for
    shape (a model update); without it, a tensor must only match the shape the first
    client sent (a report). Invalid input raises ``ValueError`` naming the tensor."""

    def __init__(self, reference: Tensors | None = None, *, pool_batchnorm: bool = False):
        self.reference = None if reference is None else {k: tuple(v.shape) for k, v in reference.items()}
        self.pool_batchnorm = pool_batchnorm
        self.sums: Tensors = {}
        self.mean_sq: Tensors = {}  # Σ w_i μ_i² of each BatchNorm running_mean (pool_batchnorm)
        self.weight = 0.0
        self.count = 0

    def check(self, tensors: Tensors) -> None:
        if self.reference is not None and set(tensors) != set(self.reference):
            extra = sorted(set(tensors) ^ set(self.reference))
            raise ValueError(f"update keys differ from the model ({extra[0]})")
        for k, v in tensors.items():
            if self.reference is not None:
                if tuple(v.shape) != self.reference[k]:
                    raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {self.reference[k]}")
            elif k in self.sums and tuple(v.shape) != tuple(self.sums[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)}, the others sent {tuple(self.sums[k].shape)}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"{k}: non-finite values")

    def add(self, tensors: Tensors, weight: float) -> None:
        """Validate, then fold in one client's tensors with aggregation weight ``weight``."""
        self.check(tensors)
        self.fold(tensors, weight)

    def fold(self, tensors: Tensors, weight: float) -> None:
        """Fold in tensors that :meth:`check` accepted (the caller vets ``weight``)."""
        for k, v in tensors.items():
            if self.pool_batchnorm and k.endswith("num_batches_tracked"):
                self.sums[k] = torch.maximum(self.sums[k], v) if k in self.sums else v.clone()
                continue
            v64 = v.double() * weight
            self.sums[k] = self.sums[k] + v64 if k in self.sums else v64
            if self.pool_batchnorm and k.endswith("running_mean"):
                sq = v.double().square() * weight
                self.mean_sq[k] = self.mean_sq[k] + sq if k in self.mean_sq else sq
        self.weight += weight
        self.count += 1

    def result(self) -> Tensors:
        """The weighted means (empty before any client)."""
        if not self.weight:
            return {}
        out = {k: v if self.pool_batchnorm and k.endswith("num_batches_tracked") else v / self.weight
               for k, v in self.sums.items()}
        if self.pool_batchnorm:
            for k in out:  # Σ p_i σ²_i  ->  Σ p_i (σ²_i + μ_i²) − μ̄²
                if k.endswith("running_var"):
                    m = k[: -len("running_var")] + "running_mean"
                    if m in self.mean_sq:
                        out[k] = out[k] + self.mean_sq[m] / self.weight - out[m].square()
        return out
