"""The run configuration's schema: one dataclass per section of a recipe, with its checks.

Recipes are read and parsed by the generic loader :mod:`fedasr.configlib`: unknown keys
and values of the wrong type are errors that name the key (``fl.rounds: expected an
integer, got 'ten'``), and every key can be overridden on the command line with
``--set section.key=value`` (the value is parsed as YAML).

The pruning methods' own blocks (``pruning.NAME: {...}``) are kept here as raw mappings:
the method layer parses and checks them (:func:`fedasr.methods.validate`), so parsing a
config imports neither the methods nor torch. A recipe may also hold the sweep's part
(``SWEEP_KEYS``, read by :mod:`fedasr.sweep`); a run's config ignores it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fedasr.configlib import apply_overrides, coerce, from_dict, read_recipe
from fedasr.errors import FedasrError


@dataclass
class ModelSection:
    """The model: a named preset plus optional overrides of any architecture field
    (`model.overrides` below)."""

    preset: str = "tiny"  # tiny (2.9M parameters) | small (9.2M, Conformer-S-like) | medium (29.0M)
    overrides: dict = field(default_factory=dict)  # architecture fields replacing the preset's (model.overrides.*)


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainSection:
    """The local trainer, shared by centralized runs and federated clients."""

    optimizer: str = "adamw"  # the local optimizer: adamw | sgd
    lr: float = 1e-3  # peak learning rate (reached at the end of the warm-up)
    momentum: float = 0.9  # sgd: heavy-ball momentum (0: plain SGD)
    weight_decay: float = 1e-6  # decoupled weight decay (adamw) or L2 penalty (sgd)
    warmup_steps: int = 100  # linear warm-up of the learning rate over these local steps
    # a run started with --init-from continues at its checkpoint's schedule position (the
    # learning rate the recipe asks for: past the warm-up); true: warm up again from step 0
    warmup_on_init: bool = False
    lr_schedule: str = "noam"  # noam (warm-up then 1/sqrt decay) | constant (after warm-up) | eden
    lr_decay_steps: int = 1000  # eden: steps where the decay sets in
    grad_clip: float = 5.0  # the gradients' global norm is clipped to this (0: no clipping)
    max_duration: float = 40.0  # seconds of audio per batch
    max_batch: Optional[int] = None  # utterances per batch at most
    # lhotse's duration buckets the batches are drawn from (utterances of similar length
    # together); 1: batches of random utterances
    num_buckets: int = 4
    ctc_weight: float = 0.3  # weight of the auxiliary CTC loss on the encoder output
    simple_loss_weight: float = 0.0  # auxiliary simple transducer loss (needs model simple_head: true)
    # full: the joiner on every (frame, label position) | pruned: only in a band of
    # prune_range label positions per frame chosen by the simple loss (k2's pruned RNN-T loss;
    # needs simple_head and simple_loss_weight > 0)
    loss: str = "full"
    prune_range: int = 5  # pruned: label positions per frame the joiner is evaluated on (S)
    prune_warmup_steps: int = 0  # pruned: its weight rises linearly from 0.1 to 1 over these steps
    spec_augment: bool = True  # SpecAugment: 2 frequency masks of at most 27 bins, 4 time masks of at most 5%
    # fp32 | bf16: the model's forward under bfloat16 autocast (the losses, the RNN-T recursions,
    # the conv modules' norms and the optimizer stay in float32; evaluation is in float32)
    precision: str = "fp32"
    prefetch: int = 2  # batches collated ahead by a background thread (pinned memory on CUDA); 0: none

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
        if self.precision not in PRECISIONS:
            raise FedasrError(f"{p}precision: unknown {self.precision!r} ({', '.join(PRECISIONS)})")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise FedasrError(f"{p}prefetch: must be an integer >= 0, got {self.prefetch!r}")
        if self.loss == "pruned" and not self.simple_loss_weight > 0:
            raise FedasrError(f"{p}loss: pruned needs {p}simple_loss_weight > 0 "
                              "(the simple loss chooses the pruning ranges)")


@dataclass
class EvalSection:
    """Dev evaluation during training (on the federation's dev split, decoded on the server)."""

    every: int = 1  # dev evaluation every k rounds and after the last (0: after the last only)
    dev_max_utterances: Optional[int] = 200  # dev utterances decoded at most (a fixed spread by id; null: all)
    beam: int = 1  # dev decoding: 1 = greedy, more = modified beam search
    max_duration: float = 120.0  # seconds of audio per decoding batch

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
CENTRALIZED_OPTIMIZERS = ("persistent", "per_round")
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

    rounds: int = 10  # federated rounds (a checkpoint after each)
    clients_per_round: int = 4  # clients sampled each round (seeded)
    client_fraction: Optional[float] = None  # overrides clients_per_round when set
    local_steps: Optional[int] = 20  # optimizer steps each client takes per round (null: local_epochs)
    local_epochs: Optional[int] = None  # passes over the client's data per round, instead of local_steps
    # the server's optimizer over the averaged update: fedavg | fedavgm (momentum) | fedadam |
    # fedyogi (Reddi et al. 2021) | fedlamb (FedAdam's moments, a layer-wise normalised step)
    aggregation: str = "fedavg"
    # examples: the client's dataset size n_k (utterances; McMahan et al.) | processed:
    # utterances the client processed this round (repeats included) | uniform
    weighting: str = "examples"
    # the server's step on the averaged update [default: per aggregation: 1.0 for fedavg and
    # fedavgm (plain averaging), 0.01 for fedadam, fedyogi and fedlamb]
    server_lr: Optional[float] = None
    server_momentum: float = 0.9  # fedavgm: the server's momentum
    beta1: float = 0.9  # fedadam / fedyogi / fedlamb: first-moment decay
    beta2: float = 0.99  # fedadam / fedyogi / fedlamb: second-moment decay
    tau: float = 1e-3  # adaptivity (epsilon) of fedadam / fedyogi / fedlamb
    min_clients: int = 1  # a round goes on while at least this many clients succeed (else the run stops)
    # server learning rate by round: linear warm-up over the first server_lr_warmup_rounds
    # rounds, then constant | cosine (to 0 at fl.rounds) | step (x server_lr_gamma every
    # server_lr_step_rounds rounds)
    server_lr_schedule: str = "constant"
    server_lr_warmup_rounds: int = 0  # rounds of linear server learning-rate warm-up
    server_lr_step_rounds: int = 10  # step: rounds between two decays
    server_lr_gamma: float = 0.5  # step: the factor of each decay
    # what a client trains when the round's masks remove whole units: masked (the full model
    # with zeros) | compact (the physically smaller dense model; masks of another kind are an
    # error) | auto (compact where the masks allow, masked otherwise)
    client_model: str = "masked"
    # a centralized run (--centralized): one optimizer kept across rounds (persistent), or a
    # fresh one every round as federated clients start theirs (per_round: the server-only
    # baseline compared like for like)
    centralized_optimizer: str = "persistent"

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
        if self.centralized_optimizer not in CENTRALIZED_OPTIMIZERS:
            raise FedasrError(f"{p}centralized_optimizer: unknown {self.centralized_optimizer!r} "
                              f"({', '.join(CENTRALIZED_OPTIMIZERS)})")
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
COMMON_PRUNING_KEYS = ("method", "target_sparsity", "include", "exclude", "recalibrate_bn")


@dataclass
class PruningSection:
    """In-round pruning. ``method`` selects a registered pruning method (``none`` trains
    dense); its own settings are in the block named after it (``pruning.fedtiny: {...}``).
    ``target_sparsity``, ``include`` and ``exclude`` are common to every method.

    Every other key is kept in ``blocks`` as given (a method's raw settings): the method
    layer knows the methods, parses each block into its method's ``Config`` and rejects
    unknown names (:func:`fedasr.methods.method_blocks`)."""

    method: str = "none"  # the pruning method (a registered name, below; none: dense training)
    target_sparsity: float = 0.5  # share of the prunable weights that are zero at the end
    include: list = field(default_factory=lambda: list(DEFAULT_PRUNABLE))  # name globs of the prunable tensors (only >= 2-D ones count)
    exclude: list = field(default_factory=list)  # name globs of tensors never pruned
    # after every change of the masks the server recomputes the BatchNorm statistics of the
    # served model on this many batches of its own data (0: off; they stay the clients' pooled ones)
    recalibrate_bn: int = 0
    blocks: dict = field(default_factory=dict)  # method name -> its settings, raw (as the recipe gives them)

    @classmethod
    def parse(cls, data, prefix: str) -> "PruningSection":
        if not isinstance(data, dict):
            raise FedasrError(f"{prefix}: expected a mapping, got {data!r}")
        p = f"{prefix}." if prefix else ""
        hints = typing.get_type_hints(cls)
        common = {k: coerce(v, hints[k], f"{p}{k}") for k, v in data.items() if k in COMMON_PRUNING_KEYS}
        blocks = {k: copy.deepcopy(v) if v is not None else {} for k, v in data.items() if k not in COMMON_PRUNING_KEYS}
        obj = cls(**common, blocks=blocks)
        if not 0.0 <= obj.target_sparsity < 1.0:
            raise FedasrError(f"{p}target_sparsity: must be in [0, 1), got {obj.target_sparsity}")
        if obj.recalibrate_bn < 0:
            raise FedasrError(f"{p}recalibrate_bn: must be >= 0 (batches; 0: off), got {obj.recalibrate_bn}")
        return obj

    def to_dict(self) -> dict:
        d = {k: copy.deepcopy(getattr(self, k)) for k in COMMON_PRUNING_KEYS}
        d.update(copy.deepcopy(self.blocks))
        return d


# the sweep's part of a recipe (fedasr.sweep's schema): a run's config ignores these sections
SWEEP_KEYS = ("seed_model", "sweep")


@dataclass
class RunConfig:
    """A run's config: what `fedasr train` reads from a recipe (the sections below), beside the
    top-level keys."""

    seed: int = 0  # the run's random seed (initial weights, client sampling, batches, masks)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N — where clients train
    keep_checkpoints: int = 3  # newest round checkpoints kept (0 = all)
    model: ModelSection = field(default_factory=ModelSection)  # the architecture
    train: TrainSection = field(default_factory=TrainSection)  # the local trainer
    fl: FLSection = field(default_factory=FLSection)  # the federated rounds
    eval: EvalSection = field(default_factory=EvalSection)  # dev evaluation
    pruning: PruningSection = field(default_factory=PruningSection)  # pruning in the rounds

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pruning"] = self.pruning.to_dict()
        return d

    def validate(self, prefix: str) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise FedasrError(f"device: unknown {self.device!r} (auto, cpu, cuda, cuda:N)")


AUTO_CPU_WARNING = ("fedasr: warning: device: auto found no CUDA device; training on the CPU "
                    "(set device: cuda to require a GPU, device: cpu to silence this)")


def resolve_device(name: str, *, warn: bool = False):
    """A torch.device for ``auto``/``cpu``/``cuda[:N]``; asking for CUDA without one (or for
    a CUDA index beyond the visible devices) is an error. ``warn``: when ``auto`` falls back
    to the CPU, say so in one line on stderr (a training run that silently ends up on the CPU
    takes weeks instead of hours)."""
    import torch  # here, not at the top: parsing a config does not import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if warn:
            print(AUTO_CPU_WARNING, file=sys.stderr, flush=True)
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FedasrError(f"device: {name} requested but no CUDA device is available")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FedasrError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) "
                              "are visible (CUDA_VISIBLE_DEVICES?)")
        return dev
    return torch.device(name)


