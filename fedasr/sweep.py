"""`fedasr sweep` and `fedasr report`: WER-vs-sparsity curves from one recipe.

A sweep runs one training run per (scheme, sparsity) of the recipe's ``sweep:`` section
(sparsity 0 is a single shared dense run), evaluates each on the federation's test
splits, and ``report`` gathers them into ``wer_vs_sparsity.csv`` and ``.png``::

    SWEEP_DIR/recipe.yaml                 the recipe as given (with --sparsity and --set applied)
    SWEEP_DIR/seed/                       the seed model (recipe ``seed_model:``): trained once,
                                          centrally on the server's data; every run starts from it
    SWEEP_DIR/runs/dense/                 a normal run directory (+ results.json, log.txt)
    SWEEP_DIR/runs/SCHEME/s0.50/          ...
    SWEEP_DIR/runs/centralized/s0.50/     a reference scheme (``centralized: true``): the same
                                          pruning, schedule and steps, trained centrally
    SWEEP_DIR/wer_vs_sparsity.csv / .png

Every curve is judged against two references from the same recipe, each a scheme that
copies another's pruning (``like: SCHEME``) and trains it centrally (``centralized: true``):

- the *centralized twin* (``data: clients``): on the union of the clients' data, with one
  optimizer kept across rounds: what pruning would reach if the data could be pooled;
- *server-only* (``data: server``): on the server's own data alone, like for like with the
  federated clients (a fresh optimizer every round, ``fl.centralized_optimizer: per_round``;
  the same learning-rate schedule; ``clients_per_round x local_steps`` steps of the same
  batches a round: as many samples as the round's clients together).

Each run is a subprocess of the `fedasr` CLI (its output goes to the run's log.txt), so
runs can go in parallel (``--jobs``) and a crash of one does not take the others down.
Re-running skips finished runs and resumes unfinished ones from their last checkpoint.

Several sweep jobs may share one sweep directory (a cluster's job array, each with its own
``--only``; or the same sweep started twice): a run directory is *claimed* before anything
is written to it (``RUN/.claim``, created exclusively, holding the owner's host and pid;
:func:`claim_run`), a run claimed by another job is left to it, a finished run is never
touched again, and an unfinished one is resumed by whoever claims it next. A claim whose
process is gone (same host) or whose heartbeat stopped (another host, 10 minutes) is taken
over. A job that needs the seed model waits for the job training it (or trains it, under
the seed's claim). ``--devices`` places runs on devices round robin (``--set device=``; a
Flower run's SuperNode slots too), ``--engine flower`` runs each federated run's rounds
through Flower's Deployment Engine (docs/cluster.md).

A recipe is a run's config plus the sweep's part (``seed_model:`` and ``sweep:``, the
schema below: :class:`SweepConfig`); :func:`split_recipe` parses each once. Every run is
``fedasr train SWEEP_DIR/recipe.yaml --set ...``, which ignores the sweep's part,
so a run's config.yaml records its own config only (its scheme and settings are in the
run's sweep.json).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import fcntl
import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import yaml

from fedasr.config import SWEEP_KEYS, RunConfig, parse_config, recipe_path
from fedasr.configlib import apply_overrides, from_dict, read_recipe
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError, OptionError
from fedasr.fsutil import atomic_write_bytes, atomic_write_text
from fedasr.rundir import RunDir

SWEEP_FILE = "sweep.json"


SEED_SCHEME = "seed"


# ---------------------------------------------------------------------------- schema
# A recipe holds a run's config (fedasr.config.RunConfig) and the sweep's part: the
# sections named in fedasr.config.SWEEP_KEYS, which `fedasr train` ignores.
@dataclass
class SeedModelSection:
    """The seed model `fedasr sweep` trains once, centrally on the server's own data
    (`fedasr train --centralized --data server`), before its runs; every run starts from it
    (``--init-from``). ``steps: 0`` = no seed: runs start from scratch."""

    steps: int = 0  # centralized steps on the server's data
    rounds: int = 4  # the seed run's checkpoints / dev evaluations; steps must be a multiple
    overrides: list = field(default_factory=list)  # further "key=value" settings of the seed run

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.steps < 0:
            raise FedasrError(f"{p}steps: must be >= 0 (0: no seed model)")
        if self.rounds < 1:
            raise FedasrError(f"{p}rounds: must be at least 1")
        if self.steps and self.steps % self.rounds:
            raise FedasrError(f"{p}steps: {self.steps} is not a multiple of {p}rounds ({self.rounds})")
        for i, o in enumerate(self.overrides):
            if not isinstance(o, str) or "=" not in o:
                raise FedasrError(f"{p}overrides[{i}]: expected 'key=value', got {o!r}")

    @property
    def enabled(self) -> bool:
        return self.steps > 0


@dataclass
class SweepScheme:
    """One pruning scheme of a sweep: a curve, one run per target sparsity (or per knob value)."""

    name: str = "scheme"  # the curve's name, and its runs' directory SWEEP/runs/NAME/ (not dense)
    pruning: dict = field(default_factory=dict)  # pruning.* keys of this scheme (method included)
    overrides: list = field(default_factory=list)  # further "key=value" settings
    # a reference: this scheme's pruning, overrides and sparsities are those of scheme ``like``
    # (its own overrides are added), trained centrally (centralized: true) on the clients'
    # union (data: clients, the centralized twin) or on the server's data (data: server)
    like: Optional[str] = None
    centralized: bool = False  # train centrally (fedasr train --centralized): a reference scheme
    data: str = "clients"  # centralized: on the clients' union (clients) or the server's own data (server)
    # a method that decides its own sparsity (ASP) sweeps its knob instead of the targets:
    # {key: pruning.asp.k, values: [1.5, 2.0, 2.5]}
    knob: dict = field(default_factory=dict)
    sparsities: Optional[list] = None  # this scheme's targets [default: sweep.sparsities]

    @classmethod
    def parse(cls, data, prefix: str) -> "SweepScheme":
        if not isinstance(data, dict):
            raise FedasrError(f"{prefix}: expected a mapping with name and pruning")
        if "server_only" in data:
            raise FedasrError(f"{prefix}.server_only: replaced by `centralized: true` and `data: server` (the "
                              "scheme's pruning run centrally on the server's data, like for like)")
        return from_dict(cls, data, prefix)

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.data not in ("clients", "server"):
            raise FedasrError(f"{p}data: unknown {self.data!r} (clients, server)")
        if self.data == "server" and not self.centralized:
            raise FedasrError(f"{p}data: server needs centralized: true (the server's data is never a client)")
        low = 0 if self.centralized else 1e-12  # a reference may run its own dense point
        for i, v in enumerate(self.sparsities or []):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not low <= v < 1:
                raise FedasrError(f"{p}sparsities[{i}]: must be a number in ({'[' if low == 0 else '('}0, 1)"
                                  f"{'' if low == 0 else ' (the dense run is shared)'}, got {v!r}")
        if self.knob:
            if set(self.knob) != {"key", "values"} or not isinstance(self.knob["key"], str) \
                    or not isinstance(self.knob["values"], list) or not self.knob["values"]:
                raise FedasrError(f"{p}knob: expected {{key: SETTING, values: [V, ...]}}")


@dataclass
class SweepSection:
    """One run per (scheme, sparsity); sparsity 0 is one shared dense run."""

    sparsities: list = field(default_factory=lambda: [0.0, 0.5])  # target sparsities (0: the shared dense run)
    schemes: list[SweepScheme] = field(default_factory=list)  # the pruning schemes (sweep.schemes[] below)
    splits: list = field(default_factory=list)  # test splits to evaluate [default: all]
    beam: int = 1  # the runs' test decoding: 1 = greedy (sherpa-onnx's), more = modified beam search

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        for i, s in enumerate(self.sparsities):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s < 1:
                raise FedasrError(f"{p}sparsities[{i}]: must be a number in [0, 1), got {s!r}")
        names = [sch.name for sch in self.schemes]
        if "dense" in names:
            raise FedasrError(f"{p}schemes[{names.index('dense')}].name: 'dense' is reserved for the sparsity-0 run")
        if len(set(names)) != len(names):
            raise FedasrError(f"{p}schemes: scheme names must be unique")


@dataclass
class SweepConfig:
    """The sweep's part of a recipe (its sections are ``fedasr.config.SWEEP_KEYS``)."""

    seed_model: SeedModelSection = field(default_factory=SeedModelSection)
    sweep: SweepSection = field(default_factory=SweepSection)


