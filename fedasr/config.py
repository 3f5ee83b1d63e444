"""Run configuration: YAML recipes -> typed dataclasses.

Unknown keys and values of the wrong type are errors that name the key
(``fl.rounds: expected int, got 'ten'``). Every key can be overridden on the command
line with ``--set section.key=value`` (the value is parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from fedasr.errors import FedasrError


@dataclass
class ModelSection:
    """The model: a named preset plus optional overrides of any ModelConfig field."""

    preset: str = "tiny"
    overrides: dict = field(default_factory=dict)


@dataclass
class TrainSection:
    """The local trainer, shared by centralized runs and federated clients."""

    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd: heavy-ball momentum (0: plain SGD)
    weight_decay: float = 1e-6
    warmup_steps: int = 100
    lr_schedule: str = "noam"  # noam (warm-up then 1/sqrt decay) | constant (after warm-up) | eden
    lr_decay_steps: int = 1000  # eden: steps where the decay sets in
    grad_clip: float = 5.0
    max_duration: float = 40.0  # seconds of audio per batch
    max_batch: Optional[int] = None  # utterances per batch at most
    num_buckets: int = 4
    ctc_weight: float = 0.3
    simple_loss_weight: float = 0.0  # auxiliary simple transducer loss (needs model simple_head: true)
    # full: the joiner on every (frame, label position) | pruned: only in a band of
    # prune_range label positions per frame chosen by the simple loss (k2's pruned RNN-T loss;
    # needs simple_head and simple_loss_weight > 0)
    loss: str = "full"
    prune_range: int = 5
    prune_warmup_steps: int = 0  # pruned: its weight rises linearly from 0.1 to 1 over these steps
    spec_augment: bool = True

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not self.lr > 0:
            raise FedasrError(f"{p}lr: must be positive")
        if self.max_duration <= 0:
            raise FedasrError(f"{p}max_duration: must be positive")
        if self.warmup_steps < 0:
            raise FedasrError(f"{p}warmup_steps: must be >= 0")
        if self.optimizer not in ("adamw", "sgd"):
            raise FedasrError(f"{p}optimizer: unknown {self.optimizer!r} (adamw, sgd)")
        if not 0.0 <= self.momentum < 1.0:
            raise FedasrError(f"{p}momentum: must be in [0, 1)")
        if self.lr_schedule not in ("noam", "constant", "eden"):
            raise FedasrError(f"{p}lr_schedule: unknown {self.lr_schedule!r} (noam, constant, eden)")
        if self.lr_decay_steps < 1:
            raise FedasrError(f"{p}lr_decay_steps: must be at least 1")
        for key in ("ctc_weight", "simple_loss_weight"):
            if getattr(self, key) < 0:
                raise FedasrError(f"{p}{key}: must be >= 0")
        if self.loss not in ("full", "pruned"):
            raise FedasrError(f"{p}loss: unknown {self.loss!r} (full, pruned)")
        if isinstance(self.prune_range, bool) or not isinstance(self.prune_range, int) or self.prune_range < 2:
            raise FedasrError(f"{p}prune_range: must be an integer >= 2, got {self.prune_range!r}")
        if isinstance(self.prune_warmup_steps, bool) or not isinstance(self.prune_warmup_steps, int) \
                or self.prune_warmup_steps < 0:
            raise FedasrError(f"{p}prune_warmup_steps: must be an integer >= 0, got {self.prune_warmup_steps!r}")
        if self.loss == "pruned" and not self.simple_loss_weight > 0:
            raise FedasrError(f"{p}loss: pruned needs {p}simple_loss_weight > 0 "
                              "(the simple loss chooses the pruning ranges)")


@dataclass
class EvalSection:
    every: int = 1  # dev evaluation every k rounds and after the last (0: after the last only)
    dev_max_utterances: Optional[int] = 200
    beam: int = 1  # dev decoding: 1 = greedy, more = modified beam search
    max_duration: float = 120.0

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.every < 0:
            raise FedasrError(f"{p}every: must be >= 0 (0 = only after the last round)")
        if self.beam < 1:
            raise FedasrError(f"{p}beam: must be at least 1")
        if self.dev_max_utterances is not None and self.dev_max_utterances < 1:
            raise FedasrError(f"{p}dev_max_utterances: must be at least 1 (or null for all)")
        if not self.max_duration > 0:
            raise FedasrError(f"{p}max_duration: must be positive")

    def due(self, rnd: int, last: int) -> bool:
        return rnd == last or (self.every > 0 and rnd % self.every == 0)


AGGREGATIONS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedlamb")
SERVER_LR_SCHEDULES = ("constant", "cosine", "step")
WEIGHTINGS = ("examples", "processed", "uniform")
CLIENT_MODELS = ("masked", "compact", "auto")
# fl.server_lr when the recipe gives none. FedAvg/FedAvgM: 1.0 is plain averaging (FedAvgM's
# effective step is 1/(1-momentum) times larger). FedAdam/FedYogi normalise each weight's
# step to ~server_lr, so 1.0 would move every weight by ~1 in round one; Reddi et al. (2021)
# found their best server learning rates around 1e-2 (tau = 1e-3). FedLAMB moves each tensor
# by server_lr times its own norm per round (a relative step).
SERVER_LR_DEFAULTS = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedlamb": 0.01}


@dataclass
class FLSection:
    """Federated rounds. A centralized run (``--centralized``) uses the same number of
    rounds with ``clients_per_round x local_steps`` steps per round on the union of the
    clients' data, i.e. the same compute as the federated run."""

    rounds: int = 10
    clients_per_round: int = 4
    client_fraction: Optional[float] = None  # overrides clients_per_round when set
    local_steps: Optional[int] = 20
    local_epochs: Optional[int] = None  # instead of local_steps
    aggregation: str = "fedavg"
    # examples: the client's dataset size n_k (utterances; McMahan et al.) | processed:
    # utterances the client processed this round (repeats included) | uniform
    weighting: str = "examples"
    server_lr: Optional[float] = None  # [default: per aggregation, see SERVER_LR_DEFAULTS]
    server_momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam / fedyogi
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity (epsilon) of fedadam / fedyogi / fedlamb
    min_clients: int = 1
    # server learning rate by round: linear warm-up over the first server_lr_warmup_rounds
    # rounds, then constant | cosine (to 0 at fl.rounds) | step (x server_lr_gamma every
    # server_lr_step_rounds rounds)
    server_lr_schedule: str = "constant"
    server_lr_warmup_rounds: int = 0
    server_lr_step_rounds: int = 10
    server_lr_gamma: float = 0.5
    # what a client trains when the round's masks remove whole units: masked (the full model
    # with zeros) | compact (the physically smaller dense model; masks of another kind are an
    # error) | auto (compact where the masks allow, masked otherwise)
    client_model: str = "masked"

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if self.rounds < 1:
            raise FedasrError(f"{p}rounds: must be at least 1")
        if self.clients_per_round < 1:
            raise FedasrError(f"{p}clients_per_round: must be at least 1")
        if self.client_fraction is not None and not 0 < self.client_fraction <= 1:
            raise FedasrError(f"{p}client_fraction: must be in (0, 1]")
        if (self.local_steps is None) == (self.local_epochs is None):
            raise FedasrError(f"{p}local_steps: set exactly one of local_steps and local_epochs")
        if self.local_steps is not None and self.local_steps < 1:
            raise FedasrError(f"{p}local_steps: must be at least 1")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise FedasrError(f"{p}local_epochs: must be at least 1")
        if self.aggregation not in AGGREGATIONS:
            raise FedasrError(f"{p}aggregation: unknown {self.aggregation!r} ({', '.join(AGGREGATIONS)})")
        if self.weighting not in WEIGHTINGS:
            raise FedasrError(f"{p}weighting: unknown {self.weighting!r} ({', '.join(WEIGHTINGS)})")
        if self.server_lr is not None and not self.server_lr > 0:
            raise FedasrError(f"{p}server_lr: must be positive")
        if self.min_clients < 1:
            raise FedasrError(f"{p}min_clients: must be at least 1")
        if self.server_lr_schedule not in SERVER_LR_SCHEDULES:
            raise FedasrError(f"{p}server_lr_schedule: unknown {self.server_lr_schedule!r} "
                              f"({', '.join(SERVER_LR_SCHEDULES)})")
        if self.server_lr_warmup_rounds < 0:
            raise FedasrError(f"{p}server_lr_warmup_rounds: must be >= 0")
        if self.server_lr_step_rounds < 1:
            raise FedasrError(f"{p}server_lr_step_rounds: must be at least 1")
        if not 0 < self.server_lr_gamma <= 1:
            raise FedasrError(f"{p}server_lr_gamma: must be in (0, 1]")
        if self.client_model not in CLIENT_MODELS:
            raise FedasrError(f"{p}client_model: unknown {self.client_model!r} ({', '.join(CLIENT_MODELS)})")

    @property
    def effective_server_lr(self) -> float:
        return self.server_lr if self.server_lr is not None else SERVER_LR_DEFAULTS[self.aggregation]

    def server_lr_at(self, rnd: int) -> float:
        """The server learning rate of round ``rnd`` (1-based) under the schedule."""
        lr, w = self.effective_server_lr, self.server_lr_warmup_rounds
        if rnd <= w:
            return lr * rnd / w
        if self.server_lr_schedule == "step":
            return lr * self.server_lr_gamma ** ((rnd - 1 - w) // self.server_lr_step_rounds)
        if self.server_lr_schedule == "cosine":
            t = min(1.0, (rnd - 1 - w) / max(1, self.rounds - w))
            return lr * 0.5 * (1.0 + math.cos(math.pi * t))
        return lr


DEFAULT_PRUNABLE = ["encoder.layers.*", "predictor.lstm.*", "predictor.conv.*", "joiner.*"]
COMMON_PRUNING_KEYS = ("method", "target_sparsity", "include", "exclude")


@dataclass
class PruningSection:
    """In-round pruning. ``method`` selects a registered pruning method (``none`` trains
    dense); its own settings are in the block named after it (``pruning.fedtiny: {...}``).
    ``target_sparsity``, ``include`` and ``exclude`` are common to every method."""

    method: str = "none"
    target_sparsity: float = 0.5  # share of the prunable weights that are zero at the end
    include: list = field(default_factory=lambda: list(DEFAULT_PRUNABLE))  # name globs (>= 2-D tensors)
    exclude: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)  # method name -> its parsed config block

    @classmethod
    def parse(cls, data: dict, prefix: str) -> "PruningSection":
        from fedasr.methods.base import registry

        methods = registry()
        p = f"{prefix}." if prefix else ""
        common, blocks = {}, {}
        for k, v in data.items():
            if k in COMMON_PRUNING_KEYS:
                common[k] = v
            elif k in methods and methods[k].Config is not None:
                if v is not None and not isinstance(v, dict):
                    raise FedasrError(f"{p}{k}: expected a mapping of {k}'s settings, got {v!r}")
                blocks[k] = from_dict(methods[k].Config, v if v is not None else {}, f"{p}{k}")
            else:
                known = list(COMMON_PRUNING_KEYS) + sorted(n for n, m in methods.items() if m.Config is not None)
                raise FedasrError(f"{p}{k}: unknown key (known: {', '.join(known)})")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], f"{p}{k}") for k, v in common.items()}
        obj = cls(**kwargs, blocks=blocks)
        if obj.method not in methods:
            raise FedasrError(f"{p}method: unknown {obj.method!r} ({', '.join(sorted(methods))})")
        if not 0.0 <= obj.target_sparsity < 1.0:
            raise FedasrError(f"{p}target_sparsity: must be in [0, 1), got {obj.target_sparsity}")
        cfg_cls = methods[obj.method].Config
        if cfg_cls is not None and obj.method not in blocks:
            obj.blocks[obj.method] = from_dict(cfg_cls, {}, f"{p}{obj.method}")
        block = obj.blocks.get(obj.method)
        check = getattr(block, "check_common", None)
        if check is not None:
            check(obj, f"{p}{obj.method}")
        return obj

    def block(self, method: str):
        """The config block of ``method`` (its defaults when the recipe gives none)."""
        if method not in self.blocks:
            from fedasr.methods.base import registry

            cfg_cls = registry()[method].Config
            return cfg_cls() if cfg_cls is not None else None
        return self.blocks[method]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in COMMON_PRUNING_KEYS}
        d.update({name: dataclasses.asdict(b) for name, b in self.blocks.items()})
        return d


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
    name: str = "scheme"
    pruning: dict = field(default_factory=dict)  # pruning.* keys of this scheme (method included)
    overrides: list = field(default_factory=list)  # further "key=value" settings
    # the paper's baseline: one-shot prune of the seed model at each sparsity (the scheme's
    # federated_pruning pattern/importance/allocation), then fine-tuning on the server's data
    # alone for as many steps as a federated run's clients take together
    server_only: bool = False
    # a method that decides its own sparsity (ASP) sweeps its knob instead of the targets:
    # {key: pruning.asp.k, values: [1.5, 2.0, 2.5]}
    knob: dict = field(default_factory=dict)
    sparsities: Optional[list] = None  # this scheme's targets [default: sweep.sparsities]

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        for i, v in enumerate(self.sparsities or []):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                raise FedasrError(f"{p}sparsities[{i}]: must be a number in (0, 1), got {v!r}")
        if self.knob:
            if set(self.knob) != {"key", "values"} or not isinstance(self.knob["key"], str) \
                    or not isinstance(self.knob["values"], list) or not self.knob["values"]:
                raise FedasrError(f"{p}knob: expected {{key: SETTING, values: [V, ...]}}")


