"""The federated round protocol, shared by every engine (the embedded one and Flower).

Only transport differs between engines: the server side (:class:`Server`) produces
messages and absorbs replies, the client side (:class:`ClientWorker`) turns a message into
a reply, and both are plain bytes encoded by :mod:`fedasr.codec`, so what is counted in
``bytes_down``/``bytes_up`` is what an engine really sends. A round::

    for each evaluate-only phase of the pruning method (e.g. FedTiny's BatchNorm selection):
        server.phase_payload(r, phase) -> every sampled client -> server.absorb_phase(reply)
        server.end_phase(r, phase)
    server.begin_round(r); server.train_payload() -> every sampled client -> server.absorb(reply)
    server.end_round(r)      server optimiser step, pruning-method update, masks

Server-to-client messages are one shared payload (weights sent with the masks, the
method's instructions) plus a small per-client JSON header (client, seed, step). With
``fl.client_model: compact|auto`` and masks that remove whole units, the payload is the
compacted model instead (its architecture, no masks) and replies are scattered back into
the dense shapes (:meth:`Server.begin_round`), so every engine gets it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fedasr import codec
from fedasr.config import RunConfig
from fedasr.data.batching import AsrDataset
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.fl.client import derive_seed, make_dataset, train_client
from fedasr.fl.server import ClientRejected, ServerOptimizer, StreamingAggregator, is_bn_stat
from fedasr.methods import make_method
from fedasr.methods.base import Instructions, MethodUpdate, Report, RoundContext
from fedasr.prune.masks import Masks

TRAIN, PHASE = "train", "phase"


class TooFewClients(FedasrError):
    """Fewer than ``fl.min_clients`` clients of a round succeeded."""


# ---------------------------------------------------------------------------- messages
def encode_down(kind: str, rnd: int, phase: str | None, weights: dict[str, torch.Tensor], masks: Masks,
                instructions: Instructions, arch: dict | None = None, tokenizer: str | None = None) -> bytes:
    """``arch``: the model config the weights belong to (a compacted model has its own widths);
    ``tokenizer``: the sha256 of the server's tokenizer (a client with another one refuses)."""
    tensors = {f"w/{k}": v for k, v in weights.items()}
    tensors.update({f"i/{k}": v for k, v in instructions.tensors.items()})
    meta = {"kind": kind, "round": rnd, "phase": phase, "instructions": instructions.meta, "arch": arch,
            "tokenizer": tokenizer}
    return codec.encode(tensors, {f"w/{k}": m for k, m in masks.items()}, meta)


@dataclass
class Down:
    kind: str
    round: int
    phase: str | None
    weights: dict[str, torch.Tensor]
    masks: Masks
    instructions: Instructions
    arch: dict | None = None
    tokenizer: str | None = None


def decode_down(payload: bytes) -> Down:
    tensors, masks, meta = codec.decode_message(payload)
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
    instr = Instructions({k[2:]: v for k, v in tensors.items() if k.startswith("i/")}, meta.get("instructions", {}))
    return Down(meta["kind"], int(meta["round"]), meta.get("phase"), weights,
                {k[2:]: m for k, m in masks.items()}, instr, meta.get("arch"), meta.get("tokenizer"))


def client_header(client: str, seed: int, global_step: int) -> bytes:
    return json.dumps({"client": client, "seed": seed, "global_step": global_step}).encode()


def encode_up(update: dict[str, torch.Tensor], masks: Masks, report: Report, meta: dict) -> bytes:
    tensors = {f"u/{k}": v for k, v in update.items()}
    tensors.update({f"r/{k}": v for k, v in report.tensors.items()})
    return codec.encode(tensors, {f"u/{k}": m for k, m in masks.items()}, {**meta, "report": report.meta})


@dataclass
class Up:
    update: dict[str, torch.Tensor]
    report: Report
    meta: dict


def decode_up(payload: bytes) -> Up:
    tensors, _, meta = codec.decode_message(payload)
    update = {k[2:]: v for k, v in tensors.items() if k.startswith("u/")}
    report = Report({k[2:]: v for k, v in tensors.items() if k.startswith("r/")}, meta.get("report", {}))
    return Up(update, report, meta)


