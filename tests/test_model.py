"""Tests for the Conformer-Transducer model and its pruning group table."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import MICRO_MODEL, tiny_batch, tiny_model
from fedasr.errors import FedasrError
from fedasr.model.conformer import Conv2dSubsampling, MaskedBatchNorm1d, lengths_to_mask
from fedasr.model.groups import KINDS, group_families
from fedasr.model.transducer import PRESETS, ModelConfig, Transducer, TransducerOutput


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend


def micro_model(seed: int = 0, **overrides) -> Transducer:
    return tiny_model(seed, **{"num_layers": 2, **overrides})


def randomize_bn(model: nn.Module, seed: int = 1) -> None:
    """Give BatchNorm layers non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def batch(b=3, t=48, f=20, u=4, vocab=7, seed=0):
    x = tiny_batch([t] + [max(7, t - 9 * (i + 1)) for i in range(b - 1)], [u] + [max(0, u - 1 - i) for i in range(b - 1)],
                   seed=seed, num_features=f, vocab=vocab)
    return x.feats, x.feat_lens, x.targets, x.target_lens


# --------------------------------------------------------------------------- shapes


def test_subsampling_output_lengths_exact():
    sub = Conv2dSubsampling(num_features=20, channels=4, d_model=16)
    for n in range(1, 40):
        x, out_len = sub(torch.randn(1, n, 20), torch.tensor([n]))
        expected = x.size(1) if n >= 7 else 0
        assert int(out_len) == expected == Conv2dSubsampling.output_lengths(n), n
    assert Conv2dSubsampling.output_lengths(300) == 74
    lens = torch.arange(0, 50)
    assert Conv2dSubsampling.output_lengths(lens).tolist() == [Conv2dSubsampling.output_lengths(n) for n in range(50)]


def test_forward_shapes_and_lengths():
    model = micro_model()
    feats, feat_lens, targets, target_lens = batch()
    out = model(feats, feat_lens, targets, target_lens)
    assert isinstance(out, TransducerOutput)
    enc_lens = Conv2dSubsampling.output_lengths(feat_lens)
    assert out.enc_lens.tolist() == enc_lens.tolist()
    t_out = int(enc_lens.max())
    assert out.logits.shape == (3, t_out, int(target_lens.max()) + 1, 7)
    assert out.ctc_logits.shape == (3, t_out, 7)

    enc, lens = model.encode(feats, feat_lens)
    assert enc.shape == (3, t_out, 16)
    mask = lengths_to_mask(lens, t_out)
    assert torch.all(enc[~mask] == 0), "padded encoder frames are zero"
    assert torch.isfinite(enc).all()

    # targets wider than max(target_lens) are trimmed (torchaudio rnnt_loss convention)
    wide = torch.cat([targets, torch.full((3, 5), -1)], dim=1)
    assert model(feats, feat_lens, wide, target_lens).logits.shape == out.logits.shape


def test_short_and_empty_targets():
    model = micro_model().eval()
    feats = torch.randn(2, 5, 20)  # shorter than the 7 frames the front end needs
    out = model(feats, torch.tensor([5, 3]), torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 0]))
    assert out.enc_lens.tolist() == [0, 0]
    assert out.logits.shape == (2, 0, 1, 7)
    enc, lens = model.encode(torch.randn(2, 30, 20), torch.tensor([30, 4]))
    assert lens.tolist() == [Conv2dSubsampling.output_lengths(30), 0]
    assert torch.isfinite(enc).all()


def test_no_ctc_head():
    model = micro_model(ctc_head=False)
    assert model.ctc_head is None
    assert not any(k.startswith("ctc_head") for k in model.state_dict())
    out = model(*batch())
    assert out.ctc_logits is None


def test_backward_reaches_every_parameter():
    model = micro_model(dropout=0.1).train()
    out = model(*batch())
    loss = out.logits.logsumexp(-1).mean() + out.ctc_logits.logsumexp(-1).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "predictor.embedding.weight":
            assert p.grad.abs().sum() > 0, name