def split_recipe(recipe: dict) -> tuple[RunConfig, SweepConfig]:
    """A recipe's run part (what every run starts from) and its sweep part, each parsed
    and checked (the method blocks too)."""
    from fedasr.methods import validate

    cfg = parse_config(recipe)
    validate(cfg)
    return cfg, from_dict(SweepConfig, {k: v for k, v in recipe.items() if k in SWEEP_KEYS})


# ---------------------------------------------------------------------------- plan
@dataclass
class SweepRun:
    scheme: str
    sparsity: float  # the target (0 for a knob scheme: the method decides)
    path: Path
    settings: list[str]  # --set overrides on top of the recipe
    knob: dict | None = None  # {key, value} of a knob scheme
    rounds: int = 0  # the run's rounds (its progress)
    train_args: list[str] = field(default_factory=list)  # further `fedasr train` options
    from_seed: bool = False  # starts from the seed model (--init-from)
    reference: str = ""  # "" (a federated run), "centralized" (the twin) or "server-only"


@dataclass
class SweepPlan:
    """A sweep, planned from its (resolved) recipe: the seed run, if any, then the runs."""

    recipe: dict  # as SWEEP_DIR/recipe.yaml records it
    out: Path
    config: RunConfig  # the recipe's run part
    sweep: SweepConfig
    seed: SweepRun | None
    runs: list[SweepRun]

    @property
    def all_runs(self) -> list[SweepRun]:
        return ([self.seed] if self.seed is not None else []) + self.runs

    @property
    def total_rounds(self) -> int:
        return sum(r.rounds for r in self.all_runs)


