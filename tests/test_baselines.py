"""The baselines FedTiny is compared against (issue 29): FedDST, PruneFL, SNIP and SynFlow.
Each rule against a case computed by hand, the server-data plumbing, bad settings, and a
short run of each through the embedded engine (exact sparsity, zeros, resume)."""

import pytest
import torch
from torch import nn

from conftest import FAST, interrupted_then_resumed, tiny_model
from fedasr.config import PruningSection, load_config
from fedasr.configlib import from_dict
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.fl.messages import decode_up, encode_up
from fedasr.fl.runner import Runner
from fedasr.methods import validate
from fedasr.methods.base import Report, RoundContext
from fedasr.methods.feddst import FedDST, FedDSTConfig, MaskVotes, ReadjustHooks
from fedasr.methods.pai import snip_scores, synflow_masks, synflow_scores
from fedasr.methods.prunefl import PruneFL, PruneFLConfig, SquaredGradientHooks, admit, stayers
from fedasr.prune.allocation import keep_top, layer_counts, top_positions

pytestmark = pytest.mark.usefixtures("single_thread")


class Params(nn.Module):
    """Named 2-D parameters and nothing else (the methods' rules act per tensor)."""

    def __init__(self, **tensors):
        super().__init__()
        for n, t in tensors.items():
            self.register_parameter(n, nn.Parameter(torch.as_tensor(t, dtype=torch.float32).clone()))


def common(method, sparsity=0.5):
    return PruningSection(method=method, target_sparsity=sparsity, include=["*"])


# ---------------------------------------------------------------------------- allocation
def test_erk_and_uniform_counts_by_hand():
    shapes = {"a": (4, 4), "b": (2, 8), "c": (10, 10)}  # 132 weights; density 0.5 keeps 66
    # ERK scores (Σ dims / Π dims): a 8/16, b 10/16, c 20/100. ε·(8 + 10 + 20) = 66 gives b a
    # density above 1: b is dense (16), then ε·(8 + 20) = 50: a 14.29, c 35.71 -> 14 and 35,
    # and the one left over goes to the larger fractional part (c)
    assert layer_counts(shapes, 0.5, "erk") == {"a": 14, "b": 16, "c": 36}
    assert layer_counts(shapes, 0.5, "uniform") == {"a": 8, "b": 8, "c": 50}
    # every tensor keeps at least one weight; the total stays exact
    counts = layer_counts(shapes, 0.02, "uniform")
    assert min(counts.values()) >= 1 and sum(counts.values()) == round(0.02 * 132)


def test_rankings_break_ties_deterministically():
    p = torch.tensor([1.0, 3.0, 1.0, 3.0, 0.0])
    assert top_positions(p, 3).tolist() == [1, 3, 0]  # ties: the lower index
    assert top_positions(p, 3, secondary=torch.tensor([0, 0, 5, 1, 9.0])).tolist() == [3, 1, 2]
    scores = {"a": torch.tensor([[0.1, 0.2], [0.3, 0.4]]), "b": torch.tensor([[5.0, 6.0, 7.0]])}
    # one global ranking: b's three, then a's best (which also is its floor of one)
    got = keep_top(scores, 4)
    assert got["a"].tolist() == [[False, False], [False, True]] and got["b"].all()
    # a forced (pruned for good) position is never kept; max_layer: a keeps ceil(0.5 x 4) = 2
    got = keep_top(scores, 4, forced={"b": torch.tensor([[False, True, False]])}, max_layer=0.5)
    assert got["a"].tolist() == [[False, False], [True, True]] and got["b"].tolist() == [[True, False, True]]


# ---------------------------------------------------------------------------- FedDST
def feddst(model, sparsity=0.5, rounds=8, **kw):
    return FedDST(from_dict(FedDSTConfig, kw, "pruning.feddst"), common("feddst", sparsity), model, rounds, seed=1)


def test_feddst_initial_mask_keeps_the_erk_count_of_each_tensor_by_magnitude():
    g = torch.Generator().manual_seed(0)
    model = Params(a=torch.randn(4, 4, generator=g), b=torch.randn(2, 8, generator=g),
                   c=torch.randn(10, 10, generator=g))
    w = dict(model.state_dict())
    masks = feddst(model).init(RoundContext(1, 8, w, {}))
    assert {n: int(m.sum()) for n, m in masks.items()} == {"a": 14, "b": 16, "c": 36}
    for n, m in masks.items():  # the largest |w| of each tensor
        if not m.all():
            assert w[n][m].abs().min() > w[n][~m].abs().max()
    rnd = feddst(model, init="random").init(RoundContext(1, 8, w, {}))
    assert {n: int(m.sum()) for n, m in rnd.items()} == {"a": 14, "b": 16, "c": 36}
    assert not torch.equal(rnd["c"], masks["c"])


