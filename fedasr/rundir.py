"""A run directory, as `fedasr train` writes it and every later stage reads it::

    RUN_DIR/config.yaml               resolved config (+ federation path, mode)
    RUN_DIR/metrics.jsonl             one JSON object per round
    RUN_DIR/checkpoints/round_NNNN.pt one per round (the last ``keep_checkpoints`` kept)
    RUN_DIR/checkpoints/latest        name of the newest complete checkpoint
    RUN_DIR/results.json              WER per split (`fedasr eval`)
    RUN_DIR/decode/SPLIT-beamN.tsv    hypotheses (`fedasr eval`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_write_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
# what config.yaml records about the run beside its RunConfig
RUN_KEYS = ("federation", "mode", "data", "engine", "device_resolved", "init_from", "init_from_sha256")


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def ckpt_dir(self) -> Path:
        return self.root / "checkpoints"

    def claim(self, overwrite: bool = False) -> bool:
        """The rule for starting a new run here: a directory that exists and holds anything
        is an error unless ``overwrite``. Returns whether there is something to overwrite
        (the caller clears what it must)."""
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise FedasrError(f"{self.root}: run directory exists (use --resume to continue it or --overwrite)")
            return True
        return False

    def clear_outputs(self, engine: bool = True) -> None:
        """Remove what a run writes here (config, metrics, checkpoints, results, decodes and,
        with ``engine``, the Flower engine's files), before starting it again; other files (a
        sweep's own: its claim, sweep.json, log.txt) stay."""
        import shutil

        for name in (CONFIG_FILE, METRICS_FILE, RESULTS_FILE):
            (self.root / name).unlink(missing_ok=True)
        for name in ("checkpoints", "decode", *(("flower",) if engine else ())):
            shutil.rmtree(self.root / name, ignore_errors=True)

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

    def run_config(self) -> tuple[dict, dict]:
        """config.yaml split into (what the run records about itself: RUN_KEYS, the RunConfig mapping)."""
        raw = self.read_config()
        return {k: raw.pop(k) for k in RUN_KEYS if k in raw}, raw

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl (empty before the first round)."""
        try:
            text = self.metrics_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def results(self) -> dict:
        return json.loads(self.results_path.read_text()) if self.results_path.is_file() else {}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint as every command takes it (prune, compact, export, info, eval, train
    --init-from): a checkpoint file; a run directory, or its ``checkpoints/`` directory (the
    run's newest complete checkpoint); or ``RUN/checkpoints/latest`` (the file naming it).
    Whether the file is a readable checkpoint is :func:`fedasr.checkpoint.read_checkpoint`'s
    concern."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path.parent if path.name == "checkpoints" else path)
        if not run.ckpt_dir.is_dir():
            raise FedasrError(f"{path}: a directory, but not a run directory (no checkpoints/ inside)")
    elif path.name == "latest" and path.parent.name == "checkpoints" and path.is_file():
        run = RunDir(path.parent.parent)
    else:
        return path
    latest = run.latest()
    if latest is None:
        raise FedasrError(f"{path}: the run has no complete checkpoint yet")
    return latest
