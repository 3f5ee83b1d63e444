"""`fedasr train`: a run on the embedded engine (one process) or on Flower's Deployment
Engine. Everything is checked here first (one-line errors before anything starts); the run
directory ends up the same on either engine."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Iterator

from fedasr.errors import FedasrError, OptionError

# events(rounds in the run, rounds already done) -> a context holding the round events
# (round_start, client_done, round_end; the Flower engine reports round_end only)
EventsFactory = Callable[[int, int], ContextManager]


class _NoEvents:
    def round_start(self, rnd, clients): pass
    def client_done(self, client, ok): pass
    def round_end(self, row): pass


@contextmanager
def _no_events(rounds: int, done: int) -> Iterator[_NoEvents]:
    yield _NoEvents()


def train(*, federation: Path | None = None, config: Path | None = None, out: Path | None = None,
          overrides: list[str] = (), centralized: bool = False, data: str = "clients", resume: Path | None = None,
          init_from: Path | None = None, overwrite: bool = False, engine: str = "embedded",
          superlink: str | None = None, insecure: bool = False, root_certificates: Path | None = None,
          slots: int | None = None, round_timeout: float = 900.0, devices: list[str] | None = None,
          device: str | None = None, events: EventsFactory = _no_events) -> tuple[list[dict], Path]:
    """Start (or ``resume``) a run and train it to its last round. ``events`` wraps the
    rounds (e.g. a progress bar). ``device``: the config's ``device`` replaced (a resumed run
    too: it may go on on another machine). ``config``: a recipe file or a shipped recipe's name;
    ``init_from``: a checkpoint file, a run directory or RUN/checkpoints/latest. Returns the
    run's metrics rows and its directory."""
    if init_from is not None:
        from fedasr.rundir import resolve_checkpoint

        init_from = resolve_checkpoint(init_from)
    if device is not None and resume is None:
        overrides = [*overrides, f"device={device}"]
    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.runner import Runner

    if engine not in ("embedded", "flower"):
        raise OptionError(f"--engine: unknown {engine!r} (embedded, flower)")
    if engine == "flower":
        if data != "clients":
            raise OptionError("--data server: the seed model trains centrally on the embedded engine")
        return _train_flower(federation, config, out, overrides, centralized, resume, init_from, overwrite,
                             superlink, insecure, root_certificates, slots, round_timeout, devices, device, events)
    if superlink is not None:
        raise OptionError("--superlink: only with --engine flower")
    if devices:
        raise OptionError("--devices: the SuperNode slots' devices, only with --engine flower "
                          "(the embedded engine trains on the config's device: --set device=cuda:N)")
    if resume is not None:
        if config is not None or overrides or centralized or init_from is not None or data != "clients":
            raise OptionError("--resume: the run's own config.yaml is used; "
                              "drop the recipe, --set, --centralized, --data and --init-from")
        runner = Runner.resume(resume, federation=federation, engine="embedded", device=device)
    else:
        if federation is None or out is None:
            raise OptionError("--federation and --out are required (or --resume RUN_DIR)")
        cfg = load_config(config, list(overrides))
        runner = Runner(out, Federation(federation), cfg, centralized=centralized, data=data)
        runner.start(overwrite=overwrite, init_from=init_from)
    with events(runner.cfg.fl.rounds, runner.round) as ev:
        runner.events = ev
        history = runner.run_rounds()
    return history, runner.run.root


def _train_flower(federation, config, out, overrides, centralized, resume, init_from, overwrite, superlink,
                  insecure, root_certificates, slots, round_timeout, devices, device, events) -> tuple[list[dict], Path]:
    """`train --engine flower`: validate here, then run on Flower."""
    from fedasr.config import load_config, parse_config
    from fedasr.data.federation import Federation
    from fedasr.fl.flower.launch import parse_devices, run_flower
    from fedasr.fl.client import model_config
    from fedasr.methods import validate
    from fedasr.rundir import RunDir

    if centralized:
        raise OptionError("--centralized: the baseline runs on the embedded engine (drop --engine flower)")
    if superlink is not None and not insecure and root_certificates is None:
        raise OptionError("--superlink: give --root-certificates CA.pem (TLS), or --insecure for loopback tests")
    slot_devices = parse_devices(devices)
    if slot_devices and superlink is not None:
        raise OptionError("--devices: places the SuperNodes this command starts; with --superlink start each "
                          "SuperNode with its own CUDA_VISIBLE_DEVICES and FEDASR_DEVICE (docs/cluster.md)")
    if resume is not None:
        if config is not None or overrides or init_from is not None:
            raise OptionError("--resume: the run's own config.yaml is used; drop the recipe, --set and --init-from")
        rd = RunDir(resume)
        run, raw = rd.run_config()
        if rd.latest() is None:
            raise FedasrError(f"{resume}: no complete checkpoint to resume from; start the run again")
        fed = Federation(federation or run["federation"])
        cfg = parse_config({**raw, "device": device} if device else raw)
        run_dir = resume
    else:
        if federation is None or out is None:
            raise OptionError("--federation and --out are required (or --resume RUN_DIR)")
        cfg = load_config(config, list(overrides))
        fed = Federation(federation)
        validate(cfg)  # a bad method block or model config fails here, not in the ServerApp
        model_config(cfg, fed.tokenizer.vocab_size)
        if init_from is not None:
            from fedasr.checkpoint import read_checkpoint

            read_checkpoint(init_from)  # exists and is a checkpoint
        if RunDir(out).claim(overwrite):
            RunDir(out).clear_outputs()
        run_dir = out
    # slots: one per device given; a GPU run without --devices: one (a CUDA context per slot
    # on one card only adds contention); on the CPU: the clients of a round, at most the cores
    if slots:
        n_slots = slots
    elif slot_devices:
        n_slots = len(slot_devices)
    elif cfg.device.startswith("cuda") or (cfg.device == "auto" and _cuda_available()):
        n_slots = 1
    else:
        n_slots = max(1, min(cfg.fl.clients_per_round, os.cpu_count() or 1))
    done = len(RunDir(run_dir).metrics()) if resume is not None else 0
    with events(cfg.fl.rounds, done) as ev:
        run_flower(Path(run_dir), fed.root, cfg.to_dict(), resume=resume is not None, init_from=init_from,
                   superlink=superlink, insecure=insecure, root_certificates=root_certificates, slots=n_slots,
                   round_timeout=round_timeout, devices=slot_devices, on_row=ev.round_end)
    return RunDir(run_dir).metrics(), Path(run_dir)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