def test_predictor_sos_and_joiner():
    model = micro_model().eval()
    pred = model.predictor
    targets = torch.tensor([[3, 4, -1], [5, 6, 2]])
    out = pred.forward_with_sos(targets)
    assert out.shape == (2, 4, 12)
    step0, state = pred(torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(out[:, :1], step0)
    step1, _ = pred(targets[:, :1], state)  # incremental == full
    torch.testing.assert_close(out[:, 1:2], step1)
    padded_as_blank = pred.forward_with_sos(torch.tensor([[3, 4, 0]]))
    torch.testing.assert_close(out[:1], padded_as_blank)

    j = model.joiner
    enc_p, pred_p = torch.randn(2, 5, 10), torch.randn(2, 3, 10)
    full = j.joint(enc_p[:, :, None], pred_p[:, None])
    assert full.shape == (2, 5, 3, 7)
    torch.testing.assert_close(full[1, 4, 2], j.joint(enc_p[1, 4][None], pred_p[1, 2][None])[0])


def test_padding_invariance_eval():
    model = micro_model(num_layers=3, dropout=0.1).eval()
    randomize_bn(model)
    g = torch.Generator().manual_seed(5)
    short = torch.randn(1, 37, 20, generator=g)
    long = torch.randn(1, 80, 20, generator=g)
    padded = torch.cat([short, 100 * torch.randn(1, 43, 20, generator=g)], dim=1)  # garbage padding
    with torch.no_grad():
        alone, alone_len = model.encode(short, torch.tensor([37]))
        both, both_len = model.encode(torch.cat([padded, long]), torch.tensor([37, 80]))
        long_alone, _ = model.encode(long, torch.tensor([80]))
    n = int(alone_len)
    assert int(both_len[0]) == n and alone.size(1) == n
    torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], long_alone[0], atol=1e-5, rtol=0)

    targets = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        l_alone = model(short, torch.tensor([37]), targets[:1, :2], torch.tensor([2])).logits
        l_both = model(torch.cat([padded, long]), torch.tensor([37, 80]), targets, torch.tensor([2, 3])).logits
    torch.testing.assert_close(l_both[0, :n, :3], l_alone[0], atol=1e-5, rtol=0)


def test_masked_batch_norm_training_statistics():
    torch.manual_seed(0)
    c = 6
    bn = MaskedBatchNorm1d(c).train()
    ref = nn.BatchNorm1d(c).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    ref.load_state_dict(bn.state_dict())
    x = torch.randn(3, c, 10)
    mask = lengths_to_mask(torch.tensor([10, 6, 3]), 10)
    out = bn(x, mask)
    expected = ref(x.transpose(1, 2)[mask])
    torch.testing.assert_close(out.transpose(1, 2)[mask], expected)
    assert torch.all(out.transpose(1, 2)[~mask] == 0)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    # padded values do not affect the statistics
    x2 = x.clone()
    x2.transpose(1, 2)[~mask] = 1e3
    torch.testing.assert_close(bn(x2, mask), out)
    # eval mode / no mask: plain BatchNorm
    bn.eval()
    ref.eval()
    ref.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x, mask), ref(x))


def test_state_dict_round_trip():
    model = micro_model().eval()
    randomize_bn(model)
    other = micro_model(seed=3).eval()
    other.load_state_dict(model.state_dict())
    feats, feat_lens, targets, target_lens = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            model(feats, feat_lens, targets, target_lens).logits, other(feats, feat_lens, targets, target_lens).logits
        )


# --------------------------------------------------------------------------- names / config


