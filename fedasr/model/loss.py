"""RNN-Transducer loss on CPU (and any torch device) without torchaudio.

:func:`rnnt_loss` follows the argument conventions of
``torchaudio.functional.rnnt_loss``:

* ``logits``: ``(B, T, U + 1, V)`` unnormalised joint-network outputs; the
  log-softmax over ``V`` is applied inside.
* ``targets``: ``(B, U)`` integer label ids.
* ``logit_lengths``: ``(B,)`` number of valid frames per utterance (``1..T``).
* ``target_lengths``: ``(B,)`` number of valid labels per utterance (``0..U``).

The loss of one utterance is ``-log P(y | x)`` summed over every monotonic
alignment of the standard RNN-T lattice: from node ``(t, u)`` a label emission
(``y[u]``) moves to ``(t, u + 1)``, a blank moves to ``(t + 1, u)``, and the
path ends with a blank emitted at ``(T_b - 1, U_b)``.

Design (see ``scripts/bench_rnnt_loss.py`` for measurements):

* A custom autograd function reads the big ``(B, T, U + 1, V)`` tensor only a
  few times.  The forward pass computes, chunk by chunk so that the temporary
  stays in cache, the log-softmax of each ``(t, u)`` row and keeps only two
  numbers per node: the blank log-probability and the log-probability of the
  next target label.  Everything else runs on ``(B, U + 1, T)`` tensors.
* The lattice recursion runs over the ``U + 1`` label positions; along time
  it is solved in closed form with a cumulative sum of blank log-probs and
  ``torch.logcumsumexp`` (in float64), so there is no Python loop over ``T``.
* The backward pass runs the mirror-image beta recursion, turns
  ``alpha + beta`` into node occupation probabilities and writes the gradient
  with respect to the logits (``softmax * occupancy - one-hot terms``) into a
  single freshly allocated ``(B, T, U + 1, V)`` buffer.  Nothing of size
  ``B*T*U*V`` is kept between forward and backward (only a reference to the
  caller's ``logits``).
* Positions beyond an utterance's lengths are never read: their loss
  contribution and their gradient are exactly zero, whatever the padding
  holds.

:func:`rnnt_loss_reference` is a deliberately plain implementation (full
log-softmax, anti-diagonal recursion, ordinary autograd) used by the tests and
the benchmark.
"""

from __future__ import annotations

import operator

import torch

__all__ = ["rnnt_loss", "rnnt_loss_reference", "rnnt_loss_simple", "rnnt_loss_pruned", "prune_ranges"]

_REDUCTIONS = ("mean", "sum", "none")

# Number of logits processed per chunk in the big-tensor passes.  About 2 MiB
# of float32: large enough to amortise Python overhead, small enough for the
# temporary to stay in cache (which measured ~3x faster than one full-size
# log_softmax on CPU, where a fresh full-size buffer costs page faults).
_CHUNK_ELEMENTS = 1 << 19

# The passes over the big tensor run utterance by utterance in cache-sized chunks on the
# CPU (measured faster there: padding is never touched) and over the whole batch at once,
# in chunks of frames of _DEVICE_CHUNK_ELEMENTS logits (64 MiB of float32 temporaries),
# on other devices, where each Python-level operation is a kernel launch and the per-
# utterance loops made the loss launch-bound. None: by device; True/False force one
# (tests compare the two on the CPU; scripts/bench_rnnt_loss.py --ops counts them).
BATCH_UTTERANCES: bool | None = None
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def _batched(logits: torch.Tensor) -> bool:
    return logits.device.type != "cpu" if BATCH_UTTERANCES is None else BATCH_UTTERANCES


