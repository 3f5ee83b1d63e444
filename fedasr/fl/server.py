"""Server side: streaming aggregation of client updates and the server optimisers.

Clients return *updates* Δ_i = w_i − w (float parameters) and their BatchNorm running
statistics. The server keeps one running weighted sum, so memory does not grow with the
number of clients, and then applies the server optimiser to the averaged update
Δ = Σ p_i Δ_i (p_i ∝ examples, or uniform):

- ``fedavg``:  w ← w + η Δ                     (η = server_lr; 1.0 is plain FedAvg)
- ``fedavgm``: v ← β v + Δ;  w ← w + η v        (Hsu et al., 2019)
- ``fedadam``: m ← β1 m + (1−β1) Δ;  v ← β2 v + (1−β2) Δ²;  w ← w + η m / (√v + τ)
- ``fedyogi``: as fedadam but v ← v − (1−β2) Δ² sign(v − Δ²)     (Reddi et al., 2021)
- ``fedlamb``: fedadam's moments, then a layer-wise normalised step (LAMB, You et al., 2020):
  u = m / (√v + τ);  w ← w + η (‖w‖ / ‖u‖) u  per tensor (ratio 1 when either norm is 0),
  so every tensor moves by η times its own norm per round, whatever the size of the
  averaged update. No bias correction: within a tensor it is one factor, which the trust
  ratio cancels. Norms are over the unpruned positions.

η follows ``fl.server_lr_schedule`` by round (``FLSection.server_lr_at``): linear warm-up
over ``server_lr_warmup_rounds``, then constant, cosine or step decay.

BatchNorm rule: running means and variances are not trained by gradients, so they bypass
the server optimiser. The new global statistics are those of the pooled data: the mean is
μ̄ = Σ p_i μ_i and the variance Σ p_i (σ²_i + (μ_i − μ̄)²) — within-client variance plus the
spread of the client means (same p_i); ``num_batches_tracked`` takes the maximum.
"""

from __future__ import annotations

import math

import torch

from fedasr.config import FLSection


class ClientRejected(Exception):
    """A client update that cannot be aggregated (non-finite, wrong shape/keys)."""


class StreamingAggregator:
    def __init__(self, global_state: dict[str, torch.Tensor]):
        self.reference = {k: (tuple(v.shape), v.dtype) for k, v in global_state.items()}
        self.sum: dict[str, torch.Tensor] = {}
        self.mean_sq: dict[str, torch.Tensor] = {}  # Σ p_i μ_i² of each BatchNorm running_mean
        self.weight = 0.0
        self.count = 0

    def check(self, update: dict[str, torch.Tensor]) -> None:
        if set(update) != set(self.reference):
            extra = sorted(set(update) ^ set(self.reference))
            raise ClientRejected(f"update keys differ from the model ({extra[0]})")
        for k, v in update.items():
            shape, _ = self.reference[k]
            if tuple(v.shape) != shape:
                raise ClientRejected(f"{k}: shape {tuple(v.shape)}, expected {shape}")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ClientRejected(f"{k}: non-finite values")

    def add(self, update: dict[str, torch.Tensor], weight: float) -> None:
        """Validate and fold one client's update (deltas and BN statistics) into the sum."""
        self.check(update)
        if not weight > 0 or not math.isfinite(weight):
            raise ClientRejected(f"bad aggregation weight {weight}")
        for k, v in update.items():
            if k.endswith("num_batches_tracked"):
                self.sum[k] = torch.maximum(self.sum[k], v) if k in self.sum else v.clone()
                continue
            v64 = v.double() * weight
            if k in self.sum:
                self.sum[k] += v64
            else:
                self.sum[k] = v64
            if k.endswith("running_mean"):
                sq = v.double().square() * weight
                self.mean_sq[k] = self.mean_sq[k] + sq if k in self.mean_sq else sq
        self.weight += weight
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        out = {k: v if k.endswith("num_batches_tracked") else v / self.weight for k, v in self.sum.items()}
        pool_batchnorm_variances(out, self.mean_sq, self.weight)
        return out


def pool_batchnorm_variances(means: dict[str, torch.Tensor], mean_sq_sums: dict[str, torch.Tensor],
                             weight: float) -> None:
    """In place: turn each weighted mean of client variances ``X.running_var`` in ``means``
    into the variance of the pooled data, Σp_i(σ²_i + μ_i²) − μ̄², given the weighted sums
    Σw_iμ_i² of ``X.running_mean`` (``mean_sq_sums``) and the total weight."""
    for k in means:
        if k.endswith("running_var"):
            m = k[: -len("running_var")] + "running_mean"
            if m in mean_sq_sums:
                means[k] = means[k] + mean_sq_sums[m] / weight - means[m].square()


