"""FedTiny: candidate masks, BatchNorm recalibration and pooling, selection by loss, top-K
reports and their bytes, prune/regrow at constant density, and runs (resume included)."""

import math

import pytest
import torch

from conftest import FAST, MICRO_MODEL, interrupted_then_resumed, tiny_batch, tiny_model
from fedasr.config import PruningSection, load_config
from fedasr.configlib import from_dict
from fedasr.data.batching import Batch
from fedasr.data.federation import Federation
from fedasr.fl.messages import encode_up
from fedasr.fl.runner import Runner
from fedasr.methods.base import MeanAggregator, Report, RoundContext
from fedasr.methods.fedtiny import (FedTiny, FedTinyConfig, TopKHooks,
                                    recalibrate_batchnorm)
from fedasr.model.transducer import ModelConfig, Transducer

pytestmark = pytest.mark.usefixtures("single_thread")


def micro(seed=0, **kw):
    return tiny_model(seed, **kw)


def method(model, sparsity=0.8, rounds=10, **kw):
    cfg = from_dict(FedTinyConfig, kw, "pruning.fedtiny")
    return FedTiny(cfg, PruningSection(method="fedtiny", target_sparsity=sparsity), model, rounds, seed=3)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_candidates_are_noisy_layerwise_magnitude_masks_at_the_target_density():
    m = micro()
    ft = method(m, sparsity=0.8, candidates=4, density_noise=0.5, density_tolerance=0.02)
    w = state(m)
    cands = ft.draw_candidates(w)
    assert len(cands) == 4
    sizes = {n: w[n].numel() for n in ft.names}
    for c in cands:
        kept = sum(int(c[n].sum()) for n in ft.names)
        assert abs(kept / sum(sizes.values()) - 0.2) <= 0.02 * 0.2 + 1e-9
        for n in ft.names:  # per layer: the largest |w| are kept, at a density in d(1 +- noise)
            k = int(c[n].sum())
            assert max(1, math.floor(0.1 * sizes[n])) <= k <= math.ceil(0.3 * sizes[n])
            kept_min = w[n][c[n]].abs().min()
            assert torch.all(w[n][~c[n]].abs() <= kept_min)
    dens = [[int(c[n].sum()) for n in ft.names] for c in cands]
    assert len({tuple(d) for d in dens}) == 4  # the per-layer densities differ between candidates
    assert all(torch.equal(a[n], b[n]) for a, b in zip(cands, ft.draw_candidates(w)) for n in ft.names)


def test_erk_candidates_are_drawn_around_the_erdos_renyi_kernel_densities():
    """``allocation: erk``: each layer's density within d_l^ERK (1 +- noise), so small layers
    keep more than large ones (uniform keeps every layer near d); the total at the target."""
    from fedasr.errors import FedasrError
    from fedasr.prune.allocation import layer_counts

    m = micro()
    w = state(m)
    erk = method(m, sparsity=0.9, candidates=3, density_noise=0.2, allocation="erk")
    sizes = {n: w[n].numel() for n in erk.names}
    base = layer_counts({n: tuple(w[n].shape) for n in erk.names}, 0.1, "erk")
    for c in erk.draw_candidates(w):
        assert abs(sum(int(c[n].sum()) for n in erk.names) / sum(sizes.values()) - 0.1) <= 0.02 * 0.1 + 1e-9
        for n in erk.names:
            k, d = int(c[n].sum()), base[n] / sizes[n]
            assert max(1, math.floor(0.8 * d * sizes[n])) <= k <= min(sizes[n], math.ceil(1.2 * d * sizes[n]))
    small, large = min(erk.names, key=sizes.get), max(erk.names, key=sizes.get)
    assert base[small] / sizes[small] > 2 * base[large] / sizes[large]
    with pytest.raises(FedasrError, match=r"pruning.fedtiny.allocation: unknown 'global' \(erk, uniform\)"):
        FedTinyConfig(allocation="global").validate("pruning.fedtiny")


def _batch(feats, lens, vocab):
    return tiny_batch(lens, [3] * feats.shape[0], seed=5, feats=feats, vocab=vocab)