def _frame_chunks(T: int, per_frame: int):
    """(t0, t1) chunks of frames holding about _DEVICE_CHUNK_ELEMENTS elements."""
    step = max(1, _DEVICE_CHUNK_ELEMENTS // max(1, per_frame))
    return [(t0, min(T, t0 + step)) for t0 in range(0, T, step)]


def _lattice_mask(t_lens: torch.Tensor, u_lens: torch.Tensor, T: int, U1: int) -> torch.Tensor:
    """(B, T, U+1) bool: the nodes inside each utterance's lattice (t < T_b, u <= U_b)."""
    t_ok = torch.arange(T, device=t_lens.device).view(1, T, 1) < t_lens.view(-1, 1, 1)
    return t_ok & (torch.arange(U1, device=t_lens.device).view(1, 1, U1) <= u_lens.view(-1, 1, 1))


# Floor of the lattice log-probabilities, in nats.  An arc with probability 0 (a -inf
# log-probability from a masked vocabulary entry or an fp16 overflow) would make the
# closed-form recursion compute -inf - (-inf) = NaN; at -1e4 nats its probability is
# still exactly 0 in float64 (exp underflows below -745), so losses and gradients are
# those of the -inf lattice, and the float64 sums of floored values (|E| <= 1e4 * T)
# keep ~1e-8 absolute precision.  Only a path whose every alignment needs an arc below
# the floor (a loss above 1e4 nats) differs: its loss is reported large but finite.
LOGP_FLOOR = -1.0e4


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _validate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list[int], list[int]]:
    """Check the inputs; return (targets, logit_lengths, target_lengths) as
    int64 on the logits' device, with padded target positions replaced by the
    blank id, the non-negative blank id, and the lengths as Python lists (read
    where they were given: on the host, free)."""
    for name, value in (
        ("logits", logits),
        ("targets", targets),
        ("logit_lengths", logit_lengths),
        ("target_lengths", target_lengths),
    ):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"rnnt_loss: {name} must be a torch.Tensor, got {type(value).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"rnnt_loss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 4:
        raise ValueError(
            f"rnnt_loss: logits must be 4-D (B, T, U+1, V), got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"rnnt_loss: logits must be a floating-point tensor, got {logits.dtype}")
    if targets.dim() != 2:
        raise ValueError(f"rnnt_loss: targets must be 2-D (B, U), got shape {tuple(targets.shape)}")
    for name, value in (
        ("targets", targets),
        ("logit_lengths", logit_lengths),
        ("target_lengths", target_lengths),
    ):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"rnnt_loss: {name} must be an integer tensor, got {value.dtype}")
    for name, value in (("logit_lengths", logit_lengths), ("target_lengths", target_lengths)):
        if value.dim() != 1:
            raise ValueError(f"rnnt_loss: {name} must be 1-D (B,), got shape {tuple(value.shape)}")

    B, T, U1, V = logits.shape
    if B == 0:
        raise ValueError("rnnt_loss: empty batch (logits.shape[0] == 0)")
    if T == 0 or U1 == 0 or V == 0:
        raise ValueError(f"rnnt_loss: logits has an empty dimension: shape {tuple(logits.shape)}")
    for name, value in (
        ("targets", targets),
        ("logit_lengths", logit_lengths),
        ("target_lengths", target_lengths),
    ):
        if value.shape[0] != B:
            raise ValueError(
                f"rnnt_loss: batch size mismatch: logits has B={B} but {name} has {value.shape[0]}"
            )
    U = targets.shape[1]
    if U1 != U + 1:
        raise ValueError(
            f"rnnt_loss: logits.shape[2] must be targets.shape[1] + 1 = {U + 1}, got {U1}"
        )
    if isinstance(blank, bool):
        raise ValueError(f"rnnt_loss: blank must be an int, got {blank!r}")
    try:
        blank = operator.index(blank)
    except TypeError:
        raise ValueError(f"rnnt_loss: blank must be an int, got {blank!r}") from None
    if not -V <= blank < V:
        raise ValueError(f"rnnt_loss: blank={blank} is out of range for vocabulary size V={V}")
    blank = blank % V

    # The checks read the lengths and targets where they are: given on the host (the CPU copy
    # of a batch, as the trainer passes them) nothing waits for the device; given on the
    # device, the host waits once for the lengths and once for the target ids.
    t_lens = logit_lengths.long().tolist()
    u_lens = target_lengths.long().tolist()
    if min(t_lens) < 1:
        raise ValueError(f"rnnt_loss: logit_lengths must be >= 1, got min {min(t_lens)}")
    if max(t_lens) > T:
        raise ValueError(f"rnnt_loss: logit_lengths max {max(t_lens)} exceeds logits.shape[1] = {T}")
    if min(u_lens) < 0:
        raise ValueError(f"rnnt_loss: target_lengths must be >= 0, got min {min(u_lens)}")
    if max(u_lens) > U:
        raise ValueError(f"rnnt_loss: target_lengths max {max(u_lens)} exceeds targets.shape[1] = {U}")

    targets = targets.long()
    where = targets.device
    valid = torch.arange(U, device=where).unsqueeze(0) < target_lengths.to(where).long().unsqueeze(1)
    if U > 0 and max(u_lens) > 0:
        big = torch.iinfo(torch.long).max
        lo, hi = torch.stack([torch.where(valid, targets, big).min(),
                              torch.where(valid, targets, -big).max()]).tolist()
        if lo < 0 or hi >= V:
            raise ValueError(
                f"rnnt_loss: target ids must lie in [0, V={V}) within target_lengths, "
                f"found values in [{lo}, {hi}]"
            )
    # Padded target slots may hold anything (-1, V, ...): never gather them.
    targets = torch.where(valid, targets, torch.full_like(targets, blank))
    device = logits.device
    return (targets.to(device, non_blocking=True), logit_lengths.to(device=device, dtype=torch.long, non_blocking=True),
            target_lengths.to(device=device, dtype=torch.long, non_blocking=True), blank, t_lens, u_lens)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / losses.shape[0]


# --------------------------------------------------------------------------
# fast implementation
# --------------------------------------------------------------------------


def _rev_logcumsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.logcumsumexp(x.flip(dim), dim).flip(dim)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _time_chunk(u_len: int, V: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, u_len * V))