def is_bn_stat(name: str) -> bool:
    return name.endswith(("running_mean", "running_var", "num_batches_tracked"))


class ServerOptimizer:
    """Applies the averaged update to the global weights; holds fedavgm/fedadam/fedyogi state."""

    def __init__(self, cfg: FLSection):
        self.cfg = cfg
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def state_dict(self) -> dict:
        return {"state": {k: {n: t.clone() for n, t in s.items()} for k, s in self.state.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.state = {k: dict(s) for k, s in d.get("state", {}).items()}

    @torch.no_grad()
    def reset(self, name: str, positions: torch.Tensor) -> None:
        """Zero the optimiser state of ``name`` at ``positions`` (a weight regrown from zero)."""
        for t in self.state.get(name, {}).values():
            t[positions.to(t.device)] = 0.0
        if "v" in self.state.get(name, {}) and self.cfg.aggregation in ("fedadam", "fedyogi", "fedlamb"):
            self.state[name]["v"][positions.to(self.state[name]["v"].device)] = self.cfg.tau ** 2

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], mean: dict[str, torch.Tensor],
             masks: dict[str, torch.Tensor] | None = None, rnd: int | None = None) -> None:
        """``params``: the global state dict (modified in place); ``mean``: averaged client
        deltas for trainable tensors and averaged *values* for BatchNorm statistics;
        ``rnd``: the round (1-based), for the server learning-rate schedule.

        ``masks``: positions that were pruned during the round (False) are frozen: neither
        the weight nor the optimiser state (momentum, first/second moments) moves there.
        Clients send a zero update at a pruned position, and without the freeze FedAvgM
        momentum or FedAdam/FedYogi moments would keep moving it; with mask refinement
        the server's dense shadow then keeps the pruned weight's last value and its state,
        and a regrown weight resumes from both."""
        c = self.cfg
        scheduled = c.server_lr_schedule != "constant" or c.server_lr_warmup_rounds > 0
        if scheduled and rnd is None:
            raise ValueError("ServerOptimizer.step: a server_lr_schedule needs the round")
        lr = c.server_lr_at(rnd) if scheduled else c.effective_server_lr
        masks = masks or {}
        for name, p in params.items():
            if name not in mean:
                continue
            if is_bn_stat(name):
                p.copy_(mean[name].to(p.dtype))
                continue
            if not p.is_floating_point():
                continue
            delta = mean[name].to(torch.float64)
            keep = masks.get(name)
            if keep is not None:
                keep = keep.to(device=delta.device, dtype=torch.bool)

            def frozen(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
                return new if keep is None else torch.where(keep, new, old)

            if c.aggregation == "fedavg":
                step = lr * delta
            elif c.aggregation == "fedavgm":
                s = self.state.setdefault(name, {"v": torch.zeros_like(delta)})
                s["v"] = frozen(s["v"] * c.server_momentum + delta, s["v"])
                step = lr * s["v"]
            else:
                s = self.state.setdefault(name, {"m": torch.zeros_like(delta),
                                                 "v": torch.full_like(delta, c.tau**2)})
                d2 = delta * delta
                m = s["m"] * c.beta1 + (1 - c.beta1) * delta
                if c.aggregation == "fedyogi":
                    v = s["v"] - (1 - c.beta2) * d2 * torch.sign(s["v"] - d2)
                else:  # fedadam, fedlamb
                    v = s["v"] * c.beta2 + (1 - c.beta2) * d2
                s["m"], s["v"] = frozen(m, s["m"]), frozen(v, s["v"])
                if c.aggregation == "fedlamb":
                    u = s["m"] / (s["v"].sqrt() + c.tau)
                    w = p.to(torch.float64)
                    if keep is not None:
                        u = torch.where(keep, u, torch.zeros_like(u))
                        w = torch.where(keep, w, torch.zeros_like(w))
                    w_norm, u_norm = float(w.norm()), float(u.norm())
                    step = lr * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0) * u
                else:
                    step = lr * s["m"] / (s["v"].sqrt() + c.tau)
            if keep is not None:
                step = torch.where(keep, step, torch.zeros_like(step))
            p.add_(step.to(p.dtype))
