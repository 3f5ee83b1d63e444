"""Federated optimisation levers: client SGD (momentum or none), the FedLAMB server step,
the server learning-rate schedule by round, and the conv module's LayerNorm option."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MICRO_MODEL, tiny_model
from fedasr.config import FLSection, TrainSection, load_config
from fedasr.errors import FedasrError
from fedasr.fl.server import ServerOptimizer
from fedasr.model.conformer import ChannelLayerNorm
from fedasr.model.groups import group_families
from fedasr.model.transducer import ModelConfig, ModelConfigError, Transducer
from fedasr.trainer import make_optimizer


# --------------------------------------------------------------------------- client SGD


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_client_sgd_follows_the_heavy_ball_rule(momentum):
    """loss = 0.5 * 3 * w^2 from w = 1 (gradient 3w), lr 0.1: plain SGD w <- w - 0.1 * 3w;
    with momentum b <- m b + g, w <- w - 0.1 b."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt = make_optimizer(model, TrainSection(optimizer="sgd", lr=0.1, momentum=momentum, weight_decay=0.0))
    w, buf = 1.0, 0.0
    for _ in range(3):
        opt.zero_grad()
        (0.5 * 3.0 * model.weight.square().sum()).backward()
        opt.step()
        buf = momentum * buf + 3.0 * w
        w -= 0.1 * buf
        assert float(model.weight.detach()) == pytest.approx(w, rel=1e-6)
    # after 3 steps: plain 1 * 0.7^3 = 0.343; momentum 0.5: 0.7, 0.34, 0.058
    assert w == pytest.approx(0.343 if momentum == 0 else 0.058, abs=1e-9)


def test_sgd_momentum_default_is_the_former_hard_coded_0_9():
    assert TrainSection().momentum == 0.9
    opt = make_optimizer(torch.nn.Linear(1, 1), TrainSection(optimizer="sgd"))
    assert opt.param_groups[0]["momentum"] == 0.9


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("setting,key", [
    ("train.momentum=1.0", "train.momentum"),
    ("train.momentum=-0.1", "train.momentum"),
    ("fl.aggregation=lamb", "fl.aggregation"),
    ("fl.server_lr_schedule=linear", "fl.server_lr_schedule"),
    ("fl.server_lr_warmup_rounds=-1", "fl.server_lr_warmup_rounds"),
    ("fl.server_lr_step_rounds=0", "fl.server_lr_step_rounds"),
    ("fl.server_lr_gamma=0", "fl.server_lr_gamma"),
    ("fl.server_lr_gamma=1.5", "fl.server_lr_gamma"),
])
def test_bad_optimiser_settings_are_one_line_errors_naming_the_key(setting, key):
    with pytest.raises(FedasrError) as e:
        load_config(None, [setting])
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_conv_norm_values_and_fedtiny_needs_batchnorm():
    with pytest.raises(ModelConfigError, match="conv_norm must be one of batchnorm, layernorm"):
        ModelConfig.from_dict({**MICRO_MODEL, "conv_norm": "groupnorm"})
    from fedasr.methods import validate

    with pytest.raises(FedasrError) as e:  # (the method layer knows what a method needs)
        validate(load_config(None, ["model.overrides.conv_norm=layernorm", "pruning.method=fedtiny"]))
    assert str(e.value).startswith("pruning.method: fedtiny needs model.overrides.conv_norm: batchnorm")
    # either alone is fine
    assert load_config(None, ["model.overrides.conv_norm=layernorm",
                              "pruning.method=federated_pruning"]).pruning.method == "federated_pruning"
    assert load_config(None, ["pruning.method=fedtiny"]).pruning.method == "fedtiny"


# --------------------------------------------------------------------------- FedLAMB