def test_feddst_plan_decays_and_counts_per_tensor():
    model = Params(a=torch.ones(2, 4), b=torch.ones(3, 3))
    method = feddst(model, rounds=8, alpha=0.5, update_every=2, end_round=4)
    masks = {"a": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool),
             "b": torch.tensor([[1, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)}

    def plan(rnd):
        return method.plan(RoundContext(rnd, 8, dict(model.state_dict()), masks))

    # α_2 = 0.5/2 (1 + cos(π/2)) = 0.25: a keeps 5 -> ceil(1.25) = 2; b keeps 3 -> ceil(0.75) = 1
    assert plan(2) == {"a": 2, "b": 1}
    assert plan(1) == {} and plan(3) == {} and plan(4) == {}  # odd rounds; end_round: α = 0
    assert method.alpha_at(2) == pytest.approx(0.25)


def test_feddst_client_drops_smallest_regrows_largest_gradient_and_uploads_under_its_own_mask():
    model = Params(w=torch.zeros(2, 4))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    hooks = ReadjustHooks({"w": mask}, {"w": 2})
    p = model.w
    # two local steps: the mean gradient at the pruned positions 4..7 is (1.5, -2.5, 2.5, 0.5)
    # (|.|: 6 and 5 tie at 2.5 -> the lower index, 5, first); kept positions do not count
    for g in ([9.0, 9, 9, 9, 1, -2, 3, 0], [9.0, 9, 9, 9, 2, -3, 2, 1]):
        p.grad = torch.tensor(g).view(2, 4)
        hooks.after_backward(model)
        assert torch.all(p.grad[1] == 0)  # masked after the accumulation
        with torch.no_grad():  # the trained weights after the step
            p.copy_(torch.tensor([[0.5, -0.1, 0.3, -0.05], [0.0, 0, 0, 0]]))
        hooks.after_step(model)
    rep = hooks.report()
    assert rep.tensors["w/drop"].tolist() == [3, 1]  # |w| 0.05 and 0.1: the two smallest kept
    assert rep.tensors["w/grow"].tolist() == [5, 6]
    assert rep.tensors["w/drop"].dtype == torch.int32
    own = hooks.upload_masks()["w"]
    assert own.tolist() == [[True, False, True, False], [False, True, True, False]]
    assert torch.equal(mask, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool))  # not changed in place
    # on the wire the update travels under the client's own mask: a dropped weight's update
    # is not sent (it arrives as 0); the changes cost their 2 x 2 int32 indices
    update = {"w": torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0, 0, 0]])}
    payload = encode_up(update, hooks.upload_masks(), rep, {})
    up = decode_up(payload)
    assert up.update["w"].tolist() == [[pytest.approx(0.1), 0.0, pytest.approx(0.3), 0.0], [0.0, 0, 0, 0]]
    assert torch.equal(up.report.tensors["w/grow"], rep.tensors["w/grow"])
    # an untouched round uploads under the received mask
    plain = feddst(model).client_hooks({"w": mask}, feddst(model).configure(RoundContext(1, 8, {}, {"w": mask})))
    assert plain.upload_masks()["w"] is mask