def test_batchnorm_recalibration_measures_the_data_from_scratch():
    m = micro(num_layers=1)
    bn = m.encoder.layers[0].conv.batch_norm
    with torch.no_grad():
        bn.running_mean.fill_(7.0)  # stale statistics that must not leak into the result
        bn.running_var.fill_(9.0)
    g = torch.Generator().manual_seed(1)
    batch = _batch(torch.randn(3, 40, MICRO_MODEL["num_features"], generator=g), torch.tensor([40, 31, 22]),
                   MICRO_MODEL["vocab_size"])
    seen = {}

    def grab(mod, args, out):
        x, mask = args
        seen["x"] = x.transpose(1, 2)[mask].detach()

    h = bn.register_forward_hook(grab)
    n = recalibrate_batchnorm(m, [batch])
    h.remove()
    assert n == 3 and not m.training and bn.momentum == 0.1  # everything restored
    torch.testing.assert_close(bn.running_mean, seen["x"].mean(0))
    torch.testing.assert_close(bn.running_var, seen["x"].var(0, unbiased=True))


def test_pooled_batchnorm_statistics_per_candidate():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(n, 4, generator=g) * s + mu for n, s, mu in ((30, 1.0, 2.0), (90, 2.0, -1.0))]
    agg = MeanAggregator(pool_batchnorm=True)
    for x in data:
        agg.add(Report({"c0/bn.running_mean": x.mean(0), "c0/bn.running_var": x.var(0, unbiased=False),
                        "c1/bn.running_mean": -x.mean(0), "c1/bn.running_var": x.var(0, unbiased=False)}),
                float(len(x)))
    res = agg.result()
    pooled = torch.cat(data)
    torch.testing.assert_close(res["c0/bn.running_mean"].float(), pooled.mean(0))
    torch.testing.assert_close(res["c0/bn.running_var"].float(), pooled.var(0, unbiased=False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["c1/bn.running_mean"].float(), -pooled.mean(0))


def test_selection_takes_the_lowest_weighted_loss_and_installs_its_statistics():
    m = micro()
    ft = method(m, candidates=3)
    w = state(m)
    masks = ft.init(RoundContext(1, 10, w, {}))
    assert ft.phases(1) == ["bn_stats", "candidate_loss"]
    bn = [k for k in w if k.endswith("batch_norm.running_mean")][0]
    ft.bn_candidates = [{bn: torch.full_like(w[bn], float(i))} for i in range(3)]
    agg = MeanAggregator()
    agg.add(Report({"loss": torch.tensor([3.0, 1.0, 2.0])}), 1.0)  # client A: candidate 1 best
    agg.add(Report({"loss": torch.tensor([3.0, 4.0, 2.0])}), 3.0)  # client B (3x the data): candidate 2
    cands = list(ft.candidates)
    upd = ft.end_phase("candidate_loss", RoundContext(1, 10, w, masks), agg)
    assert upd.metrics["mask_selection"] == {"losses": [3.0, 3.25, 2.0], "chosen": 2}
    assert all(torch.equal(upd.masks[n], cands[2][n]) for n in ft.names)
    assert torch.all(w[bn] == 2.0)  # the chosen candidate's pooled statistics
    assert ft.phases(2) == [] and ft.candidates == []


def test_topk_report_is_k_indices_and_values_at_pruned_positions_and_costs_its_size():
    m = micro()
    name = "encoder.layers.0.ff1.linear1.weight"
    p = dict(m.named_parameters())[name]
    mask = torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) > 0.7
    hooks = TopKHooks({name: mask}, {name: 5})
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(p.shape, generator=g) for _ in range(3)]
    for gr in grads:
        for q in m.parameters():
            q.grad = torch.zeros_like(q)
        p.grad = gr.clone()
        hooks.after_backward(m)
    assert torch.all(p.grad[~mask] == 0)  # masked after the report accumulated
    rep = hooks.report()
    idx, val = rep.tensors[f"{name}/idx"], rep.tensors[f"{name}/val"]
    mean = (sum(grads) / 3).reshape(-1)
    pruned = ~mask.reshape(-1)
    best = torch.topk(mean.abs() * pruned, 5).indices
    assert sorted(idx.tolist()) == sorted(best.tolist()) and torch.all(pruned[idx.long()])
    torch.testing.assert_close(val, mean[idx.long()])
    assert idx.dtype == torch.int32 and val.dtype == torch.float32
    # on the wire: 5 x (4 + 4) bytes of data, not the dense gradient
    up = encode_up({}, {}, rep, {})
    assert len(up) - 8 - int.from_bytes(up[4:8], "little") == 5 * 8
    assert len(up) < 600 < 4 * p.numel()


