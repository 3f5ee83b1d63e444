"""`fedasr export CKPT --out DIR`: a checkpoint -> the ONNX directory :func:`fedasr.export.export_model`
writes, with the normalisation statistics of its run's federation."""

from __future__ import annotations

from fedasr.commands import load
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.export import export_model


def export_checkpoint(path, out, federation=None, int8: bool = False, int8_scheme: str | None = None) -> dict:
    """`fedasr export CKPT --out DIR`: the normalisation statistics come from the run's
    federation (the checkpoint's config) or ``federation``."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise FedasrError("fedasr export: needs the export extra (pip install 'fedasr[export]': onnx, "
                          "onnxruntime)") from None
    ckpt = load(path)
    path = ckpt.path
    model, tok = ckpt.model, ckpt.tokenizer
    fed_dir = federation or ckpt.config.get("federation")
    if fed_dir is None:
        raise FedasrError(f"{path}: the checkpoint names no federation (for the normalisation); pass --federation")
    fed = Federation(fed_dir)
    if fed.tokenizer.proto != tok.proto:
        raise FedasrError(f"{path}: the checkpoint's tokenizer differs from {fed.root}/tokenizer.model")
    from fedasr.export import INT8_DEFAULT

    return export_model(model, tok, fed.cmvn, out, source=str(path), int8=int8,
                        extra={"measured": measured_wer(path)}, int8_scheme=int8_scheme or INT8_DEFAULT)


def measured_wer(path) -> dict:
    """What `fedasr eval` measured on this very checkpoint (its run's results.json), per
    split: WER and the decoding it was measured with (empty when it was not evaluated)."""
    from pathlib import Path

    from fedasr.rundir import RunDir

    path = Path(path).resolve()
    if path.parent.name != "checkpoints":
        return {}
    out = {}
    for split, r in RunDir(path.parent.parent).results().items():
        if isinstance(r, dict) and r.get("checkpoint") and Path(r["checkpoint"]).resolve() == path:
            out[split] = {"wer": r["wer"], "decoding": r.get("decoding", "greedy search (symbols per frame "
                                                                          "not recorded)")}
    return out