def test_feddst_server_averages_over_the_clients_that_kept_and_sets_the_mask_by_magnitude():
    """Two clients (weights 3 and 1) and one 8-weight tensor kept at {0, 1, 2, 3}; each drops
    and regrows 2 (alpha 1, end_round 4, round 2: α_2 = 0.5, ceil(0.5 x 4) = 2)."""
    model = Params(w=torch.zeros(8, 1))
    method = feddst(model, rounds=8, alpha=1.0, update_every=1, end_round=4)
    M = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool).view(8, 1)
    master = torch.tensor([1.0, 0.3, -0.2, 2.0, 5.0, -6.0, 7.0, 8.0]).view(8, 1)  # 4..7: stale values
    ctx = RoundContext(2, 8, {"w": master.clone()}, {"w": M})
    assert method.plan(ctx) == {"w": 2}
    votes = method.report_aggregator(ctx)
    assert isinstance(votes, MaskVotes)
    a = Report({"w/drop": torch.tensor([0, 1], dtype=torch.int32), "w/grow": torch.tensor([4, 5], dtype=torch.int32)})
    b = Report({"w/drop": torch.tensor([0, 2], dtype=torch.int32), "w/grow": torch.tensor([5, 6], dtype=torch.int32)})
    votes.add(a, 3.0)
    votes.add(b, 1.0)
    assert votes.shares()["w"].view(-1).tolist() == [0, 0.25, 0.75, 1, 0.75, 1, 0.25, 0]
    # A trains 2 -> -0.6, 3 -> 2.4 (own mask {2,3,4,5}); B 1 -> 0.5, 3 -> 1.2 (own {1,3,5,6});
    # regrown weights are sent as zero updates; the engine's FedAvg mean (W = 4):
    delta_a = torch.tensor([0, 0, -0.4, 0.4, 0, 0, 0, 0], dtype=torch.float64).view(8, 1)
    delta_b = torch.tensor([0, 0.2, 0, -0.8, 0, 0, 0, 0], dtype=torch.float64).view(8, 1)
    mean = {"w": (3 * delta_a + delta_b) / 4}
    fixed = method.aggregate_update(ctx, votes, mean)["w"].view(-1)
    # each position over its keepers: 1 -> B's 0.5, 2 -> A's -0.6, 3 -> (3 x 2.4 + 1.2) / 4 = 2.1
    torch.testing.assert_close(fixed, torch.tensor([0, 0.2, -0.4, 0.1, 0, 0, 0, 0], dtype=torch.float64))
    # the server's FedAvg step (lr 1; positions outside the round's mask frozen)
    ctx.weights["w"] += torch.where(M, fixed.view(8, 1), torch.zeros(8, 1, dtype=torch.float64)).float()
    torch.testing.assert_close(ctx.weights["w"].view(-1), torch.tensor([1.0, 0.5, -0.6, 2.1, 5, -6, 7, 8]))
    upd = method.update(ctx, votes)
    # 4 kept: 3 (2.1), 2 (0.6), 1 (0.5), then a zero-valued regrown one: 5, which all the
    # weight kept, before 4 (0.75) and 6 (0.25); 0 was dropped by every client, 7 by none kept
    assert upd.masks["w"].view(-1).nonzero().view(-1).tolist() == [1, 2, 3, 5]
    assert upd.reset["w"].view(-1).nonzero().view(-1).tolist() == [5] and upd.metrics == {"regrown": 1}
    # a report that does not match the round's mask or plan is rejected, leaving nothing
    for bad in ({"w/drop": torch.tensor([4, 1], dtype=torch.int32), "w/grow": torch.tensor([5, 6], dtype=torch.int32)},
                {"w/drop": torch.tensor([0], dtype=torch.int32), "w/grow": torch.tensor([5], dtype=torch.int32)},
                {"w/drop": torch.tensor([0, 0], dtype=torch.int32), "w/grow": torch.tensor([5, 6], dtype=torch.int32)}):
        with pytest.raises(ValueError):
            votes.add(Report(bad), 1.0)
    assert votes.weight == 4.0


def test_feddst_uploads_cost_the_client_masks_and_changes():
    """Bytes up of a readjustment round: each client's bitmask + kept values + 8 bytes a change."""
    model = Params(w=torch.zeros(4, 8))
    mask = torch.zeros(32, dtype=torch.bool)
    mask[:16] = True
    hooks = ReadjustHooks({"w": mask.view(4, 8)}, {"w": 3})
    model.w.grad = torch.arange(32.0).view(4, 8)
    hooks.after_backward(model)
    hooks.after_step(model)
    rep = hooks.report()
    upd = {"w": torch.ones(4, 8)}
    with_changes = encode_up(upd, hooks.upload_masks(), rep, {})
    without = encode_up(upd, {"w": mask.view(4, 8)}, Report(), {})
    head = int.from_bytes(with_changes[4:8], "little")
    head0 = int.from_bytes(without[4:8], "little")
    # the same 16 kept values and 4-byte bitmask; the changes add 2 x 3 int32 indices
    assert (len(with_changes) - 8 - head) - (len(without) - 8 - head0) == 2 * 3 * 4
    assert int(hooks.upload_masks()["w"].sum()) == 16


