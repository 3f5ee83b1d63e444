"""Tests for the pruned RNN-T loss (fedasr.model.loss.rnnt_loss_pruned / prune_ranges),
the band joiner (Joiner.forward_pruned) and ``train.loss: pruned``."""

from __future__ import annotations

import pytest
import torch

from conftest import MICRO_MODEL, tiny_batch, tiny_model
from fedasr.config import TrainSection
from fedasr.data.batching import Batch
from fedasr.errors import FedasrError
from fedasr.model.loss import prune_ranges, rnnt_loss, rnnt_loss_pruned, rnnt_loss_simple
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.trainer import pruned_loss_scale, transducer_loss
from test_loss import _brute_force_nll, _random_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S, seed):
    """Ranges from the occupation of a random simple joiner (the trainer's path)."""
    g = torch.Generator().manual_seed(seed)
    am = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    lm = torch.randn(B, U + 1, V, generator=g, dtype=torch.float64) * 2
    _, occ = rnnt_loss_simple(am, lm, targets, t_lens, u_lens, reduction="none", return_occupation=True)
    return occ, prune_ranges(occ, t_lens, u_lens, S)


def _band(logits, ranges):
    """logits (B, T, U+1, V) -> the band (B, T, S, V) at ``ranges``."""
    B, T, S = ranges.shape
    V = logits.shape[-1]
    return logits.gather(2, ranges.unsqueeze(3).expand(B, T, S, V))


# --------------------------------------------------------------------------
# exactness
# --------------------------------------------------------------------------


@pytest.mark.parametrize("S", [None, 50])  # None: S = U + 1
@pytest.mark.parametrize("seed", range(3))
def test_full_band_equals_full_loss_and_gradient(S, seed):
    """With S >= U + 1 the band is every label position: the loss and its gradient are the
    full loss' (variable lengths, garbage in the padding of the targets)."""
    B, T, U, V = 6, 7, 5, 6
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=seed, pad_targets=-1)
    _, ranges = _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S or U + 1, seed)
    assert ranges.shape == (B, T, U + 1) and bool((ranges == torch.arange(U + 1)).all())
    w = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5
    x = logits.clone().requires_grad_(True)
    full = rnnt_loss(x, targets, t_lens, u_lens, reduction="none")
    (full * w).sum().backward()
    y = logits.clone().requires_grad_(True)
    pruned = rnnt_loss_pruned(_band(y, ranges), targets, ranges, t_lens, u_lens, reduction="none")
    (pruned * w).sum().backward()
    torch.testing.assert_close(pruned, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-12, atol=1e-12)


def _band_brute_force(band, ranges, targets, t_len, u_len, blank):
    """-log of the probability of the alignments inside the band, by the full-lattice
    enumeration on logits that give every arc leaving an out-of-band node probability 0."""
    T, S, V = band.shape
    full = torch.zeros(T, u_len + 1, V, dtype=torch.float64)
    for t in range(T):
        for u in range(u_len + 1):
            s = u - int(ranges[t, 0])
            if 0 <= s < S:
                full[t, u] = band[t, s]
            else:
                full[t, u, blank] = -1e30
                if u < u_len:
                    full[t, u, int(targets[u])] = -1e30
    return _brute_force_nll(full, targets, t_len, u_len, blank)


