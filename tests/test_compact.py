"""Compaction (every unit family, outputs unchanged), `fedasr compact`/`eval`/`info`,
Automatic Structured Pruning (band rule, shrinking mid-run, resume) and ONNX export."""

import copy
import json

import numpy as np
import pytest
import torch

from conftest import FAST, MICRO_MODEL, interrupted_then_resumed, run_cli, sets, tiny_batch, tiny_model
from nearties import f32_tol, greedy_trace, has_near_tie, near_tie_or_same, torch_joint
from fedasr.checkpoint import load_checkpoint
from fedasr.config import load_config
from fedasr.data.federation import Federation
from fedasr.fl.runner import Runner
from fedasr.methods.asp import band_keep, unit_norms
from fedasr.model.compact import compact_with_masks, compactable, units_pruned_whole
from fedasr.model.conformer import ChannelLayerNorm
from fedasr.model.groups import KINDS, group_families
from fedasr.model.transducer import ModelConfig, Transducer

pytestmark = pytest.mark.usefixtures("single_thread")


def micro(**kw):
    m = tiny_model(**{"pred_layers": 1, **kw}).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.running_mean.normal_(generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
                mod.weight.normal_(generator=g)
                mod.bias.normal_(generator=g)
            if isinstance(mod, ChannelLayerNorm):
                mod.weight.normal_(generator=g)
                mod.bias.normal_(generator=g)
    return m


def unit_masks(model, drop: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Masks removing the listed units of each family (every parameter slice they own)."""
    params = dict(model.named_parameters())
    masks = {}
    for fam in group_families(model):
        for u in drop.get(fam.name, []):
            for m in fam.members:
                if m.param in params:
                    mk = masks.setdefault(m.param, torch.ones_like(params[m.param], dtype=torch.bool))
                    mk.index_fill_(m.dim, m.index[u], False)
    with torch.no_grad():
        for n, mk in masks.items():
            params[n].mul_(mk)
    return masks


def batch():
    b = tiny_batch([70, 52, 33], [4, 3, 2], seed=1, targets=torch.tensor([[1, 2, 3, 4], [5, 6, 1, 0], [2, 2, 0, 0]]))
    return b.feats, b.feat_lens, b.targets, b.target_lens


@pytest.mark.parametrize("predictor,simple,conv_norm", [("lstm", False, "batchnorm"), ("stateless", True, "batchnorm"),
                                                        ("stateless", True, "layernorm")])
def test_compaction_of_every_family_keeps_the_outputs(predictor, simple, conv_norm):
    model = micro(predictor=predictor, simple_head=simple, conv_norm=conv_norm)
    fams = compactable(model)
    assert {f.kind for f in fams} == set(KINDS)
    g = torch.Generator().manual_seed(5)
    drop = {f.name: torch.randperm(f.num_units, generator=g)[: max(1, f.num_units // 3)].tolist() for f in fams}
    masks = unit_masks(model, drop)
    small, left, plan = compact_with_masks(model, masks)
    assert not left  # unit masks leave nothing behind
    for f in fams:  # each family lost exactly its dropped units
        assert int(plan.keep[f.name].sum()) == f.num_units - len(drop[f.name]), f.name
    assert small.num_parameters() == model.num_parameters() - sum(int((~m).sum()) for m in masks.values())
    x = batch()
    with torch.no_grad():
        a, b = model(*x), small.eval()(*x)
        enc_a, _ = model.encode(x[0], x[1])
        enc_b, _ = small.encode(x[0], x[1])
    assert (enc_a - enc_b).abs().max() <= 1e-5
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert (a.ctc_logits - b.ctc_logits).abs().max() <= 1e-5
    if simple:
        assert (a.simple_lm - b.simple_lm).abs().max() <= 1e-5
    # the surviving weights were copied, not re-initialised: the same values, fewer of them
    s_big, s_small = model.state_dict(), small.state_dict()
    for n, t in s_small.items():
        kept = plan.apply({n: s_big[n]})[n]
        assert torch.equal(t, kept), n
    # an optimizer-state-like dict follows the same index selection
    moments = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    assert all(plan.apply(moments)[n].shape == p.shape for n, p in small.named_parameters())


def test_partial_masks_are_refused_or_kept():
    model = micro()
    masks = unit_masks(model, {"encoder.layers.0.ff1.units": [0, 1, 2]})
    extra = masks["encoder.layers.0.ff1.linear1.weight"]
    extra[5, :3] = False  # a few weights of a live unit: not a whole unit
    with pytest.raises(Exception, match=r"3 of its .* masked weights are not in whole units"):
        compact_with_masks(model, masks)
    small, left, plan = compact_with_masks(model, masks, allow_partial=True)
    assert int(plan.keep["encoder.layers.0.ff1.units"].sum()) == MICRO_MODEL["ffn_dim"] - 3
    assert list(left) == ["encoder.layers.0.ff1.linear1.weight"] and int((~left[list(left)[0]]).sum()) == 3
    assert units_pruned_whole(model, {}) == {}


def test_asp_band_rule_against_a_hand_computation():
    norms = torch.tensor([1.0, 2.0, 2.1, 2.2, 1.9, 2.05, 9.0, 2.0], dtype=torch.float64)
    mu = float(norms.mean())
    sigma = float(np.std(norms.numpy()))  # population
    k = 1.5
    both = [bool(mu - k * sigma <= x <= mu + k * sigma) for x in norms.tolist()]
    lower = [bool(x >= mu - k * sigma) for x in norms.tolist()]
    assert band_keep(norms, k, "both").tolist() == both and both[6] is False  # the 9.0 outlier goes
    assert band_keep(norms, k, "lower").tolist() == lower and lower[6] is True
    assert band_keep(torch.tensor([1.0, 1.0]), 0.5, "both").tolist() == [True, True]
    model = micro()
    fam = next(f for f in group_families(model) if f.kind == "attention_head")
    w = dict(model.state_dict())
    by_hand = torch.zeros(fam.num_units, dtype=torch.float64)
    dh = model.encoder.layers[0].attn.d_head
    for h in range(fam.num_units):
        rows = slice(h * dh, (h + 1) * dh)
        for proj in ("q_proj", "k_proj", "v_proj"):
            by_hand[h] += w[f"{fam.name[:-6]}.{proj}.weight"][rows].abs().double().sum()
        by_hand[h] += w[f"{fam.name[:-6]}.out_proj.weight"][:, rows].abs().double().sum()
    torch.testing.assert_close(unit_norms(model, fam, w), by_hand)


ASP = ["pruning.method=asp", "pruning.asp.k=1.0", "fl.aggregation=fedadam"]


def _moments_follow_their_weights(before: dict, after: dict, moments_before: dict, moments_after: dict) -> int:
    """Each weight kept by a shrink keeps its own server-optimizer moments: an element of a
    tensor after the shrink is found before it by its weight's value (values unique in
    their tensor), and its moments must be the ones it had there. Returns how many were
    checked."""
    checked = 0
    for name, st in moments_after.items():
        w0, w1 = before[name].flatten().tolist(), after[name].flatten().tolist()
        seen: dict[float, int] = {}
        for i, v in enumerate(w0):
            seen[v] = -1 if v in seen else i
        for k, t in st.items():
            m0, m1 = moments_before[name][k].flatten(), t.flatten()
            idx = [(j, seen[v]) for j, v in enumerate(w1) if seen.get(v, -1) >= 0]
            assert idx, name
            j, i = map(list, zip(*idx))
            assert torch.equal(m1[j], m0[i]), (name, k)
            checked += len(idx)
    return checked


def test_asp_shrinks_the_model_mid_run_and_resumes_exactly(federation, tmp_path, monkeypatch):
    cfg = FAST + ASP + ["fl.rounds=4", "pruning.asp.max_prune_round=2"]
    straight = Runner(tmp_path / "a", Federation(federation), load_config(None, cfg))
    straight.start()
    shrinks = []
    compact = straight.server.compact

    def snapshot(server):
        return ({k: v.clone() for k, v in server.model.state_dict().items()},
                {n: {k: t.clone() for k, t in st.items()} for n, st in server.server_opt.state.items()})

    def watched(keep):  # the weights and server-optimizer moments on both sides of each shrink
        before = snapshot(straight.server)
        compact(keep)
        shrinks.append((*before, *snapshot(straight.server)))

    monkeypatch.setattr(straight.server, "compact", watched)
    dense_params = straight.model.num_parameters()
    rows = straight.run_rounds()
    assert rows[0]["num_params"] < dense_params
    assert [("widths" in r) for r in rows] == [True, True, False, False]
    assert rows[0]["num_params"] > rows[1]["num_params"] == rows[3]["num_params"]
    assert rows[1]["bytes_down"] > rows[2]["bytes_down"]  # clients get the smaller dense model
    assert rows[3]["sparsity"] > 0.2 and rows[3]["nonzero_params"] <= rows[3]["num_params"]
    widths = straight.model.cfg.widths
    assert widths and all(v >= 1 for v in widths.values())
    # the server optimiser's state follows the shapes, and each kept weight keeps its moments
    for name, st in straight.server.server_opt.state.items():
        assert all(t.shape == straight.model.state_dict()[name].shape for t in st.values()), name
    assert len(shrinks) == 2
    for w0, m0, w1, m1 in shrinks:
        assert {k for st in m1.values() for k in st} == {"m", "v"} and any(bool(st["m"].any()) for st in m1.values())
        assert sum(w0[n].numel() - w1[n].numel() for n in m1) > 0  # the shrink removed weights that have moments
        total = sum(2 * w1[n].numel() for n in m1)  # m and v of every kept weight
        assert _moments_follow_their_weights(w0, w1, m0, m1) >= 0.9 * total

    # stopped after round 1's shrink, resumed across it (round 2 shrinks again)
    resumed = interrupted_then_resumed(tmp_path / "b", Federation(federation), load_config(None, cfg), 1)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.model.cfg.widths == widths


def test_compact_eval_info_and_export_through_the_cli(federation, tmp_path):
    run = tmp_path / "unit"
    settings = FAST + ["fl.rounds=2", "pruning.method=federated_pruning", "pruning.target_sparsity=0.5",
                       "pruning.federated_pruning.pattern=unit", "pruning.federated_pruning.allocation=uniform",
                       "model.overrides.predictor=stateless"]
    r = run_cli("train", "--federation", federation, "--out", run, *sets(*settings))
    assert r.returncode == 0, r.stderr
    ckpt = run / "checkpoints" / "round_0002.pt"
    small = tmp_path / "small.pt"
    r = run_cli("compact", ckpt, "--out", small)
    assert r.returncode == 0, r.stderr
    big_model, _, big_ckpt = load_checkpoint(ckpt)
    small_model, _, small_ckpt = load_checkpoint(small)
    masked = sum(int((~m).sum()) for m in big_ckpt["masks"].values())
    assert masked > 0 and not small_ckpt["masks"]
    assert big_model.num_parameters() - small_model.num_parameters() == masked  # exactly the pruned units go
    # the same function: in float64 the compacted model's logits are the masked one's, along
    # the masked model's greedy path (one symbol a frame) on every test-clean utterance
    fed = Federation(federation)
    cuts = list(fed.split_cuts("test-clean"))
    big64, small64 = copy.deepcopy(big_model).double().eval(), copy.deepcopy(small_model).double().eval()
    traces = {}
    for c in cuts:
        feats = fed.cmvn.apply(torch.from_numpy(c.load_features()).float())
        joint, frames = torch_joint(big64, feats)
        traces[c.id] = greedy_trace(joint, frames, big_model.blank_id, big_model.cfg.pred_context)
        small_joint = torch_joint(small64, feats)[0]
        assert max(float(np.abs(small_joint(t, ctx) - logits).max())
                   for t, (ctx, _, logits) in enumerate(traces[c.id])) <= 1e-10, c.id
    # so `fedasr eval` gives both the same hypotheses, but where float32 rounding may break a near tie
    hyps = {}
    for c in (ckpt, small):
        r = run_cli("eval", c, "--run", run, "--split", "test-clean", "--max-symbols-per-frame", "1")
        assert r.returncode == 0, r.stderr
        tsv = (run / "decode" / "test-clean-beam1.tsv").read_text().splitlines()[1:]
        hyps[c.name] = {line.split("\t")[0]: line.split("\t")[2] for line in tsv}
    assert set(hyps[ckpt.name]) == set(traces)
    for cid, trace in traces.items():
        assert hyps[ckpt.name][cid] == hyps[small.name][cid] or has_near_tie(trace, 2 * f32_tol(trace)), cid
    r = run_cli("info", small, "--json", tmp_path / "info.json")
    assert r.returncode == 0 and json.loads((tmp_path / "info.json").read_text())["parameters"] == \
        small_model.num_parameters()
    # a column-pattern checkpoint is refused with one line
    col = run_cli("prune", ckpt, "--sparsity", "0.5", "--pattern", "column", "--out", tmp_path / "col.pt")
    assert col.returncode == 0, col.stderr
    r = run_cli("compact", tmp_path / "col.pt", "--out", tmp_path / "x.pt")
    assert r.returncode != 0 and "not in whole units" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    # ONNX: onnxruntime decodes the compacted model as the float64 trace, but for a near tie
    pytest.importorskip("onnxruntime")
    from fedasr.export import OnnxTransducer

    r = run_cli("export", small, "--out", tmp_path / "onnx")
    assert r.returncode == 0, r.stderr
    onnx = OnnxTransducer(tmp_path / "onnx")
    for c in cuts:
        raw = c.load_features()
        enc = onnx.encode(raw[None], np.array([len(raw)]))[0][0]
        trace = traces[c.id]
        assert near_tie_or_same(trace, onnx.greedy(enc, 1), big_model.blank_id, 2 * f32_tol(trace)), c.id


def test_centralized_asp_keeps_its_batch_stream_and_resumes_exactly(federation, tmp_path):
    """Regression: a shrink restarted the centralized client's batch stream (and resume differed)."""
    cfg = FAST + ["fl.rounds=3", "pruning.method=asp", "pruning.asp.k=0.5", "pruning.asp.max_prune_round=2"]
    straight = Runner(tmp_path / "a", Federation(federation), load_config(None, cfg), centralized=True)
    straight.start()
    straight.run_rounds()
    assert straight.worker._stream.consumed == 3 * 2 * 2  # rounds x clients_per_round x local_steps, unbroken
    resumed = Runner(tmp_path / "b", Federation(federation), load_config(None, cfg), centralized=True)
    from conftest import StopAfterRound, Stopped

    resumed.events = StopAfterRound(1)
    resumed.start()
    with pytest.raises(Stopped):
        resumed.run_rounds()
    again = Runner.resume(tmp_path / "b")
    again.run_rounds()
    a, b = straight.model.state_dict(), again.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- compacted client training
FP_UNIT = ["pruning.method=federated_pruning", "pruning.target_sparsity=0.5", "pruning.federated_pruning.pattern=unit",
           "pruning.federated_pruning.schedule=constant"]


def test_scatter_inverts_the_compaction_and_keeps_the_base_elsewhere():
    model = micro()
    masks = unit_masks(model, {"encoder.layers.0.ff1.units": [1, 5], "encoder.layers.0.attn.heads": [0],
                               "encoder.layers.0.conv.channels": [2], "predictor.lstm.l0.units": [3],
                               "joiner.units": [0, 4]})
    small, left, plan = compact_with_masks(model, masks)
    state = model.state_dict()
    shrunk = plan.apply(state)
    assert {k: tuple(v.shape) for k, v in shrunk.items()} == plan.shapes()
    base = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in state.items()}
    back = plan.scatter(shrunk, base)
    pred = "joiner.pred_proj.weight"  # shrinks along both dims (joiner rows, predictor columns)
    assert shrunk[pred].shape == (state[pred].shape[0] - 2, state[pred].shape[1] - 1)
    for k, v in state.items():
        kept = masks[k] if k in masks else torch.ones_like(v, dtype=torch.bool)
        if k.endswith(("batch_norm.running_mean", "batch_norm.running_var")):
            kept = masks[k.rsplit(".", 1)[0] + ".weight"]
        assert torch.equal(back[k][kept], v[kept]), k
        assert bool((back[k][~kept] == 7.0).all()), k
    assert int((~masks[pred]).sum()) == 2 * state[pred].shape[1] + state[pred].shape[0] - 2