def test_the_engine_averages_feddst_updates_over_the_clients_that_kept_each_position():
    """Through the real server: replies encoded under the clients' own masks, the method's
    re-normalisation before the FedAvg step."""
    from fedasr.aggregate import is_bn_stat
    from fedasr.fl.server import RoundInfo, Server

    cfg = load_config(None, ["pruning.method=feddst", "pruning.target_sparsity=0.5", "pruning.feddst.alpha=0.5",
                             "pruning.feddst.update_every=1", "pruning.feddst.end_round=4", "fl.rounds=8"])
    server = Server(cfg, tiny_model(), ["a", "b"])
    server.start()
    ex = server.train_exchange(1)
    plan = server.method.plan(server.ctx(1))
    before = {k: v.clone() for k, v in server.model.state_dict().items()}
    replies, owns = [], []
    for client, (weight, delta) in enumerate(((3, 1.0), (1, -1.0))):
        masks, report = dict(server.masks), {}
        for n, k in plan.items():
            kept, pruned = server.masks[n].view(-1).nonzero().view(-1), (~server.masks[n]).view(-1).nonzero().view(-1)
            drop, grow = (kept[:k], pruned[:k]) if client == 0 else (kept[-k:], pruned[:k])
            own = server.masks[n].clone().view(-1)
            own[drop], own[grow] = False, True
            masks[n] = own.view(server.masks[n].shape)
            report[f"{n}/drop"], report[f"{n}/grow"] = drop.to(torch.int32), grow.to(torch.int32)
        update = {k: v.clone() if is_bn_stat(k) or not v.is_floating_point() else torch.full_like(v, delta)
                  for k, v in before.items()}
        replies.append(encode_up(update, masks, Report(report),
                                 {"kind": "train", "num_examples": weight, "metrics": {"loss": 1.0, "steps": 1}}))
        owns.append(masks)
    info = RoundInfo(["a", "b"])
    for reply in replies:
        server.absorb(ex, reply, info)
    M = {n: mask.clone() for n, mask in server.masks.items()}
    server.finish(ex, info)
    n = next(iter(plan))
    a, b, kept, m = owns[0][n].view(-1), owns[1][n].view(-1), M[n].view(-1), before[n].view(-1)
    got = server.model.state_dict()[n].view(-1)
    both, only_a, only_b = a & b & kept, a & ~b & kept, b & ~a & kept
    assert both.any() and only_a.any() and only_b.any()
    torch.testing.assert_close(got[both], m[both] + 0.5)  # (3 x 1 - 1 x 1) / 4
    torch.testing.assert_close(got[only_a], m[only_a] + 1.0)  # A's update alone (not 3/4 of it)
    torch.testing.assert_close(got[only_b], m[only_b] - 1.0)  # B's alone (not 1/4 of it)

def test_a_feddst_client_worker_sends_its_update_under_its_own_mask(federation, tmp_path):
    from fedasr import codec

    cfg = load_config(None, FAST + ["fl.rounds=4", "pruning.method=feddst", "pruning.target_sparsity=0.7",
                                    "pruning.feddst.update_every=1", "pruning.feddst.alpha=0.5"])
    runner = Runner(tmp_path / "run", Federation(federation), cfg)
    runner.start()
    ex = runner.server.train_exchange(1)
    client = runner.server.sample_clients(1)[0]
    reply = runner.worker.handle(runner.server.client_header(1, client), ex.payload)
    tensors, masks, _ = codec.decode_message(reply)
    plan = runner.method.plan(runner.server.ctx(1))
    assert plan
    for n, m in runner.masks.items():
        own = m.clone().view(-1)
        if n in plan:
            drop, grow = tensors[f"r/{n}/drop"].long(), tensors[f"r/{n}/grow"].long()
            assert len(drop) == len(grow) == plan[n]
            own[drop], own[grow] = False, True
            assert torch.all(tensors[f"u/{n}"].view(-1)[grow] == 0)  # regrown at zero: a zero update
        assert torch.equal(masks[f"u/{n}"].view(-1), own), n  # dropped weights are not sent