def load_recipe(path: str | Path) -> dict:
    return read_recipe(recipe_path(path), "recipe")


def _check_run(recipe: dict, run: SweepRun) -> None:
    """A run's settings on top of the recipe make a valid run config (or a one-line error now,
    not in the middle of the sweep)."""
    from fedasr.methods import validate

    validate(parse_config(apply_overrides(recipe, run.settings)))


def _plan_seed(recipe: dict, sweep: SweepConfig, out: Path) -> SweepRun | None:
    sm = sweep.seed_model
    if not sm.enabled:
        return None
    settings = ["pruning.method=none", f"fl.rounds={sm.rounds}", "fl.clients_per_round=1", "fl.client_fraction=null",
                f"fl.local_steps={sm.steps // sm.rounds}", "fl.local_epochs=null", "eval.every=1", *sm.overrides]
    run = SweepRun(SEED_SCHEME, 0.0, out / SEED_SCHEME, settings, rounds=sm.rounds,
                   train_args=["--centralized", "--data", "server"])
    _check_run(recipe, run)
    return run


def plan_seed(recipe: dict, out: Path) -> SweepRun | None:
    """The seed run of the recipe's ``seed_model:`` block (None without one): centralized on
    the server's data, ``steps`` in ``rounds`` rounds, dense."""
    return _plan_seed(recipe, split_recipe(recipe)[1], out)


def _resolve_like(schemes: list[SweepScheme]) -> list[SweepScheme]:
    """Each scheme with ``like: OTHER`` completed from OTHER: its pruning (unless given), its
    overrides before the scheme's own, its sparsities and knob (unless given)."""
    by_name = {s.name: s for s in schemes}
    out = []
    for i, sch in enumerate(schemes):
        if sch.like is None:
            out.append(sch)
            continue
        where = f"sweep.schemes[{i}].like"
        base = by_name.get(sch.like)
        if base is None:
            raise FedasrError(f"{where}: no scheme named {sch.like!r}")
        if base.like is not None or base.centralized:
            raise FedasrError(f"{where}: {sch.like!r} is itself a reference; name a federated scheme")
        out.append(dataclasses.replace(sch, pruning=sch.pruning or copy.deepcopy(base.pruning),
                                       overrides=list(base.overrides) + list(sch.overrides),
                                       sparsities=sch.sparsities if sch.sparsities is not None else base.sparsities,
                                       knob=sch.knob or copy.deepcopy(base.knob)))
    return out


