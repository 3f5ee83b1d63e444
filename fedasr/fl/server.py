"""The server side of a federated round: :class:`Server` (the global model, the masks, the
client sample, the aggregation of replies, the pruning method) and the server optimisers.

A round, as :func:`fedasr.fl.round.run_round` runs it: for each evaluate-only phase of the
pruning method, :meth:`Server.phase_exchange` -> clients -> :meth:`Server.absorb` per reply
-> :meth:`Server.finish`; then the same with :meth:`Server.train_exchange`, whose
:meth:`~Server.finish` steps the server optimiser and asks the method for the next masks.
Each :class:`Exchange` holds its own aggregation state, so nothing set in one call is read
by another whose order only the engine knows.

Server optimisers:

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
the server optimiser: the new global statistics are those of the pooled data
(:mod:`fedasr.aggregate`, ``pool_batchnorm``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from fedasr.aggregate import WeightedMean, is_bn_stat
from fedasr.config import FLSection, RunConfig
from fedasr.errors import FedasrError
from fedasr.fl.messages import PHASE, TRAIN, Up, client_header, decode_up, derive_seed, encode_down
from fedasr.methods import make_method
from fedasr.methods.base import MethodUpdate, Report, RoundContext
from fedasr.prune.masks import Masks


class ClientRejected(Exception):
    """A client reply that cannot be aggregated (non-finite, wrong shape/keys): the engine
    drops that client from the round."""


class TooFewClients(FedasrError):
    """Fewer than ``fl.min_clients`` clients of a round succeeded."""


@contextmanager
def rejecting(prefix: str = ""):
    """A client's data that fails validation rejects the client."""
    try:
        yield
    except (ValueError, RuntimeError, KeyError) as e:
        raise ClientRejected(f"{prefix}{e}") from None


@dataclass
class RoundInfo:
    """What a round did: its clients, those dropped (with the reason), bytes, losses and
    the pruning method's metrics; :meth:`row` is its line of metrics.jsonl."""

    clients: list[str]
    dropped: list[dict] = field(default_factory=list)
    examples: int = 0
    processed: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    client_time: float = 0.0
    client_times: list[float] = field(default_factory=list)  # each absorbed reply's client_seconds
    losses: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def drop(self, client: str, reason: str) -> None:
        if not any(d["client"] == client for d in self.dropped):
            self.dropped.append({"client": client, "reason": reason})  # (its first failure of the round)

    def row(self) -> dict:
        losses = self.losses
        row = {"clients": self.clients, "dropped": self.dropped, "examples": self.examples,
               "processed": self.processed, "client_time": self.client_time, "client_times": self.client_times,
               "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "steps": self.steps,
               "train_loss": sum(losses) / len(losses) if losses else None}
        row.update(self.metrics)
        return row


@dataclass
class Exchange:
    """One message to the round's clients and the state that absorbs their replies."""

    kind: str  # TRAIN or PHASE
    rnd: int
    phase: str | None
    payload: bytes
    reports: object  # the pruning method's aggregator of client reports
    updates: WeightedMean | None = None  # TRAIN: the clients' updates, in the dense shapes
    plan: object = None  # TRAIN: the compaction clients train (fl.client_model), or None
    small: WeightedMean | None = None  # with a plan: checks a reply's (compacted) shapes
    count: int = 0  # replies absorbed