def test_prune_and_regrow_keep_the_density_and_zero_the_regrown():
    m = micro()
    ft = method(m, sparsity=0.7, candidates=1, adaptive_bn=False, alpha=0.2, update_every=1, granularity="entire")
    w = state(m)
    masks = ft.init(RoundContext(1, 10, w, {}))
    assert ft.phases(1) == []  # one candidate, no BatchNorm selection: nothing to select
    ft.selected = True
    ctx = RoundContext(2, 10, w, masks)
    plan = ft.configure(ctx).meta["topk"]
    assert set(plan) == set(ft.names)
    alpha = 0.2 / 2 * (1 + math.cos(math.pi * 2 / ft.end_round))
    assert all(plan[n] == math.ceil(alpha * int(masks[n].sum())) for n in plan)
    agg = ft.report_aggregator(ctx)
    g = torch.Generator().manual_seed(8)
    for weight in (1.0, 2.0):  # two clients report top-K gradients
        rep = {}
        for n, k in plan.items():
            dead = torch.nonzero(~masks[n].reshape(-1)).flatten()
            pick = dead[torch.randperm(len(dead), generator=g)[:k]]
            rep[f"{n}/idx"] = pick.to(torch.int32)
            rep[f"{n}/val"] = torch.randn(len(pick), generator=g)
        agg.add(Report(rep), weight)
    scores = agg.result()
    upd = ft.update(ctx, agg)
    total_regrown = 0
    for n in ft.names:
        old, new = masks[n], upd.masks[n]
        assert int(new.sum()) == int(old.sum()), n  # density unchanged
        grown = new & ~old
        dropped = old & ~new
        assert int(grown.sum()) == int(dropped.sum()) == int(upd.reset[n].sum())
        assert torch.equal(grown, upd.reset[n])
        total_regrown += int(grown.sum())
        if grown.any():  # the regrown are the best-scored pruned positions ...
            assert scores[n].abs()[grown].min() >= scores[n].abs()[~old & ~grown].max()
            live = w[n].abs()[old & new]  # ... the dropped the smallest live weights
            assert w[n].abs()[dropped].max() <= live.min()
    assert upd.metrics["regrown"] == total_regrown > 0


FT = ["pruning.method=fedtiny", "pruning.target_sparsity=0.8", "pruning.fedtiny.candidates=3",
      "pruning.fedtiny.phase_batches=1", "pruning.fedtiny.update_every=1", "pruning.fedtiny.end_round=3",
      "pruning.fedtiny.granularity=block", "pruning.fedtiny.alpha=0.2"]


def test_fedtiny_run_selects_adjusts_and_resumes_exactly(federation, tmp_path):
    cfg = FAST + FT + ["fl.rounds=3", "fl.aggregation=fedadam"]
    straight = Runner(tmp_path / "a", Federation(federation), load_config(None, cfg))
    straight.start()
    rows = straight.run_rounds()
    sel = rows[0]["mask_selection"]
    assert len(sel["losses"]) == 3 and sel["chosen"] == min(range(3), key=lambda i: sel["losses"][i])
    # an adjustment every round before end_round 3 (where the cosine rate reaches 0)
    assert [r.get("regrown", 0) > 0 for r in rows] == [True, True, False] and "regrown" not in rows[2]
    for r in rows:  # sparse from the start, at the target throughout
        assert r["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert rows[0]["bytes_down"] > rows[1]["bytes_down"]  # round 1 also sent the candidates

    resumed = interrupted_then_resumed(tmp_path / "b", Federation(federation), load_config(None, cfg), 2)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.masks[k], resumed.masks[k]) for k in straight.masks)
    # the same reports (up to the digits of the clients' reported wall-clock times)
    assert abs(resumed.history[-1]["bytes_up"] - straight.history[-1]["bytes_up"]) < 16
    # what clients hold is sparse: every served weight at a pruned position is zero
    served = straight.server.served_state()
    assert all(torch.all(served[n][~m] == 0) for n, m in straight.masks.items())