def test_fedlamb_follows_its_update_rule():
    """Adam moments of the averaged update, then per tensor a step of server_lr x ||w||:
    u = m / (sqrt(v) + tau), w <- w + lr ||w|| / ||u|| u; a zero tensor takes lr u."""
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer(FLSection(aggregation="fedlamb", server_lr=lr, beta1=b1, beta2=b2, tau=tau))
    w = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.0])}
    x, bias = [3.0, 4.0], [0.0, 0.0]
    m = {"w": [0.0, 0.0], "b": [0.0, 0.0]}
    v = {"w": [tau**2] * 2, "b": [tau**2] * 2}
    deltas = [([0.5, -0.1], [0.2, 0.05]), ([0.3, 0.2], [-0.1, 0.0]), ([-0.2, 0.4], [0.3, 0.1])]
    for dw, db in deltas:
        opt.step(w, {"w": torch.tensor(dw), "b": torch.tensor(db)})
        for name, vals, d in (("w", x, dw), ("b", bias, db)):
            m[name] = [b1 * a + (1 - b1) * g for a, g in zip(m[name], d)]
            v[name] = [b2 * a + (1 - b2) * g * g for a, g in zip(v[name], d)]
            u = [a / (math.sqrt(s) + tau) for a, s in zip(m[name], v[name])]
            wn, un = math.hypot(*vals), math.hypot(*u)
            ratio = wn / un if wn > 0 and un > 0 else 1.0
            vals[:] = [a + lr * ratio * b for a, b in zip(vals, u)]
        assert w["w"].tolist() == pytest.approx(x, rel=1e-6)
        assert w["b"].tolist() == pytest.approx(bias, rel=1e-6, abs=1e-9)
    # the first step moved the weight tensor by exactly lr x its norm (5 -> a step of 0.5)
    fresh = ServerOptimizer(FLSection(aggregation="fedlamb", server_lr=lr))
    w = {"w": torch.tensor([3.0, 4.0])}
    fresh.step(w, {"w": torch.tensor([1e-4, -2.0])})  # whatever the update's size
    assert float((w["w"] - torch.tensor([3.0, 4.0])).norm()) == pytest.approx(0.5, rel=1e-6)


def test_fedlamb_reset_restores_the_initial_second_moment():
    opt = ServerOptimizer(FLSection(aggregation="fedlamb", tau=1e-3))
    opt.step({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 0.5])})
    opt.reset("w", torch.tensor([True, False]))
    assert opt.state["w"]["m"][0] == 0 and opt.state["w"]["v"][0] == pytest.approx(1e-6)
    assert opt.state["w"]["m"][1] != 0


# --------------------------------------------------------------------------- server lr schedule


def test_server_lr_schedule_by_round():
    c = FLSection(rounds=10, server_lr=1.0, server_lr_schedule="cosine", server_lr_warmup_rounds=2)
    got = [c.server_lr_at(r) for r in range(1, 11)]
    assert got[:2] == [0.5, 1.0]  # linear warm-up
    assert got[2] == 1.0  # cosine from the first round after warm-up ...
    assert got[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))  # round 7: 0.5
    assert got[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))  # ... to near 0 at the last
    s = FLSection(rounds=10, server_lr=0.8, server_lr_schedule="step", server_lr_step_rounds=3, server_lr_gamma=0.5)
    assert [s.server_lr_at(r) for r in range(1, 8)] == [0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]
    assert FLSection(server_lr=0.3).server_lr_at(7) == 0.3  # constant
    # the optimiser's step uses the round's rate: fedavg w <- w + lr_r delta
    opt = ServerOptimizer(s)
    w = {"w": torch.tensor([0.0])}
    for r in range(1, 8):
        opt.step(w, {"w": torch.tensor([1.0])}, rnd=r)
    assert float(w["w"]) == pytest.approx(0.8 * 3 + 0.4 * 3 + 0.2)
    with pytest.raises(ValueError, match="needs the round"):
        opt.step(w, {"w": torch.tensor([1.0])})


def test_centralized_runs_ignore_the_server_schedule():
    """--centralized takes the client's weights as they are: a server schedule would scale them."""
    from fedasr.fl.server import Server

    cfg = load_config(None, ["fl.server_lr_schedule=cosine", "fl.server_lr_warmup_rounds=3",
                             "fl.aggregation=fedlamb"])
    model = tiny_model()
    srv = Server(cfg, model, ["a", "b"], centralized=True)
    assert srv.server_opt.cfg.aggregation == "fedavg" and srv.server_opt.cfg.server_lr_at(1) == 1.0


