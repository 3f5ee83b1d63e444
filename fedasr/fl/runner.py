"""A training run's lifecycle: start (or --init-from), rounds, checkpoints, dev
evaluation, resume.

Each round is :func:`fedasr.fl.round.run_round` over the run's transport: by default the
embedded engine (:class:`~fedasr.fl.round.LocalTransport`: one in-process client worker
exchanges the same encoded messages another engine would send over a network); the
Flower ServerApp passes its own. The centralized baseline is the same round with one
client that holds the union of the clients' data (or the server's own data: the seed
model) and keeps its optimizer across rounds.

Every random choice is derived from (config seed, round, client index), and the whole
training state (dense weights, masks, server optimiser, pruning-method state, the
centralized client's optimizer and batch position, metrics history) is in each
checkpoint, so a run killed at any moment and resumed ends with the same weights as an
uninterrupted run. See :mod:`fedasr.rundir` for the run directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from lhotse import CutSet

from fedasr.aggregate import is_bn_stat
from fedasr.checkpoint import load_weights, read_checkpoint, save_checkpoint
from fedasr.config import RunConfig, parse_config, resolve_device
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError, OptionError
from fedasr.evaluate import evaluate
from fedasr.fl.client import ClientWorker, make_dataset, model_config, train_client
from fedasr.fl.messages import derive_seed
from fedasr.fl.round import (DEVICE_FAULT, DeviceFault, Events, LocalTransport, NoEvents, Transport, is_device_fault,
                             run_round)
from fedasr.fl.server import Server, TooFewClients
from fedasr.fsutil import atomic_write_text, file_sha256
from fedasr.methods import registry, resolved_pruning, validate
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.rundir import RunDir
from fedasr.trainer import recalibrate_batchnorm, transducer_loss


def dev_subset(cuts: CutSet, cap: int | None) -> CutSet:
    """A deterministic spread of at most ``cap`` cuts (every k-th by id)."""
    ids = sorted(c.id for c in cuts)
    if cap is not None and len(ids) > cap:
        step = len(ids) / cap
        ids = [ids[int(i * step)] for i in range(cap)]
    return cuts.subset(cut_ids=ids)


class Runner:
    """``transport``: how rounds reach the clients (default: the embedded engine's
    in-process worker); ``client_fn``: the embedded worker's local training (tests inject
    faults with it); ``data``: what the centralized baseline trains on."""

    def __init__(self, run_dir: str | Path, fed: Federation, cfg: RunConfig, *, centralized: bool = False,
                 events: Events | None = None, client_fn: Callable = train_client, engine: str = "embedded",
                 data: str = "clients", transport: Transport | None = None):
        self.run = RunDir(Path(run_dir))
        self.engine = engine  # recorded in config.yaml
        self.fed = fed
        self.cfg = cfg
        validate(cfg)  # the pruning method's config block, before anything is written
        self.centralized = centralized
        if data not in ("clients", "server"):
            raise OptionError(f"--data: unknown {data!r} (clients, server)")
        if data == "server" and not centralized:
            raise OptionError("--data server: only with --centralized (the server's data is never a client)")
        if data == "server" and not fed.has_server_data:
            raise FedasrError(f"--data server: {fed.root} holds no server data (shard it with --server-split)")
        self.data = data
        method = registry()[cfg.pruning.method]
        if method.needs_server_data and not fed.has_server_data:
            raise FedasrError(f"pruning.method: {method.name} needs the server's own data, and {fed.root} holds "
                              "none (shard it with --server-split)")
        self._server_data = None
        self.events = events or NoEvents()
        self.tokenizer = fed.tokenizer
        mcfg = model_config(cfg, self.tokenizer.vocab_size)
        torch.manual_seed(derive_seed(cfg.seed, 0))
        self.device = resolve_device(cfg.device, warn=True)  # auto on a machine without CUDA: one line
        model = Transducer(mcfg)  # the global model: on the CPU (server side)
        local = Transducer(mcfg).to(self.device)  # the client worker's model; dev evaluation
        fl = cfg.fl
        steps = fl.clients_per_round * fl.local_steps if centralized and fl.local_steps is not None else None
        # the embedded engine's worker keeps the clients' features between rounds (up to
        # FEDASR_CACHE_MB of them) instead of loading and normalising them again every round
        self.worker = ClientWorker(cfg, fed, local, train_fn=client_fn, persistent=centralized,
                                   num_steps=steps if centralized else fl.local_steps, data=data,
                                   cache_clients=len(fed.client_ids))
        self.transport: Transport = transport or LocalTransport(self.worker)
        reachable = self.transport.connect(fed.client_ids)  # (the centralized baseline samples none)
        self.server = Server(cfg, model, fed.client_ids, centralized=centralized, reachable=reachable,
                             tokenizer_sha=hashlib.sha256(self.tokenizer.proto).hexdigest(),
                             server_batches=self._server_batches if fed.has_server_data else None)
        if cfg.pruning.recalibrate_bn > 0:
            if not fed.has_server_data:
                raise FedasrError(f"pruning.recalibrate_bn: {fed.root} holds no server data to recompute BatchNorm "
                                  "statistics on (shard with --server-split, or set it to 0)")
            self.server.recalibrate = self.recalibrate_batchnorm
        # the prunable weights of the starting architecture: sparsity is measured against them
        # (a compacted model has fewer)
        self.base_sizes = {n: p.numel() for n, p in model.named_parameters() if n in self.server.method.names}
        self.round = 0
        self.history: list[dict] = []
        dev_splits = [s for s, m in fed.eval_splits.items() if m["role"] == "dev"]
        self.dev_cuts = dev_subset(fed.split_cuts(dev_splits[0]), cfg.eval.dev_max_utterances) if dev_splits else None

    def _server_batches(self):
        """The server's own batches, in a fixed order without SpecAugment (what a method
        that scores weights on the server's data reads: ``RoundContext.server_batches``)."""
        return self._server_dataset().batches(self.cfg.train.max_duration, shuffle=False, num_buckets=1)

    def _server_dataset(self):
        """The server's own data (loaded once), without SpecAugment."""
        if self._server_data is None:
            self._server_data = make_dataset(self.fed.server_cuts(), self.tokenizer, self.fed.cmvn, self.cfg)
            self._server_data.spec_augment = None
        return self._server_data

    # the global model's served (masked) state is what the rest of the toolkit sees
    @property
    def model(self) -> Transducer:
        """The global model holding the dense master weights (see :class:`Server`)."""
        return self.server.model

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.server.masks

    @property
    def method(self):
        return self.server.method

    @property
    def prunable(self) -> list[str]:
        return self.server.method.names

    @property
    def lr_step(self) -> int:
        return self.server.lr_step

    @property
    def local(self) -> Transducer:
        """The client worker's model (on the device)."""
        return self.worker.model

    def served_model(self) -> Transducer:
        """The worker's model loaded with what clients receive (weights x masks)."""
        self.worker.ensure_architecture(self.server.arch())
        self.local.load_state_dict(self.server.served_state())
        return self.local

    # ---------------------------------------------------------------- state
    def config_dict(self) -> dict:
        return {"federation": str(self.fed.root.resolve()), "mode": "centralized" if self.centralized else "federated",
                "data": self.data, "engine": self.engine, "device_resolved": str(self.device), **self.cfg.to_dict(),
                "pruning": resolved_pruning(self.cfg.pruning)}

    def state(self) -> dict:
        return {"round": self.round, "history": self.history, "torch_rng": torch.get_rng_state(),
                "server": self.server.state_dict(), "client": self.worker.state_dict(), "base_sizes": self.base_sizes}

    def save(self) -> None:
        path = self.run.checkpoint(self.round)
        served = self.server.served_state()
        save_checkpoint(path, self.model, self.tokenizer, masks=self.masks, config=self.config_dict(),
                        state=self.state(), weights=served)
        self.run.set_latest(path)
        atomic_write_text(self.run.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            for old in sorted(self.run.ckpt_dir.glob("round_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)

    def restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        st = ckpt["state"]
        if "server" not in st:
            raise FedasrError(f"{path}: written by an older fedasr (no server state); start the run again")
        self.server.load_state_dict(st["server"], ckpt["model"], ckpt["masks"], ckpt["model_config"], path)
        self.round = int(st["round"])
        self.history = list(st["history"])
        self.base_sizes = dict(st.get("base_sizes", self.base_sizes))
        self.worker.load_state_dict(st.get("client", {}))
        torch.set_rng_state(st["torch_rng"])

    def start(self, overwrite: bool = False, init_from: str | Path | None = None) -> None:
        if self.run.claim(overwrite):
            # the old run's checkpoints, metrics, results and decodes (not the engine's own
            # files: the Flower launcher's logs are there while its ServerApp starts the run)
            self.run.clear_outputs(engine=False)
        self.run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        init_masks = None
        if init_from is not None:
            ckpt = read_checkpoint(init_from)
            if ckpt["tokenizer"]["sha256"] != hashlib.sha256(self.tokenizer.proto).hexdigest():
                raise FedasrError(f"{init_from}: its tokenizer differs from the federation's")
            # compared as configs: a checkpoint written before a field existed has its default
            if ModelConfig.from_dict(ckpt["model_config"]).to_dict() != self.model.cfg.to_dict():
                raise FedasrError(f"{init_from}: model architecture differs from the run's model config")
            load_weights(self.model, ckpt["model"], init_from)
            init_masks = ckpt["masks"]
        self.server.start(init_masks)
        if init_from is not None and not self.cfg.train.warmup_on_init:
            # continue the checkpoint's learning-rate schedule (without one recorded, e.g. a
            # one-shot pruned checkpoint: from the end of the warm-up)
            st = ckpt["state"].get("server", {})
            self.server.lr_step = int(st.get("lr_step", self.cfg.train.warmup_steps))
        cfg = self.config_dict()
        if init_from is not None:
            cfg["init_from"] = str(init_from)
            cfg["init_from_sha256"] = file_sha256(init_from)  # which seed a run descends from
        atomic_write_text(self.run.config_path, yaml.safe_dump(cfg, sort_keys=False))
        self.run.metrics_path.unlink(missing_ok=True)

    @classmethod
    def resume(cls, run_dir: str | Path, events: Events | None = None, federation: str | Path | None = None,
               device: str | None = None, **kw) -> "Runner":
        """The run in ``run_dir`` from its latest checkpoint; ``device``: instead of its
        config's (it goes on on another machine, or another GPU)."""
        rd = RunDir(Path(run_dir))
        run, raw = rd.run_config()
        fed = Federation(federation or run["federation"])
        if device is not None:
            raw = {**raw, "device": device}
        runner = cls(run_dir, fed, parse_config(raw), centralized=(run.get("mode") == "centralized"), events=events,
                     engine=kw.pop("engine", run.get("engine", "embedded")), data=run.get("data", "clients"), **kw)
        latest = rd.latest()
        if latest is None:
            raise FedasrError(f"{run_dir}: no complete checkpoint to resume from; start the run again")
        runner.restore(latest)
        return runner

    # ---------------------------------------------------------------- rounds
    def sparsity_metrics(self) -> dict:
        """Sparsity of the prunable weights against the starting architecture: 1 - nonzero /
        original size (zeros of masks and units a compaction removed alike)."""
        served = self.server.served_state()
        params = {n: served[n] for n, _ in self.model.named_parameters()}
        nonzero = {n: int((params[n] != 0).sum()) for n in self.base_sizes}
        base = sum(self.base_sizes.values())
        return {"sparsity": 1 - sum(nonzero.values()) / base if base else 0.0,
                "prunable_fraction": sum(params[n].numel() for n in self.base_sizes) / sum(
                    p.numel() for p in params.values()),
                "nonzero_params": sum(int((p != 0).sum()) for p in params.values()),
                "num_params": sum(p.numel() for p in params.values()),
                "layer_sparsity": {n: round(1 - nonzero[n] / self.base_sizes[n], 5) for n in self.base_sizes}}

    @torch.no_grad()
    def recalibrate_batchnorm(self, rnd: int, served: dict[str, torch.Tensor]) -> tuple[dict, int]:
        """BatchNorm statistics of the served model recomputed on ``pruning.recalibrate_bn``
        batches of the server's own data (a seeded draw per round), in the worker's model;
        returns them (by state-dict name) and the utterances seen."""
        self.worker.ensure_architecture(self.server.arch())
        model = self.worker.model
        model.load_state_dict(served)
        batches = self._server_dataset().batches(self.cfg.train.max_duration, seed=derive_seed(self.cfg.seed, rnd, 7),
                                            shuffle=True, num_buckets=1)
        seen = recalibrate_batchnorm(model, itertools.islice(batches, self.cfg.pruning.recalibrate_bn))
        state = model.state_dict()
        model.train()
        return {k: state[k].detach().cpu().clone() for k in state if is_bn_stat(k)}, seen

    @torch.no_grad()
    def dev_eval(self) -> dict:
        if self.dev_cuts is None:
            return {}
        model = self.served_model()
        model.eval()
        ds = make_dataset(self.dev_cuts, self.tokenizer, self.fed.cmvn, self.cfg)
        ds.spec_augment = None
        total, n = 0.0, 0
        for batch in ds.batches(self.cfg.eval.max_duration, shuffle=False, num_buckets=1):
            loss, _ = transducer_loss(model, batch, 0.0)
            total += float(loss) * len(batch)
            n += len(batch)
        res, _ = evaluate(model, self.dev_cuts, self.tokenizer, self.fed.cmvn, beam=self.cfg.eval.beam,
                          max_duration=self.cfg.eval.max_duration)
        model.train()
        return {"dev_loss": total / max(1, n), "dev_wer": res["wer"], "dev_cer": res["cer"]}

    def run_rounds(self) -> list[dict]:
        fl = self.cfg.fl
        while self.round < fl.rounds:
            rnd = self.round + 1
            t0 = time.perf_counter()
            try:
                row = run_round(self.server, self.transport, rnd, self.events)
                row = {"round": rnd, **row, **self.sparsity_metrics()}
                if self.cfg.eval.due(rnd, fl.rounds):
                    t_eval = time.perf_counter()
                    row.update(self.dev_eval())
                    row["eval_time"] = time.perf_counter() - t_eval
            except TooFewClients as e:
                raise FedasrError(f"{e}; last good checkpoint: {self._last_good()}") from None
            except DeviceFault as e:
                raise FedasrError(f"round {rnd}: {e.client}: {_one_line(e.reason)}; the run stops "
                                  f"({DEVICE_FAULT_HINT}); last good checkpoint: {self._last_good()}") from None
            except RuntimeError as e:  # the server side's own work (dev evaluation) on the device
                if not is_device_fault(e):
                    raise
                raise FedasrError(f"round {rnd}: {DEVICE_FAULT}{_one_line(f'{type(e).__name__}: {e}')}; the run "
                                  f"stops ({DEVICE_FAULT_HINT}); last good checkpoint: {self._last_good()}") from None
            row["round_time"] = time.perf_counter() - t0
            row["lr_step"] = self.lr_step
            self.round = rnd
            self.history.append(row)
            self.save()
            self.events.round_end(row)
        return self.history

    def _last_good(self) -> str:
        last = self.run.latest()
        return str(last) if last else "none"


DEVICE_FAULT_HINT = ("out of memory: lower train.max_duration / train.max_batch or use a larger device; "
                     "a CUDA error: see the traceback with CUDA_LAUNCH_BLOCKING=1; resume with --resume")


def _one_line(text: str) -> str:
    return text.splitlines()[0][:300] if text else ""