@pytest.mark.parametrize("extra", [["fl.weighting=processed"],
                                   ["pruning.fedtiny.candidates=1", "pruning.fedtiny.adaptive_bn=false"]])
def test_fedtiny_variants_select_and_adjust(federation, tmp_path, extra):
    """Regressions: processed weighting gave the phases zero weight (a traceback); one
    candidate without BatchNorm selection never adjusted anything."""
    cfg = load_config(None, FAST + FT + ["fl.rounds=2"] + extra)
    r = Runner(tmp_path / "run", Federation(federation), cfg)
    r.start()
    rows = r.run_rounds()
    assert rows[0]["regrown"] > 0 and rows[0]["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert ("mask_selection" in rows[0]) == ("pruning.fedtiny.candidates=1" not in extra)


@pytest.mark.parametrize("extra", [[], ["pruning.fedtiny.candidates=1", "pruning.fedtiny.adaptive_bn=false"]])
def test_dense_rounds_before_start_round_then_selection_from_the_trained_model(federation, tmp_path, extra):
    from conftest import StopAfterRound, Stopped

    cfg = load_config(None, FAST + FT + ["fl.rounds=3", "pruning.fedtiny.start_round=3",
                                         "pruning.fedtiny.end_round=4"] + extra)
    half = Runner(tmp_path / "a", Federation(federation), cfg, events=StopAfterRound(2))
    half.start()
    assert half.masks == {}
    with pytest.raises(Stopped):
        half.run_rounds()
    rows = half.history
    assert rows[0]["sparsity"] == 0.0 and not any("mask_selection" in r for r in rows)
    # (the row's sparsity is the served model's after the round: masks installed at its end count)
    assert rows[1]["sparsity"] == (pytest.approx(0.8, abs=0.02) if extra else 0.0)
    # the candidates come from the model trained for two rounds (not the initial one)
    method = half.server.method
    expected = method.draw_candidates({n: half.model.state_dict()[n] for n in method.names})
    if extra:  # one candidate, no BatchNorm selection: installed at once for round 3
        assert method.selected and all(torch.equal(half.masks[n], expected[0][n]) for n in expected[0])
    else:
        assert not method.selected and half.masks == {}
        assert all(torch.equal(c[n], e[n]) for c, e in zip(method.candidates, expected) for n in e)
    resumed = Runner.resume(tmp_path / "a")
    row = resumed.run_rounds()[-1]
    assert row["sparsity"] == pytest.approx(0.8, abs=0.02) and row.get("regrown", 0) > 0
    assert ("mask_selection" in row) == (not extra)
    straight = Runner(tmp_path / "b", Federation(federation), cfg)
    straight.start()
    straight.run_rounds()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.masks[k], resumed.masks[k]) for k in straight.masks)


def test_a_rejected_report_leaves_nothing_in_the_aggregates():
    from fedasr.fl.server import ClientRejected, RoundInfo, Server

    m = micro()
    cfg = load_config(None, ["pruning.method=fedtiny", "pruning.target_sparsity=0.8", "pruning.fedtiny.candidates=1",
                             "pruning.fedtiny.adaptive_bn=false", "pruning.fedtiny.update_every=1",
                             "pruning.fedtiny.granularity=entire", "fl.rounds=10"])
    server = Server(cfg, m, ["a", "b"])
    server.start()
    ex = server.train_exchange(1)
    name = server.method.names[0]
    update = {k: torch.zeros_like(v) for k, v in m.state_dict().items()}
    bad = Report({f"{name}/idx": torch.tensor([10**9], dtype=torch.int32), f"{name}/val": torch.tensor([1.0])})
    reply = encode_up(update, server.masks, bad, {"kind": "train", "num_examples": 5, "metrics": {"loss": 1.0}})
    info = RoundInfo(["a"])
    with pytest.raises(ClientRejected, match="out of range"):
        server.absorb(ex, reply, info)
    assert ex.count == 0 and ex.updates.count == 0 and ex.updates.weight == 0 and ex.reports.weight == 0