@pytest.mark.parametrize("S", [2, 3])
@pytest.mark.parametrize("seed", range(3))
def test_pruned_loss_matches_band_brute_force(S, seed):
    B, T, U, V = 5, 5, 4, 5
    blank = [0, V - 1, 2][seed]
    _, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=seed, blank=blank)
    t_lens = t_lens.clamp(min=U)  # U_b <= (S - 1) T_b: the band holds alignments
    _, ranges = _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S, seed)
    band = torch.randn(B, T, S, V, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    got = rnnt_loss_pruned(band, targets, ranges, t_lens, u_lens, blank=blank, reduction="none")
    expected = torch.tensor([_band_brute_force(band[b], ranges[b], targets[b], int(t_lens[b]), int(u_lens[b]),
                                               blank) for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # pruning removes alignments: the band's probability is below the full lattice's
    full = torch.zeros(B, T, U + 1, V, dtype=torch.float64).scatter(
        2, ranges.unsqueeze(3).expand(B, T, S, V), band)
    assert bool((got >= rnnt_loss(full, targets, t_lens, u_lens, blank=blank, reduction="none") - 1e-9).all())


def test_a_band_without_alignments_gives_a_huge_finite_loss():
    """U_b > (S - 1) T_b: no alignment fits in the band (as the full loss, above 1e4)."""
    targets = torch.tensor([[1, 2, 1, 2]])
    t_lens, u_lens = torch.tensor([2]), torch.tensor([4])
    ranges = prune_ranges(torch.rand(1, 5, 3), t_lens, u_lens, 2)
    band = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = rnnt_loss_pruned(band, targets, ranges, t_lens, u_lens)
    loss.backward()
    assert 1e4 < float(loss.detach()) < 1e6 and bool(torch.isfinite(band.grad).all())


def test_pruned_loss_gradcheck():
    B, T, U, V, S = 3, 5, 4, 4, 3
    _, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=4)
    t_lens = t_lens.clamp(min=2)
    _, ranges = _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S, 4)
    band = torch.randn(B, T, S, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    band.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: rnnt_loss_pruned(x, targets, ranges, t_lens, u_lens, reduction="none"), (band,))


def test_padding_is_never_read():
    """NaN in frames beyond T_b and in band slots beyond U_b changes nothing; their
    gradient is exactly 0."""
    B, T, U, V, S = 4, 6, 3, 5, 3
    logits, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=7)
    u_lens[0] = 0  # band slots beyond U_b = 0
    _, ranges = _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S, 7)
    band = _band(logits, ranges)
    pad = (torch.arange(T).view(1, T, 1) >= t_lens.view(B, 1, 1)) | (ranges > u_lens.view(B, 1, 1))
    assert bool(pad.any())
    dirty = band.masked_fill(pad.unsqueeze(3), float("nan")).requires_grad_(True)
    clean = band.clone().requires_grad_(True)
    lc = rnnt_loss_pruned(clean, targets, ranges, t_lens, u_lens, reduction="sum")
    ld = rnnt_loss_pruned(dirty, targets, ranges, t_lens, u_lens, reduction="sum")
    lc.backward()
    ld.backward()
    torch.testing.assert_close(ld, lc)
    torch.testing.assert_close(dirty.grad, clean.grad)
    assert bool((clean.grad[pad] == 0).all()) and bool(torch.isfinite(clean.grad).all())


# --------------------------------------------------------------------------
# ranges
# --------------------------------------------------------------------------