def parse_config(data: dict | None) -> RunConfig:
    """A run's config from its raw mapping (the sweep's sections, if any, are ignored).
    The method blocks are checked by :func:`fedasr.methods.validate`."""
    return from_dict(RunConfig, {k: v for k, v in (data or {}).items() if k not in SWEEP_KEYS})


# the recipes shipped with the package (a link to the repository's top-level recipes/)
RECIPES_DIR = Path(__file__).parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every shipped recipe; the name is the path under recipes/ without
    ``.yaml`` (``ci``, ``librispeech100/federated_pruning``)."""
    return {p.relative_to(RECIPES_DIR).with_suffix("").as_posix(): p for p in sorted(RECIPES_DIR.rglob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """What a recipe is, in a few words (`fedasr recipes`): the first sentence of its opening
    comment, up to a parenthesis."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") or not line.strip("# "):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    for stop in (". ", " (", " — "):
        text = text.split(stop, 1)[0]
    return text.rstrip(".")


def recipe_path(recipe: str | Path) -> Path:
    """A recipe as the commands take it: a YAML file, or the name of a shipped recipe
    (``ci``, ``ci.yaml``, ``recipes/ci.yaml`` from anywhere, ``librispeech100/federated_pruning``)."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("recipes/")
    shipped = shipped_recipes()
    if name in shipped:
        return shipped[name]
    raise FedasrError(f"{recipe}: no such recipe file, nor a shipped recipe of that name "
                      f"(shipped: {', '.join(shipped)}; `fedasr recipes` lists them)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe (a file or a shipped recipe's name; or the defaults) with ``--set`` overrides, parsed."""
    data = read_recipe(recipe_path(path)) if path is not None else {}
    return parse_config(apply_overrides(data, overrides or []))