def _plan_runs(recipe: dict, cfg: RunConfig, sweep: SweepConfig, out: Path) -> list[SweepRun]:
    schemes = _resolve_like(sweep.sweep.schemes)
    if not schemes:
        raise FedasrError("sweep.schemes: the recipe lists no pruning scheme")
    rounds = cfg.fl.rounds
    from_seed = sweep.seed_model.enabled
    targets = sweep.sweep.sparsities
    runs: list[SweepRun] = []
    if any(s == 0 for s in targets):
        runs.append(SweepRun("dense", 0.0, out / "runs" / "dense", ["pruning.method=none"], rounds=rounds,
                             from_seed=from_seed))
    for i, sch in enumerate(schemes):
        where = f"sweep.schemes[{i}]"
        if "method" not in sch.pruning:
            raise FedasrError(f"{where}.pruning.method: required (the scheme's pruning method)")
        own = sch.sparsities if sch.sparsities is not None else targets
        # a reference runs its dense point (sparsity 0) only when its own list names it
        sparsities = sorted(set(own) - ({0, 0.0} if not (sch.centralized and sch.sparsities) else set()))
        train_args, extra, reference = [], [], ""
        if sch.centralized:
            train_args = ["--centralized", "--data", sch.data]
            reference = "server-only" if sch.data == "server" else "centralized"
            if sch.data == "server":  # like for like with the federated clients
                extra = ["fl.centralized_optimizer=per_round"]
        base = [f"pruning.{k}={json.dumps(v)}" for k, v in _flatten(sch.pruning).items()] + list(sch.overrides) + extra

        def add(name: str, sparsity: float, settings: list[str], knob=None):
            runs.append(SweepRun(sch.name, sparsity, out / "runs" / sch.name / name, settings, knob, rounds=rounds,
                                 train_args=list(train_args), from_seed=from_seed, reference=reference))

        if sch.knob:  # the method decides its sparsity: one run per knob value
            leaf = sch.knob["key"].rsplit(".", 1)[-1]
            for v in sch.knob["values"]:
                add(f"{leaf}{v}", 0.0, base + [f"{sch.knob['key']}={json.dumps(v)}"],
                    {"key": sch.knob["key"], "value": v})
            continue
        for s in sparsities:
            if s == 0:  # a reference's dense point
                add("s0.00", 0.0, ["pruning.method=none", *sch.overrides, *extra])
            else:
                add(f"s{s:.2f}", float(s), base + [f"pruning.target_sparsity={s}"])
    for r in runs:
        _check_run(recipe, r)
    return runs


def plan_runs(recipe: dict, out: Path) -> list[SweepRun]:
    """The runs of the recipe's ``sweep:`` section (the seed run aside), every one checked."""
    cfg, sweep = split_recipe(recipe)
    return _plan_runs(recipe, cfg, sweep, out)


def plan_sweep(recipe: dict, out: str | Path) -> SweepPlan:
    """The whole sweep of a resolved recipe (:func:`resolved_recipe`), checked before anything runs."""
    out = Path(out)
    cfg, sweep = split_recipe(recipe)
    seed = _plan_seed(recipe, sweep, out)
    return SweepPlan(recipe, out, cfg, sweep, seed, _plan_runs(recipe, cfg, sweep, out))


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a scheme's pruning settings as --set keys."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved_recipe(recipe_path: str | Path, overrides: list[str] | None = None,
                    sparsities: list[float] | None = None) -> dict:
    """The recipe with ``--set`` overrides and ``--sparsities`` applied (``--sparsities``
    replaces every target list, the schemes' own included)."""
    extra = list(overrides or [])
    if sparsities is not None:
        extra.append(f"sweep.sparsities={json.dumps(sparsities)}")
    recipe = apply_overrides(load_recipe(recipe_path), extra)
    if sparsities is not None:
        for scheme in (recipe.get("sweep") or {}).get("schemes") or []:
            if isinstance(scheme, dict):
                scheme.pop("sparsities", None)
    return recipe


def resolved_recipe_text(recipe: dict) -> str:
    """`fedasr config`: a (resolved) recipe with every key filled in, as YAML: the run config
    (:class:`RunConfig`, the pruning method blocks in full) and the sweep's part
    (:class:`SweepConfig`), each checked as `fedasr sweep` checks them."""
    from fedasr.methods import resolved_pruning

    cfg, sweep = split_recipe(recipe)
    data = cfg.to_dict()
    data["pruning"] = resolved_pruning(cfg.pruning)
    sweep_part = dataclasses.asdict(sweep)
    text = yaml.safe_dump(data, sort_keys=False)
    return (f"{text}# the sweep's part (`fedasr sweep`; `fedasr train` ignores it)\n"
            f"{yaml.safe_dump(sweep_part, sort_keys=False)}")


# ---------------------------------------------------------------------------- run
def _finished(run: SweepRun, splits: list[str]) -> bool:
    rd = RunDir(run.path)
    results, metrics = rd.results(), rd.metrics()
    return bool(metrics) and all(s in results for s in splits) and metrics[-1]["round"] >= run.rounds


def rounds_done(run: SweepRun) -> int:
    """Rounds a run has checkpointed so far (its metrics.jsonl is rewritten after each)."""
    return len(RunDir(run.path).metrics())