def _gather_lattice(
    logits: torch.Tensor,
    index: torch.Tensor,
    t_lens: list[int],
    u_lens: list[int],
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Read the big tensor once: ``(B, U+1, T, 2)`` float64 with the blank and
    next-target log-probs of every node (zero in padding, which is never read).

    ``index`` is ``(B, U+1, 2)``: the blank id and the next target id per
    label position. ``valid`` (B, T, U+1) (:func:`_lattice_mask`): the whole batch at
    once, else utterance by utterance.
    """
    B, T, U1, V = logits.shape
    cdtype = _compute_dtype(logits.dtype)
    if valid is not None:  # the whole batch at once (see BATCH_UTTERANCES)
        lat = torch.empty(B, T, U1, 2, dtype=cdtype, device=logits.device)
        idx = index.unsqueeze(1)
        for t0, t1 in _frame_chunks(T, B * U1 * V):
            logp = torch.log_softmax(logits[:, t0:t1].to(cdtype), dim=-1)
            lat[:, t0:t1] = logp.gather(-1, idx.expand(B, t1 - t0, U1, 2))
        lat = torch.where(valid.unsqueeze(3), lat, 0.0)
        return lat.transpose(1, 2).to(torch.float64).clamp_(min=LOGP_FLOOR).contiguous()
    lat = torch.zeros(B, T, U1, 2, dtype=cdtype, device=logits.device)
    for b in range(B):
        tb, ub1 = t_lens[b], u_lens[b] + 1
        step = _time_chunk(ub1, V)
        idx_b = index[b, :ub1].unsqueeze(0)
        for t0 in range(0, tb, step):
            t1 = min(tb, t0 + step)
            # log_softmax is fused and fast (logsumexp measured 2-3x slower on CPU)
            logp = torch.log_softmax(logits[b, t0:t1, :ub1].to(cdtype), dim=-1)
            lat[b, t0:t1, :ub1] = logp.gather(-1, idx_b.expand(t1 - t0, ub1, 2))
    return lat.transpose(1, 2).to(torch.float64).clamp_(min=LOGP_FLOOR).contiguous()


def _alpha(blank_lp: torch.Tensor, emit_lp: torch.Tensor, u_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward variables ``alpha`` (B, U+1, T) and the exclusive cumulative
    blank sums ``E`` (B, U+1, T+1): ``E[..., t] = sum_{t'' < t} blank[..., t'']``."""
    B, U1, T = blank_lp.shape
    E = blank_lp.new_zeros(B, U1, T + 1)
    E[:, :, 1:] = torch.cumsum(blank_lp, dim=2)
    alpha = blank_lp.new_zeros(B, U1, T)
    alpha[:, 0] = E[:, 0, :T]
    for u in range(1, u_max + 1):
        Eu = E[:, u, :T]
        # alpha[t, u] = E[t] + logsumexp_{t' <= t}(alpha[t', u-1] + emit[t', u-1] - E[t'])
        alpha[:, u] = Eu + torch.logcumsumexp(alpha[:, u - 1] + emit_lp[:, u - 1] - Eu, dim=1)
    return alpha, E


def _arc_weights(
    blank_lp: torch.Tensor,
    emit_lp: torch.Tensor,
    alpha: torch.Tensor,
    E: torch.Tensor,
    log_p: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    u_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior probabilities of the blank arc and the label arc leaving each
    node, ``(B, U+1, T)`` each (float64; exactly zero outside the lattice).

    They are ``d log P / d blank_lp`` and ``d log P / d emit_lp``.
    """
    B, U1, T = blank_lp.shape
    U = U1 - 1
    device = blank_lp.device
    neg_inf = float("-inf")

    t_ar = torch.arange(T + 1, device=device)
    u_ar = torch.arange(U1, device=device)
    valid = (t_ar[:T].view(1, 1, T) < logit_lengths.view(B, 1, 1)) & (
        u_ar.view(1, U1, 1) <= target_lengths.view(B, 1, 1)
    )
    # Terminal "virtual node" (t = T_b, u = U_b), reached by the final blank,
    # with log-probability 0 of finishing.
    term_t = t_ar.view(1, T + 1) == logit_lengths.view(B, 1)  # (B, T+1)

    # beta[t, u] = log P(rest of the path | at node (t, u)), -inf outside the
    # lattice.  Along time, as for alpha, in closed form:
    # beta[t, u] = logsumexp_{t' >= t}(E[t'] - E[t] + src[t'])
    # with src[t'] = emit[t', u] + beta[t', u+1] (+ the terminal at t' = T_b).
    beta = alpha.new_full((B, U1, T), neg_inf)
    src = alpha.new_full((B, T + 1), neg_inf)
    for u in range(u_max, -1, -1):
        src.fill_(neg_inf)
        if u < U:
            src[:, :T] = emit_lp[:, u] + beta[:, u + 1]
        is_last = (target_lengths == u).view(B, 1)
        src.masked_fill_(term_t & is_last, 0.0)
        Eu = E[:, u]
        val = _rev_logcumsumexp(src + Eu, dim=1) - Eu
        beta[:, u] = torch.where(valid[:, u], val[:, :T], neg_inf)

    # beta of the node a blank at (t, u) leads to: (t+1, u), or the terminal.
    beta_next = torch.cat([beta[:, :, 1:], beta.new_full((B, U1, 1), neg_inf)], dim=2)
    bidx = torch.arange(B, device=device)
    beta_next[bidx, target_lengths, logit_lengths - 1] = 0.0

    lp = log_p.view(B, 1, 1)
    occ_blank = torch.exp(alpha + blank_lp + beta_next - lp)
    occ_emit = torch.zeros_like(occ_blank)
    if U > 0:
        occ_emit[:, :U] = torch.exp(alpha[:, :U] + emit_lp[:, :U] + beta[:, 1:] - lp)
    return occ_blank, occ_emit


class _RNNTLoss(torch.autograd.Function):
    """Per-utterance RNN-T losses ``(B,)``; gradient w.r.t. ``logits`` only."""

    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, blank, t_lens, u_lens):  # type: ignore[override]
        B = logits.shape[0]
        u_max = max(u_lens)

        # index[b, u] = (blank, targets[b, u]); the emit slot of u = U is a dummy.
        emit_ids = torch.cat([targets, targets.new_full((B, 1), blank)], dim=1)
        index = torch.stack([torch.full_like(emit_ids, blank), emit_ids], dim=2)

        B, T, U1, _ = logits.shape
        valid = _lattice_mask(logit_lengths, target_lengths, T, U1) if _batched(logits) else None
        lat = _gather_lattice(logits, index, t_lens, u_lens, valid)
        blank_lp = lat[..., 0].contiguous()  # (B, U+1, T) float64
        emit_lp = lat[..., 1].contiguous()
        alpha, E = _alpha(blank_lp, emit_lp, u_max)

        bidx = torch.arange(B, device=logits.device)
        t_last = logit_lengths - 1
        log_p = alpha[bidx, target_lengths, t_last] + blank_lp[bidx, target_lengths, t_last]

        ctx.save_for_backward(
            logits, index, logit_lengths, target_lengths, blank_lp, emit_lp, alpha, E, log_p, valid
        )
        ctx.t_lens, ctx.u_lens = t_lens, u_lens
        return (-log_p).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (logits, index, logit_lengths, target_lengths,
         blank_lp, emit_lp, alpha, E, log_p, valid) = ctx.saved_tensors
        t_lens, u_lens = ctx.t_lens, ctx.u_lens
        B, T, U1, V = logits.shape

        occ_blank, occ_emit = _arc_weights(
            blank_lp, emit_lp, alpha, E, log_p, logit_lengths, target_lengths, max(u_lens)
        )
        # d loss_b / d logp = -grad_output[b] * occupation
        go = grad_output.to(torch.float64).reshape(B, 1, 1)
        cdtype = _compute_dtype(logits.dtype)
        w_blank, w_emit = occ_blank * go, occ_emit * go
        w_neg = torch.stack([w_blank, w_emit], dim=3).transpose(1, 2).neg().to(cdtype)  # (B, T, U+1, 2)
        w_sum = (w_blank + w_emit).transpose(1, 2).unsqueeze(3).to(cdtype)  # (B, T, U+1, 1)

        # d loss / d logits = softmax * (w_blank + w_emit) - w_blank 1[blank] - w_emit 1[target],
        # written chunk by chunk (the softmax temporary stays in cache) into
        # the one output buffer.  The fused softmax kernel measured faster
        # than exp(x - lse) on CPU.
        grad = torch.empty_like(logits)
        direct = logits.dtype == cdtype
        if valid is not None:  # the whole batch at once; exactly 0 outside each lattice
            idx = index.unsqueeze(1)
            for t0, t1 in _frame_chunks(T, B * U1 * V):
                sm = torch.softmax(logits[:, t0:t1].to(cdtype), dim=-1)
                sm.mul_(w_sum[:, t0:t1]).scatter_add_(-1, idx.expand(B, t1 - t0, U1, 2), w_neg[:, t0:t1])
                grad[:, t0:t1] = torch.where(valid[:, t0:t1].unsqueeze(3), sm, 0.0)
            return grad, None, None, None, None, None, None
        for b in range(B):
            tb, ub1 = t_lens[b], u_lens[b] + 1
            if tb < T:
                grad[b, tb:].zero_()
            if ub1 < U1:
                grad[b, :tb, ub1:].zero_()
            step = _time_chunk(ub1, V)
            idx_b = index[b, :ub1].unsqueeze(0)
            for t0 in range(0, tb, step):
                t1 = min(tb, t0 + step)
                out = grad[b, t0:t1, :ub1]
                sm = torch.softmax(logits[b, t0:t1, :ub1].to(cdtype), dim=-1)
                idx = idx_b.expand(t1 - t0, ub1, 2)
                if direct:
                    torch.mul(sm, w_sum[b, t0:t1, :ub1], out=out)
                    out.scatter_add_(-1, idx, w_neg[b, t0:t1, :ub1])
                else:  # float16/bfloat16: finish in float32, round once
                    sm.mul_(w_sum[b, t0:t1, :ub1]).scatter_add_(-1, idx, w_neg[b, t0:t1, :ub1])
                    out.copy_(sm)
        return grad, None, None, None, None, None, None


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """RNN-Transducer loss (``-log P(y | x)``), torchaudio argument conventions.

    Args:
        logits: ``(B, T, U+1, V)`` unnormalised joint outputs (any float dtype;
            float16/bfloat16 are computed in float32 chunk by chunk).
        targets: ``(B, U)`` integer labels; entries beyond ``target_lengths``
            are ignored (may hold any value).
        logit_lengths: ``(B,)`` valid frames per utterance, ``1 <= T_b <= T``.
        target_lengths: ``(B,)`` valid labels per utterance, ``0 <= U_b <= U``.
        blank: blank id; negative values count from the end of the vocabulary
            as in Python indexing (torchaudio's default ``-1`` is the last id).
        reduction: ``"mean"`` (sum over the batch divided by ``B``, like
            torchaudio), ``"sum"`` or ``"none"`` (``(B,)`` per-utterance losses).

    Returns:
        The loss, in ``logits.dtype``.  The gradient flows to ``logits`` only
        and is exactly zero at positions beyond each utterance's lengths.

    Raises:
        ValueError: on inconsistent shapes, non-integer targets/lengths,
            lengths outside the tensor dimensions, out-of-range target ids or
            blank, or an unknown reduction.
    """
    targets, logit_lengths, target_lengths, blank, t_lens, u_lens = _validate(
        logits, targets, logit_lengths, target_lengths, blank, reduction
    )
    losses = _RNNTLoss.apply(logits, targets, logit_lengths, target_lengths, blank, t_lens, u_lens)
    return _reduce(losses, reduction)


# --------------------------------------------------------------------------
# reference implementation
# --------------------------------------------------------------------------


def rnnt_loss_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Straightforward RNN-T loss: full log-softmax, anti-diagonal alpha
    recursion, plain autograd.  Same interface as :func:`rnnt_loss`; slow and
    memory-hungry, meant for tests and benchmarks."""
    targets, logit_lengths, target_lengths, blank, _, _ = _validate(
        logits, targets, logit_lengths, target_lengths, blank, reduction
    )
    B, T, U1, V = logits.shape
    U = U1 - 1
    device = logits.device
    work = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    neg = -1e30  # finite "log zero": keeps autograd free of inf - inf

    logp = torch.log_softmax(work, dim=-1)
    blank_lp = logp[..., blank]  # (B, T, U+1)
    if U > 0:
        idx = targets.view(B, 1, U, 1).expand(B, T, U, 1)
        emit_lp = logp[:, :, :U].gather(-1, idx).squeeze(-1)  # (B, T, U)

    u_ar = torch.arange(U1, device=device)
    alpha = torch.full((B, U1), neg, dtype=work.dtype, device=device)
    alpha = torch.where(u_ar == 0, torch.zeros_like(alpha), alpha)
    diagonals = [alpha]
    for n in range(1, T + U):
        t = n - u_ar  # time index of node (t, u) on this diagonal
        in_lattice = (t >= 0) & (t < T)
        # blank arc (t-1, u) -> (t, u)
        ok_b = in_lattice & (t >= 1)
        from_blank = alpha + blank_lp[:, (t - 1).clamp(0, T - 1), u_ar]
        from_blank = torch.where(ok_b, from_blank, neg)
        if U > 0:
            # label arc (t, u-1) -> (t, u)
            ok_e = in_lattice & (u_ar >= 1)
            prev = torch.cat([alpha.new_full((B, 1), neg), alpha[:, :U]], dim=1)
            from_emit = prev + emit_lp[:, t.clamp(0, T - 1), (u_ar - 1).clamp(0, U - 1)]
            from_emit = torch.where(ok_e, from_emit, neg)
            alpha = torch.logaddexp(from_blank, from_emit)
        else:
            alpha = from_blank
        alpha = torch.where(in_lattice, alpha, neg)
        diagonals.append(alpha)
    alphas = torch.stack(diagonals)  # (T+U, B, U+1)
    bidx = torch.arange(B, device=device)
    t_last = logit_lengths - 1
    log_p = alphas[t_last + target_lengths, bidx, target_lengths] + blank_lp[bidx, t_last, target_lengths]
    return _reduce((-log_p).to(logits.dtype), reduction)


# --------------------------------------------------------------------------
# "simple" loss (k2's rnnt_loss_simple): an additive joiner in logit space
# --------------------------------------------------------------------------


def _simple_lattice(am, lm, targets, logit_lengths, target_lengths, blank, reduction):
    """Validated inputs and the floored ``(B, U+1, T)`` blank and ``(B, U, T)`` label
    log-probabilities (float64, with autograd) of the simple joiner ``am[t] + lm[u]``."""
    B, T, V = am.shape
    if lm.dim() != 3 or lm.shape[0] != B or lm.shape[2] != V:
        raise ValueError(f"rnnt_loss_simple: lm must be (B, U+1, V) = ({B}, U+1, {V}), got {tuple(lm.shape)}")
    U1 = lm.shape[1]
    # validation (shapes, lengths, ids) is that of the full loss on a view of the right shape
    targets, logit_lengths, target_lengths, blank, _, u_lens = _validate(
        am[:, :, None, :].expand(B, T, U1, V),
        targets, logit_lengths, target_lengths, blank, reduction)
    am64, lm64 = am.double(), lm.double()
    am_max = am64.amax(-1, keepdim=True).detach()
    lm_max = lm64.amax(-1, keepdim=True).detach()
    norm = torch.log(torch.bmm(torch.exp(am64 - am_max), torch.exp(lm64 - lm_max).transpose(1, 2)))
    norm = norm + am_max + lm_max.transpose(1, 2)  # (B, T, U+1)
    U = U1 - 1
    blank_lp = am64[:, :, blank, None] + lm64[:, None, :, blank] - norm  # (B, T, U+1)
    if U > 0:
        am_y = am64.gather(2, targets[:, None, :].expand(B, T, U))  # (B, T, U): am[t, y_u]
        lm_y = lm64[:, :U].gather(2, targets[:, :, None]).squeeze(2)  # (B, U): lm[u, y_u]
        emit_lp = am_y + lm_y[:, None, :] - norm[:, :, :U]
    blank_lp = blank_lp.clamp(min=LOGP_FLOOR).transpose(1, 2)  # (B, U+1, T)
    emit_lp = emit_lp.clamp(min=LOGP_FLOOR).transpose(1, 2) if U > 0 else None  # (B, U, T)
    return targets, logit_lengths, target_lengths, blank, max(u_lens), blank_lp, emit_lp


def rnnt_loss_simple(
    am: torch.Tensor,
    lm: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    reduction: str = "mean",
    return_occupation: bool = False,
):
    """RNN-T loss of the *linear* joiner ``logits[b, t, u] = am[b, t] + lm[b, u]`` (k2's
    ``rnnt_loss_simple``), without materialising the ``(B, T, U+1, V)`` tensor.

    ``am``: ``(B, T, V)`` encoder-side logits; ``lm``: ``(B, U+1, V)`` predictor-side logits
    (position 0 is the start). Because the joiner is additive, the log-softmax normaliser
    of every lattice node is ``log(exp(am[t]) · exp(lm[u]))``: one batched matrix product
    ``(B, T, V) x (B, V, U+1)``. Used as an auxiliary loss: cheap, and it learns the
    alignment early (k2/icefall use it to pick the pruning bounds of the full joiner).
    Same conventions, validation and -1e4 log-probability floor as :func:`rnnt_loss`;
    plain autograd (the tensors are ``(B, T, U+1)``).

    ``return_occupation``: also return the (detached, float64) ``(B, U+1, T)`` probability
    that the alignment passes through each lattice node — what k2 reads from the simple
    loss' gradients to choose the pruning ranges (:func:`prune_ranges`).
    """
    B, T, V = am.shape
    targets, logit_lengths, target_lengths, blank, u_max, blank_lp, emit_lp = _simple_lattice(
        am, lm, targets, logit_lengths, target_lengths, blank, reduction)
    U1 = blank_lp.shape[1]
    # alpha over label positions, closed form along time (see _alpha), with autograd
    E = torch.cat([blank_lp.new_zeros(B, U1, 1), torch.cumsum(blank_lp, dim=2)], dim=2)  # (B, U+1, T+1)
    alphas = [E[:, 0, :T]]
    for u in range(1, U1):
        Eu = E[:, u, :T]
        alphas.append(Eu + torch.logcumsumexp(alphas[-1] + emit_lp[:, u - 1] - Eu, dim=1))
    alpha = torch.stack(alphas, dim=1)  # (B, U+1, T)
    bidx = torch.arange(B, device=am.device)
    t_last = logit_lengths - 1
    log_p = alpha[bidx, target_lengths, t_last] + blank_lp[bidx, target_lengths, t_last]
    loss = _reduce((-log_p).to(am.dtype), reduction)
    if not return_occupation:
        return loss
    with torch.no_grad():
        b_lp = blank_lp.detach()
        e_lp = b_lp.new_zeros(b_lp.shape)  # the emit slot of u = U is never used
        if U1 > 1:
            e_lp[:, :U1 - 1] = emit_lp.detach()
        occ_blank, occ_emit = _arc_weights(b_lp, e_lp, alpha.detach(), E.detach(), log_p.detach(),
                                           logit_lengths, target_lengths, u_max)
    return loss, occ_blank + occ_emit


# --------------------------------------------------------------------------
# pruned loss (k2's rnnt_loss_pruned): the joiner evaluated in a band of S symbols
# --------------------------------------------------------------------------


def prune_ranges(
    occupation: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    prune_range: int,
) -> torch.Tensor:
    """The label positions where the pruned loss evaluates the joiner: ``(B, T, S)``
    int64, ``ranges[b, t] = s_begin[b, t] + (0, 1, ..., S - 1)`` with
    ``S = min(prune_range, U + 1)`` (``U = occupation.shape[1] - 1``).

    ``occupation`` ``(B, U+1, T)``: the probability that the alignment passes through each
    node, from the simple loss (``rnnt_loss_simple(..., return_occupation=True)``). As k2's
    ``get_rnnt_prune_ranges``, each frame's window is the one of ``S`` consecutive label
    positions holding the most occupation, then adjusted (as k2's
    ``_adjust_pruning_lower_bound``) into a band that contains alignments: from frame
    ``T_b - 1`` on ``s_begin = max(U_b - S + 1, 0)`` (the last frame holds ``U_b``, where the
    final blank is emitted); ``s_begin`` never decreases (lowered to the running minimum
    from the end), rises by at most ``S - 1`` per frame (a blank from frame ``t`` to ``t + 1``
    needs a label position in both windows) and starts at ``s_begin[b, 0] = 0``; all values
    lie in ``[0, U]``. Such a band exists for an utterance iff ``U_b <= (S - 1) * T_b`` (at
    most ``S - 1`` labels per frame); otherwise it holds no alignment and the pruned loss
    reports the utterance as impossible (a loss above 1e4, see :data:`LOGP_FLOOR`).
    Deterministic (no randomness).
    """
    if isinstance(prune_range, bool) or not isinstance(prune_range, int) or prune_range < 2:
        raise ValueError(f"prune_ranges: prune_range must be an integer >= 2, got {prune_range!r}")
    B, U1, T = occupation.shape
    device = occupation.device
    S = min(prune_range, U1)
    t_lens = logit_lengths.to(device=device, dtype=torch.long, non_blocking=True).view(B, 1)
    u_lens = target_lengths.to(device=device, dtype=torch.long, non_blocking=True).view(B, 1)
    occ = occupation.detach().double()
    if S < U1:
        # sum of the occupation over the window [k, k + S) for every start k in [0, U + 1 - S]
        cs = torch.cat([occ.new_zeros(B, 1, T), torch.cumsum(occ, dim=1)], dim=1)  # (B, U+2, T)
        s_begin = (cs[:, S:] - cs[:, :U1 + 1 - S]).argmax(dim=1)  # (B, T)
    else:
        s_begin = torch.zeros(B, T, dtype=torch.long, device=device)
    hi = (u_lens - S + 1).clamp(min=0)  # (B, 1): the last start whose window ends at U_b
    t_ar = torch.arange(T, device=device).view(1, T)
    s_begin = torch.minimum(s_begin, hi)
    s_begin = torch.where(t_ar >= t_lens - 1, hi, s_begin)
    # never decreases: a reversed running min (k2's monotonic_lower_bound) ...
    s_begin = torch.flip(torch.cummin(torch.flip(s_begin, [1]), dim=1).values, [1])
    # ... rises by at most S - 1 per frame: s[t] >= s[t'] - (S - 1)(t' - t) for every t' > t
    # (a reversed running max of s[t'] - (S - 1) t') ...
    step = (S - 1) * t_ar
    s_begin = torch.flip(torch.cummax(torch.flip(s_begin - step, [1]), dim=1).values, [1]) + step
    # ... and starts at 0: s[t] <= (S - 1) t (both keep the two properties above)
    s_begin = torch.minimum(s_begin, step)
    return s_begin.unsqueeze(2) + torch.arange(S, device=device)


class _PrunedRNNTLoss(torch.autograd.Function):
    """Per-utterance pruned RNN-T losses ``(B,)``; gradient w.r.t. the band logits only.

    The band's blank and label log-probabilities are placed into the full ``(B, U+1, T)``
    lattice (which holds two numbers per node, not ``V``), every node outside the band gets
    log-probability :data:`LOGP_FLOOR` (probability 0), and the full loss' closed-form
    alpha/beta recursions run on it; so with the band covering every label position the
    loss is exactly the full one.
    """

    @staticmethod
    def forward(ctx, logits, targets, s_begin, logit_lengths, target_lengths, blank, u_lens):  # type: ignore[override]
        B, T, S, V = logits.shape
        U = targets.shape[1]
        device = logits.device
        u_max = max(u_lens)
        cdtype = _compute_dtype(logits.dtype)

        ranges = s_begin.unsqueeze(2) + torch.arange(S, device=device)  # (B, T, S)
        # band positions inside the utterance's lattice (label position <= U_b)
        band_ok = ranges <= target_lengths.view(B, 1, 1)
        # index[b, t, s] = (blank, next target at label position ranges[b, t, s])
        emit_ids = torch.cat([targets, targets.new_full((B, 1), blank)], dim=1)  # (B, U+1)
        nxt = emit_ids.gather(1, ranges.clamp(max=U).view(B, T * S)).view(B, T, S)
        index = torch.stack([torch.full_like(nxt, blank), nxt], dim=3)  # (B, T, S, 2)

        # the whole batch at once (the band is small: faster than utterance by utterance on
        # the CPU too); frames beyond T_b are outside the lattice below, never read
        band = torch.empty(B, T, S, 2, dtype=cdtype, device=device)
        for t0, t1 in _frame_chunks(T, B * S * V):
            logp = torch.log_softmax(logits[:, t0:t1].to(cdtype), dim=-1)
            band[:, t0:t1] = logp.gather(-1, index[:, t0:t1])
        band = band.to(torch.float64)

        # the lattice: node (t, u) is band slot s = u - s_begin[t] when 0 <= s < S
        u_ar = torch.arange(U + 1, device=device)
        slot = u_ar.view(1, 1, U + 1) - s_begin.unsqueeze(2)  # (B, T, U+1)
        t_ok = torch.arange(T, device=device).view(1, T, 1) < logit_lengths.view(B, 1, 1)
        in_lat = (slot >= 0) & (slot < S) & (u_ar.view(1, 1, U + 1) <= target_lengths.view(B, 1, 1)) & t_ok
        slot = slot.clamp(0, S - 1)
        lat = []
        for c in range(2):
            v = band[..., c].gather(2, slot)  # (B, T, U+1)
            lat.append(torch.where(in_lat, v, LOGP_FLOOR).clamp_(min=LOGP_FLOOR).transpose(1, 2).contiguous())
        blank_lp, emit_lp = lat  # (B, U+1, T) float64
        alpha, E = _alpha(blank_lp, emit_lp, u_max)
        bidx = torch.arange(B, device=device)
        t_last = logit_lengths - 1
        log_p = alpha[bidx, target_lengths, t_last] + blank_lp[bidx, target_lengths, t_last]

        ctx.save_for_backward(logits, index, ranges, band_ok, logit_lengths, target_lengths,
                              blank_lp, emit_lp, alpha, E, log_p)
        ctx.u_max = u_max
        return (-log_p).to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):  # type: ignore[override]
        (logits, index, ranges, band_ok, logit_lengths, target_lengths,
         blank_lp, emit_lp, alpha, E, log_p) = ctx.saved_tensors
        B, T, S, V = logits.shape
        U = blank_lp.shape[1] - 1
        occ_blank, occ_emit = _arc_weights(
            blank_lp, emit_lp, alpha, E, log_p, logit_lengths, target_lengths, ctx.u_max
        )
        go = grad_output.to(torch.float64).reshape(B, 1, 1)
        cdtype = _compute_dtype(logits.dtype)
        idx = ranges.clamp(max=U)
        # the arcs' occupation at the band's nodes (zero outside the lattice)
        w = [torch.where(band_ok, o.transpose(1, 2).gather(2, idx), 0.0) * go for o in (occ_blank, occ_emit)]
        w_neg = torch.stack(w, dim=3).neg().to(cdtype)  # (B, T, S, 2)
        w_sum = (w[0] + w[1]).unsqueeze(3).to(cdtype)  # (B, T, S, 1)
        grad = torch.empty_like(logits)
        # the whole batch at once; exactly 0 beyond T_b and U_b (band slots never read)
        keep = band_ok & (torch.arange(T, device=logits.device).view(1, T, 1) < logit_lengths.view(B, 1, 1))
        for t0, t1 in _frame_chunks(T, B * S * V):
            sm = torch.softmax(logits[:, t0:t1].to(cdtype), dim=-1)
            sm.mul_(w_sum[:, t0:t1]).scatter_add_(-1, index[:, t0:t1], w_neg[:, t0:t1])
            grad[:, t0:t1] = torch.where(keep[:, t0:t1].unsqueeze(3), sm, 0.0)
        return grad, None, None, None, None, None, None


def rnnt_loss_pruned(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ranges: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    reduction: str = "mean",
    check_ranges: bool = True,
) -> torch.Tensor:
    """RNN-T loss on the joiner's outputs in a band of label positions (k2's
    ``rnnt_loss_pruned``, Kuang et al., Interspeech 2022).

    Args:
        logits: ``(B, T, S, V)`` unnormalised joiner outputs; ``logits[b, t, s]`` is the
            joiner at frame ``t`` and label position ``ranges[b, t, s]``.
        targets, logit_lengths, target_lengths, blank, reduction: as :func:`rnnt_loss`.
        ranges: ``(B, T, S)`` from :func:`prune_ranges` (``s_begin + 0..S-1`` per frame).

    The loss sums over the alignments that stay inside the band (their nodes and arcs
    read only ``logits``); with ``S >= U + 1`` and ``ranges = 0..U`` that is every
    alignment and the loss and its gradient are those of :func:`rnnt_loss`. Band slots
    beyond an utterance's lengths are never read (gradient exactly 0). ``check_ranges=False``
    skips the check of ``ranges`` (which reads them from the device), for bands made by
    :func:`prune_ranges`.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError("rnnt_loss_pruned: logits must be a 4-D (B, T, S, V) tensor")
    if not isinstance(ranges, torch.Tensor) or tuple(ranges.shape) != tuple(logits.shape[:3]):
        raise ValueError(f"rnnt_loss_pruned: ranges must be (B, T, S) = {tuple(logits.shape[:3])}, "
                         f"got {tuple(ranges.shape) if isinstance(ranges, torch.Tensor) else ranges!r}")
    B, T, S, V = logits.shape
    if not isinstance(targets, torch.Tensor) or targets.dim() != 2:
        raise ValueError("rnnt_loss_pruned: targets must be a 2-D (B, U) tensor")
    U = targets.shape[1]
    if S > U + 1:
        raise ValueError(f"rnnt_loss_pruned: band width S={S} exceeds U + 1 = {U + 1}")
    # validation of targets/lengths/blank: that of the full loss on a view of the right shape
    targets, logit_lengths, target_lengths, blank, _, u_lens = _validate(
        logits[:, :, :1].expand(B, T, U + 1, V), targets, logit_lengths, target_lengths, blank, reduction)
    ranges = ranges.to(device=logits.device, dtype=torch.long)
    s_begin = ranges[:, :, 0]
    if check_ranges:  # one read of the device (prune_ranges' bands need no check: check_ranges=False)
        bad = (ranges != s_begin.unsqueeze(2) + torch.arange(S, device=logits.device)).any() | \
            (s_begin.min() < 0) | (s_begin.max() > U + 1 - S)
        if bool(bad):
            raise ValueError("rnnt_loss_pruned: ranges must be s_begin + (0..S-1) per frame with "
                             f"0 <= s_begin <= U + 1 - S = {U + 1 - S} (see prune_ranges)")
    losses = _PrunedRNNTLoss.apply(logits, targets, s_begin.contiguous(), logit_lengths, target_lengths, blank,
                                   u_lens)
    return _reduce(losses, reduction)
