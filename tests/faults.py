"""Faults injected from outside the shipped code, for crash/resume tests.

In the process a test starts:

    python tests/faults.py kill-in-round N ARGS...   # `fedasr ARGS...`, SIGKILLed in round N

``kill-in-round N``: the process kills itself (SIGKILL) in round N right after the round's
first client finished training — mid-round, before aggregation and the round's checkpoint.

In every Python process a run starts (Flower's SuperLink, SuperNodes, client workers): a
test passes :func:`fault_env` to the command; ``tests/faultsite/sitecustomize.py`` then
reads ``FEDASR_TEST_FAULTS`` at each interpreter's start-up and installs the faults named
there (:func:`install_from_env`), each in the process it belongs to:

- ``kill-node-in-round=N``: the first Flower client worker to receive a training message of
  round N SIGKILLs its SuperNode's executor (``fedasr.fl.flower.node``, the worker's parent)
  and itself, before training; Flower's SuperNode process follows its parent
  (PR_SET_PDEATHSIG) and leaves the federation. The client is written to
  ``FAULT_DIR/killed``.
- ``hold-in-round=N``: a Flower client worker that receives a message of round N never
  answers (it waits until it is stopped): the round cannot end before the test stops it.
- ``fixed-clock``: fedasr's client side (:mod:`fedasr.fl.client`, :mod:`fedasr.trainer`)
  reads 0.0 from its clock, so a reply's wall-clock fields (``metrics.time``,
  ``client_seconds``) have the same text, and the same length, on every engine and machine.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

ENV, DIR_ENV = "FEDASR_TEST_FAULTS", "FEDASR_TEST_FAULT_DIR"
SITE = Path(__file__).resolve().parent / "faultsite"


def kill_in_round(n: int) -> None:
    from fedasr.fl import round as fl_round

    exchange = fl_round.LocalTransport.exchange

    def first_client_then_die(self, rnd, kind, clients, payload, headers):
        if rnd != n or kind != fl_round.TRAIN:
            return exchange(self, rnd, kind, clients, payload, headers)
        exchange(self, rnd, kind, clients[:1], payload, headers)
        os.kill(os.getpid(), signal.SIGKILL)

    fl_round.LocalTransport.exchange = first_client_then_die


def fault_env(*faults: str, fault_dir: Path | None = None) -> dict[str, str]:
    """The environment (to add to os.environ) under which every Python process a command
    starts installs ``faults`` (``FAULT_DIR``: ``fault_dir``, for their records)."""
    path = os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": path, ENV: ",".join(faults)}
    if fault_dir is not None:
        env[DIR_ENV] = str(fault_dir)
    return env


def after_import(name: str, fn) -> None:
    """Call ``fn(module)`` once module ``name`` has been imported (now, if it has been)."""
    if name in sys.modules:
        fn(sys.modules[name])
        return

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                fn(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


class FixedClock:
    """The ``time`` module, except that ``perf_counter`` reads 0.0."""

    @staticmethod
    def perf_counter() -> float:
        return 0.0

    def __getattr__(self, name):
        return getattr(time, name)


def _fixed_clock(client_mod) -> None:
    client_mod.time = FixedClock()
    sys.modules["fedasr.trainer"].time = FixedClock()  # imported by fedasr.fl.client


def _worker_faults(client_mod, kill_round: int | None, hold_round: int | None, fault_dir: Path) -> None:
    import json

    from fedasr.fl.messages import TRAIN, decode_down

    handle = client_mod.ClientWorker.handle

    def faulty(self, header, payload):
        msg = decode_down(payload)
        if msg.round == hold_round:
            while True:
                time.sleep(1.0)
        if msg.round == kill_round and msg.kind == TRAIN:
            try:  # the first worker of the round only
                fd = os.open(fault_dir / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, json.loads(header)["client"].encode())
                os.close(fd)
                parent = os.getppid()
                cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
                if b"fedasr.fl.flower.node" not in cmd:
                    raise RuntimeError(f"kill-node-in-round: the worker's parent is not a SuperNode: {cmd!r}")
                os.kill(parent, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        return handle(self, header, payload)

    client_mod.ClientWorker.handle = faulty


def install_from_env() -> None:
    """Install the faults of ``FEDASR_TEST_FAULTS`` that belong to this process."""
    faults = dict(f.partition("=")[::2] for f in os.environ.get(ENV, "").split(",") if f)
    unknown = set(faults) - {"kill-node-in-round", "hold-in-round", "fixed-clock"}
    if unknown:
        raise SystemExit(f"{ENV}: unknown fault(s) {sorted(unknown)}")
    if "fixed-clock" in faults:
        after_import("fedasr.fl.client", _fixed_clock)
    in_worker = getattr(sys, "orig_argv", [])[1:3] == ["-m", "fedasr.fl.flower.worker"]
    kill, hold = faults.get("kill-node-in-round"), faults.get("hold-in-round")
    if in_worker and (kill or hold):
        fault_dir = Path(os.environ[DIR_ENV]) if kill else Path()
        after_import("fedasr.fl.client", lambda m: _worker_faults(m, int(kill) if kill else None,
                                                                   int(hold) if hold else None, fault_dir))


if __name__ == "__main__":
    fault, arg, *rest = sys.argv[1:]
    if fault != "kill-in-round":
        raise SystemExit(f"unknown fault {fault!r}")
    kill_in_round(int(arg))
    from fedasr.cli import main

    sys.argv = ["fedasr", *rest]
    main()
