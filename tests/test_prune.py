"""Federated Pruning: masks, patterns, allocations, schedules, refinement, runner integration."""

import json
import re

import pytest
import torch

from conftest import FAST, interrupted_then_resumed, run_cli, sets, tiny_model
from fedasr.config import PruningSection, load_config
from fedasr.configlib import from_dict
from fedasr.data.federation import Federation
from fedasr import codec
from fedasr.fl.runner import Runner
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.prune.allocation import adaptive_fractions
from fedasr.methods.base import MeanAggregator, Report, RoundContext
from fedasr.methods.federated_pruning import FederatedPruning, FederatedPruningConfig, GradientHooks
from fedasr.prune.schedule import sparsity_at

SMALL = dict(num_layers=2, d_model=64, num_heads=4, ffn_dim=128, pred_hidden=64, pred_embed_dim=32, joint_dim=48)


def model(seed=0):
    m = tiny_model(seed, preset="tiny", vocab_size=40, **SMALL)
    with torch.no_grad():  # give layers different scales so that allocations differ
        for i, (n, p) in enumerate(m.named_parameters()):
            p.mul_(1 + (i % 5))
    return m


def weights(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def pruner(m, target_sparsity=0.5, **kw):
    """Federated Pruning for model ``m``: its config block from ``kw``, the common target."""
    cfg = from_dict(FederatedPruningConfig, kw, "pruning.federated_pruning")
    common = PruningSection(method="federated_pruning", target_sparsity=target_sparsity)
    return FederatedPruning(cfg, common, m, total_rounds=10, seed=0)


def max_group(pattern, w):
    return {"unstructured": 1, "row": w[0].numel(), "column": w[:, 0].numel(),
            "half_row": (w[0].numel() + 1) // 2, "half_column": (w[:, 0].numel() + 1) // 2}[pattern]


@pytest.mark.parametrize("pattern", ["unstructured", "row", "column", "half_row", "half_column", "unit"])
@pytest.mark.parametrize("alloc", ["uniform", "global", "adaptive"])
@pytest.mark.parametrize("target", [0.5, 0.8])
def test_allocation_hits_target_within_one_group(pattern, alloc, target):
    m = model()
    pr = pruner(m, pattern=pattern, allocation=alloc, target_sparsity=target)
    w = weights(m)
    masks = pr.compute(1, w, {})
    total = sum(w[n].numel() for n in pr.names)
    pruned = sum(int((~masks[n]).sum()) for n in pr.names if n in masks)
    if pattern == "unit":
        biggest = max(int(l.sizes.max()) for l in pr.layers(w, "magnitude", "l2", None, None))
    else:
        biggest = max(max_group(pattern, w[n]) for n in pr.names)
    slack = biggest if alloc == "global" or pattern == "unit" else biggest * len(pr.names) / 2
    assert abs(pruned - target * total) <= slack, (pruned / total, target)
    if alloc == "uniform" and pattern != "unit":
        for layer in pr.layers(w, "magnitude", "l2", None, None):  # every layer within one group of the target
            members = layer.expand(torch.ones(len(layer.sizes), dtype=torch.bool))
            pruned = sum(int((~masks[n]).sum()) for n in members)
            assert abs(pruned - target * layer.numel) <= float(layer.sizes.max()) / 2 + 1e-9, layer.name


def _unit_major(mk):
    """An LSTM weight (4H, C) with gate-major rows -> (H, 4, C): a row is one hidden unit."""
    return mk.view(4, mk.shape[0] // 4, -1).transpose(0, 1)


@pytest.mark.parametrize("pattern", ["row", "column", "half_row", "half_column"])
def test_structured_patterns_zero_whole_groups(pattern):
    m = model()
    pr = pruner(m, pattern=pattern, allocation="uniform", target_sparsity=0.5)
    masks = pr.compute(1, weights(m), {})
    for n in pr.names:
        mk = masks[n]
        if "lstm" in n:  # (H, 4, C): a "row" is a hidden unit, all 4 gates
            u = _unit_major(mk)
            hc, hu = (u.shape[2] + 1) // 2, (u.shape[0] + 1) // 2
            groups = {"row": [u], "column": [u.transpose(0, 2)], "half_row": [u[..., :hc], u[..., hc:]],
                      "half_column": [u[:hu].transpose(0, 2), u[hu:].transpose(0, 2)]}[pattern]
        else:
            p = "row" if pattern in ("column", "half_column") and mk.shape[1] == 1 else pattern  # depthwise
            rows = mk.reshape(mk.shape[0], -1)
            hc, hr = (rows.shape[1] + 1) // 2, (mk.shape[0] + 1) // 2
            groups = {"row": [rows], "column": [mk.transpose(0, 1)], "half_row": [rows[:, :hc], rows[:, hc:]],
                      "half_column": [mk[:hr].transpose(0, 1), mk[hr:].transpose(0, 1)]}[p]
        for g in groups:  # each group (first dim) entirely kept or entirely pruned
            flat = g.reshape(g.shape[0], -1)
            assert torch.all(flat.all(1) | (~flat).all(1)), n
        assert 0 < int((~mk).sum()) < mk.numel(), n


def test_lstm_row_is_a_hidden_unit_across_both_matrices():
    m = model()
    pr = pruner(m, pattern="row", allocation="uniform", target_sparsity=0.5)
    masks = pr.compute(1, weights(m), {})
    ih = _unit_major(masks["predictor.lstm.weight_ih_l0"])  # (H, 4, E)
    hh = _unit_major(masks["predictor.lstm.weight_hh_l0"])  # (H, 4, H)
    unit_kept = ih.reshape(ih.shape[0], -1).any(1)
    for t in (ih, hh):  # a unit is all 4 gates of both matrices, kept or pruned together
        flat = t.reshape(t.shape[0], -1)
        assert torch.equal(flat.all(1), unit_kept) and torch.equal(flat.any(1), unit_kept)
    assert int((~unit_kept).sum()) == ih.shape[0] // 2  # half the units, not half the gate rows


def test_unit_pattern_removes_whole_units_everywhere():
    m = model()
    pr = pruner(m, pattern="unit", allocation="uniform", target_sparsity=0.5)
    masks = pr.compute(1, weights(m), {})
    params = dict(m.named_parameters())
    for fam in m.group_table():
        members = [mm for mm in fam.members if mm.param in params]
        pruned_units = 0
        for u in range(fam.num_units):
            states = [bool(masks.get(mm.param, torch.ones_like(params[mm.param], dtype=torch.bool))
                           .index_select(mm.dim, mm.index[u]).any()) for mm in members]
            if fam.kind != "predictor_unit" and fam.kind != "joiner_unit":
                assert all(states) or not any(states), (fam.name, u)
            pruned_units += not states[0]
        assert pruned_units > 0, fam.name
    # biases of pruned FFN units are masked too, so the unit is disconnected
    assert "encoder.layers.0.ff1.linear1.bias" in masks


def test_adaptive_prunes_less_important_layers_more():
    m = model()
    pr = pruner(m, pattern="row", allocation="adaptive", target_sparsity=0.5)
    layers = pr.layers(weights(m), "magnitude", "l2", None, None)
    frac = adaptive_fractions(layers, 0.5, 0.95)
    imp = {l.name: float((l.scores * l.sizes).sum() / l.sizes.sum()) * l.scale for l in layers}
    names = sorted(frac, key=lambda n: imp[n])
    assert frac[names[0]] >= frac[names[-1]]
    sizes = {l.name: l.numel for l in layers}
    mean = sum(frac[n] * sizes[n] for n in frac) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-6)
    assert len({round(f, 3) for f in frac.values()}) > 3


def test_schedules():
    c = FederatedPruningConfig(start_round=3)
    assert [sparsity_at(c, 0.6, r, 10) for r in (1, 2, 3, 9)] == [0.0, 0.0, 0.6, 0.6]
    s = FederatedPruningConfig(schedule="step", step_size=0.2, step_every=2, start_round=1)
    assert [round(sparsity_at(s, 0.5, r, 10), 6) for r in range(1, 8)] == [0.2, 0.2, 0.4, 0.4, 0.5, 0.5, 0.5]
    cu = FederatedPruningConfig(schedule="cubic", start_round=2, end_round=5, initial_sparsity=0.0)
    vals = [sparsity_at(cu, 0.8, r, 10) for r in range(1, 8)]
    assert vals[0] == 0.0 and vals[4:] == [0.8, 0.8, 0.8]
    assert vals[1] == pytest.approx(0.8 * (1 - (1 - 0.25) ** 3))  # start_round: the first masked round
    assert all(a < b for a, b in zip(vals[:5], vals[1:5]))  # 4 mask steps from round 2 to round 5


def test_gradual_schedule_first_mask_step_is_a_small_fraction():
    """A cubic schedule over 10 rounds changes the masks 10 times, the first time by 27% of
    the target (1 - 0.9^3); linear (power 1) by 10%. (Was: s_0 at start_round itself, so
    start 2 / end 4 gave 0, 0, 0.4375, 0.5: 87.5% of the target in one step.)"""
    cu = FederatedPruningConfig(schedule="cubic", start_round=1, end_round=10)
    vals = [sparsity_at(cu, 0.5, r, 20) for r in range(1, 21)]
    assert vals[0] == pytest.approx(0.5 * 0.271) and vals[0] < 0.3 * 0.5
    assert len(set(vals)) == 10 and vals[9:] == [0.5] * 11
    steps = [b - a for a, b in zip([0.0] + vals, vals)]
    assert max(steps) == steps[0]  # cubic: the largest step first, then smaller ones
    lin = FederatedPruningConfig(schedule="cubic", start_round=1, end_round=10, power=1.0)
    assert [round(sparsity_at(lin, 0.5, r, 20), 9) for r in range(1, 11)] == [round(0.05 * k, 9) for k in range(1, 11)]


def test_coherent_column_prunes_the_same_residual_features_in_every_reader():
    """coherent_column: the matrices reading the residual stream drop the same input features
    (a narrower residual stream); every other matrix prunes its own columns."""
    from fedasr.model.groups import RESIDUAL_READERS

    m = model()
    w = weights(m)
    pr = pruner(m, pattern="coherent_column", allocation="uniform", target_sparsity=0.5)
    masks = pr.compute(1, w, {})
    readers = [n for n in pr.names if RESIDUAL_READERS.match(n)]
    assert len(readers) == 6 * m.cfg.num_layers + 1
    cols = {n: masks[n].reshape(masks[n].shape[0], masks[n].shape[1], -1).all(0).all(-1) for n in readers}
    first = cols[readers[0]]
    assert all(torch.equal(c, first) for c in cols.values())  # one feature mask
    for n in readers:  # whole columns
        full = masks[n].reshape(masks[n].shape[0], masks[n].shape[1], -1)
        assert torch.equal(full, first.view(1, -1, 1).expand_as(full))
    assert int((~first).sum()) == m.cfg.d_model // 2  # uniform: half the features
    others = [n for n in pr.names if n not in readers and w[n].dim() >= 2 and w[n].shape[1] > 1]
    assert any(not torch.equal(masks[others[0]].reshape(w[others[0]].shape[0], w[others[0]].shape[1], -1).all(0).all(-1),
                               masks[o].reshape(w[o].shape[0], w[o].shape[1], -1).all(0).all(-1))
               for o in others[1:] if w[o].shape[1] == w[others[0]].shape[1])
    # against plain column: there each reader drops its own features
    plain = pruner(m, pattern="column", allocation="uniform", target_sparsity=0.5).compute(1, w, {})
    plain_cols = [plain[n].reshape(plain[n].shape[0], plain[n].shape[1], -1).all(0).all(-1) for n in readers]
    assert any(not torch.equal(c, plain_cols[0]) for c in plain_cols[1:])


def test_masks_are_frozen_after_refine_until():
    """Refinement recomputes the masks every round until ``refine_until``; after it the masks
    never change, whatever the weights do."""
    m = model()
    w = weights(m)
    pr = pruner(m, pattern="unstructured", target_sparsity=0.5, refine=True, refine_until=3)
    assert [pr._recompute_after(r) for r in range(1, 7)] == [True, True, False, False, False, False]
    masks = pr.compute(1, w, {})
    from fedasr.methods.base import RoundContext

    for rnd in (3, 4, 5):
        moved = {k: v * (1 + torch.rand_like(v)) for k, v in w.items()}  # reorders the magnitudes
        assert pr.update(RoundContext(rnd, 6, moved, masks), _Empty()).masks is masks
    assert pr.update(RoundContext(2, 6, {k: v * (1 + torch.rand_like(v)) for k, v in w.items()}, masks),
                     _Empty()).masks is not masks
    # a schedule still moving at refine_until keeps moving the masks until its end
    late = pruner(m, pattern="unstructured", target_sparsity=0.5, schedule="cubic", start_round=1, end_round=5,
                  refine_until=2)
    assert [late._recompute_after(r) for r in range(1, 7)] == [True, True, True, True, False, False]


class _Empty:
    def result(self):
        return {}


def test_refinement_regrows_and_fixed_masks_do_not():
    m = model()
    w = weights(m)
    name = "encoder.layers.0.ff1.linear1.weight"
    for refine in (True, False):
        pr = pruner(m, pattern="row", allocation="uniform", target_sparsity=0.5, refine=refine)
        masks = pr.compute(1, w, {})
        dropped = int(torch.nonzero(~masks[name].all(1))[0])
        grown = {k: v.clone() for k, v in w.items()}
        grown[name][dropped] *= 1000  # the dense weight of a pruned row became important
        again = pr.compute(2, grown, masks)
        assert bool(again[name][dropped].all()) is refine
        if not refine:  # a fixed mask only ever shrinks
            for n in masks:
                assert not torch.any(again[n] & ~masks[n])


def test_gradient_importance_uses_client_reports():
    m = model()
    w = weights(m)
    pr = pruner(m, pattern="row", allocation="uniform", target_sparsity=0.5, importance="gradient")
    name = "encoder.layers.0.ff1.linear1.weight"
    first = pr.compute(1, w, {})  # no report yet: magnitude
    dropped = int(torch.nonzero(~first[name].all(1))[0])
    reports = {n: torch.full_like(w[n], 1e-6) for n in pr.names}
    reports[name][dropped] = 1e6  # clients say this row matters
    agg = MeanAggregator()
    for weight in (1.0, 3.0):  # two clients, the same report: the weighted mean is that report
        agg.add(Report(reports), weight)
    pr.update(RoundContext(1, 10, w, first), agg)
    assert set(pr.reports) == set(reports) and all(torch.allclose(pr.reports[n], reports[n].double())
                                                   for n in reports)
    assert bool(pr.compute(2, w, first)[name][dropped].all())
    # the client side accumulates mean |grad| before masking, when the server asks for it
    hooks = pr.client_hooks(first, pr.configure(RoundContext(1, 10, w, first)))
    assert isinstance(hooks, GradientHooks)
    p = dict(m.named_parameters())[name]
    for g in (1.0, -3.0):
        for q in m.parameters():
            q.grad = torch.full_like(q, g)
        hooks.after_backward(m)
    assert torch.allclose(hooks.report().tensors[name], torch.full_like(p, 2.0))
    assert torch.all(p.grad[~first[name]] == 0)


PRUNE = ["pruning.method=federated_pruning", "pruning.federated_pruning.pattern=column",
         "pruning.federated_pruning.allocation=adaptive", "pruning.target_sparsity=0.5"]


@pytest.mark.parametrize("agg,refine", [("fedavg", True), ("fedadam", False)])
def test_pruned_weights_stay_zero_through_training_and_aggregation(federation, tmp_path, agg, refine):
    cfg = load_config(None, FAST + PRUNE + ["fl.rounds=2", f"fl.aggregation={agg}", fp(f"refine={str(refine).lower()}")[0],
                                    "fl.server_lr=0.05"])
    r = Runner(tmp_path / "run", Federation(federation), cfg)
    r.start()
    seen = []

    def check(name, model, state, data, c, **kw):
        from fedasr.fl.client import train_client
        res = train_client(name, model, state, data, c, **kw)
        for n, mk in kw["hooks"].masks.items():
            assert torch.all(dict(model.named_parameters())[n][~mk] == 0), n
        seen.append(name)
        return res

    r.worker.train_fn = check
    rows = r.run_rounds()
    assert len(seen) == 4
    served = r.server.served_state()  # what clients get, what is evaluated and checkpointed
    params = {n: served[n] for n, _ in r.model.named_parameters()}
    for n, mk in r.masks.items():
        assert torch.all(params[n][~mk] == 0), n
    assert rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.02)
    n_prunable = sum(params[n].numel() for n in r.prunable)
    assert rows[-1]["prunable_fraction"] == pytest.approx(n_prunable / sum(p.numel() for p in params.values()))
    assert set(rows[-1]["layer_sparsity"]) == set(r.prunable)
    # bytes: bitmask + kept values down; the same masks shape the upload
    down = len(codec.encode(r.model.state_dict(), r.masks))
    dense = len(codec.encode(r.model.state_dict()))
    pruned = sum(int((~m).sum()) for m in r.masks.values())
    masked = sum(m.numel() for m in r.masks.values())
    assert dense - down >= 4 * pruned - masked / 8 - 4096  # 4 B saved per pruned weight, 1 bit per masked one


def test_byte_counts_match_formula(federation, tmp_path):
    cfg = load_config(None, FAST + PRUNE + ["fl.rounds=1"] + fp("pattern=unstructured", "allocation=uniform"))
    r = Runner(tmp_path / "run", Federation(federation), cfg)
    r.start()
    state = {k: v.clone() for k, v in r.model.state_dict().items()}
    masks = {k: v.clone() for k, v in r.masks.items()}
    sent = []  # what the engine really sent: (payload, {client: header})
    exchange = r.transport.exchange
    r.transport.exchange = lambda rnd, kind, clients, payload, headers: (
        sent.append((payload, dict(headers))), exchange(rnd, kind, clients, payload, headers))[1]
    row = r.run_rounds()[0]
    assert len(sent) == 1 and len(row["clients"]) == 2
    payload, headers = sent[0]
    # the shared payload holds the packed masks, the kept values and the unmasked tensors, nothing else
    header = int.from_bytes(payload[4:8], "little")
    json.loads(payload[8:8 + header])
    expected = 0
    for k, v in state.items():
        item = v.element_size() if not v.is_floating_point() else 4
        if k in masks:
            expected += (v.numel() + 7) // 8 + 4 * int(masks[k].sum())
        else:
            expected += item * v.numel()
    assert len(payload) == 8 + header + expected
    # each client gets the shared payload + its own small JSON header (name, seed, step)
    assert sorted(headers) == sorted(row["clients"]) and all(len(h) < 200 for h in headers.values())
    assert row["bytes_down"] == sum(len(payload) + len(h) for h in headers.values())
    s = row["sparsity"]
    prunable = sum(state[k].numel() for k in masks)
    ratio_prunable = sum((state[k].numel() + 7) // 8 + 4 * int(masks[k].sum()) for k in masks) / (4 * prunable)
    assert ratio_prunable <= (1 - s) + 1 / 32 + 0.01


def test_resumed_pruned_run_equals_straight_run(federation, tmp_path):
    base = FAST + PRUNE + ["fl.rounds=3"] + fp("schedule=step", "step_size=0.25", "step_every=1",
                                               "importance=gradient")
    straight = Runner(tmp_path / "a", Federation(federation), load_config(None, base))
    straight.start()
    straight.run_rounds()
    resumed = interrupted_then_resumed(tmp_path / "b", Federation(federation), load_config(None, base), 1)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.masks[k], resumed.masks[k]) for k in straight.masks)