# --------------------------------------------------------------------------- conv_norm: layernorm


def test_channel_layer_norm_is_layernorm_per_frame_and_counts_removed_channels_as_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g)  # (B, C, T)
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(6, generator=g) + 0.5)
        norm.bias.copy_(torch.randn(6, generator=g))
    ref = F.layer_norm(x.transpose(1, 2), (6,), norm.weight, norm.bias, eps=1e-5).transpose(1, 2)
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=0)
    # channels 1 and 4 exactly zero (and their affine zero): dropping them changes nothing
    x[:, [1, 4]] = 0.0
    with torch.no_grad():
        norm.weight[[1, 4]] = 0.0
        norm.bias[[1, 4]] = 0.0
    keep = [0, 2, 3, 5]
    small = ChannelLayerNorm(4, total=6)
    with torch.no_grad():
        small.weight.copy_(norm.weight[keep])
        small.bias.copy_(norm.bias[keep])
    with torch.no_grad():
        full, compact, naive = norm(x), small(x[:, keep]), ChannelLayerNorm(4)(x[:, keep])
    assert float(full[:, [1, 4]].abs().max()) == 0.0
    torch.testing.assert_close(compact, full[:, keep], atol=1e-6, rtol=0)
    # without counting the removed zeros, the statistics (and outputs) would differ
    assert float((naive - full[:, keep]).abs().max()) > 1e-2


def test_layernorm_conv_module_has_no_batchnorm_and_its_affine_is_in_the_channel_unit():
    model = tiny_model(conv_norm="layernorm")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    keys = set(model.state_dict())
    assert "encoder.layers.0.conv.layer_norm.weight" in keys and not any("batch_norm" in k for k in keys)
    fam = next(f for f in group_families(model) if f.name == "encoder.layers.0.conv.channels")
    params = [m.param for m in fam.members]
    assert "encoder.layers.0.conv.layer_norm.weight" in params and "encoder.layers.0.conv.layer_norm.bias" in params
    # training: no statistics from the batch, so one utterance's output does not depend on the others
    model.train()
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 40, MICRO_MODEL["num_features"], generator=g)
    both, _ = model.encode(feats, torch.tensor([40, 40]))
    alone, _ = model.encode(feats[:1], torch.tensor([40]))
    torch.testing.assert_close(both[:1], alone, atol=1e-5, rtol=0)


def test_layernorm_model_exports_to_onnx_with_the_same_encoder_output(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import types

    import numpy as np

    from fedasr.export import OnnxTransducer, export_model

    model = tiny_model(conv_norm="layernorm", predictor="stateless", pred_layers=1,
                       widths={"encoder.layers.0.conv": 11}).eval()  # a compacted conv module: 11 of 16 channels
    pieces = [f"p{i}" for i in range(MICRO_MODEL["vocab_size"])]
    tok = types.SimpleNamespace(sp=types.SimpleNamespace(id_to_piece=pieces.__getitem__,
                                                         get_piece_size=lambda: len(pieces)))
    nf = MICRO_MODEL["num_features"]
    cmvn = types.SimpleNamespace(mean=[0.5] * nf, std=[2.0] * nf)
    export_model(model, tok, cmvn, tmp_path / "onnx")
    onnx = OnnxTransducer(tmp_path / "onnx")
    feats = torch.randn(1, 60, nf, generator=torch.Generator().manual_seed(2))
    enc, lens = onnx.encode(feats.numpy(), np.array([60]))
    with torch.no_grad():
        ref, ref_lens = model.encoder((feats - 0.5) / 2.0, torch.tensor([60]))
        ref = model.joiner.project_encoder(ref)
    assert int(lens[0]) == int(ref_lens[0])
    np.testing.assert_allclose(enc[0, : int(lens[0])], ref[0].numpy(), atol=1e-4, rtol=0)
