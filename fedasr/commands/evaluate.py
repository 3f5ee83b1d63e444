"""`fedasr eval`: a run's checkpoint -> RUN_DIR/results.json and RUN_DIR/decode/*.tsv (the
decoding and scoring are :mod:`fedasr.evaluate`, which the runner's dev evaluation uses too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from fedasr.commands import load
from fedasr.config import resolve_device
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError, OptionError
from fedasr.evaluate import evaluate, speaker_client_map
from fedasr.fsutil import atomic_write_text
from fedasr.rundir import RunDir, resolve_checkpoint


def evaluate_run(run_dir=None, *, checkpoint=None, splits: list[str] | None = None, beam: int = 1,
                 federation=None, max_duration: float = 120.0, device: str = "auto",
                 progress: Callable[[str, int], Callable[[int], None]] | None = None,
                 max_symbols_per_frame: int = 1, unrestricted: int | None = 3) -> tuple[dict, list[str], str, Path]:
    """`fedasr eval`: decode ``splits`` (default: the federation's test splits) with
    ``checkpoint`` (a file, a run directory or RUN/checkpoints/latest; default: ``run_dir``'s
    newest), write RUN_DIR/results.json (merged with earlier splits) and
    RUN_DIR/decode/SPLIT-beamN.tsv; ``run_dir`` defaults to the checkpoint's run. ``progress(split,
    n_utts)`` returns a per-batch callback. Greedy search emits up to ``max_symbols_per_frame``
    symbols a frame (default 1: what sherpa-onnx's greedy search does, so the WER is the
    deployed model's); ``unrestricted``: also greedy with up to that many, reported beside where
    it differs (None or 0: not). Returns (results, splits, checkpoint path, run directory)."""
    if beam < 1:
        raise OptionError("--beam: must be at least 1")
    if max_symbols_per_frame < 1:
        raise OptionError("--max-symbols-per-frame: must be at least 1")
    if unrestricted is not None and unrestricted < 0:
        raise OptionError("--unrestricted: must be >= 0 (0: off)")
    if run_dir is None and checkpoint is None:
        raise OptionError("fedasr eval: give a checkpoint (a file or a run directory) or --run RUN_DIR")
    ckpt_path = resolve_checkpoint(checkpoint if checkpoint is not None else run_dir)
    if run_dir is None:
        given = Path(checkpoint)
        if given.is_dir():
            run_dir = given.parent if given.name == "checkpoints" else given
        elif ckpt_path.parent.name == "checkpoints":
            run_dir = ckpt_path.parent.parent
        else:
            raise OptionError(f"{checkpoint}: not inside a run directory; give --run RUN_DIR (its federation, "
                              "and where results.json goes)")
    rd = RunDir(run_dir)
    raw = rd.read_config()
    fed = Federation(federation or raw["federation"])
    ckpt = load(ckpt_path)
    model, tok = ckpt.model, ckpt.tokenizer
    model.to(resolve_device(device))
    if tok.proto != fed.tokenizer.proto:
        raise FedasrError(f"{ckpt_path}: the checkpoint's tokenizer differs from {fed.root}/tokenizer.model")
    splits = list(splits or []) or [s for s, m in fed.eval_splits.items() if m["role"] == "test"]
    spk2client = speaker_client_map(fed.meta["clients"])
    results = rd.results()
    for s in splits:
        cuts = fed.split_cuts(s)
        res, decoded = evaluate(model, cuts, tok, fed.cmvn, beam=beam, max_duration=max_duration,
                                speaker_to_client=spk2client, progress=progress(s, len(cuts)) if progress else None,
                                max_symbols_per_frame=max_symbols_per_frame, unrestricted=unrestricted or None)
        res["checkpoint"] = str(ckpt_path)
        if beam == 1:
            res["max_symbols_per_frame"] = max_symbols_per_frame
        results[s] = res
        lines = "".join(f"{d.id}\t{d.ref}\t{d.hyp}\n" for d in decoded)
        atomic_write_text(rd.root / "decode" / f"{s}-beam{beam}.tsv", "id\tref\thyp\n" + lines)
    atomic_write_text(rd.results_path, json.dumps(results, indent=2))
    return results, splits, str(ckpt_path), rd.root
