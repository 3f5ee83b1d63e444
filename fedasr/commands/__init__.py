"""The checkpoint-in/file-out commands, one floor below the CLI: each `fedasr` subcommand
calls one function here (`cli.py` keeps the options, tables and progress bars).

    prune.py     `fedasr prune`    one-shot pruning of a checkpoint
    compact.py   `fedasr compact`  unit masks -> a physically smaller checkpoint
    export.py    `fedasr export`   a checkpoint -> ONNX directory (sherpa-onnx layout)
    info.py      `fedasr info`     shapes, sparsity, bytes and FLOPs of a checkpoint
    evaluate.py  `fedasr eval`     a run's checkpoint -> RUN_DIR/results.json
    train.py     `fedasr train`    a run on the embedded or the Flower engine

What they share about a checkpoint is here: :func:`load` and the one rule for which of its
tensors are prunable, :func:`prunable_names`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedasr.checkpoint import load_checkpoint
from fedasr.config import DEFAULT_PRUNABLE
from fedasr.data.tokenizer import Tokenizer
from fedasr.model.transducer import Transducer
from fedasr.prune.masks import prunable_names as _matching
from fedasr.rundir import resolve_checkpoint


@dataclass
class Checkpoint:
    """A checkpoint file as a command reads it: the model built from it, its tokenizer and
    the raw payload (see :mod:`fedasr.checkpoint`)."""

    path: Path  # the file (commands record it in what they write)
    model: Transducer
    tokenizer: Tokenizer
    raw: dict

    @property
    def config(self) -> dict:
        """The run config the checkpoint was written with (empty when none)."""
        return self.raw.get("config") or {}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return dict(self.raw["masks"])


def load(path: str | Path) -> Checkpoint:
    """A checkpoint as the commands take it (:func:`fedasr.rundir.resolve_checkpoint`: a file,
    a run directory or RUN/checkpoints/latest), loaded; ``path`` is the file it resolved to."""
    path = resolve_checkpoint(path)
    model, tok, raw = load_checkpoint(path)
    return Checkpoint(path, model, tok, raw)


def prunable_names(ckpt: Checkpoint) -> list[str]:
    """The prunable parameters of a checkpoint, as its run chose them: the >= 2-D tensors
    its config's ``pruning.include`` globs match and its ``pruning.exclude`` globs do not
    (the defaults without a config). One rule for every command that reads a checkpoint
    (`prune`, `info`)."""
    pruning = ckpt.config.get("pruning") or {}
    return _matching(ckpt.model, pruning.get("include", list(DEFAULT_PRUNABLE)), pruning.get("exclude", []))