def test_parameter_names_stable():
    keys = set(micro_model().state_dict())
    for name in [
        "encoder.subsampling.conv1.weight",
        "encoder.subsampling.conv2.bias",
        "encoder.subsampling.linear.weight",
        "encoder.layers.0.ff1.linear1.weight",
        "encoder.layers.1.ff2.linear2.bias",
        "encoder.layers.0.attn.q_proj.weight",
        "encoder.layers.0.attn.out_proj.bias",
        "encoder.layers.1.conv.pointwise1.weight",
        "encoder.layers.1.conv.depthwise.weight",
        "encoder.layers.0.conv.batch_norm.running_var",
        "encoder.layers.0.final_norm.weight",
        "predictor.embedding.weight",
        "predictor.lstm.weight_ih_l0",
        "predictor.lstm.weight_hh_l1",
        "joiner.enc_proj.weight",
        "joiner.pred_proj.bias",
        "joiner.output.weight",
        "ctc_head.weight",
    ]:
        assert name in keys, name
    layer0 = sorted(k[len("encoder.layers.0.") :] for k in keys if k.startswith("encoder.layers.0."))
    expected = []
    for ff in ("ff1", "ff2"):
        expected += [f"{ff}.norm.weight", f"{ff}.norm.bias"]
        expected += [f"{ff}.{lin}.{w}" for lin in ("linear1", "linear2") for w in ("weight", "bias")]
    expected += ["attn.norm.weight", "attn.norm.bias"]
    expected += [f"attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")]
    expected += ["conv.norm.weight", "conv.norm.bias"]
    expected += [f"conv.{p}.{w}" for p in ("pointwise1", "depthwise", "pointwise2") for w in ("weight", "bias")]
    expected += [f"conv.batch_norm.{w}" for w in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    expected += ["final_norm.weight", "final_norm.bias"]
    assert layer0 == sorted(expected)
    assert not any("pos_enc" in k for k in keys), "positional table is not checkpointed"


@pytest.mark.parametrize("name,target", [("small", 10e6), ("medium", 30e6)])
def test_preset_sizes(name, target):
    with torch.device("meta"):
        n = Transducer(ModelConfig.preset(name, vocab_size=256)).num_parameters()
    assert abs(n - target) <= 0.15 * target, n


def test_tiny_preset_is_small():
    with torch.device("meta"):
        n = Transducer(ModelConfig.preset("tiny", vocab_size=256)).num_parameters()
    assert n < 4e6
    assert set(PRESETS) >= {"tiny", "small", "medium"}


def test_config_round_trip_and_errors():
    cfg = ModelConfig.preset("small", vocab_size=500, dropout=0.2)
    assert cfg.vocab_size == 500 and cfg.num_layers == 16 and cfg.dropout == 0.2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus_key"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus_key": 1})
    with pytest.raises(ValueError, match="bogus_key"):
        ModelConfig.preset("tiny", bogus_key=1)
    with pytest.raises(ValueError, match="nope"):
        ModelConfig.preset("nope")
    with pytest.raises(FedasrError):  # user-facing error class as well
        ModelConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(conv_kernel=4)
    with pytest.raises(ValueError, match="blank_id"):
        ModelConfig(vocab_size=5, blank_id=5)


# --------------------------------------------------------------------------- torchaudio


TA_CONFORMER = dict(d_model=16, num_heads=4, ffn_dim=24, conv_kernel=5, num_layers=2)
TA_FIXTURE = Path(__file__).parent / "fixtures" / "torchaudio_conformer.pt"


def ta_conformer_model() -> Transducer:
    """fedasr's side of the torchaudio cross-check (two layers, non-trivial BatchNorm)."""
    model = micro_model(**TA_CONFORMER).eval()
    randomize_bn(model)
    return model


def ta_conformer_input() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 23, TA_CONFORMER["d_model"], generator=torch.Generator().manual_seed(23))
    return x, torch.tensor([23, 23])  # torchaudio's conv module lets padding leak; compare unpadded