# ---------------------------------------------------------------------------- client side
class ClientWorker:
    """The client side: one reusable model (memory does not grow with the number of
    clients); a message for client ``c`` loads ``c``'s data, runs the method's evaluate-only
    phase or local training with the method's hooks, and encodes the reply.

    ``persistent``: the centralized baseline's single client keeps its optimizer and its
    batch stream across rounds (``state_dict`` for resume); federated clients start each
    round afresh, as real devices would. It trains on the union of the clients' data, or on
    the server's own data (``data="server"``: the seed model).

    ``cache_clients``: keep the datasets (features loaded and normalised) of the last that
    many clients served, for a long-lived worker that serves them again (Flower's warm
    client workers); 0 (the embedded engine): load a client's data with every message."""

    def __init__(self, cfg: RunConfig, fed: Federation, model: torch.nn.Module, *, train_fn=train_client,
                 persistent: bool = False, num_steps: int | None = None, data: str = "clients",
                 cache_clients: int = 0):
        self.cfg = cfg
        self.fed = fed
        self.data = data  # persistent: "clients" (their union) or "server" (the server's own data)
        self.model = model
        self.method = make_method(cfg.pruning, model, cfg.fl.rounds, cfg.seed)
        self.train_fn = train_fn
        self.persistent = persistent
        self.num_steps = num_steps if num_steps is not None else cfg.fl.local_steps
        self._data = None  # persistent: the dataset, its optimizer and stream
        self._optimizer = None
        self._stream = None
        self._state: dict = {}
        self.cache_clients = cache_clients
        self._cache: dict = {}  # client -> dataset, least recently served first
        import hashlib

        self._tok_sha = hashlib.sha256(fed.tokenizer.proto).hexdigest()

    def dataset(self, client: str):
        if self.persistent:
            if self._data is None:
                cuts = self.fed.server_cuts() if self.data == "server" else self.fed.all_client_cuts()
                self._data = make_dataset(cuts, self.fed.tokenizer, self.fed.cmvn, self.cfg)
            return self._data
        data = self._cache.pop(client, None)  # (always None without a cache)
        if data is None:
            data = make_dataset(self.fed.client_cuts(client), self.fed.tokenizer, self.fed.cmvn, self.cfg)
        if self.cache_clients > 0:
            self._cache[client] = data  # the most recently served last
            while len(self._cache) > self.cache_clients:
                self._cache.pop(next(iter(self._cache)))
        return data

    def ensure_architecture(self, arch: dict | None) -> None:
        """Rebuild the model when the server's architecture changed (a compacting method)."""
        if arch is None or arch == self.model.cfg.to_dict():
            return
        from fedasr.model.transducer import ModelConfig, Transducer

        device = next(self.model.parameters()).device
        with torch.random.fork_rng():
            self.model = Transducer(ModelConfig.from_dict(arch)).to(device)
        self.method = make_method(self.cfg.pruning, self.model, self.cfg.fl.rounds, self.cfg.seed)
        # a persistent client keeps its batch stream; its optimizer restarts on the smaller
        # model, unless the state it was restored with belongs to that model already
        if self._optimizer is not None:
            self._state = {"batches": self._stream.consumed}
            self._optimizer = None
        elif self._state.get("arch") != arch:
            self._state = {k: v for k, v in self._state.items() if k not in ("optimizer", "arch")}

    def _check_tokenizer(self, sha: str | None) -> None:
        if sha is not None and sha != self._tok_sha:
            raise FedasrError(f"{self.fed.root}: its tokenizer differs from the server's (another federation?)")

    def handle(self, header: bytes, payload: bytes) -> bytes:
        """One message -> the encoded reply. The reply says how long the client worked
        (``client_seconds``: from receiving to having encoded its reply, minus that encoding):
        an engine's overhead is the round's wall time minus that."""
        t0 = time.perf_counter()
        h = json.loads(header)
        msg = decode_down(payload)
        self._check_tokenizer(msg.tokenizer)
        self.ensure_architecture(msg.arch)
        data = self.dataset(h["client"])
        if msg.kind == PHASE:
            plain = AsrDataset(data.cuts, data.tokenizer, data.cmvn, spec_augment=None)  # evaluate-only: no SpecAugment

            def batches():
                return plain.batches(self.cfg.train.max_duration, shuffle=False, num_buckets=1)

            report = self.method.client_phase(msg.phase, self.model, msg.weights, msg.masks, batches,
                                              msg.instructions)
            return encode_up({}, {}, report, {"kind": PHASE, "num_examples": len(data),
                                              "client_seconds": time.perf_counter() - t0})
        hooks = self.method.client_hooks(msg.masks, msg.instructions)
        extra = {}
        if self.persistent:
            extra = self._persistent_parts(data)
        res = self.train_fn(h["client"], self.model, msg.weights, data, self.cfg, seed=int(h["seed"]),
                            global_step=int(h["global_step"]), hooks=hooks, num_steps=self.num_steps, **extra)
        return encode_up(res.update, msg.masks, hooks.report(),
                         {"kind": TRAIN, "num_examples": res.num_examples, "metrics": res.metrics,
                          "client_seconds": time.perf_counter() - t0})

    def _persistent_parts(self, data) -> dict:
        from fedasr.trainer import BatchStream, make_optimizer

        if self._stream is None:
            self._stream = BatchStream(data, self.cfg.train, derive_seed(self.cfg.seed, 0),
                                       consumed=int(self._state.get("batches", 0)))
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.model, self.cfg.train)
            if self._state.get("optimizer"):
                self._optimizer.load_state_dict(self._state["optimizer"])
        return {"optimizer": self._optimizer, "stream": self._stream}

    def state_dict(self) -> dict:
        if self._optimizer is None:
            return dict(self._state)
        return {"optimizer": self._optimizer.state_dict(), "batches": self._stream.consumed,
                "arch": self.model.cfg.to_dict()}

    def load_state_dict(self, d: dict) -> None:
        self._state = dict(d or {})