class SweepEvents(Protocol):
    """What a sweep reports as it goes (the CLI renders it; calls come from worker threads)."""

    def run_done(self, run: SweepRun, status: str) -> None: ...  # "done" or "skipped (finished)"
    def rounds(self, done: int, total: int) -> None: ...  # rounds of the whole sweep so far


class _NoEvents:
    def run_done(self, run, status): pass
    def rounds(self, done, total): pass


class SweepProgress:
    """The sweep's progress in rounds, not runs (a run takes minutes): a finished run counts
    all its rounds, a run in flight the rounds it has checkpointed (its metrics.jsonl)."""

    def __init__(self, runs: list[SweepRun]):
        self.runs = list(runs)
        self.total = sum(r.rounds for r in self.runs)
        self._finished: set[Path] = set()
        self._lock = threading.Lock()

    def finish(self, run: SweepRun) -> None:
        with self._lock:
            self._finished.add(run.path)

    def done(self) -> int:
        with self._lock:
            finished = set(self._finished)
        return sum(r.rounds if r.path in finished else min(r.rounds, rounds_done(r)) for r in self.runs)


@contextmanager
def _watch(progress: SweepProgress, events: SweepEvents, interval: float):
    """Report ``progress`` to ``events`` every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval):
            events.rounds(progress.done(), progress.total)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def select_runs(plan: SweepPlan, only: list[str] | None) -> list[SweepRun]:
    """The plan's runs that ``only`` selects (all without it): ``SCHEME`` (every run of the
    scheme; ``dense``, ``seed`` too) or ``SCHEME@SPARSITY`` (``fp@0.5``; a knob run by its
    directory name, ``asp@k1.5``). A selector that matches nothing is an error listing the runs."""
    if not only:
        return list(plan.runs)
    everything = plan.all_runs
    chosen: list[SweepRun] = []
    for sel in only:
        scheme, _, at = sel.partition("@")
        hits = [r for r in everything if r.scheme == scheme and (not at or r.path.name == at or _same_sparsity(r, at))]
        if not hits:
            names = ", ".join(f"{r.scheme}@{r.path.name.lstrip('s') if r.knob is None else r.path.name}"
                              if r.scheme not in ("dense", SEED_SCHEME) else r.scheme for r in everything)
            raise OptionError(f"--only {sel}: no such run (the sweep's runs: {names})")
        chosen += [r for r in hits if r not in chosen]
    return [r for r in everything if r in chosen]  # in the plan's order


def runs_to_do(plan: SweepPlan, only: list[str] | None) -> list[SweepRun]:
    """The runs ``only`` selects, the seed first when it is one of them or one of them
    starts from it."""
    chosen = select_runs(plan, only)
    seed = plan.seed
    if seed is not None and seed not in chosen and any(r.from_seed for r in chosen):
        chosen = [seed] + chosen
    return chosen


def _same_sparsity(run: SweepRun, text: str) -> bool:
    try:
        return run.knob is None and abs(float(text) - run.sparsity) < 1e-9
    except ValueError:
        return False


# ---------------------------------------------------------------------------- claims
CLAIM_FILE = ".claim"
HEARTBEAT_SECONDS = 60.0  # a claim's file is touched this often while its run goes on
STALE_SECONDS = 600.0  # a claim from another host untouched this long is taken over


def _start_time(pid: int) -> str | None:
    """A process's start time (Linux: /proc/PID/stat field 22), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _stale(path: Path, owner: dict | None) -> bool:
    """Whether the claim ``owner`` (read from ``path``) belongs to nobody any more: a process
    of this host that is gone (or whose pid now names another process), or, from another
    host, a claim whose heartbeat stopped."""
    if not owner:
        return False  # being written, or not ours to judge
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return owner.get("started") is not None and _start_time(pid) != owner.get("started")
    try:
        return time.time() - path.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False


