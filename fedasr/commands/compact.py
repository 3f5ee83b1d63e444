"""`fedasr compact`: a checkpoint whose unit masks remove whole units -> a checkpoint of the
physically smaller model (the compaction itself is :mod:`fedasr.model.compact`)."""

from __future__ import annotations

from fedasr.checkpoint import save_checkpoint
from fedasr.commands import load
from fedasr.errors import FedasrError
from fedasr.model.compact import compact_with_masks


def compact_checkpoint(path, out, allow_partial: bool = False) -> dict:
    """`fedasr compact`: a checkpoint whose unit masks remove whole units -> a checkpoint of
    the physically smaller model (same tokenizer; the run config kept, the compaction noted)."""
    ckpt = load(path)
    path = ckpt.path
    model, tok = ckpt.model, ckpt.tokenizer
    masks = ckpt.masks
    if not masks:
        raise FedasrError(f"{path}: has no masks, so no unit to remove")
    small, left, plan = compact_with_masks(model, masks, allow_partial, source=str(path))
    if not plan.keep:
        raise FedasrError(f"{path}: no whole unit is masked (pattern 'unit' prunes whole units)")
    config = dict(ckpt.config)
    config["compacted_from"] = str(path)
    save_checkpoint(out, small, tok, masks=left, config=config)
    return {"checkpoint": str(path), "parameters_before": model.num_parameters(), "parameters_after": small.num_parameters(),
            "units_removed": plan.removed, "masks_left": len(left),
            "widths": {k: v for k, v in (plan.config.widths or {}).items()}}