def test_prune_info_and_finetune_cli(federation, tmp_path):
    run = tmp_path / "dense"
    r = run_cli("train", "--federation", federation, "--out", run, *sets(*FAST, "fl.rounds=1"))
    assert r.returncode == 0, r.stderr
    ckpt = run / "checkpoints" / "round_0001.pt"
    out = tmp_path / "pruned.pt"
    r = run_cli("prune", ckpt, "--sparsity", "0.6", "--pattern", "row", "--allocation", "global", "--out", out)
    assert r.returncode == 0, r.stderr
    said = re.search(r"sparsity ([0-9.]+)% of ([0-9,]+) prunable weights", r.stdout)
    assert said and float(said.group(1)) == pytest.approx(60.0, abs=1.0), r.stdout
    r = run_cli("info", out, "--json", tmp_path / "info.json")
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["sparsity"] == pytest.approx(0.6, abs=0.01)
    pruned = info["sparsity"] * info["prunable"]
    assert info["dense_bytes"] - info["sparse_bytes"] >= 4 * pruned - info["prunable"] / 8 - 4096
    assert info["flops_nonzero"] < info["flops"]
    assert info["encoder_flops_nonzero"] < info["encoder_flops"]
    # the printed totals are the measured ones
    assert f"{info['nonzeros']:,}" in r.stdout and f"{info['parameters']:,}" in r.stdout
    assert f"{100 * info['sparsity']:.2f}%" in r.stdout and said.group(2) == f"{info['prunable']:,}"
    r = run_cli("prune", ckpt, "--sparsity", "0.5", "--importance", "gradient", "--out", tmp_path / "g.pt")
    assert r.returncode != 0 and "--federation" in r.stderr
    r = run_cli("prune", ckpt, "--sparsity", "0.5", "--importance", "gradient", "--federation", federation,
                "--batches", "2", "--out", tmp_path / "g.pt")
    assert r.returncode == 0, r.stderr
    # gradients were computed without touching the BatchNorm statistics the checkpoint holds
    src, got = torch.load(ckpt, weights_only=True)["model"], torch.load(tmp_path / "g.pt", weights_only=True)["model"]
    bn = [k for k in src if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn and all(torch.equal(src[k], got[k]) for k in bn)
    # fine-tune the pruned checkpoint federatedly: its masks stay fixed
    r = run_cli("train", "--federation", federation, "--out", tmp_path / "ft", "--init-from", out,
                *sets(*FAST, "fl.rounds=1"))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["sparsity"] >= 0.6 - 0.01


def fp(*settings: str) -> list[str]:
    """``--set`` keys of the Federated Pruning block."""
    return [f"pruning.federated_pruning.{s}" for s in settings]


@pytest.mark.parametrize("centralized", [False, True])
def test_refinement_changes_nothing_before_pruning_starts(federation, tmp_path, centralized):
    """Rounds before the schedule's start_round train exactly like a dense run."""
    dense = Runner(tmp_path / "d", Federation(federation), load_config(None, FAST + ["fl.rounds=2"]),
                   centralized=centralized)
    dense.start()
    dense.run_rounds()
    later = Runner(tmp_path / "p", Federation(federation),
                   load_config(None, FAST + PRUNE + ["fl.rounds=2"] + fp("start_round=5", "refine=true")),
                   centralized=centralized)
    later.start()
    later.run_rounds()
    assert not later.masks
    a, b = dense.model.state_dict(), later.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_refinement_with_server_momentum_keeps_pruned_weights(federation, tmp_path):
    """fedadam + refinement: a weight pruned during a round keeps its dense value through it."""
    cfg = load_config(None, FAST + PRUNE + ["fl.rounds=3", "fl.aggregation=fedadam"]
                      + fp("refine=true", "schedule=constant", "start_round=2"))
    r = Runner(tmp_path / "run", Federation(federation), cfg)
    r.start()
    r.cfg.fl.rounds = 2
    r.run_rounds()  # round 1 dense (moments built up), masks from round 2 on
    assert r.masks
    before = {n: t.clone() for n, t in r.model.state_dict().items()}
    masks = {n: m.clone() for n, m in r.masks.items()}
    r.cfg.fl.rounds = 3
    r.run_rounds()
    dense = r.model.state_dict()
    moved = 0
    for n, m in masks.items():
        assert torch.equal(dense[n][~m], before[n][~m]), n
        moved += int((dense[n][m] != before[n][m]).sum())
    assert moved > 0


def test_regrown_units_get_their_biases_and_batchnorm_back(federation, tmp_path):
    """Unit pattern + refinement: a pruned conv channel is zero everywhere in the served model
    (biases and BatchNorm affine too) and comes back with all of them when it regrows."""
    cfg = load_config(None, FAST + PRUNE + ["fl.rounds=3"] + fp("pattern=unit", "allocation=uniform",
                                                                "schedule=constant", "start_round=2", "refine=true"))
    r = Runner(tmp_path / "run", Federation(federation), cfg)
    r.start()
    r.cfg.fl.rounds = 1
    r.run_rounds()  # a dense round trains biases and BatchNorm; masks for round 2 follow it
    pre = "encoder.layers.0.conv"
    dw = r.masks[f"{pre}.depthwise.weight"]
    gone = torch.nonzero(~dw.reshape(dw.shape[0], -1).any(1)).flatten()
    assert len(gone) > 0
    names = [f"{pre}.batch_norm.weight", f"{pre}.batch_norm.bias", f"{pre}.depthwise.bias"]
    served, dense = r.server.served_state(), r.model.state_dict()
    for n in names:
        assert torch.all(served[n][gone] == 0), n  # disconnected while pruned ...
        assert torch.all(dense[n][gone] != 0), n  # ... and kept in the dense weights
    expected = {n: dense[n][gone].clone() for n in names}
    with torch.no_grad():
        dense[f"{pre}.depthwise.weight"][gone] *= 1e6  # the pruned channels become the most important
    r.cfg.fl.rounds = 2
    r.run_rounds()  # round 2 trains them frozen; its mask update regrows them
    served = r.server.served_state()
    for n, want in expected.items():
        assert torch.equal(served[n][gone], want), n


@pytest.mark.parametrize("pattern", ["unstructured", "row", "column", "half_row", "half_column", "unit"])
@pytest.mark.parametrize("alloc", ["uniform", "global", "adaptive"])
def test_high_sparsity_respects_the_cap_and_never_removes_a_whole_layer(pattern, alloc):
    """At 0.9 no layer goes beyond max_layer_sparsity after rounding to whole groups, and
    every layer (4 attention heads, a depthwise kernel with 2 half-column groups, ...)
    keeps at least one group."""
    m = model()
    pr = pruner(m, pattern=pattern, allocation=alloc, target_sparsity=0.9, max_layer_sparsity=0.95)
    w = weights(m)
    masks = pr.compute(1, w, {})
    # a group is kept when any of its elements is: its mean mask value ("l1 magnitude" of the masks) > 0
    as_weights = {n: masks[n].double() if n in masks else torch.ones_like(t, dtype=torch.float64) for n, t in w.items()}
    kept = {l.name: int((l.scores > 0).sum()) for l in pr.layers(as_weights, "magnitude", "l1", None, None)}
    for layer in pr.layers(w, "magnitude", "l2", None, None):
        members = layer.expand(torch.ones(len(layer.sizes), dtype=torch.bool))
        assert kept[layer.name] >= 1, layer.name
        if pattern != "unit":  # (unit families overlap, so their element counts are not additive)
            pruned = sum(int((~masks[n]).sum()) for n in members)
            assert pruned <= 0.95 * layer.numel + 1e-6, (layer.name, pruned / layer.numel)
    if pattern == "unit":
        for fam in m.group_table():
            if fam.kind == "attention_head":
                q = masks[fam.members[0].param]
                heads = q.view(fam.num_units, -1).any(1)
                assert int(heads.sum()) >= 1, fam.name


def test_half_column_on_depthwise_kernels_prunes_channels():
    m = model()
    pr = pruner(m, pattern="half_column", allocation="uniform", target_sparsity=0.9)
    masks = pr.compute(1, weights(m), {})
    dw = masks["encoder.layers.0.conv.depthwise.weight"]  # (d, 1, k)
    channels = dw.reshape(dw.shape[0], -1)
    assert torch.all(channels.all(1) | (~channels).all(1))
    assert int((~channels.all(1)).sum()) == pytest.approx(0.9 * dw.shape[0], abs=1)


@pytest.mark.parametrize("alloc", ["global", "adaptive"])
def test_random_importance_is_random_across_layers(alloc):
    m = model()
    pr = pruner(m, pattern="unstructured", allocation=alloc, importance="random", target_sparsity=0.5)
    masks = pr.compute(1, weights(m), {})
    for n in pr.names:
        if masks[n].numel() >= 2000:  # binomial spread of a layer this size: ~0.01
            assert abs(float((~masks[n]).float().mean()) - 0.5) < 0.06, n


@pytest.mark.parametrize("alloc", ["global", "adaptive"])
def test_gradient_importance_is_not_scaled_by_fan_in(alloc):
    """|w|·ḡ alike everywhere (whatever each layer's fan-in): every layer near the target."""
    m = model()
    w = weights(m)
    pr = pruner(m, pattern="unstructured", allocation=alloc, importance="gradient", target_sparsity=0.5)
    g = torch.Generator().manual_seed(0)
    pr.reports = {n: (1 + 0.1 * torch.rand(w[n].shape, generator=g)) / w[n].abs().clamp(min=1e-12)
                  for n in pr.names}
    masks = pr.compute(2, w, {})
    for n in pr.names:
        if masks[n].numel() >= 2000:
            assert abs(float((~masks[n]).float().mean()) - 0.5) < 0.06, n


def test_adaptive_without_refinement_ranks_only_live_weights():
    """Two layers with the same live weights, one already half pruned for good: the zeros
    must not make it look unimportant (that fed back into ever more pruning)."""
    from fedasr.prune.patterns import Layer

    def layer(name, pruned):
        scores = torch.ones(100, dtype=torch.float64)
        scores[:pruned] = 0.0
        return Layer(name, scores, torch.ones(100, dtype=torch.float64), lambda k: {})

    a, b = layer("a", 0), layer("b", 50)
    forced = {"b": b.scores == 0}
    frac = adaptive_fractions([a, b], 0.6, 0.95, forced)
    assert frac["a"] == pytest.approx(frac["b"])


def test_info_counts_prunable_weights_with_the_runs_exclude(federation, tmp_path):
    """`fedasr info` derives the prunable tensors as `fedasr prune` and training do:
    include minus exclude (it used to ignore exclude)."""
    from fedasr.checkpoint import save_checkpoint
    from fedasr.commands.info import checkpoint_info

    fed = Federation(federation)
    model = Transducer(ModelConfig.preset("tiny", vocab_size=fed.tokenizer.vocab_size))
    path = tmp_path / "ckpt.pt"
    pruning = {"include": ["encoder.layers.*", "joiner.*"], "exclude": ["encoder.layers.*.ff*"]}
    save_checkpoint(path, model, fed.tokenizer, config={"pruning": pruning})
    info = checkpoint_info(path)
    expected = [n for n, p in model.named_parameters() if p.dim() >= 2
                and (n.startswith("encoder.layers.") or n.startswith("joiner.")) and ".ff" not in n]
    assert {lay["name"] for lay in info["layers"] if lay["prunable"]} == set(expected)
    assert info["prunable"] == sum(dict(model.named_parameters())[n].numel() for n in expected)


def test_prune_and_info_take_the_same_prunable_tensors_from_the_checkpoint(federation, tmp_path):
    """`fedasr prune` masks exactly the tensors `fedasr info` calls prunable (one rule:
    the run's include minus its exclude); the excluded ones stay dense."""
    from fedasr.checkpoint import read_checkpoint, save_checkpoint
    from fedasr.commands.info import checkpoint_info
    from fedasr.commands.prune import prune_checkpoint

    fed = Federation(federation)
    torch.manual_seed(0)
    model = Transducer(ModelConfig.preset("tiny", vocab_size=fed.tokenizer.vocab_size))
    path = tmp_path / "ckpt.pt"
    pruning = {"include": ["encoder.layers.*"], "exclude": ["encoder.layers.*.ff*"]}
    save_checkpoint(path, model, fed.tokenizer, config={"pruning": pruning})
    rep = prune_checkpoint(path, tmp_path / "pruned.pt", sparsity=0.5, pattern="unstructured",
                           importance="magnitude", allocation="uniform")
    names = {lay["name"] for lay in checkpoint_info(path)["layers"] if lay["prunable"]}
    masks = read_checkpoint(tmp_path / "pruned.pt")["masks"]
    assert names and set(masks) == names and not any(".ff" in n for n in names)
    assert rep["prunable"] == sum(dict(model.named_parameters())[n].numel() for n in names)
    assert rep["sparsity"] == pytest.approx(0.5, abs=0.01)