# ---------------------------------------------------------------------------- PruneFL
def test_prunefl_reconfiguration_ranks_importance_over_cost():
    masks = {"a": torch.tensor([1, 1, 1, 0], dtype=torch.bool), "b": torch.tensor([1, 1, 0, 0], dtype=torch.bool)}
    weights = {"a": torch.tensor([0.9, 0.1, 0.5, 0.0]), "b": torch.tensor([0.3, 0.05, 0.2, 0.7])}
    # max_decrease 0.5: a may lose floor(1.5) = 1 kept weight (its smallest: 1), b floor(1) = 1 (1)
    stay = stayers(masks, weights, 0.5)
    assert stay["a"].tolist() == [True, False, True, False] and stay["b"].tolist() == [True, False, False, False]
    importance = {"a": torch.tensor([4.0, 3, 1, 6]), "b": torch.tensor([1.0, 10, 8, 2])}
    cost = {"a": 1.0, "b": 2.0}  # importance / cost: a 4 3 1 6, b 0.5 5 4 1
    # fixed: fill up to 5 kept: the candidates a1 (3), a3 (6), b1 (5), b2 (4), b3 (1) -> a3, b1
    got = admit(stay, importance, 5, cost)
    assert got["a"].tolist() == [True, False, True, True] and got["b"].tolist() == [True, True, False, False]
    # adaptive, cap 7: kept so far Σ importance 6 over Σ cost 4 (1.5); a3: 6 > 1.5 -> 12/5;
    # b1: 5 > 2.4 -> 22/7; b2: 4 > 3.14 -> 30/9; a1: 3 < 3.33 stops (6 kept, below the cap of 7)
    got = admit(stay, importance, 7, cost, adaptive=True)
    assert got["a"].tolist() == [True, False, True, True] and got["b"].tolist() == [True, True, True, False]
    # with the round's fixed time T0 = 0.5 x Σ cost (12) = 6: 6/10; a3 -> 12/11, b1 -> 22/13,
    # b2 -> 30/15, a1: 3 > 2 -> 33/16; b3: 1 < 2.06 stops: 7 kept (the cap is 8)
    got = admit(stay, importance, 8, cost, time_constant=0.5, adaptive=True)
    assert got["a"].tolist() == [True, True, True, True] and got["b"].tolist() == [True, True, True, False]


def test_prunefl_clients_report_the_sum_of_squared_gradients_before_masking():
    model = Params(w=torch.zeros(1, 3))
    mask = torch.tensor([[True, False, True]])
    hooks = SquaredGradientHooks({"w": mask}, ["w"])
    for g in ([1.0, 2.0, -1.0], [3.0, -1.0, 0.5]):
        model.w.grad = torch.tensor([g])
        hooks.after_backward(model)
    assert hooks.report().tensors["w"].tolist() == [[10.0, 5.0, 1.25]]
    method = PruneFL(from_dict(PruneFLConfig, {"reconfig_every": 2}, "p"), common("prunefl"), model, 6, 0)
    asks = [method.configure(RoundContext(r, 6, {}, {"w": mask})).meta["report_sqgrad"] for r in range(1, 7)]
    assert asks == [False, True, False, True, False, False]  # every 2 rounds, not after the last


def test_prunefl_initial_pruning_reaches_the_target_scoring_the_server_data_once(monkeypatch):
    g = torch.Generator().manual_seed(0)
    model = Params(a=torch.randn(6, 5, generator=g), b=torch.randn(5, 4, generator=g))
    method = PruneFL(from_dict(PruneFLConfig, {"max_decrease": 0.3, "init_batches": 2}, "p"),
                     common("prunefl", 0.8), model, 6, 0)
    calls = []

    def server_batches():
        calls.append(1)
        return iter([torch.ones(1, 4), torch.full((1, 4), 2.0)])

    import fedasr.methods.prunefl as prunefl_module

    def loss(net, x):  # (the Transducer's RNN-T loss, for this two-tensor model)
        return (net.a @ (net.b @ x.T)).square().sum()

    original = prunefl_module.gradient_sums
    monkeypatch.setattr(prunefl_module, "gradient_sums", lambda *a, **k: original(*a, **{**k, "loss": loss}))
    masks = method.init(RoundContext(1, 6, dict(model.state_dict()), {}, model, server_batches))
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * 50) == method.n_keep
    assert len(calls) == 1  # only the last reconfiguration admits weights by importance
    with pytest.raises(FedasrError, match="pruning.method: prunefl needs the server's own data"):
        method.init(RoundContext(1, 6, dict(model.state_dict()), {}, model))