# ---------------------------------------------------------------------------- server side
@dataclass
class RoundInfo:
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


class Server:
    """The server side: the global model (dense master weights: a pruned position keeps its
    last value here, clients get ``weights x masks``), the masks, the server optimiser, the
    pruning method, the client sample, and the aggregation of every reply."""

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, clients: list[str], *, centralized: bool = False,
                 tokenizer_sha: str | None = None):
        self.cfg = cfg
        self.model = model  # on the CPU
        self.clients = sorted(clients)  # those sampled from (an engine may narrow them to the reachable)
        self.client_index = {c: i for i, c in enumerate(self.clients)}  # a client's seed index: fixed
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
        self._round: RoundInfo | None = None
        self._plan = None  # this round's client compaction (fl.client_model)

    # ---------------------------------------------------------------- state
    def weights(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def ctx(self, rnd: int) -> RoundContext:
        return RoundContext(rnd, self.cfg.fl.rounds, self.weights(), self.masks, self.model)

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
        ctx = RoundContext(1, self.cfg.fl.rounds, self.weights(), dict(init_masks or {}))
        self.masks = self.method.init(ctx)

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

    # ---------------------------------------------------------------- evaluate-only phases
    def phases(self, rnd: int) -> list[str]:
        return self.method.phases(rnd)

    def phase_payload(self, rnd: int, phase: str) -> bytes:
        ctx = self.ctx(rnd)
        instructions, masks = self.method.phase_instructions(phase, ctx)
        self._phase_agg = self.method.phase_aggregator(phase, ctx)
        self._phase_count = 0
        return encode_down(PHASE, rnd, phase, self.weights(), self.masks if masks is None else masks, instructions,
                           self.arch(), self.tokenizer_sha)

    def absorb_phase(self, reply: bytes, info: RoundInfo) -> None:
        up = decode_up(reply)
        weight = self._weight(up.meta)
        try:
            self._phase_agg.add(up.report, weight)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ClientRejected(f"bad report: {e}") from None
        info.bytes_up += self._count(len(reply))
        info.client_time += float(up.meta.get("client_seconds", 0.0))
        info.client_times.append(round(float(up.meta.get("client_seconds", 0.0)), 4))
        self._phase_count += 1

    def end_phase(self, rnd: int, phase: str, info: RoundInfo) -> None:
        self._enough(rnd, self._phase_count, info, f"phase {phase!r}")
        self._apply(self.method.end_phase(phase, self.ctx(rnd), self._phase_agg), info)

    def _enough(self, rnd: int, count: int, info: RoundInfo, what: str = "") -> None:
        needed = 1 if self.centralized else self.cfg.fl.min_clients
        if count < needed:
            where = f" in {what}" if what else ""
            raise TooFewClients(f"round {rnd}: only {count} of {len(info.clients)} clients succeeded{where} "
                                f"(fl.min_clients={needed}); first failure: "
                                f"{info.dropped[0]['reason'] if info.dropped else 'none'}")

    # ---------------------------------------------------------------- training
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

    def begin_round(self, rnd: int, clients: list[str]) -> bytes:
        """The round's training message. With a compaction (:meth:`client_plan`) clients get
        the smaller dense model (the kept units' master values, its architecture, no masks)
        and send updates of its shapes; :meth:`absorb` scatters them back into the dense
        shapes (zero deltas and the server's own BatchNorm statistics at removed units)."""
        ctx = self.ctx(rnd)
        instructions = self.method.configure(ctx)
        self._agg = StreamingAggregator(self.model.state_dict())
        self._reports = self.method.report_aggregator(ctx)
        self._plan = plan = self.client_plan(rnd)
        if plan is None:
            return encode_down(TRAIN, rnd, None, self.weights(), self.masks, instructions, self.arch(),
                               self.tokenizer_sha)
        weights = plan.apply(self.weights())
        self._small = StreamingAggregator(weights)  # checks a reply's shapes before the scatter
        return encode_down(TRAIN, rnd, None, weights, {}, instructions, plan.config.to_dict(), self.tokenizer_sha)

    def _expand(self, up: Up) -> Up:
        """A compacted client's reply in the dense shapes: its deltas with zeros at the
        removed positions (frozen there by the server optimiser as any pruned position),
        its BatchNorm statistics with the server's own values of removed channels, and the
        report tensors named after a model tensor (e.g. mean |grad|) with zeros there."""
        plan = self._plan
        self._small.check(up.update)
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

    def _weight(self, meta: dict) -> float:
        """A client's aggregation weight (``fl.weighting``); evaluate-only phases process no
        training utterances, so there ``processed`` weighs by the dataset size."""
        fl = self.cfg.fl
        if fl.weighting == "uniform":
            return 1.0
        if fl.weighting == "processed" and meta.get("kind") != PHASE:
            return float(meta.get("metrics", {}).get("processed", 0))
        return float(meta["num_examples"])

    def absorb(self, reply: bytes, info: RoundInfo) -> None:
        """Fold one client's reply into the round; a bad one raises :class:`ClientRejected`
        (the engine drops the client)."""
        up = decode_up(reply)
        if self._plan is not None:
            up = self._expand(up)
        metrics = up.meta.get("metrics", {})
        if not math.isfinite(float(metrics.get("loss", 0.0))):
            raise ClientRejected(f"non-finite loss {metrics['loss']}")
        weight = self._weight(up.meta)
        if not weight > 0 or not math.isfinite(weight):
            raise ClientRejected(f"bad aggregation weight {weight}")
        self._agg.check(up.update)  # a rejected client leaves nothing behind: check all, then add
        try:
            self._reports.add(up.report, weight)  # (aggregators validate a report before folding it in)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ClientRejected(f"bad report: {e}") from None
        self._agg.add(up.update, weight)
        info.bytes_up += self._count(len(reply))
        info.client_time += float(up.meta.get("client_seconds", 0.0))
        info.client_times.append(round(float(up.meta.get("client_seconds", 0.0)), 4))
        info.examples += int(up.meta["num_examples"])
        info.processed += int(metrics.get("processed", 0))
        info.losses.append(float(metrics.get("loss", float("nan"))))
        info.steps.append(int(metrics.get("steps", 0)))

    def end_round(self, rnd: int, info: RoundInfo) -> None:
        """Server optimiser step on the dense weights (pruned positions frozen), then the
        pruning method's update: masks for the next round."""
        self._enough(rnd, self._agg.count, info)
        self.server_opt.step(self.model.state_dict(), self._agg.mean(), self.masks, rnd=rnd)
        self.lr_step += max(info.steps) if info.steps else 0
        self._apply(self.method.update(self.ctx(rnd), self._reports), info)

    @torch.no_grad()
    def _apply(self, upd: MethodUpdate, info: RoundInfo) -> None:
        self.masks = upd.masks
        state = self.model.state_dict()
        for name, pos in upd.reset.items():
            state[name][pos] = 0.0
            self.server_opt.reset(name, pos)
        info.metrics.update(upd.metrics)
        if upd.keep:
            self.compact(upd.keep)
            info.metrics["widths"] = dict(self.model.cfg.widths or {})

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

    def down_bytes(self, payload: bytes, header: bytes) -> int:
        return self._count(len(payload) + len(header))
