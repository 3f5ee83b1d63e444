"""Tests for fedasr.model.loss (RNN-T loss)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from fedasr.model import loss as loss_module
from fedasr.model.loss import rnnt_loss, rnnt_loss_reference

IMPLS = [rnnt_loss, rnnt_loss_reference]


@pytest.fixture(autouse=True, params=["per utterance", "whole batch"])
def loss_path(request, monkeypatch):
    """Every test runs on both paths of the big-tensor passes: per utterance (the CPU's) and
    over the whole batch (every other device's, see BATCH_UTTERANCES)."""
    monkeypatch.setattr(loss_module, "BATCH_UTTERANCES", request.param == "whole batch")
    return request.param


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _brute_force_nll(logits, targets, t_len, u_len, blank):
    """-log P(y|x) of one utterance by enumerating every alignment."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    y = targets.tolist()
    path_logps = []

    def walk(t, u, acc):
        if t == t_len - 1 and u == u_len:
            path_logps.append(acc + logp[t, u, blank].item())
            return
        if u < u_len:  # emit label y[u]: (t, u) -> (t, u+1)
            walk(t, u + 1, acc + logp[t, u, y[u]].item())
        if t < t_len - 1:  # emit blank: (t, u) -> (t+1, u)
            walk(t + 1, u, acc + logp[t, u, blank].item())

    walk(0, 0, 0.0)
    assert len(path_logps) == math.comb(t_len - 1 + u_len, u_len)
    m = max(path_logps)
    return -(m + math.log(sum(math.exp(p - m) for p in path_logps)))


def _random_batch(
    B, T, U, V, *, seed, dtype=torch.float64, blank=0, full=True, scale=1.0, pad_targets=-1
):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64) * scale
    blank_id = blank % V
    # labels different from blank
    targets = torch.randint(0, V - 1, (B, U), generator=g)
    targets = targets + (targets >= blank_id).long()
    t_lens = torch.randint(1, T + 1, (B,), generator=g)
    u_lens = torch.randint(0, U + 1, (B,), generator=g)
    if full:  # make the padded dims tight, as torchaudio requires
        t_lens[0] = T
        u_lens[-1] = U
    for b in range(B):
        targets[b, u_lens[b]:] = pad_targets
    return logits.to(dtype), targets, t_lens, u_lens


def _pad_mask(shape, t_lens, u_lens):
    B, T, U1, V = shape
    t = torch.arange(T).view(1, T, 1, 1)
    u = torch.arange(U1).view(1, 1, U1, 1)
    valid = (t < t_lens.view(B, 1, 1, 1)) & (u <= u_lens.view(B, 1, 1, 1))
    return valid.expand(shape)


def _loss_and_grad(fn, logits, *args, weights=None, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    obj = loss.sum() if weights is None else (loss * weights).sum()
    (grad,) = torch.autograd.grad(obj, x)
    return loss.detach(), grad


# --------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fn", IMPLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(fn, reduction, seed):
    B, T, U, V = 5, 1 + seed % 4, seed % 4, 2 + seed % 4
    blank = [0, V - 1, -1][seed % 3]
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=seed, blank=blank)
    expected = torch.tensor(
        [
            _brute_force_nll(logits[b], targets[b], int(t_lens[b]), int(u_lens[b]), blank % V)
            for b in range(B)
        ],
        dtype=torch.float64,
    )
    if reduction == "sum":
        expected = expected.sum()
    elif reduction == "mean":
        expected = expected.sum() / B
    got = fn(logits, targets, t_lens, u_lens, blank=blank, reduction=reduction)
    assert got.dtype == torch.float64
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_brute_force_exhaustive_small_grid():
    """Every (T_b, U_b) combination up to (4, 3) in one padded batch."""
    pairs = [(t, u) for t in range(1, 5) for u in range(4)]
    B, T, U, V = len(pairs), 4, 3, 5
    logits, targets, _, _ = _random_batch(B, T, U, V, seed=123, blank=2, pad_targets=1)
    t_lens = torch.tensor([p[0] for p in pairs])
    u_lens = torch.tensor([p[1] for p in pairs])
    expected = torch.tensor(
        [_brute_force_nll(logits[b], targets[b], *pairs[b], 2) for b in range(B)],
        dtype=torch.float64,
    )
    got = rnnt_loss(logits, targets, t_lens, u_lens, blank=2, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_targets_equal_to_blank_are_allowed():
    logits, targets, t_lens, u_lens = _random_batch(3, 3, 2, 4, seed=7, pad_targets=1)
    targets[:, 0] = 0  # the blank id used below
    expected = torch.tensor(
        [_brute_force_nll(logits[b], targets[b], int(t_lens[b]), int(u_lens[b]), 0) for b in range(3)],
        dtype=torch.float64,
    )
    for fn in IMPLS:
        got = fn(logits, targets, t_lens, u_lens, blank=0, reduction="none")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # gradients agree too (blank and target scatter into the same column)
    _, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction="none")
    _, g_ref = _loss_and_grad(rnnt_loss_reference, logits, targets, t_lens, u_lens, reduction="none")
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("seed,blank", [(0, 0), (1, 3), (2, -1)])
def test_gradcheck(reduction, seed, blank):
    # fast mode (random projections of the Jacobian) keeps this quick; the
    # full Jacobian is checked once below.
    logits, targets, t_lens, u_lens = _random_batch(3, 4, 3, 5, seed=seed, blank=blank, full=False)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: rnnt_loss(z, targets, t_lens, u_lens, blank=blank, reduction=reduction),
        (x,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
        fast_mode=True,
    )


def test_gradcheck_full_jacobian():
    logits, targets, t_lens, u_lens = _random_batch(2, 3, 2, 4, seed=4, blank=1)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: rnnt_loss(z, targets, t_lens, u_lens, blank=1, reduction="none"),
        (x,),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


def test_gradient_with_arbitrary_upstream_weights():
    """Negative, zero and positive per-utterance weights (grad_output)."""
    logits, targets, t_lens, u_lens = _random_batch(4, 6, 3, 7, seed=3)
    weights = torch.tensor([1.5, -0.7, 0.0, -2.0], dtype=torch.float64)
    loss, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction="none", weights=weights)
    loss_ref, g_ref = _loss_and_grad(
        rnnt_loss_reference, logits, targets, t_lens, u_lens, reduction="none", weights=weights
    )
    torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    assert torch.all(g[2] == 0)


def test_gradient_rows_sum_to_zero():
    """d loss / d logits of a softmax model sums to zero over the vocabulary."""
    logits, targets, t_lens, u_lens = _random_batch(3, 7, 4, 9, seed=11)
    _, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction="sum")
    torch.testing.assert_close(g.sum(-1), torch.zeros_like(g.sum(-1)), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------
# float32 agreement with the reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_reference_float32_medium(reduction):
    B, T, U, V = 4, 50, 12, 32
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=5, dtype=torch.float32, blank=0)
    t_lens[1], u_lens[1] = 17, 3
    targets[1, 3:] = -1
    loss, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction=reduction)
    loss_ref, g_ref = _loss_and_grad(rnnt_loss_reference, logits, targets, t_lens, u_lens, reduction=reduction)
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # float32 result close to the exact float64 one
    loss64, g64 = _loss_and_grad(rnnt_loss, logits.double(), targets, t_lens, u_lens, reduction=reduction)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)


def test_low_precision_logits():
    logits, targets, t_lens, u_lens = _random_batch(3, 12, 5, 16, seed=9, dtype=torch.float32)
    half = logits.to(torch.float16)
    loss, g = _loss_and_grad(rnnt_loss, half, targets, t_lens, u_lens, reduction="none")
    loss_ref, g_ref = _loss_and_grad(rnnt_loss, half.double(), targets, t_lens, u_lens, reduction="none")
    assert loss.dtype == torch.float16 and g.dtype == torch.float16
    torch.testing.assert_close(loss.double(), loss_ref, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=2e-3)


# --------------------------------------------------------------------------
# padding
# --------------------------------------------------------------------------


def test_padding_invariance():
    B, T, U, V = 5, 9, 5, 11
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=21, pad_targets=-1)
    mask = _pad_mask(logits.shape, t_lens, u_lens)
    # garbage (huge, and even NaN) in the padding must not matter
    garbage = torch.randn(logits.shape, dtype=torch.float64) * 1e4
    garbage[0, -1, 0, 0] = float("nan")
    padded = torch.where(mask, logits, garbage)
    padded[1, :, :, :] = torch.where(mask[1], padded[1], float("nan"))
    loss, g = _loss_and_grad(rnnt_loss, padded, targets, t_lens, u_lens, reduction="none")
    assert torch.isfinite(loss).all()
    assert torch.all(g[~mask] == 0)
    for b in range(B):
        tb, ub = int(t_lens[b]), int(u_lens[b])
        alone = logits[b : b + 1, :tb, : ub + 1]
        loss_b, g_b = _loss_and_grad(
            rnnt_loss, alone, targets[b : b + 1, :ub], t_lens[b : b + 1], u_lens[b : b + 1], reduction="none"
        )
        torch.testing.assert_close(loss[b : b + 1], loss_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g[b : b + 1, :tb, : ub + 1], g_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_two_paths_agree_bit_for_bit(dtype, monkeypatch):
    """Whole batch or per utterance: the same losses and gradients to the bit (row-wise
    log-softmax and softmax, the same arithmetic per node), garbage padding included."""
    B, T, U, V = 6, 23, 7, 13
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=5, dtype=dtype, full=False)
    mask = _pad_mask(logits.shape, t_lens, u_lens)
    logits = torch.where(mask, logits, torch.full_like(logits, float("nan")))
    got = {}
    for batched in (False, True):
        monkeypatch.setattr(loss_module, "BATCH_UTTERANCES", batched)
        got[batched] = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction="none")
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1])
    assert torch.all(got[True][1][~mask] == 0) and torch.isfinite(got[True][0]).all()


def test_reference_padding_gradient_is_zero():
    logits, targets, t_lens, u_lens = _random_batch(4, 7, 4, 6, seed=4)
    mask = _pad_mask(logits.shape, t_lens, u_lens)
    padded = torch.where(mask, logits, 50.0)
    _, g = _loss_and_grad(rnnt_loss_reference, padded, targets, t_lens, u_lens, reduction="sum")
    assert torch.all(g[~mask] == 0)


# --------------------------------------------------------------------------
# numerical stability
# --------------------------------------------------------------------------


def test_huge_logits_are_stable_in_float32():
    B, T, U, V = 3, 40, 8, 20
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=8, scale=100.0)
    x32 = logits.float()
    loss, g = _loss_and_grad(rnnt_loss, x32, targets, t_lens, u_lens, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert (loss > 0).all()
    loss64, g64 = _loss_and_grad(rnnt_loss, x32.double(), targets, t_lens, u_lens, reduction="none")
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-3)
    loss_ref, g_ref = _loss_and_grad(rnnt_loss_reference, x32, targets, t_lens, u_lens, reduction="none")
    assert torch.isfinite(loss_ref).all() and torch.isfinite(g_ref).all()


def test_long_sequence_float32():
    """Long T: the time recursion in closed form must not lose precision."""
    B, T, U, V = 2, 600, 20, 8
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=10, dtype=torch.float32)
    loss, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, reduction="none")
    loss64, g64 = _loss_and_grad(rnnt_loss, logits.double(), targets, t_lens, u_lens, reduction="none")
    loss_ref, _ = _loss_and_grad(rnnt_loss_reference, logits.double(), targets, t_lens, u_lens, reduction="none")
    torch.testing.assert_close(loss64, loss_ref, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g.double(), g64, rtol=1e-3, atol=1e-5)


def test_forward_without_grad():
    logits, targets, t_lens, u_lens = _random_batch(2, 5, 3, 6, seed=2, dtype=torch.float32)
    with torch.no_grad():
        a = rnnt_loss(logits, targets, t_lens, u_lens)
    b = rnnt_loss(logits, targets, t_lens.int(), u_lens.int())  # no requires_grad, int32 lengths
    assert a.shape == () and torch.equal(a, b)


# --------------------------------------------------------------------------
# torchaudio
# --------------------------------------------------------------------------


TA_CASES = [(30, 0), (200, 7)]  # (T, blank): B=4, U=10, V=16
TA_FIXTURE = Path(__file__).parent / "fixtures" / "torchaudio_rnnt.pt"
REDUCTIONS = ("none", "sum", "mean")


def ta_inputs(T: int, blank: int):
    """The inputs of the torchaudio cross-check (logits, int targets, lengths)."""
    logits, targets, t_lens, u_lens = _random_batch(4, T, 10, 16, seed=T, dtype=torch.float32, blank=blank)
    targets = torch.where(targets < 0, 1 if blank != 1 else 2, targets)  # torchaudio needs valid ids
    return logits, targets, t_lens, u_lens


def inputs_sha256(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _assert_matches_torchaudio(loss, g, loss_ta, g_ta):
    torch.testing.assert_close(loss, loss_ta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g_ta, rtol=7e-4, atol=7e-4)  # torchaudio's own fp32 error at large T (DESIGN.md)


@pytest.mark.parametrize("T,blank", TA_CASES)
def test_matches_torchaudio(T, blank):
    ta = pytest.importorskip("torchaudio")
    logits, targets, t_lens, u_lens = ta_inputs(T, blank)
    for reduction in REDUCTIONS:
        loss, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, blank=blank, reduction=reduction)
        loss_ta, g_ta = _loss_and_grad(
            ta.functional.rnnt_loss,
            logits,
            targets.int(),
            t_lens.int(),
            u_lens.int(),
            blank=blank,
            reduction=reduction,
        )
        _assert_matches_torchaudio(loss, g, loss_ta, g_ta)


@pytest.mark.parametrize("T,blank", TA_CASES)
def test_matches_torchaudio_fixture(T, blank):
    """The same comparison against torchaudio's losses and gradients kept in tests/fixtures
    (made by scripts/make_torchaudio_fixtures.py in an environment with a torchaudio that
    loads): it runs where torchaudio does not. The fixture holds the gradient of
    ``reduction="sum"`` on the lattice; torchaudio's is zero off it, the same for "none"
    and divided by B for "mean" (checked, bit for bit, when the fixture was made)."""
    case = torch.load(TA_FIXTURE, weights_only=True)["cases"][f"T{T}_blank{blank}"]
    logits, targets, t_lens, u_lens = ta_inputs(T, blank)
    assert inputs_sha256(logits, targets, t_lens, u_lens) == case["inputs_sha256"], \
        "the inputs are not those the fixture was made from: run scripts/make_torchaudio_fixtures.py"
    g_sum = torch.zeros_like(logits)
    g_sum[_pad_mask(logits.shape, t_lens, u_lens)] = case["grad_sum_on_lattice"]
    g_ta = {"none": g_sum, "sum": g_sum, "mean": g_sum / logits.shape[0]}
    for reduction in REDUCTIONS:
        loss, g = _loss_and_grad(rnnt_loss, logits, targets, t_lens, u_lens, blank=blank, reduction=reduction)
        _assert_matches_torchaudio(loss, g, case["loss"][reduction], g_ta[reduction])


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _good():
    logits, targets, t_lens, u_lens = _random_batch(2, 4, 3, 5, seed=0, dtype=torch.float32)
    return dict(logits=logits, targets=targets, logit_lengths=t_lens, target_lengths=u_lens)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: a.update(logits=a["logits"][0]), "4-D"),
        (lambda a: a.update(logits=a["logits"].long()), "floating-point"),
        (lambda a: a.update(logits=a["logits"][:, :, :3]), r"shape\[2\]"),
        (lambda a: a.update(targets=a["targets"].float()), "targets must be an integer"),
        (lambda a: a.update(targets=a["targets"][0]), "targets must be 2-D"),
        (lambda a: a.update(targets=a["targets"][:1]), "batch size mismatch"),
        (lambda a: a.update(logit_lengths=a["logit_lengths"].float()), "logit_lengths must be an integer"),
        (lambda a: a.update(logit_lengths=a["logit_lengths"][None]), "logit_lengths must be 1-D"),
        (lambda a: a.update(target_lengths=a["target_lengths"][:1]), "batch size mismatch"),
        (lambda a: a.update(logit_lengths=torch.tensor([5, 4])), "exceeds logits.shape"),
        (lambda a: a.update(logit_lengths=torch.tensor([0, 4])), ">= 1"),
        (lambda a: a.update(target_lengths=torch.tensor([4, 1])), "exceeds targets.shape"),
        (lambda a: a.update(target_lengths=torch.tensor([-1, 1])), ">= 0"),
        (lambda a: a.update(targets=torch.full((2, 3), 5), target_lengths=torch.tensor([3, 3])), "target ids"),
        (lambda a: a.update(targets=torch.full((2, 3), -2), target_lengths=torch.tensor([1, 0])), "target ids"),
        (lambda a: a.update(logits=a["logits"][:0], targets=a["targets"][:0],
                            logit_lengths=a["logit_lengths"][:0], target_lengths=a["target_lengths"][:0]), "empty"),
        (lambda a: a.update(logits=a["logits"].numpy()), "torch.Tensor"),
        (lambda a: a.update(blank=5), "blank=5 is out of range"),
        (lambda a: a.update(blank=-6), "out of range"),
        (lambda a: a.update(blank=1.0), "blank must be an int"),
        (lambda a: a.update(reduction="avg"), "reduction"),
    ],
)
@pytest.mark.parametrize("fn", IMPLS, ids=lambda f: f.__name__)
def test_validation_errors(fn, change, match):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=match):
        fn(**args)


def test_padding_targets_are_not_validated():
    args = _good()
    args["targets"][0, int(args["target_lengths"][0]):] = 10**6  # out of range, but padding
    args["targets"][1, int(args["target_lengths"][1]):] = -5
    assert torch.isfinite(rnnt_loss(**args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_impossible_arcs_give_finite_gradient_equal_to_reference(dtype):
    """A -inf log-probability (masked vocabulary, fp16 overflow) on some arcs: the loss and the
    gradient stay finite and equal the reference's, which handles -inf through autograd."""
    logits, targets, t_lens, u_lens = _random_batch(3, 7, 4, 6, seed=11, dtype=dtype)
    assert t_lens.tolist() == [7, 2, 5] and u_lens.tolist() == [1, 0, 4]
    logits[0, 2, 1, 0] = -math.inf  # the blank at one node
    logits[2, 1, :3, 0] = -math.inf  # most blanks of a frame
    logits[2, 3, 0, int(targets[2, 0])] = -math.inf  # the label arc of one node
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = rnnt_loss(ours, targets, t_lens, u_lens, reduction="none")
    want = rnnt_loss_reference(ref, targets, t_lens, u_lens, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(want).all()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert torch.allclose(loss.double(), want.double(), atol=tol, rtol=tol)
    loss.sum().backward()
    want.sum().backward()
    assert torch.isfinite(ours.grad).all()
    assert torch.allclose(ours.grad.double(), ref.grad.double(), atol=tol, rtol=tol)


def test_utterance_with_no_possible_alignment_gets_a_huge_finite_loss():
    logits, targets, t_lens, u_lens = _random_batch(3, 7, 4, 6, seed=11)
    logits[1, 0, :, 0] = -math.inf  # utterance 1 (T=2, U=0) must emit a blank in frame 0
    x = logits.clone().requires_grad_()
    loss = rnnt_loss(x, targets, t_lens, u_lens, reduction="none")
    assert 1e4 <= float(loss[1]) < 1e5
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_simple_loss_equals_full_loss_of_the_additive_joiner(seed):
    """rnnt_loss_simple(am, lm) is the RNN-T loss of logits am[t] + lm[u], values and gradients."""
    from fedasr.model.loss import rnnt_loss_simple

    _, targets, t_lens, u_lens = _random_batch(3, 9, 4, 7, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    am = (torch.randn(3, 9, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    lm = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2).requires_grad_()
    simple = rnnt_loss_simple(am, lm, targets, t_lens, u_lens, reduction="none")
    am2, lm2 = am.detach().clone().requires_grad_(), lm.detach().clone().requires_grad_()
    full = rnnt_loss(am2[:, :, None, :] + lm2[:, None, :, :], targets, t_lens, u_lens, reduction="none")
    torch.testing.assert_close(simple, full, atol=1e-9, rtol=1e-9)
    w = torch.rand(3, generator=g, dtype=torch.float64)
    (simple * w).sum().backward()
    (full * w).sum().backward()
    torch.testing.assert_close(am.grad, am2.grad, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lm.grad, lm2.grad, atol=1e-9, rtol=1e-9)