@dataclass
class SweepSection:
    """Used by `fedasr sweep`: one run per (scheme, sparsity); sparsity 0 is one shared dense run."""

    sparsities: list = field(default_factory=lambda: [0.0, 0.5])
    schemes: list = field(default_factory=list)  # of SweepScheme mappings
    splits: list = field(default_factory=list)  # test splits to evaluate [default: all]
    beam: int = 1

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        for i, s in enumerate(self.sparsities):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s < 1:
                raise FedasrError(f"{p}sparsities[{i}]: must be a number in [0, 1), got {s!r}")
        names = []
        for i, sch in enumerate(self.schemes):
            if not isinstance(sch, dict):
                raise FedasrError(f"{p}schemes[{i}]: expected a mapping with name and pruning")
            obj = from_dict(SweepScheme, sch, f"{p}schemes[{i}]")
            names.append(obj.name)
            if obj.name == "dense":
                raise FedasrError(f"{p}schemes[{i}].name: 'dense' is reserved for the sparsity-0 run")
        if len(set(names)) != len(names):
            raise FedasrError(f"{p}schemes: scheme names must be unique")


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N — where clients train
    keep_checkpoints: int = 3  # newest round checkpoints kept (0 = all)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    fl: FLSection = field(default_factory=FLSection)
    eval: EvalSection = field(default_factory=EvalSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    seed_model: SeedModelSection = field(default_factory=SeedModelSection)
    sweep: SweepSection = field(default_factory=SweepSection)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pruning"] = self.pruning.to_dict()
        return d

    def validate(self, prefix: str) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise FedasrError(f"device: unknown {self.device!r} (auto, cpu, cuda, cuda:N)")
        if self.pruning.method == "fedtiny" and self.model.overrides.get("conv_norm") == "layernorm":
            raise FedasrError("pruning.method: fedtiny needs model.overrides.conv_norm: batchnorm "
                              "(its mask selection recomputes BatchNorm statistics)")
        if self.fl.client_model == "compact":
            from fedasr.methods.base import registry

            method = self.pruning.method
            why = registry()[method].whole_unit_masks(self.pruning.block(method))
            if why is not None:
                raise FedasrError(f"fl.client_model: compact needs masks that remove whole units, "
                                  f"but {why} (use fl.client_model: auto to fall back to masked training)")


def resolve_device(name: str):
    """A torch.device for ``auto``/``cpu``/``cuda[:N]``; asking for CUDA without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedasrError(f"device: {name} requested but no CUDA device is available")
    return torch.device(name)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except FedasrError:
                continue
        raise FedasrError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FedasrError(f"{key}: expected a mapping, got {value!r}")
        parse = getattr(tp, "parse", None)
        return parse(value, key) if parse is not None else from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FedasrError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FedasrError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise FedasrError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise FedasrError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise FedasrError(f"{key}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp) or (Any,)
            return [v if inner is Any else _coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        raise FedasrError(f"{key}: expected a list, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise FedasrError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(prefix)
    return obj


def parse_config(data: dict | None) -> RunConfig:
    return from_dict(RunConfig, dict(data or {}))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides (value parsed as YAML) to a raw config dict."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise FedasrError(f"--set {item}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FedasrError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file whose top level is a mapping; problems are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FedasrError(f"{path}: {what} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FedasrError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FedasrError(f"{path}: expected a mapping at the top level")
    return data


def merge_mappings(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_mappings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, what: str = "config file", _seen: tuple = ()) -> dict:
    """A recipe file; ``extends: OTHER.yaml`` (relative to the file) starts from another recipe
    and changes only what this one says (mappings merge, lists and values replace)."""
    path = Path(path)
    data = read_yaml_mapping(path, what)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise FedasrError(f"{path}: extends: expected a file name, got {parent!r}")
    base, seen = (path.parent / parent).resolve(), _seen + (path.resolve(),)
    if base in seen:
        raise FedasrError(f"{path}: extends: {parent} leads back to this file")
    return merge_mappings(read_recipe(base, what, seen), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = read_recipe(path) if path is not None else {}
    return parse_config(apply_overrides(data, overrides or []))