# ---------------------------------------------------------------------------- SNIP, SynFlow
def two_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Params(w1=torch.randn(3, 4, generator=g), w2=torch.randn(2, 3, generator=g))


def test_snip_scores_are_weight_times_summed_gradient_in_closed_form():
    model = two_layer()
    w1, w2 = model.w1.detach().double(), model.w2.detach().double()
    data = [(torch.randn(4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)) for _ in range(2)]

    def loss(net, batch):  # 1/2 |W2 W1 x - t|²
        x, t = batch
        return 0.5 * (net.w2.double() @ (net.w1.double() @ x) - t).square().sum()

    scores = snip_scores(model, ["w1", "w2"], data, loss=loss)
    g1, g2 = torch.zeros_like(w1), torch.zeros_like(w2)
    for x, t in data:  # dL/dW2 = r hᵀ, dL/dW1 = W2ᵀ r xᵀ with h = W1 x, r = W2 h - t
        h = w1 @ x
        r = w2 @ h - t
        g2 += torch.outer(r, h)
        g1 += torch.outer(w2.T @ r, x)
    torch.testing.assert_close(scores["w1"], (w1 * g1).abs(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores["w2"], (w2 * g2).abs(), rtol=1e-5, atol=1e-6)
    assert not model.w1.grad  # the model itself is untouched


def flow(net):  # R = 1ᵀ |W2| |W1| 1 (the linearised net: weights already by absolute value)
    return (net.w2 @ (net.w1 @ torch.ones(4, dtype=torch.float64))).sum()


def test_synflow_scores_and_iterative_schedule_in_closed_form():
    model = two_layer(1)
    a1, a2 = model.w1.detach().double().abs(), model.w2.detach().double().abs()
    scores = synflow_scores(model, ["w1", "w2"], {}, flow)
    # ∂R/∂|W1|[i, j] = Σ_k |W2|[k, i];  ∂R/∂|W2|[k, i] = Σ_j |W1|[i, j]
    torch.testing.assert_close(scores["w1"], a1 * a2.sum(0).view(3, 1))
    torch.testing.assert_close(scores["w2"], a2 * a1.sum(1).view(1, 3))
    # two iterations to 6 of 18: first round(18 x (1/3)^(1/2)) = 10 kept, then 6, rescored
    # with the first mask applied (a pruned weight adds no flow)
    masks = synflow_masks(model, ["w1", "w2"], 6, 2, flow=flow)
    first = keep_top({"w1": a1 * a2.sum(0).view(3, 1), "w2": a2 * a1.sum(1).view(1, 3)}, 10)
    m1, m2 = a1 * first["w1"], a2 * first["w2"]
    again = keep_top({"w1": m1 * m2.sum(0).view(3, 1), "w2": m2 * m1.sum(1).view(1, 3)}, 6,
                     forced={n: ~m for n, m in first.items()})
    assert all(torch.equal(masks[n], again[n]) for n in masks)
    assert sum(int(m.sum()) for m in masks.values()) == 6 and all(m.any() for m in masks.values())


def test_synflow_on_the_transducer_conserves_flow_and_balances_encoder_and_predictor():
    model = tiny_model(num_layers=2, predictor="stateless")
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    scores = synflow_scores(model, names, {})
    flows = {n: float(scores[n].sum()) for n in names}
    assert all(torch.isfinite(scores[n]).all() for n in names)
    # the linearised attention weighs its keys uniformly: queries and keys carry no flow
    assert all(v == 0 for n, v in flows.items() if n.endswith(("q_proj.weight", "k_proj.weight")))
    # every other encoder tensor lies in series with the rest (a residual skip takes a share):
    # the same flow to within a factor 1.5, not the orders of magnitude LayerNorm and the
    # saturated tanh joiner gave before the linearisation
    enc = [v for n, v in flows.items() if n.startswith("encoder.") and not n.endswith(("q_proj.weight",
                                                                                        "k_proj.weight"))]
    assert max(enc) / min(enc) < 1.5
    # the deep encoder and the shallow predictor bring the same flow to the joiner
    assert 0.5 < flows["joiner.pred_proj.weight"] / flows["joiner.enc_proj.weight"] < 2
    assert 0.5 < flows["predictor.conv.weight"] / flows["joiner.enc_proj.weight"] < 2
    assert flows["ctc_head.weight"] == 0  # not on the decoding path
    # the model itself is untouched, and so are the functions the linearisation replaced
    assert float(torch.tanh(torch.tensor(1.0))) == pytest.approx(0.7616, abs=1e-4) and all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize("setting, message", [
    ("pruning.feddst.alpha=0", "pruning.feddst.alpha: must be in (0, 1]"),
    ("pruning.feddst.allocation=er", "pruning.feddst.allocation: unknown 'er' (erk, uniform)"),
    ("pruning.prunefl.max_decrease=1.0", "pruning.prunefl.max_decrease: must be in (0, 1)"),
    ("pruning.prunefl.density=free", "pruning.prunefl.density: unknown 'free' (fixed, adaptive)"),
    ("pruning.snip.batches=0", "pruning.snip.batches: must be at least 1"),
    ("pruning.synflow.iterations=0", "pruning.synflow.iterations: must be at least 1"),
    ("pruning.synflow.max_layer_sparsity=0.4", "pruning.synflow.max_layer_sparsity: 0.4 is below"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(setting, message):
    method = setting.split(".")[1]
    cfg = load_config(None, [f"pruning.method={method}", "pruning.target_sparsity=0.5", setting])
    with pytest.raises(FedasrError) as e:
        validate(cfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_method_that_needs_server_data_refuses_a_federation_without_it(federation, tmp_path):
    cfg = load_config(None, FAST + ["pruning.method=snip", "pruning.target_sparsity=0.5"])
    with pytest.raises(FedasrError, match=r"pruning.method: snip needs the server's own data.*--server-split"):
        Runner(tmp_path / "run", Federation(federation), cfg)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- runs
RUNS = {
    "feddst": ["pruning.feddst.alpha=0.3", "pruning.feddst.update_every=1", "pruning.feddst.end_round=2"],
    "prunefl": ["pruning.prunefl.reconfig_every=1", "pruning.prunefl.init_batches=1"],
    "snip": ["pruning.snip.batches=1"],
    "synflow": ["pruning.synflow.iterations=4"],
}


class Checks:
    """Runner events: at the end of every round, the masks' kept count per tensor, after
    checking that every served weight at a pruned position is exactly zero."""

    def __init__(self, box):
        self.box = box  # [the runner]
        self.counts = []

    def round_start(self, rnd, clients):
        pass

    def client_done(self, client, ok):
        pass

    def round_end(self, row):
        r = self.box[0]
        served = r.server.served_state()
        assert all(torch.all(served[n][~m] == 0) for n, m in r.masks.items())
        self.counts.append({n: int(m.sum()) for n, m in r.masks.items()})


@pytest.mark.parametrize("method", sorted(RUNS))
def test_run_keeps_the_sparsity_exact_zeros_pruned_and_resumes_bit_identically(method, server_federation, tmp_path):
    cfg = load_config(None, FAST + ["fl.rounds=2", f"pruning.method={method}", "pruning.target_sparsity=0.7",
                                    *RUNS[method]])
    fed = Federation(server_federation)
    box = []
    checks = Checks(box)
    straight = Runner(tmp_path / "a", fed, cfg, events=checks)
    box.append(straight)
    straight.start()
    initial = {n: int(m.sum()) for n, m in straight.masks.items()}
    total = sum(p.numel() for n, p in straight.model.named_parameters() if n in straight.prunable)
    assert set(initial) == set(straight.prunable) and sum(initial.values()) == round(0.3 * total)
    rows = straight.run_rounds()
    for counts in checks.counts:
        if method == "feddst":  # every tensor keeps its count
            assert counts == initial
        else:
            assert sum(counts.values()) == sum(initial.values())
    if method in ("feddst", "prunefl"):  # the masks moved in round 1
        assert rows[0]["regrown"] > 0
    for row in rows:  # zeros of the served model: at least the masks' (a kept weight may be 0)
        assert row["sparsity"] >= 0.7 - 1 / total
    # stopped after round 1 and resumed: the same weights and masks
    resumed = interrupted_then_resumed(tmp_path / "b", fed, cfg, 1)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(straight.masks[k], resumed.masks[k]) for k in straight.masks)
    assert [r.get("regrown") for r in straight.history] == [r.get("regrown") for r in resumed.history]
    assert straight.history[-1]["bytes_down"] == resumed.history[-1]["bytes_down"]