def copy_into_torchaudio(model: Transducer, ref: nn.Module) -> None:
    """fedasr's encoder layers -> ``torchaudio.models.Conformer`` (torchaudio's conv module
    has no biases: fedasr's are zeroed)."""

    def copy_(dst: nn.Module, src: nn.Module) -> None:
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)
        elif getattr(src, "bias", None) is not None:
            src.bias.zero_()

    with torch.no_grad():
        for ours, theirs in zip(model.encoder.layers, ref.conformer_layers):
            for ff_o, ff_t in ((ours.ff1, theirs.ffn1), (ours.ff2, theirs.ffn2)):
                copy_(ff_t.sequential[0], ff_o.norm)
                copy_(ff_t.sequential[1], ff_o.linear1)
                copy_(ff_t.sequential[4], ff_o.linear2)
            a = ours.attn
            copy_(theirs.self_attn_layer_norm, a.norm)
            theirs.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            theirs.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            copy_(theirs.self_attn.out_proj, a.out_proj)
            cv, seq = ours.conv, theirs.conv_module.sequential
            copy_(theirs.conv_module.layer_norm, cv.norm)
            copy_(seq[0], cv.pointwise1)
            copy_(seq[2], cv.depthwise)
            seq[3].load_state_dict(cv.batch_norm.state_dict())
            copy_(seq[5], cv.pointwise2)
            copy_(theirs.final_layer_norm, ours.final_norm)