@pytest.mark.parametrize("setting,expect", [
    (["pruning.federated_pruning.pattern=column"], "pattern is 'column'"),
    (["pruning.method=fedtiny"], "FedTiny's masks are unstructured"),
])
def test_compact_clients_with_masks_of_another_kind_are_a_config_error(setting, expect):
    from fedasr.errors import FedasrError
    from fedasr.methods import validate

    with pytest.raises(FedasrError, match=f"^fl.client_model: compact needs masks that remove whole units, .*{expect}"):
        validate(load_config(None, FP_UNIT + setting + ["fl.client_model=compact"]))
    validate(load_config(None, FP_UNIT + setting + ["fl.client_model=auto"]))  # auto falls back


def test_compact_refuses_masks_outside_whole_units_and_auto_falls_back():
    """A 2-layer LSTM predictor cannot shrink (one hidden size for all layers), so its unit
    masks stay outside any compaction."""
    from fedasr.errors import FedasrError
    from fedasr.fl.server import Server

    model = Transducer(ModelConfig.from_dict({**MICRO_MODEL, "pred_layers": 2}))
    for mode in ("compact", "auto", "masked"):
        server = Server(load_config(None, FP_UNIT + [f"fl.client_model={mode}"]), model, ["a", "b"])
        server.start()
        if mode == "compact":
            with pytest.raises(FedasrError, match=r"^fl.client_model: compact: [\d,]+ of round 1's [\d,]+ "
                                                  r"masked weights are not in whole units"):
                server.client_plan(1)
        else:
            assert server.client_plan(1) is None
    lstm1 = Transducer(ModelConfig.from_dict({**MICRO_MODEL, "pred_layers": 1}))
    server = Server(load_config(None, FP_UNIT + ["fl.client_model=auto"]), lstm1, ["a"])
    server.start()
    assert server.client_plan(1).removed > 0