@pytest.mark.parametrize("S", [2, 4, 7])
def test_ranges_form_a_connected_monotone_band(S):
    B, T, U, V = 8, 12, 9, 6
    _, targets, t_lens, u_lens = _random_batch(B, T, U, V, seed=S)
    t_lens = torch.maximum(t_lens, (u_lens + S - 2) // (S - 1))  # U_b <= (S - 1) T_b: feasible bands
    _, ranges = _simple_ranges(B, T, U, V, t_lens, u_lens, targets, S, S)
    Se = min(S, U + 1)
    assert ranges.shape == (B, T, Se) and ranges.dtype == torch.long
    assert bool((ranges == ranges[:, :, :1] + torch.arange(Se)).all())
    assert int(ranges.min()) >= 0 and int(ranges.max()) <= U
    start = ranges[:, :, 0]
    rise = start[:, 1:] - start[:, :-1]
    assert bool((rise >= 0).all()) and bool((rise <= Se - 1).all())
    for b in range(B):
        tb, ub = int(t_lens[b]), int(u_lens[b])
        assert int(start[b, 0]) == 0
        assert int(ranges[b, tb - 1, 0]) <= ub <= int(ranges[b, tb - 1, -1])  # final blank inside
        if Se <= ub + 1:
            assert int(ranges[b].max()) <= ub
    # a band of S positions was actually pruned somewhere, and it follows the occupation
    assert S >= U + 1 or bool((start > 0).any())


def test_ranges_follow_the_occupation():
    """A single alignment with occupation 1 lies inside the band chosen from it."""
    T, U, S = 10, 6, 3
    path = [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (3, 3), (4, 3), (5, 3), (6, 3), (6, 4), (7, 4),
            (8, 4), (8, 5), (8, 6), (9, 6)]
    occ = torch.zeros(1, U + 1, T, dtype=torch.float64)
    for t, u in path:
        occ[0, u, t] = 1.0
    ranges = prune_ranges(occ, torch.tensor([T]), torch.tensor([U]), S)
    for t, u in path:
        assert int(ranges[0, t, 0]) <= u <= int(ranges[0, t, -1]), (t, u, ranges[0, t])


def test_prune_ranges_rejects_a_width_below_two():
    with pytest.raises(ValueError, match="prune_range"):
        prune_ranges(torch.ones(1, 3, 4), torch.tensor([4]), torch.tensor([2]), 1)


# --------------------------------------------------------------------------
# model and trainer
# --------------------------------------------------------------------------


def _micro(**kw) -> Transducer:
    return tiny_model(**{"num_layers": 1, "dropout": 0.0, "simple_head": True, **kw}).eval()


def _batch(seed=0) -> Batch:
    return tiny_batch([64, 41, 52], [5, 9, 0], seed=seed, tokens=10, targets_first=True, pad_targets=True,
                      ids=["a", "b", "c"])


def test_band_joiner_equals_the_full_joiner_at_the_ranges():
    model = _micro()
    enc, pred = torch.randn(2, 5, model.cfg.d_model), torch.randn(2, 4, model.predictor.output_dim)
    ranges = torch.tensor([0, 0, 1, 1, 2]).view(1, 5, 1).expand(2, 5, 2) + torch.arange(2)
    full = model.joiner(enc, pred)
    torch.testing.assert_close(model.joiner.forward_pruned(enc, pred, ranges), _band(full, ranges))


def test_trainer_pruned_with_a_full_band_equals_the_full_loss_and_gradients():
    """train.loss=pruned with prune_range >= U + 1: the same loss and parameter gradients
    as train.loss=full (the band is the whole lattice)."""
    batch = _batch()
    grads = {}
    for mode in ("full", "pruned"):
        model = _micro()
        loss, stats = transducer_loss(model, batch, 0.3, 0.5, loss=mode, prune_range=10)
        loss.backward()
        grads[mode] = ({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, stats)
    (gf, sf), (gp, sp) = grads["full"], grads["pruned"]
    assert set(sp) == set(sf) == {"rnnt", "ctc", "simple", "loss"}
    for k in ("rnnt", "ctc", "simple", "loss"):
        assert sp[k] == pytest.approx(sf[k], rel=1e-6)
    assert gp.keys() == gf.keys()
    for k in gf:
        torch.testing.assert_close(gp[k], gf[k], rtol=1e-4, atol=1e-6)


def test_trainer_pruned_band_is_an_upper_bound_and_trains_the_joiner():
    batch = _batch()
    model = _micro()
    _, full = transducer_loss(model, batch, 0.0, 0.5)
    loss, stats = transducer_loss(model, batch, 0.0, 0.5, loss="pruned", prune_range=2, pruned_scale=0.5)
    assert full["rnnt"] - 1e-4 <= stats["rnnt"] < full["rnnt"] + 20  # fewer alignments
    assert stats["loss"] == pytest.approx(0.5 * stats["rnnt"] + 0.5 * stats["simple"], rel=1e-5)
    loss.backward()
    assert float(model.joiner.output.weight.grad.abs().sum()) > 0
    with pytest.raises(FedasrError, match="train.loss"):
        transducer_loss(_micro(simple_head=False), batch, 0.0, 0.5, loss="pruned")


def test_pruned_loss_scale_warm_up():
    cfg = TrainSection(loss="pruned", simple_loss_weight=0.5, prune_warmup_steps=10)
    assert [pruned_loss_scale(cfg, s) for s in (0, 5, 10, 99)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    assert pruned_loss_scale(TrainSection(), 0) == 1.0


@pytest.mark.parametrize("change, match", [
    (dict(loss="bogus"), "train.loss: unknown"),
    (dict(prune_range=1), "train.prune_range"),
    (dict(prune_warmup_steps=-1), "train.prune_warmup_steps"),
    (dict(loss="pruned", simple_loss_weight=0.0), "train.loss: pruned needs"),
])
def test_config_validation(change, match):
    with pytest.raises(FedasrError, match=match):
        TrainSection(**{"simple_loss_weight": 0.5, **change}).validate("train")


def test_pruned_needs_the_simple_head_in_the_recipe():
    from fedasr.config import load_config
    from fedasr.fl.client import model_config

    cfg = load_config("recipes/ci.yaml", ["train.loss=pruned", "model.overrides.simple_head=false",
                                          "train.simple_loss_weight=0.5"])
    with pytest.raises(FedasrError, match="train.loss: pruned needs the model's simple-loss heads"):
        model_config(cfg, 64)
    assert model_config(load_config("recipes/ci.yaml", ["train.loss=pruned"]), 64).simple_head