def run_layers(model: Transducer, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = x
        for layer in model.encoder.layers:
            h = layer(h, lengths_to_mask(lengths, x.size(1)))
    return h


def torchaudio_conformer_run(ta_models):
    """fedasr's layers (:func:`ta_conformer_model`), their weights copied into torchaudio's
    Conformer, which runs on :func:`ta_conformer_input`: (model, x, lengths, torchaudio's output)."""
    model = ta_conformer_model()
    c = TA_CONFORMER
    ref = ta_models.Conformer(input_dim=c["d_model"], num_heads=c["num_heads"], ffn_dim=c["ffn_dim"],
                              num_layers=c["num_layers"], depthwise_conv_kernel_size=c["conv_kernel"],
                              dropout=0.0).eval()
    copy_into_torchaudio(model, ref)
    x, lengths = ta_conformer_input()
    with torch.no_grad():
        expected, _ = ref(x, lengths)
    return model, x, lengths, expected


def test_layer_matches_torchaudio_conformer():
    model, x, lengths, expected = torchaudio_conformer_run(pytest.importorskip("torchaudio.models"))
    torch.testing.assert_close(run_layers(model, x, lengths), expected, atol=1e-5, rtol=1e-5)


def test_layer_matches_torchaudio_conformer_fixture():
    """The same comparison against torchaudio's output kept in tests/fixtures (made by
    scripts/make_torchaudio_fixtures.py in an environment with a torchaudio that loads):
    it runs where torchaudio does not."""
    fx = torch.load(TA_FIXTURE, weights_only=True)
    model = ta_conformer_model()
    with torch.no_grad():  # the weights torchaudio ran with (fedasr's conv biases zeroed by the copy)
        model.encoder.layers.load_state_dict(fx["layers"])
    x, lengths = ta_conformer_input()
    assert torch.equal(x, fx["x"]) and torch.equal(lengths, fx["lengths"])
    torch.testing.assert_close(run_layers(model, x, lengths), fx["expected"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- group table


def _unit_mask(fam, param: str, shape, unit: int) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for mem in fam.members:
        if mem.param == param:
            m.index_fill_(mem.dim, mem.index[unit], True)
    return m


def _apply(model: nn.Module, fam, unit: int, fn, only_member=None) -> None:
    """``tensor[slice] = fn(slice)`` for the unit's member slices (all, or one member)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for i, mem in enumerate(fam.members):
            if only_member is not None and i != only_member:
                continue
            t = state[mem.param]
            m = torch.zeros(t.shape, dtype=torch.bool)
            m.index_fill_(mem.dim, mem.index[unit], True)
            t[m] = fn(t[m], mem.param)


def _zero(x, name):
    return torch.zeros_like(x)


def _perturb(x, name):
    g = torch.randn(x.shape)
    return g.abs() + 0.5 if name.endswith("running_var") else 2 * g


def _heads(out):
    """Every output of the model: joint logits, CTC logits and the simple-loss heads if any."""
    return [x for x in (out.logits, out.ctc_logits, out.simple_am, out.simple_lm) if x is not None]


def _outputs_and_grads(model, inputs, weights):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    loss = sum((x * w).sum() for x, w in zip(_heads(out), weights))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return [x.detach() for x in _heads(out)], grads


@pytest.fixture(scope="module", params=[("lstm", False), ("stateless", True)], ids=["lstm", "stateless+simple"])
def group_setup(request):
    predictor, simple = request.param
    model = micro_model(seed=7, predictor=predictor, simple_head=simple).eval()
    randomize_bn(model)
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2, 40, 20, generator=g)
    inputs = (feats, torch.tensor([40, 29]), torch.tensor([[1, 2, 3, 4], [5, 6, 1, 0]]), torch.tensor([4, 3]))
    with torch.no_grad():
        out = model(*inputs)
    weights = [torch.randn(x.shape, generator=g) for x in _heads(out)]
    return model, inputs, weights


def test_group_table_structure(group_setup):
    model = group_setup[0]
    fams = group_families(model)
    assert [f.name for f in fams] == [f.name for f in model.group_table()]
    cfg = model.cfg
    stateless = cfg.predictor == "stateless"
    assert len(fams) == 4 * cfg.num_layers + (1 if stateless else cfg.pred_layers) + 1
    assert {f.kind for f in fams} == set(KINDS)
    names = {f.name: f for f in fams}
    for f in fams:
        for m in f.members:
            assert m.index.dtype == torch.long and m.index.shape[0] == f.num_units
    assert names["encoder.layers.0.ff1.units"].num_units == cfg.ffn_dim
    assert names["encoder.layers.1.attn.heads"].num_units == cfg.num_heads
    assert names["encoder.layers.1.conv.channels"].num_units == cfg.d_model
    if stateless:
        pred = names["predictor.units"]
        assert pred.num_units == cfg.pred_embed_dim
        assert [m.param for m in pred.members] == ["predictor.embedding.weight", "predictor.conv.weight",
                                                   "predictor.conv.bias", "joiner.pred_proj.weight"] + (
            ["simple_lm_proj.weight"] if cfg.simple_head else [])
        return
    assert names["predictor.lstm.l1.units"].num_units == cfg.pred_hidden
    assert names["joiner.units"].num_units == cfg.joint_dim
    conv = names["encoder.layers.0.conv.channels"]
    pw1 = next(m for m in conv.members if m.param.endswith("pointwise1.weight"))
    assert pw1.index[3].tolist() == [3, 3 + cfg.d_model]
    lstm = names["predictor.lstm.l0.units"]
    ih = next(m for m in lstm.members if m.param == "predictor.lstm.weight_ih_l0")
    h = cfg.pred_hidden
    assert ih.index[2].tolist() == [2, h + 2, 2 * h + 2, 3 * h + 2]
    consumers = [m.param for m in lstm.members if m.dim == 1]
    assert consumers == ["predictor.lstm.weight_hh_l0", "predictor.lstm.weight_ih_l1"]
    last = names["predictor.lstm.l1.units"]
    assert [m.param for m in last.members if m.dim == 1] == ["predictor.lstm.weight_hh_l1", "joiner.pred_proj.weight"]


def test_group_families_partition_without_overlap(group_setup):
    model = group_setup[0]
    state = model.state_dict()
    for fam in group_families(model):
        for param in {m.param for m in fam.members}:
            shape = state[param].shape
            count = torch.zeros(shape, dtype=torch.long)
            for unit in range(fam.num_units):
                count += _unit_mask(fam, param, shape, unit).long()
            assert count.min() >= 1, f"{fam.name}: {param} not fully covered"
            if fam.kind == "predictor_unit" and param.startswith("predictor.lstm.weight_hh"):
                # rows of unit i x column of unit j: shared exactly when i != j (documented)
                h = fam.num_units
                rows = torch.arange(shape[0])[:, None] % h
                cols = torch.arange(shape[1])[None, :]
                expected = torch.where(rows == cols, 1, 2)
                assert torch.equal(count, expected), fam.name
            else:
                assert count.max() == 1, f"{fam.name}: {param} has elements in two units"


def test_zeroed_units_are_disconnected(group_setup):
    base, inputs, weights = group_setup
    _, grads_before = _outputs_and_grads(base, inputs, weights)
    # Gradients below this are rounding noise (e.g. attention key biases, whose exact
    # gradient is zero because softmax ignores a per-query constant).
    noise = 1e-6 * max(float(g.abs().max()) for g in grads_before.values())
    torch.manual_seed(123)
    seen_kinds = set()
    for fam in group_families(base):
        units = sorted({0, fam.num_units // 2, fam.num_units - 1})
        for unit in units:
            model = copy.deepcopy(base)
            _apply(model, fam, unit, _zero)
            outs0, grads = _outputs_and_grads(model, inputs, weights)

            # 1) every member is dead: perturbing any one member slice changes nothing
            for i, mem in enumerate(fam.members):
                pert = copy.deepcopy(model)
                _apply(pert, fam, unit, _perturb, only_member=i)
                with torch.no_grad():
                    out = pert(*inputs)
                msg = f"{fam.name} unit {unit}: perturbing {mem.param} (dim {mem.dim}) leaks"
                for x, x0 in zip(_heads(out), outs0):
                    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0, msg=msg)

            # 2) members get no gradient; every non-member parameter element that zeroing
            #    the unit leaves without gradient had none before (no hidden member)
            state = dict(model.named_parameters())
            for name, g in grads.items():
                member = _unit_mask(fam, name, state[name].shape, unit)
                assert torch.all(g[member].abs() <= 1e-9), f"{fam.name} unit {unit}: {name} member has gradient"
                dead = (g.abs() <= 1e-9) & ~member
                newly_dead = dead & (grads_before[name].abs() > noise)
                assert not newly_dead.any(), f"{fam.name} unit {unit}: {name} has elements left dead, not in the table"
        seen_kinds.add(fam.kind)
    assert seen_kinds == set(KINDS)


def test_stateless_predictor_sees_only_its_context():
    """Output u depends on tokens u-context+1..u only; stepping equals the full forward."""
    model = micro_model(seed=3, predictor="stateless", pred_context=3).eval()
    pred = model.predictor
    y = torch.tensor([[4, 2, 5, 1, 3, 6]])
    full = pred.forward_with_sos(y)  # (1, 7, D): position 0 is the start (blank context)
    changed = y.clone()
    changed[0, 0] = 1  # the first label: seen by outputs 1, 2, 3 only (context 3)
    other = pred.forward_with_sos(changed)
    diff = (full - other).abs().amax(-1)[0]
    assert diff[0] == 0 and torch.all(diff[4:] == 0) and diff[1:4].max() > 0
    out, state = pred(torch.full((1, 1), model.blank_id))
    steps = [out[:, 0]]
    for tok in y[0].tolist():
        out, state = pred(torch.tensor([[tok]]), state)
        steps.append(out[:, 0])
    torch.testing.assert_close(torch.stack(steps, 1), full)
    assert state[0].tolist() == [[3, 6]]  # the last context - 1 tokens
    d, v = model.cfg.pred_embed_dim, model.cfg.vocab_size
    assert sum(p.numel() for p in pred.parameters()) == v * d + d * 3 + d  # embedding, depthwise conv + bias
