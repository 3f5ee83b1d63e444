"""The embedded federated engine (and its centralized baseline), with run directories.

Run directory::

    RUN_DIR/config.yaml               resolved config (+ federation path, mode)
    RUN_DIR/metrics.jsonl             one JSON object per round
    RUN_DIR/checkpoints/round_NNNN.pt one per round (the last ``keep_checkpoints`` kept)
    RUN_DIR/checkpoints/latest        name of the newest complete checkpoint

Every random choice is derived from (config seed, round, client index), and the whole
training state (weights, server optimiser, centralized optimiser, metrics history) is
in each checkpoint, so a run killed at any moment and resumed ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import yaml
from lhotse import CutSet

from fedasr.checkpoint import read_checkpoint, save_checkpoint, load_weights
from fedasr.config import RunConfig, parse_config, resolve_device
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.evaluate import evaluate
from fedasr.fl import comm
from fedasr.fl.client import derive_seed, make_dataset, train_client
from fedasr.fl.server import ClientRejected, ServerOptimizer, StreamingAggregator
from fedasr.fsutil import atomic_write_text
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.prune.masks import prunable_names, sparsity_report
from fedasr.prune.pruner import make_pruner
from fedasr.trainer import BatchStream, make_optimizer, train_steps, transducer_loss

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Test hook: `FEDASR_TEST_KILL_IN_ROUND=N` makes the process SIGKILL itself in round N, right
# after the first client finished (mid-round, before aggregation and the round's checkpoint),
# so crash/resume tests do not depend on timing.
KILL_ENV = "FEDASR_TEST_KILL_IN_ROUND"


def _test_fault_hook(rnd: int) -> None:
    if os.environ.get(KILL_ENV) == str(rnd):
        os.kill(os.getpid(), signal.SIGKILL)


class Events(Protocol):
    def round_start(self, rnd: int, clients: list[str]) -> None: ...
    def client_done(self, client: str, ok: bool) -> None: ...
    def round_end(self, row: dict) -> None: ...


class _NoEvents:
    def round_start(self, rnd, clients): pass
    def client_done(self, client, ok): pass
    def round_end(self, row): pass


@dataclass
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def ckpt_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, rnd: int) -> Path:
        return self.ckpt_dir / f"round_{rnd:04d}.pt"

    def latest(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.is_file():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if path.is_file() else None

    def set_latest(self, path: Path) -> None:
        atomic_write_text(self.ckpt_dir / "latest", path.name + "\n")

    def read_config(self) -> dict:
        if not self.config_path.is_file():
            raise FedasrError(f"{self.root}: not a run directory ({CONFIG_FILE} missing)")
        return yaml.safe_load(self.config_path.read_text())


def model_config(cfg: RunConfig, vocab_size: int) -> ModelConfig:
    try:
        mcfg = ModelConfig.preset(cfg.model.preset, vocab_size=vocab_size, **cfg.model.overrides)
    except FedasrError as e:
        raise FedasrError(f"model: {e}") from None
    if cfg.train.simple_loss_weight > 0 and not mcfg.simple_head:
        raise FedasrError("train.simple_loss_weight: needs the model's simple-loss heads "
                          "(model.overrides: {simple_head: true})")
    return mcfg


def dev_subset(cuts: CutSet, cap: int | None) -> CutSet:
    """A deterministic spread of at most ``cap`` cuts (every k-th by id)."""
    ids = sorted(c.id for c in cuts)
    if cap is not None and len(ids) > cap:
        step = len(ids) / cap
        ids = [ids[int(i * step)] for i in range(cap)]
    return cuts.subset(cut_ids=ids)


class Runner:
    def __init__(self, run_dir: str | Path, fed: Federation, cfg: RunConfig, *, centralized: bool = False,
                 events: Events | None = None,
                 client_fn: Callable = train_client):
        self.run = RunDir(Path(run_dir))
        self.fed = fed
        self.cfg = cfg
        self.centralized = centralized
        self.events = events or _NoEvents()
        self.client_fn = client_fn
        self.tokenizer = fed.tokenizer
        mcfg = model_config(cfg, self.tokenizer.vocab_size)
        torch.manual_seed(derive_seed(cfg.seed, 0))
        self.device = resolve_device(cfg.device)
        self.model = Transducer(mcfg)  # the global model: on the CPU (server side)
        self.local = Transducer(mcfg).to(self.device)  # reused by every client; dev evaluation
        self.server_opt = ServerOptimizer(cfg.fl)
        self.central_opt: torch.optim.Optimizer | None = None  # centralized: made once the model is placed
        self._central_opt_state = None  # restored optimizer state, loaded then
        self.clients = sorted(fed.client_ids)
        self.round = 0
        self.lr_step = 0
        self.history: list[dict] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.pruner = make_pruner(cfg.pruning, self.model, cfg.fl.rounds, cfg.seed)
        self.prunable = prunable_names(self.model, cfg.pruning.include, cfg.pruning.exclude)
        self.shadow: dict[str, torch.Tensor] | None = None  # dense copy of every parameter (refinement)
        self._central_data = None
        self._central_stream = None  # one BatchStream over the union: epochs continue across rounds
        self._central_consumed = 0  # its position (restored on resume)
        dev_splits = [s for s, m in fed.eval_splits.items() if m["role"] == "dev"]
        self.dev_cuts = dev_subset(fed.split_cuts(dev_splits[0]), cfg.eval.dev_max_utterances) if dev_splits else None

    # ---------------------------------------------------------------- state
    def config_dict(self) -> dict:
        return {"federation": str(self.fed.root.resolve()), "mode": "centralized" if self.centralized else "federated",
                **self.cfg.to_dict()}

    def state(self) -> dict:
        s = {"round": self.round, "lr_step": self.lr_step, "history": self.history,
             "server_optimizer": self.server_opt.state_dict(), "torch_rng": torch.get_rng_state(),
             "pruner": self.pruner.state_dict(), "shadow": self.shadow or {}}
        if self.central_opt is not None:
            s["central_optimizer"] = self.central_opt.state_dict()
            s["central_batches"] = self._central_stream.consumed if self._central_stream else self._central_consumed
        return s

    def save(self) -> None:
        path = self.run.checkpoint(self.round)
        save_checkpoint(path, self.model, self.tokenizer, masks=self.masks, config=self.config_dict(),
                        state=self.state())
        self.run.set_latest(path)
        atomic_write_text(self.run.metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        keep = self.cfg.keep_checkpoints
        if keep > 0:
            for old in sorted(self.run.ckpt_dir.glob("round_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)

    def restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path)
        load_weights(self.model, ckpt["model"], path)
        st = ckpt["state"]
        self.round = int(st["round"])
        self.lr_step = int(st["lr_step"])
        self.history = list(st["history"])
        self.masks = dict(ckpt["masks"])
        self.server_opt.load_state_dict(st["server_optimizer"])
        if self.centralized:
            self._central_opt_state = st["central_optimizer"]
            self._central_consumed = int(st.get("central_batches", 0))
        torch.set_rng_state(st["torch_rng"])
        self.pruner.load_state_dict(st.get("pruner", {}))
        if st.get("shadow"):  # (older checkpoints kept only the prunable tensors)
            self.shadow = {**{n: p.detach().cpu().clone() for n, p in self.model.named_parameters()},
                           **st["shadow"]}
        else:
            self.shadow = None

    # ---------------------------------------------------------------- masks
    def dense_weights(self) -> dict[str, torch.Tensor]:
        """Current weights with the dense shadow in place of the masked tensors (refinement)."""
        w = {n: p.detach().cpu() for n, p in self.model.named_parameters()}
        return {**w, **self.shadow} if self.shadow else w

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Served weights = dense shadow (refinement) or current weights, times the masks.

        With refinement the server steps update the shadow, so every shadow tensor is
        copied back, masked or not (before pruning starts there are no masks at all)."""
        params = dict(self.model.named_parameters())
        for n in set(self.masks) | set(self.shadow or {}):
            src = self.shadow[n] if self.shadow and n in self.shadow else params[n]
            m = self.masks.get(n)
            params[n].copy_(src if m is None else src * m.to(device=src.device, dtype=src.dtype))

    def init_masks(self, init_masks: dict[str, torch.Tensor] | None = None) -> None:
        if self.pruner.refine:
            # every parameter: masks may cover biases and BatchNorm affine too (unit pattern)
            self.shadow = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()}
        self.masks = self.pruner.init(self.dense_weights(), dict(init_masks or {}))
        self.apply_masks()

    def start(self, overwrite: bool = False, init_from: str | Path | None = None) -> None:
        root = self.run.root
        if root.exists() and any(root.iterdir()) and not overwrite:
            raise FedasrError(f"{root}: run directory exists (use --resume to continue it or --overwrite)")
        if overwrite and self.run.ckpt_dir.exists():
            for p in self.run.ckpt_dir.iterdir():
                p.unlink()
        self.run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        init_masks = None
        if init_from is not None:
            ckpt = read_checkpoint(init_from)
            if ckpt["tokenizer"]["sha256"] != hashlib.sha256(self.tokenizer.proto).hexdigest():
                raise FedasrError(f"{init_from}: its tokenizer differs from the federation's")
            if ckpt["model_config"] != self.model.cfg.to_dict():
                raise FedasrError(f"{init_from}: model architecture differs from the run's model config")
            load_weights(self.model, ckpt["model"], init_from)
            init_masks = ckpt["masks"]
        self.init_masks(init_masks)
        cfg = self.config_dict()
        if init_from is not None:
            cfg["init_from"] = str(init_from)
        atomic_write_text(self.run.config_path, yaml.safe_dump(cfg, sort_keys=False))
        self.run.metrics_path.unlink(missing_ok=True)

    @classmethod
    def resume(cls, run_dir: str | Path, events: Events | None = None, federation: str | Path | None = None,
               **kw) -> "Runner":
        rd = RunDir(Path(run_dir))
        raw = rd.read_config()
        fed = Federation(federation or raw.pop("federation"))
        raw.pop("federation", None)
        raw.pop("init_from", None)
        mode = raw.pop("mode", "federated")
        runner = cls(run_dir, fed, parse_config(raw), centralized=(mode == "centralized"), events=events, **kw)
        latest = rd.latest()
        if latest is None:
            raise FedasrError(f"{run_dir}: no complete checkpoint to resume from; start the run again")
        runner.restore(latest)
        return runner

    # ---------------------------------------------------------------- rounds
    def sample_clients(self, rnd: int) -> list[str]:
        fl = self.cfg.fl
        k = fl.clients_per_round
        if fl.client_fraction is not None:
            k = max(1, round(fl.client_fraction * len(self.clients)))
        k = min(k, len(self.clients))
        rng = np.random.default_rng(derive_seed(self.cfg.seed, rnd, 1_000_003))
        return [self.clients[i] for i in sorted(rng.choice(len(self.clients), k, replace=False).tolist())]

    def _federated_round(self, rnd: int) -> dict:
        fl = self.cfg.fl
        chosen = self.sample_clients(rnd)
        self.events.round_start(rnd, chosen)
        global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        down = comm.encode(global_state, self.masks)
        received = comm.decode(down)
        agg = StreamingAggregator(global_state)
        bytes_up = 0
        client_time = 0.0
        examples = processed = 0
        losses, dropped, steps = [], [], []
        report_sum: dict[str, torch.Tensor] = {}
        report_weight = 0.0
        for name in chosen:
            idx = self.clients.index(name)
            try:
                data = make_dataset(self.fed.client_cuts(name), self.tokenizer, self.fed.cmvn, self.cfg)
                t0 = time.perf_counter()
                res = self.client_fn(name, self.local, received, data, self.cfg,
                                     seed=derive_seed(self.cfg.seed, rnd, idx), global_step=self.lr_step,
                                     pruning=self.pruner.client_plan(rnd, self.masks))
                client_time += time.perf_counter() - t0
                if not np.isfinite(res.metrics.get("loss", 0.0)):
                    raise ClientRejected(f"non-finite loss {res.metrics['loss']}")
                payload = comm.encode(res.update, self.masks)
                bytes_up += len(payload)
                weight = {"examples": float(res.num_examples), "processed": float(res.metrics.get("processed", 0)),
                          "uniform": 1.0}[fl.weighting]
                agg.add(comm.decode(payload), weight)
                if res.report:
                    rep = comm.encode(res.report)
                    bytes_up += len(rep)
                    for k, v in comm.decode(rep).items():
                        report_sum[k] = report_sum.get(k, 0) + weight * v.double()
                    report_weight += weight
                examples += res.num_examples
                processed += int(res.metrics.get("processed", 0))
                losses.append(res.metrics.get("loss", float("nan")))
                steps.append(res.metrics.get("steps", 0))
                self.events.client_done(name, True)
                _test_fault_hook(rnd)
            except (ClientRejected, FloatingPointError, RuntimeError, ValueError, FedasrError) as e:
                dropped.append({"client": name, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
                self.events.client_done(name, False)
        if agg.count < fl.min_clients:
            last = self.run.latest()
            raise FedasrError(
                f"round {rnd}: only {agg.count} of {len(chosen)} clients succeeded (fl.min_clients="
                f"{fl.min_clients}); first failure: {dropped[0]['reason'] if dropped else 'none'}; "
                f"last good checkpoint: {last if last else 'none'}")
        state = self.model.state_dict()
        self.server_opt.step({**state, **self.shadow} if self.shadow else state, agg.mean(), self.masks)
        self.lr_step += max(steps) if steps else 0
        self._update_masks(rnd, {k: v / report_weight for k, v in report_sum.items()} if report_weight else None)
        return {"clients": chosen, "dropped": dropped, "examples": examples, "processed": processed,
                "client_time": client_time,
                "bytes_down": len(down) * len(chosen), "bytes_up": bytes_up,
                "train_loss": float(np.mean(losses)) if losses else None}

    def _centralized_round(self, rnd: int) -> dict:
        fl = self.cfg.fl
        self.events.round_start(rnd, ["centralized"])
        if self.model is not self.local:  # centralized: the global model itself trains on the device
            self.local.load_state_dict(self.model.state_dict())
            self.model = self.local
            self.central_opt = make_optimizer(self.model, self.cfg.train)
            if self._central_opt_state is not None:
                self.central_opt.load_state_dict(self._central_opt_state)
        if self._central_data is None:
            union = CutSet.from_cuts(c for name in self.clients for c in self.fed.client_cuts(name))
            self._central_data = make_dataset(union, self.tokenizer, self.fed.cmvn, self.cfg)
            self._central_stream = BatchStream(self._central_data, self.cfg.train, derive_seed(self.cfg.seed, 0),
                                               consumed=self._central_consumed)
        torch.manual_seed(derive_seed(self.cfg.seed, rnd, 0))
        t0 = time.perf_counter()
        n_steps = fl.clients_per_round * fl.local_steps if fl.local_steps is not None else None
        plan = self.pruner.client_plan(rnd, self.masks)
        res = train_steps(self.model, self.central_opt, self._central_data, self.cfg.train,
                          seed=derive_seed(self.cfg.seed, rnd), num_steps=n_steps,
                          num_epochs=fl.local_epochs if n_steps is None else None, global_step=self.lr_step,
                          after_backward=plan.after_backward, after_step=plan.after_step,
                          stream=self._central_stream)
        self.lr_step += res.steps
        if self.shadow:  # kept weights were trained; pruned ones keep their shadow value
            for n, p in self.model.named_parameters():
                if n in self.shadow:
                    m = self.masks.get(n)
                    trained = p.detach().cpu().clone()
                    self.shadow[n] = trained if m is None else torch.where(m, trained, self.shadow[n])
        self._update_masks(rnd, plan.report() or None)
        self.events.client_done("centralized", True)
        return {"clients": ["centralized"], "dropped": [], "examples": len(self._central_data),
                "processed": res.examples,
                "client_time": time.perf_counter() - t0, "bytes_down": 0, "bytes_up": 0,
                "train_loss": res.loss}

    def _update_masks(self, rnd: int, reports: dict[str, torch.Tensor] | None) -> None:
        self.masks = self.pruner.update(rnd, self.dense_weights(), self.masks, reports)
        self.apply_masks()

    def sparsity_metrics(self) -> dict:
        rep = sparsity_report(self.model.state_dict(), self.prunable)
        return {"sparsity": rep["sparsity"], "prunable_fraction": rep["prunable_fraction"],
                "nonzero_params": sum(int((p != 0).sum()) for p in self.model.parameters()),
                "layer_sparsity": {k: round(v, 5) for k, v in rep["per_layer"].items()}}

    @torch.no_grad()
    def dev_eval(self) -> dict:
        if self.dev_cuts is None:
            return {}
        model = self.local  # on the device; holds the global weights for evaluation
        if model is not self.model:
            model.load_state_dict(self.model.state_dict())
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
            info = self._centralized_round(rnd) if self.centralized else self._federated_round(rnd)
            row = {"round": rnd, **info, **self.sparsity_metrics()}
            if self.cfg.eval.due(rnd, fl.rounds):
                t_eval = time.perf_counter()
                row.update(self.dev_eval())
                row["eval_time"] = time.perf_counter() - t_eval
            row["round_time"] = time.perf_counter() - t0
            row["lr_step"] = self.lr_step
            self.round = rnd
            self.history.append(row)
            self.save()
            self.events.round_end(row)
        return self.history
