"""The client side of a federated round: local training from the global weights.

:func:`train_client` is one client's local training: (global weights, its data, the
config, a seed, the pruning method's hooks) -> (update, number of examples, metrics).
:class:`ClientWorker` turns a server message (:mod:`fedasr.fl.messages`) into the encoded
reply: it loads the client's data, runs the method's evaluate-only phase or local
training, and keeps one reusable model, so memory does not grow with the number of
clients. Every engine runs it: in-process (embedded), or in a SuperNode's warm worker
(Flower).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from lhotse import CutSet

from fedasr.aggregate import is_bn_stat
from fedasr.config import RunConfig, parse_config, resolve_device
from fedasr.data.batching import AsrDataset
from fedasr.data.features import GlobalCMVN, SpecAugment
from fedasr.data.federation import Federation
from fedasr.data.tokenizer import Tokenizer
from fedasr.errors import FedasrError
from fedasr.fl.messages import PHASE, TRAIN, decode_down, derive_seed, encode_up
from fedasr.methods import make_method
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.trainer import BatchStream, make_optimizer, train_steps


def model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    """The run's model architecture (``model.preset`` + ``model.overrides``), checked
    against what the training config needs of it: the server and every client build it."""
    if "vocab_size" in cfg.model.overrides:
        raise FedasrError("model.overrides.vocab_size: set by the federation's tokenizer (`fedasr shard "
                          "--vocab-size`), not by the recipe")
    try:
        mcfg = ModelConfig.preset(cfg.model.preset, vocab_size=vocab_size, **cfg.model.overrides)
    except FedasrError as e:
        raise FedasrError(f"model: {e}") from None
    if cfg.train.loss == "pruned" and not mcfg.simple_head:
        raise FedasrError("train.loss: pruned needs the model's simple-loss heads "
                          "(model.overrides: {simple_head: true})")
    if cfg.train.simple_loss_weight > 0 and not mcfg.simple_head:
        raise FedasrError("train.simple_loss_weight: needs the model's simple-loss heads "
                          "(model.overrides: {simple_head: true})")
    return mcfg


@dataclass
class ClientResult:
    client: str
    update: dict[str, torch.Tensor]  # deltas of trainable tensors, values of BN statistics
    num_examples: int  # the client's dataset size n_k (utterances): FedAvg's weight
    metrics: dict = field(default_factory=dict)  # loss, steps, processed (utterances, repeats included), ...


CACHE_MB_ENV = "FEDASR_CACHE_MB"
DEFAULT_CACHE_MB = 2048


def cache_budget() -> int:
    """Bytes of client features a worker keeps between messages: ``FEDASR_CACHE_MB``
    [default 2048] MiB."""
    mb = os.environ.get(CACHE_MB_ENV, "")
    try:
        return int(float(mb) * 2**20) if mb else DEFAULT_CACHE_MB * 2**20
    except ValueError:
        raise FedasrError(f"{CACHE_MB_ENV}: expected a number of MiB, got {mb!r}") from None


def make_dataset(cuts: CutSet, tokenizer: Tokenizer, cmvn: GlobalCMVN, cfg: RunConfig) -> AsrDataset:
    return AsrDataset(cuts, tokenizer, cmvn, SpecAugment() if cfg.train.spec_augment else None)


def train_client(
    name: str,
    model: Transducer,
    global_state: dict[str, torch.Tensor],
    dataset: AsrDataset,
    cfg: RunConfig,
    *,
    seed: int,
    global_step: int,
    hooks=None,
    num_steps: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    stream: BatchStream | None = None,
) -> ClientResult:
    """``hooks``: the pruning method's client hooks (mask gradients and weights, collect
    what the method reports); ``num_steps`` [default ``fl.local_steps``] or ``fl.local_epochs``;
    ``optimizer``/``stream``: kept across rounds by a persistent client (the centralized
    baseline), else made afresh."""
    model.load_state_dict(global_state)
    torch.manual_seed(seed)  # dropout
    optimizer = optimizer or make_optimizer(model, cfg.train)
    fl = cfg.fl
    steps = num_steps if num_steps is not None else fl.local_steps
    res = train_steps(model, optimizer, dataset, cfg.train, seed=seed, num_steps=steps,
                      num_epochs=fl.local_epochs if steps is None else None, global_step=global_step,
                      after_backward=hooks.after_backward if hooks else None,
                      after_step=hooks.after_step if hooks else None, stream=stream)
    update = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if is_bn_stat(k) or not v.is_floating_point():
            update[k] = v.clone()
        else:
            update[k] = (v - global_state[k]).clone()
    metrics = {"loss": res.loss, "steps": res.steps, "time": res.time, "processed": res.examples,
               **{f"loss_{k}": v for k, v in res.stats.items() if k != "loss"}}
    return ClientResult(name, update, len(dataset), metrics)


class ClientWorker:
    """The client side: one reusable model (memory does not grow with the number of
    clients); a message for client ``c`` loads ``c``'s data, runs the method's evaluate-only
    phase or local training with the method's hooks, and encodes the reply.

    ``persistent``: the centralized baseline's single client keeps its batch stream across
    rounds, and its optimizer unless ``fl.centralized_optimizer`` is ``per_round``
    (``state_dict`` for resume); federated clients start each round afresh, as real devices
    would. It trains on the union of the clients' data, or on
    the server's own data (``data="server"``: the seed model).

    ``cache_clients``: keep the datasets (features loaded and normalised) of the last that
    many clients served, and at most ``cache_bytes`` of their features, for a worker that
    serves them again (the embedded engine's and Flower's warm client workers); 0: load a
    client's data with every message."""

    def __init__(self, cfg: RunConfig, fed: Federation, model: torch.nn.Module, *, train_fn=train_client,
                 persistent: bool = False, num_steps: int | None = None, data: str = "clients",
                 cache_clients: int = 0, cache_bytes: int | None = None):
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
        self.cache_bytes = cache_bytes if cache_bytes is not None else cache_budget()
        self._cache: dict = {}  # client -> dataset, least recently served first
        self._tok_sha = hashlib.sha256(fed.tokenizer.proto).hexdigest()

    @classmethod
    def for_run(cls, config: dict, federation: str, cache_clients: int = 0,
                device: str | None = None) -> "ClientWorker":
        """A remote engine's worker for the run config ``config`` (the server's resolved
        run config) and the federation directory ``federation`` (its own copy); ``device``:
        where it trains instead of the config's ``device`` (a SuperNode slot's own GPU)."""
        cfg = parse_config(config)
        fed = Federation(federation)
        where = resolve_device(device or cfg.device, warn=True)
        with torch.random.fork_rng():  # the server's seed sequence is not this worker's
            model = Transducer(model_config(cfg, fed.tokenizer.vocab_size)).to(where)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"fedasr client worker: training on {where}"
              + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""), file=sys.stderr, flush=True)
        return cls(cfg, fed, model, cache_clients=cache_clients)

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
            self._trim_cache()
        return data

    def _trim_cache(self) -> None:
        """Drop the least recently served datasets beyond ``cache_clients`` or ``cache_bytes``
        (the newest is always kept)."""
        while len(self._cache) > self.cache_clients:
            self._cache.pop(next(iter(self._cache)))
        sizes = {c: sum(t.numel() * t.element_size() for t in d.cache.values()) if d.cache else 0
                 for c, d in self._cache.items()}
        total = sum(sizes.values())
        for c in list(self._cache)[:-1]:
            if total <= self.cache_bytes:
                break
            total -= sizes[c]
            del self._cache[c]

    def ensure_architecture(self, arch: dict | None) -> None:
        """Rebuild the model when the server's architecture changed (a compacting method)."""
        if arch is None or arch == self.model.cfg.to_dict():
            return
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
            plain.cache = data.cache  # the same features (normalised, before SpecAugment)

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
        if self.cache_clients > 0:
            self._trim_cache()  # its features are loaded now: their size counts
        report = hooks.report()
        return encode_up(res.update, hooks.upload_masks(), report,
                         {"kind": TRAIN, "num_examples": res.num_examples, "metrics": res.metrics,
                          "client_seconds": time.perf_counter() - t0})

    def _persistent_parts(self, data) -> dict:
        if self._stream is None:
            self._stream = BatchStream(data, self.cfg.train, derive_seed(self.cfg.seed, 0),
                                       consumed=int(self._state.get("batches", 0)),
                                       pin=next(self.model.parameters()).is_cuda)
        if self.cfg.fl.centralized_optimizer == "per_round":
            return {"optimizer": make_optimizer(self.model, self.cfg.train), "stream": self._stream}
        if self._optimizer is None:
            self._optimizer = make_optimizer(self.model, self.cfg.train)
            if self._state.get("optimizer"):
                self._optimizer.load_state_dict(self._state["optimizer"])
        return {"optimizer": self._optimizer, "stream": self._stream}

    def state_dict(self) -> dict:
        if self._optimizer is None:
            if self._stream is not None:  # (per_round: the optimizer is not state)
                return {"batches": self._stream.consumed}
            return dict(self._state)
        return {"optimizer": self._optimizer.state_dict(), "batches": self._stream.consumed,
                "arch": self.model.cfg.to_dict()}

    def load_state_dict(self, d: dict) -> None:
        self._state = dict(d or {})