class Claim:
    """This process's claim of a run directory (see :func:`claim_run`): released (its file
    removed) by :meth:`release`; a thread touches the file every HEARTBEAT_SECONDS."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        self._beat.join()
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


def claim_run(run_dir: Path) -> Claim | dict:
    """Claim ``run_dir`` for this process: its ``.claim`` file created exclusively (O_EXCL: one
    winner, also across hosts on a shared filesystem) and locked (flock: released by the
    kernel when the process dies), holding this host, pid and process start time. Returns
    the :class:`Claim`, or the owner's record when another live process holds it. A stale
    claim (:func:`_stale`) is taken over, one taker at a time (flock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        owner = _owner(path)
        if not _stale(path, owner):
            return owner or {"host": "?", "pid": "?"}
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # released meanwhile: try again
            return claim_run(run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner (or another taker) holds it
            os.close(fd)
            return owner
        if _owner(path) != owner or not path.exists():  # taken over (or released) meanwhile
            os.close(fd)
            return _owner(path) or owner
        os.ftruncate(fd, 0)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return Claim(path, fd)


def _owner_text(owner: dict) -> str:
    return f"{owner.get('host', '?')}:{owner.get('pid', '?')}"


# ---------------------------------------------------------------------------- run
def run_sweep(plan: SweepPlan, federation: str | Path, *, jobs: int = 1, events: SweepEvents | None = None,
              poll_interval: float = 2.0, only: list[str] | None = None, devices: list[str] | None = None,
              engine_args: list[str] | None = None) -> list[SweepRun]:
    """Train and evaluate the runs of ``plan`` that ``only`` selects (:func:`select_runs`;
    the seed first when they need it, with every core; then ``jobs`` runs at a time):
    finished runs are skipped, unfinished ones resumed, runs claimed by another job left to
    it (:func:`claim_run`). ``devices``: each run trains on the next free one (round robin);
    ``engine_args``: further `fedasr train` options of the federated runs (``--engine
    flower ...``). Returns the runs it was asked for."""
    events = events or _NoEvents()
    out, seed = plan.out, plan.seed
    fed = Federation(federation)
    splits = plan.sweep.sweep.splits or [s for s, m in fed.eval_splits.items() if m["role"] == "test"]
    for s in splits:
        if s not in fed.eval_splits:
            raise FedasrError(f"sweep.splits: unknown split {s!r} (federation has: {', '.join(fed.eval_splits)})")
    chosen = runs_to_do(plan, only)
    runs = [r for r in chosen if r is not seed]
    needs_seed = seed is not None and seed in chosen
    if needs_seed and not fed.has_server_data:
        raise FedasrError(f"seed_model: {fed.root} holds no server data to train the seed on "
                          "(shard with --server-split, or set seed_model.steps=0)")
    out.mkdir(parents=True, exist_ok=True)
    recipe_file = out / "recipe.yaml"
    text = yaml.safe_dump(plan.recipe, sort_keys=False)
    if recipe_file.is_file() and recipe_file.read_text() != text:
        raise FedasrError(f"{recipe_file}: this sweep directory was made with another recipe; use a new --out")
    atomic_write_text(recipe_file, text)
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // max(1, jobs))
    progress = SweepProgress(([seed] if needs_seed else []) + runs)
    engine_args = list(engine_args or [])
    flower = "flower" in engine_args
    # the devices: an embedded run takes one, a Flower run a group (its SuperNode slots)
    groups = [[d] for d in devices or []]
    if flower and devices:
        n = max(1, min(jobs, len(devices)))
        groups = [devices[i::n] for i in range(n)]
    free: queue.Queue = queue.Queue()  # (slot, devices): taken by a run, put back after it
    for slot in enumerate(groups):
        free.put(slot)

    def train(run: SweepRun, log: Path, threads: int, group: list[str] | None) -> None:
        federated = "--centralized" not in run.train_args
        extra = engine_args if federated else []
        if group and federated and flower:
            extra = extra + [a for d in group for a in ("--devices", d)]
        if RunDir(run.path).latest() is not None:
            _cli(["train", "--resume", str(run.path), *extra, *(["--device", group[0]] if group else [])], log, threads)
            return
        args = list(run.train_args)
        if run.from_seed:
            args += ["--init-from", str(seed_checkpoint(seed))]
        sets = [a for s in run.settings + ([f"device={group[0]}"] if group else []) for a in ("--set", s)]
        # --overwrite: under this job's claim, what is there is an unfinished run's start (no checkpoint)
        _cli(["train", str(recipe_file), "--federation", str(fed.root), "--out", str(run.path),
              "--overwrite", *args, *extra, *sets], log, threads)

    def one(run: SweepRun, threads: int = threads, claim: Claim | None = None) -> SweepRun:
        if claim is None:
            if _finished(run, splits):
                progress.finish(run)
                events.run_done(run, "skipped (finished)")
                return run
            claim = claim_run(run.path)
            if not isinstance(claim, Claim):
                events.run_done(run, f"skipped (claimed by {_owner_text(claim)})")
                return run
        slot, group = free.get() if groups else (None, None)
        try:
            if _finished(run, splits):  # finished by another job meanwhile: never touched again
                progress.finish(run)
                events.run_done(run, "skipped (finished)")
                return run
            atomic_write_text(run.path / SWEEP_FILE, json.dumps({
                "scheme": run.scheme, "sparsity": run.sparsity, "settings": run.settings, "knob": run.knob,
                "reference": run.reference, "device": ",".join(group) if group else None, "device_slot": slot}))
            log = run.path / "log.txt"
            train(run, log, threads, group)
            evals = [a for s in splits for a in ("--split", s)]
            _cli(["eval", str(run.path), "--beam", str(plan.sweep.sweep.beam), *evals,
                  *(["--device", group[0]] if group else [])], log, threads)
        finally:
            if group is not None:
                free.put((slot, group))
            claim.release()
        progress.finish(run)
        events.run_done(run, "done")
        return run

    def ensure_seed() -> None:
        """The seed model, trained here (under its claim) or waited for (another job's)."""
        told = False
        while not _finished(seed, splits):
            claim = claim_run(seed.path)
            if isinstance(claim, Claim):
                one(seed, threads=cpus, claim=claim)
                continue
            if not told:
                events.run_done(seed, f"waiting (trained by {_owner_text(claim)})")
                told = True
            time.sleep(poll_interval)
        progress.finish(seed)

    with _watch(progress, events, poll_interval):
        if needs_seed:  # once, before every run, with every core
            ensure_seed()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            list(ex.map(one, runs))
    events.rounds(progress.done(), progress.total)
    return chosen


def seed_checkpoint(seed: SweepRun) -> Path:
    latest = RunDir(seed.path).latest()
    if latest is None:
        raise FedasrError(f"{seed.path}: the seed model has no checkpoint")
    return latest


def _cli(args: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as f:
        f.write(f"$ fedasr {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "-m", "fedasr.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise FedasrError(f"{log.parent}: `fedasr {args[0]}` failed: {tail[0]}")


# ---------------------------------------------------------------------------- report
def collect(sweep_dir: str | Path) -> tuple[list[dict], list[str]]:
    from fedasr import codec
    from fedasr.checkpoint import read_checkpoint
    from fedasr.fl.server import is_bn_stat

    sweep_dir = Path(sweep_dir)
    rows, splits = [], []
    run_files = sorted((sweep_dir / SEED_SCHEME).glob(SWEEP_FILE)) + sorted((sweep_dir / "runs").glob(f"**/{SWEEP_FILE}"))
    if not run_files:
        raise FedasrError(f"{sweep_dir}: no sweep runs found (run `fedasr sweep` first)")
    for f in run_files:
        run = RunDir(f.parent)
        meta = json.loads(f.read_text())
        results = run.results()
        latest = run.latest()
        if not results or latest is None:
            continue  # unfinished run
        metrics = run.metrics()
        ckpt = read_checkpoint(latest)
        params = {k: v for k, v in ckpt["model"].items() if not is_bn_stat(k)}
        knob = meta.get("knob")
        row = {"scheme": meta["scheme"], "sparsity": meta["sparsity"],
               "knob": f"{knob['key'].rsplit('.', 1)[-1]}={knob['value']}" if knob else "",
               "achieved_sparsity": round(metrics[-1].get("sparsity", 0.0), 5)}
        for split, r in sorted(results.items()):
            row[f"wer_{split}"] = round(r["wer"], 5)
            if split not in splits:
                splits.append(split)
        row["nonzero_params"] = sum(int((v != 0).sum()) for v in params.values())
        row["model_bytes"] = len(codec.encode(params, ckpt["masks"]))
        row["comm_bytes"] = sum(m["bytes_down"] + m["bytes_up"] for m in metrics)
        row["num_params"] = metrics[-1].get("num_params", sum(v.numel() for v in params.values()))
        row["rounds"] = metrics[-1]["round"]
        row["reference"] = meta.get("reference", "")
        rows.append(row)
    rows.sort(key=lambda r: (r["scheme"] != SEED_SCHEME, r["scheme"] != "dense", r["scheme"], r["sparsity"],
                             r["achieved_sparsity"]))
    return rows, sorted(splits)


REFERENCE_STYLE = {"centralized": dict(color="0.15", ls="-.", marker="s"),
                   "server-only": dict(color="0.45", ls="--", marker="v")}


def _scheme_style(rows: list[dict], colors: dict, sch: str) -> dict:
    ref = next((r.get("reference") for r in rows if r["scheme"] == sch and r.get("reference")), "")
    if ref:
        return {**REFERENCE_STYLE[ref], "label": f"{sch} (reference)" if sch != ref else sch}
    return dict(color=colors[sch], ls="-", marker="o", label=sch)


def plot_curves(rows: list[dict], splits: list[str], title: str):
    """One panel per split: WER vs sparsity, one line per scheme, the references (the
    centralized twin, server-only) in grey, the dense WER as a dashed line and each point
    labelled with its model size; a last panel: WER vs model size (sparse-encoded MB), where
    an engineer picks a point by the size budget."""
    import matplotlib.pyplot as plt

    dense = [r for r in rows if r["scheme"] == "dense"]
    seed = [r for r in rows if r["scheme"] == SEED_SCHEME]
    schemes = sorted({r["scheme"] for r in rows} - {"dense", SEED_SCHEME})
    colors = {sch: f"C{i}" for i, sch in enumerate(schemes)}
    fig, axes = plt.subplots(1, len(splits) + 1, figsize=(5.2 * (len(splits) + 1), 4.2), squeeze=False)
    for ax, split in zip(axes[0], splits):
        key = f"wer_{split}"
        if dense and key in dense[0]:
            ax.axhline(100 * dense[0][key], color="0.4", ls="--", lw=1,
                       label=f"dense {100 * dense[0][key]:.1f}% ({dense[0]['model_bytes'] / 1e6:.1f} MB)")
        if seed and key in seed[0]:
            ax.axhline(100 * seed[0][key], color="0.6", ls=":", lw=1.2,
                       label=f"seed model (server data) {100 * seed[0][key]:.1f}%")
        for sch in schemes:
            own = [r for r in rows if r["scheme"] == sch]
            knobbed = any(r.get("knob") for r in own)  # the method chose its sparsity: points
            alone = knobbed or any(r.get("reference") for r in own)  # no federated dense start
            pts = sorted((r for r in (own if alone else dense + own) if key in r),
                         key=lambda r: r["achieved_sparsity"])
            style = _scheme_style(rows, colors, sch)
            if knobbed:
                style.update(marker="D", ls=":")
            ax.plot([100 * r["achieved_sparsity"] for r in pts], [100 * r[key] for r in pts], **style)
            for r in pts:
                if r["scheme"] != "dense":
                    label = f"{r['model_bytes'] / 1e6:.1f} MB" + (f" ({r['knob']})" if r.get("knob") else "")
                    ax.annotate(label, (100 * r["achieved_sparsity"], 100 * r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
        ax.set_title(split)
        ax.set_xlabel("sparsity of prunable weights (%)")
        ax.set_ylabel("WER (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for i, split in enumerate(splits):
        key = f"wer_{split}"
        for sch in schemes:
            own = [r for r in rows if r["scheme"] == sch]
            alone = any(r.get("knob") or r.get("reference") for r in own)  # as in the sparsity panels
            pts = sorted((r for r in (own if alone else dense + own) if key in r), key=lambda r: r["model_bytes"])
            ax.plot([r["model_bytes"] / 1e6 for r in pts], [100 * r[key] for r in pts], marker="os^v"[i % 4],
                    ls=["-", ":", "-.", "--"][i % 4], color=colors[sch], label=f"{sch} · {split}")
        if dense and key in dense[0]:
            ax.plot([dense[0]["model_bytes"] / 1e6], [100 * dense[0][key]], marker="*", ms=10, color="0.3", ls="",
                    label=f"dense · {split}")
        if seed and key in seed[0]:
            ax.plot([seed[0]["model_bytes"] / 1e6], [100 * seed[0][key]], marker="x", ms=8, color="0.5", ls="",
                    label=f"seed · {split}")
    ax.set_title("WER vs model size")
    ax.set_xlabel("model size, sparse-encoded (MB)")
    ax.set_ylabel("WER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_report(sweep_dir: str | Path) -> tuple[list[dict], list[str], Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    rows, splits = collect(sweep_dir)
    if not rows:
        raise FedasrError(f"{sweep_dir}: no finished run to report")
    cols = ["scheme", "reference", "sparsity", "knob", "achieved_sparsity", *[f"wer_{s}" for s in splits], "nonzero_params",
            "num_params", "model_bytes", "comm_bytes", "rounds"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    csv_path = sweep_dir / "wer_vs_sparsity.csv"
    atomic_write_text(csv_path, buf.getvalue())

    fig = plot_curves(rows, splits, f"WER vs sparsity — {sweep_dir.name}")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    png_path = sweep_dir / "wer_vs_sparsity.png"
    atomic_write_bytes(png_path, png.getvalue())
    return rows, splits, csv_path, png_path