def _run(path, federation, cfg):
    r = Runner(path, Federation(federation), load_config(None, cfg))
    r.start()
    return r, r.run_rounds()


@pytest.fixture
def float64(monkeypatch):
    """Runs in this process train in float64 (models, features, messages): two computations
    that differ only in their order of summation then agree to ~1e-12, far below any
    difference of behaviour, on every CPU."""
    from fedasr.data.batching import AsrDataset

    features = AsrDataset.features
    monkeypatch.setattr(AsrDataset, "features", lambda self, cut: features(self, cut).double())
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("agg,opt", [("fedavg", "sgd"), ("fedadam", "adamw")])
def test_compact_clients_give_the_masked_weights_and_resume_exactly(federation, tmp_path, float64, agg, opt):
    """FP unit, refined every round: clients training the compacted model end with the masked
    run's served weights. In float32 the two differ by rounding (matrices of other shapes
    sum in another order), which AdamW turns into +-lr steps where a gradient is rounding
    noise alone (the depthwise-conv bias before a BatchNorm); in float64 that noise stays
    below AdamW's eps and the runs agree to 1e-8 after 3 rounds (the weights move by 3e-3
    to 0.1 in rounds 2 and 3): any difference in what is trained shows."""
    from fedasr.model.compact import whole_unit_plan

    cfg = FAST + FP_UNIT + ["fl.rounds=3", "eval.every=0", "model.overrides.dropout=0.0", f"train.optimizer={opt}",
                            f"fl.aggregation={agg}"]
    masked, rm = _run(tmp_path / "m", federation, cfg + ["fl.client_model=masked"])
    compact, rc = _run(tmp_path / "c", federation, cfg + ["fl.client_model=compact"])
    a, b = masked.server.served_state(), compact.server.served_state()
    assert a["encoder.layers.0.ff1.linear1.weight"].dtype == torch.float64
    assert set(masked.masks) == set(compact.masks) and all(torch.equal(masked.masks[k], compact.masks[k])
                                                           for k in masked.masks)
    params = dict(masked.model.named_parameters())
    assert max(float((a[k] - b[k]).abs().max()) for k in params) <= 1e-8  # (measured: 3e-17 SGD, 2e-11 AdamW)
    round1 = torch.load(tmp_path / "m" / "checkpoints" / "round_0001.pt", weights_only=True)["model"]
    assert max(float((a[k] - round1[k]).abs().max()) for k in params) > 1e-3  # rounds 2 and 3 trained
    for k, m in compact.masks.items():  # the removed units are zero in both
        assert not bool(a[k][~m].any()) and not bool(b[k][~m].any()), k
    # BatchNorm statistics agree on the kept channels; a removed channel keeps the server's
    # value under compact training, while masked clients decay it on their zero input
    for k in a:
        if k.endswith(("running_mean", "running_var")):
            kept = compact.masks[k.rsplit(".", 1)[0] + ".weight"]
            assert float((a[k][kept] - b[k][kept]).abs().max()) <= 1e-8, k
    # what travels: the compacted model (its values, every tensor dense) and its update
    plan, _ = whole_unit_plan(compact.model, compact.masks)
    small_bytes = sum(t.numel() * t.element_size() for t in plan.apply(compact.model.state_dict()).values())
    assert plan.removed > 0 and small_bytes < 8 * compact.model.num_parameters()
    down, up = rc[-1]["bytes_down"] / 2, rc[-1]["bytes_up"] / 2  # 2 clients
    assert small_bytes < down < small_bytes + 12_000 and small_bytes < up < small_bytes + 12_000
    assert all(x["bytes_down"] < y["bytes_down"] and x["bytes_up"] < y["bytes_up"] for x, y in zip(rc, rm))
    if agg == "fedavg":  # stopped after round 1, resumed: bit-identical
        resumed = interrupted_then_resumed(tmp_path / "r", Federation(federation),
                                           load_config(None, cfg + ["fl.client_model=compact"]), 1)
        c = resumed.server.served_state()
        assert all(torch.equal(b[k], c[k]) for k in b)
        dense = resumed.server.state_dict()["dense_masked"]
        assert all(torch.equal(v, compact.server.state_dict()["dense_masked"][k]) for k, v in dense.items())
