"""Holding a decoder to a reference where float rounding may break near ties: a greedy search
traced frame by frame (its logits at each decision), and the rule that another engine's
hypothesis is the trace's, or parts from it only after a decision the trace takes by a
margin within that engine's rounding."""

import numpy as np
import torch

# float32 rounds to 2^-24 of a value; through two Conformer layers, the predictor and the joiner
# the logits of an fp32 engine are off by a few of their ulps (measured: 4-6 ulps of the largest
# logit, for PyTorch and for onnxruntime, against float64). F32_TOL is 512 ulps (2^-15 of the
# largest logit): room for other kernels (AVX2, AVX-512, ARM) and still far below any error of
# an export (a feature, a normalisation or a context off).
F32_TOL = 2.0 ** -15


def f32_tol(trace) -> float:
    """F32_TOL of the largest logit of a trace."""
    return F32_TOL * max(float(np.abs(logits).max()) for _, _, logits in trace)


def greedy_trace(joint, frames: int, blank: int, context: int) -> list[tuple[tuple, int, np.ndarray]]:
    """Greedy search with one symbol a frame (sherpa-onnx's, and `--max-symbols-per-frame 1`),
    frame by frame: each frame's (context, decision, logits). ``joint(t, ctx)``: the logits at
    frame ``t`` after the last ``context`` symbols ``ctx`` (blanks before the first)."""
    ctx, steps = (blank,) * context, []
    for t in range(frames):
        logits = np.asarray(joint(t, ctx), dtype=np.float64)
        k = int(logits.argmax())
        steps.append((ctx, k, logits))
        if k != blank:
            ctx = ctx[1:] + (k,)
    return steps


def margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def near_tie_or_same(ref: list[tuple[tuple, int, np.ndarray]], tokens: list[int], blank: int, tol: float) -> bool:
    """``tokens`` (another engine's greedy hypothesis) are the reference trace's, or part from
    them after a decision the reference takes by a margin of at most ``tol`` (a near tie, where
    an engine within ``tol / 2`` of the reference logits may go either way): one no later than
    the reference's emission of the first symbol that differs (an engine that took every
    decision before it as the reference did emitted the same symbols before it)."""
    emitted = [t for t, (_, k, _) in enumerate(ref) if k != blank]
    ours = [ref[t][1] for t in emitted]
    if tokens == ours:
        return True
    i = next((i for i, (a, b) in enumerate(zip(tokens, ours)) if a != b), min(len(tokens), len(ours)))
    last = emitted[i] if i < len(emitted) else len(ref) - 1
    return min(margin(ref[t][2]) for t in range(last + 1)) <= tol


def torch_joint(model, feats: torch.Tensor):
    """``joint(t, ctx)`` of a PyTorch model (in its dtype) on normalised features."""
    from fedasr.export import _StatelessDecoder

    dec = _StatelessDecoder(model)
    with torch.no_grad():
        enc, _ = model.encode(feats[None].to(next(model.parameters()).dtype), torch.tensor([len(feats)]))
        enc = model.joiner.project_encoder(enc[0])

    def joint(t, ctx):
        with torch.no_grad():
            return model.joiner.joint(enc[t:t + 1], dec(torch.tensor([ctx])))[0].numpy()

    return joint, enc.shape[0]


def onnx_joint(onnx, enc: np.ndarray):
    """``joint(t, ctx)`` of an export in onnxruntime on its encoder output ``enc`` (T', J)."""

    def joint(t, ctx):
        dec = onnx.decoder.run(None, {"y": np.array([ctx], dtype=np.int64)})[0]
        return onnx.joiner.run(None, {"encoder_out": enc[t:t + 1], "decoder_out": dec})[0][0]

    return joint


def has_near_tie(trace, tol: float) -> bool:
    """Whether any decision of ``trace`` is taken by a margin of at most ``tol``."""
    return min(margin(logits) for _, _, logits in trace) <= tol