class Server:
    """The server side: the global model (dense master weights: a pruned position keeps its
    last value here, clients get ``weights x masks``), the masks, the server optimiser, the
    pruning method, the client sample, and the aggregation of every reply.

    ``clients``: every client of the federation (a client's seed index is its place among
    them); ``reachable``: those an engine can serve, sampled from (default: all)."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, clients: list[str], *, centralized: bool = False,
                 tokenizer_sha: str | None = None, reachable: list[str] | None = None,
                 server_batches: Callable[[], Iterable] | None = None):
        self.cfg = cfg
        self.server_batches = server_batches  # the server's own data (methods read it), or None
        self.model = model  # on the CPU
        self.client_index = {c: i for i, c in enumerate(sorted(clients))}  # a client's seed index: fixed
        self.clients = sorted(reachable if reachable is not None else clients)  # those sampled from
        self.centralized = centralized
        self.tokenizer_sha = tokenizer_sha
        if centralized:  # one client: the server takes its weights as they are
            fl = type(cfg.fl)(**{**cfg.fl.__dict__, "aggregation": "fedavg", "server_lr": 1.0,
                                  "server_lr_schedule": "constant", "server_lr_warmup_rounds": 0})
            self.server_opt = ServerOptimizer(fl)
        else:
            self.server_opt = ServerOptimizer(cfg.fl)
        self.method = make_method(cfg.pruning, model, cfg.fl.rounds, cfg.seed)
        self.masks: Masks = {}
        self.lr_step = 0
        # (rnd, served state) -> new BatchNorm statistics, after a change of the masks
        # (pruning.recalibrate_bn; the runner provides it: it holds the server's data)
        self.recalibrate = None

    # ---------------------------------------------------------------- state
    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def ctx(self, rnd: int) -> RoundContext:
        return RoundContext(rnd, self.cfg.fl.rounds, self.weights(), self.masks, self.model, self.server_batches)

    def arch(self) -> dict:
        return self.model.cfg.to_dict()

    @torch.no_grad()
    def served_state(self) -> dict[str, torch.Tensor]:
        """What clients receive and what is evaluated and checkpointed: weights x masks."""
        out = {}
        for k, v in self.model.state_dict().items():
            m = self.masks.get(k)
            out[k] = v.detach().clone() if m is None else v.detach() * m.to(v.dtype)
        return out

    def start(self, init_masks: Masks | None = None) -> None:
        ctx = RoundContext(1, self.cfg.fl.rounds, self.weights(), dict(init_masks or {}), self.model,
                           self.server_batches)
        self.masks = self.method.init(ctx)
        if self.recalibrate is not None and self.masks:  # the first masks are a change too
            stats, _ = self.recalibrate(0, self.served_state())
            state = self.model.state_dict()
            with torch.no_grad():
                for k, v in stats.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict:
        dense = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.masks}
        return {"lr_step": self.lr_step, "server_optimizer": self.server_opt.state_dict(),
                "method": self.method.state_dict(), "dense_masked": dense}

    def load_state_dict(self, st: dict, served: dict[str, torch.Tensor], masks: Masks, arch: dict,
                        source: str = "checkpoint") -> None:
        """``served``: the checkpoint's (masked) weights of architecture ``arch`` (a compacted
        run's own widths); the dense values of the masked tensors come from the state."""
        from fedasr.checkpoint import load_weights

        if arch != self.model.cfg.to_dict():
            from fedasr.model.transducer import ModelConfig, Transducer

            with torch.random.fork_rng():
                self.model = Transducer(ModelConfig.from_dict(arch))
        load_weights(self.model, {**served, **st.get("dense_masked", {})}, source)
        self.masks = dict(masks)
        self.lr_step = int(st["lr_step"])
        self.server_opt.load_state_dict(st["server_optimizer"])
        self.method.load_state_dict(st.get("method", {}))

    # ---------------------------------------------------------------- the round's clients
    def sample_clients(self, rnd: int) -> list[str]:
        if self.centralized:
            return ["centralized"]
        fl = self.cfg.fl
        k = fl.clients_per_round
        if fl.client_fraction is not None:
            k = max(1, round(fl.client_fraction * len(self.clients)))
        k = min(k, len(self.clients))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, 1_000_003))
        return [self.clients[i] for i in sorted(rng.choice(len(self.clients), k, replace=False).tolist())]

    def client_header(self, rnd: int, client: str) -> bytes:
        idx = 0 if self.centralized else self.client_index[client]
        return client_header(client, derive_seed(self.cfg.seed, rnd, idx), self.lr_step)

    def _count(self, n: int) -> int:
        return 0 if self.centralized else n  # the centralized baseline sends nothing

    def down_bytes(self, payload: bytes, header: bytes) -> int:
        return self._count(len(payload) + len(header))

    # ---------------------------------------------------------------- messages
    def phases(self, rnd: int) -> list[str]:
        """The pruning method's evaluate-only phases before this round's training."""
        return self.method.phases(rnd)

    def phase_exchange(self, rnd: int, phase: str) -> Exchange:
        ctx = self.ctx(rnd)
        instructions, masks = self.method.phase_instructions(phase, ctx)
        payload = encode_down(PHASE, rnd, phase, self.weights(), self.masks if masks is None else masks, instructions,
                              self.arch(), self.tokenizer_sha)
        return Exchange(PHASE, rnd, phase, payload, self.method.phase_aggregator(phase, ctx))

    def client_plan(self, rnd: int):
        """The compaction clients train this round (``fl.client_model``), or None: they
        train the full model with the masks. ``compact`` with masks outside whole units is
        an error naming how many; ``auto`` falls back to masked training then."""
        mode = self.cfg.fl.client_model
        if mode == "masked" or self.centralized or not self.masks:
            return None  # (the centralized client keeps its optimizer on one architecture)
        from fedasr.model.compact import whole_unit_plan

        plan, leftover = whole_unit_plan(self.model, self.masks)
        if leftover:
            if mode == "compact":
                total = sum(int((~m).sum()) for m in self.masks.values())
                raise FedasrError(f"fl.client_model: compact: {leftover:,} of round {rnd}'s {total:,} masked weights "
                                  f"are not in whole units (use fl.client_model: auto to train those rounds masked)")
            return None
        return plan

    def train_exchange(self, rnd: int) -> Exchange:
        """The round's training message. With a compaction (:meth:`client_plan`) clients get
        the smaller dense model (the kept units' master values, its architecture, no masks)
        and send updates of its shapes, which :meth:`absorb` scatters back into the dense
        shapes (zero deltas and the server's own BatchNorm statistics at removed units)."""
        ctx = self.ctx(rnd)
        instructions = self.method.configure(ctx)
        ex = Exchange(TRAIN, rnd, None, b"", self.method.report_aggregator(ctx),
                      updates=WeightedMean(self.model.state_dict(), pool_batchnorm=True), plan=self.client_plan(rnd))
        if ex.plan is None:
            ex.payload = encode_down(TRAIN, rnd, None, self.weights(), self.masks, instructions, self.arch(),
                                     self.tokenizer_sha)
        else:
            weights = ex.plan.apply(self.weights())
            ex.small = WeightedMean(weights)
            ex.payload = encode_down(TRAIN, rnd, None, weights, {}, instructions, ex.plan.config.to_dict(),
                                     self.tokenizer_sha)
        return ex

    def _weight(self, meta: dict) -> float:
        """A client's aggregation weight (``fl.weighting``); evaluate-only phases process no
        training utterances, so there ``processed`` weighs by the dataset size."""
        fl = self.cfg.fl
        if fl.weighting == "uniform":
            return 1.0
        if fl.weighting == "processed" and meta.get("kind") != PHASE:
            return float(meta.get("metrics", {}).get("processed", 0))
        return float(meta["num_examples"])

    def _expand(self, ex: Exchange, up: Up) -> Up:
        """A compacted client's reply in the dense shapes: its deltas with zeros at the
        removed positions (frozen there by the server optimiser as any pruned position),
        its BatchNorm statistics with the server's own values of removed channels, and the
        report tensors named after a model tensor (e.g. mean |grad|) with zeros there."""
        plan = ex.plan
        with rejecting():
            ex.small.check(up.update)
        state = self.model.state_dict()
        base = {k: v if is_bn_stat(k) or not v.is_floating_point() else torch.zeros_like(v) for k, v in state.items()}
        update = plan.scatter(up.update, base)
        shapes = plan.shapes()
        tensors = {}
        for k, v in up.report.tensors.items():
            if k in state and tuple(v.shape) == shapes[k] and v.shape != state[k].shape:
                v = plan.scatter({k: v}, {k: torch.zeros(state[k].shape, dtype=v.dtype)})[k]
            tensors[k] = v
        return Up(update, Report(tensors, up.report.meta), up.meta)

    def absorb(self, ex: Exchange, reply: bytes, info: RoundInfo) -> None:
        """Fold one client's reply into the exchange; a bad one raises
        :class:`ClientRejected` (the engine drops the client) and leaves nothing behind."""
        up = decode_up(reply)
        weight = self._weight(up.meta)
        if ex.kind == TRAIN:
            if ex.plan is not None:
                up = self._expand(ex, up)
            metrics = up.meta.get("metrics", {})
            if not math.isfinite(float(metrics.get("loss", 0.0))):
                raise ClientRejected(f"non-finite loss {metrics['loss']}")
            if not weight > 0 or not math.isfinite(weight):
                raise ClientRejected(f"bad aggregation weight {weight}")
            with rejecting():
                ex.updates.check(up.update)  # check all, then add
        with rejecting("bad report: "):
            ex.reports.add(up.report, weight)  # (aggregators validate a report before folding it in)
        if ex.kind == TRAIN:
            ex.updates.fold(up.update, weight)
            info.examples += int(up.meta["num_examples"])
            info.processed += int(metrics.get("processed", 0))
            info.losses.append(float(metrics.get("loss", float("nan"))))
            info.steps.append(int(metrics.get("steps", 0)))
        info.bytes_up += self._count(len(reply))
        info.client_time += float(up.meta.get("client_seconds", 0.0))
        info.client_times.append(round(float(up.meta.get("client_seconds", 0.0)), 4))
        ex.count += 1

    def finish(self, ex: Exchange, info: RoundInfo) -> None:
        """After every reply of the exchange: a phase ends with the method's decision on it
        (e.g. FedTiny's candidate); training with the server optimiser's step on the dense
        weights (pruned positions frozen) with the averaged update as the method has it
        applied, then the method's update: the next masks."""
        needed = 1 if self.centralized else self.cfg.fl.min_clients
        if ex.count < needed:
            where = f" in phase {ex.phase!r}" if ex.kind == PHASE else ""
            raise TooFewClients(f"round {ex.rnd}: only {ex.count} of {len(info.clients)} clients succeeded{where} "
                                f"(fl.min_clients={needed}); first failure: "
                                f"{info.dropped[0]['reason'] if info.dropped else 'none'}")
        if ex.kind == PHASE:
            self._apply(self.method.end_phase(ex.phase, self.ctx(ex.rnd), ex.reports), info, ex.rnd)
            return
        mean = self.method.aggregate_update(self.ctx(ex.rnd), ex.reports, ex.updates.result())
        self.server_opt.step(self.model.state_dict(), mean, self.masks, rnd=ex.rnd)
        self.lr_step += max(info.steps) if info.steps else 0
        self._apply(self.method.update(self.ctx(ex.rnd), ex.reports), info, ex.rnd)

    @torch.no_grad()
    def _apply(self, upd: MethodUpdate, info: RoundInfo, rnd: int) -> None:
        changed = upd.masks.keys() != self.masks.keys() or any(
            not torch.equal(m, self.masks[k]) for k, m in upd.masks.items())
        self.masks = upd.masks
        state = self.model.state_dict()
        for name, pos in upd.reset.items():
            state[name][pos] = 0.0
            self.server_opt.reset(name, pos)
        info.metrics.update(upd.metrics)
        if upd.keep:
            self.compact(upd.keep)
            info.metrics["widths"] = dict(self.model.cfg.widths or {})
        if self.recalibrate is not None and (changed or upd.keep) and self.masks:
            stats, seen = self.recalibrate(rnd, self.served_state())
            state = self.model.state_dict()
            for k, v in stats.items():
                state[k].copy_(v)
            info.metrics["bn_recalibrated_on"] = seen

    @torch.no_grad()
    def compact(self, keep: dict[str, torch.Tensor]) -> None:
        """Shrink the model physically: surviving weights, the server optimiser's state and
        the masks follow the same index selection (nothing is re-initialised)."""
        from fedasr.model.compact import CompactionPlan

        plan = CompactionPlan(self.model, keep)
        self.model = plan.build()
        self.server_opt.state = {name: {k: plan.apply({name: t})[name] for k, t in st.items()}
                                 for name, st in self.server_opt.state.items()}
        self.masks = {n: m for n, m in plan.apply(self.masks).items() if not bool(m.all())}


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
