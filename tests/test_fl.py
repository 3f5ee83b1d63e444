"""Federated engine: aggregation rules, server optimisers, faults, resume, determinism."""

import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, run_cli, sets
from fedasr.checkpoint import read_checkpoint
from fedasr.config import FLSection, load_config
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr import codec
from fedasr.fl.client import ClientResult, train_client
from fedasr.fl.runner import Runner
from fedasr.aggregate import WeightedMean
from fedasr.fl.server import ServerOptimizer
from fedasr.model.transducer import ModelConfig, Transducer


def small_cfg(*extra):
    return load_config(None, FAST + list(extra))


def toy_state(v):
    return {"w": torch.tensor([v, 2 * v], dtype=torch.float32), "bn.running_mean": torch.tensor([v]),
            "bn.num_batches_tracked": torch.tensor(int(v))}


def test_fedavg_of_identical_clients_returns_that_client():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", vocab_size=32, num_layers=1)
    glob, client = Transducer(cfg), Transducer(cfg)
    g, c = glob.state_dict(), client.state_dict()
    agg = WeightedMean(g, pool_batchnorm=True)
    upd = {k: (c[k] - g[k]) if v.is_floating_point() and "running" not in k else c[k] for k, v in g.items()}
    for w in (3.0, 1.0, 7.0):
        agg.add(upd, w)
    ServerOptimizer(FLSection(aggregation="fedavg")).step(glob.state_dict(), agg.result())
    for k, v in glob.state_dict().items():
        assert torch.allclose(v.float(), c[k].float(), atol=1e-6), k


def test_weighted_average_matches_hand_computation():
    glob = toy_state(0.0)
    agg = WeightedMean(glob, pool_batchnorm=True)
    agg.add({"w": torch.tensor([1.0, 2.0]), "bn.running_mean": torch.tensor([10.0]),
             "bn.num_batches_tracked": torch.tensor(4)}, 1.0)
    agg.add({"w": torch.tensor([5.0, -2.0]), "bn.running_mean": torch.tensor([2.0]),
             "bn.num_batches_tracked": torch.tensor(9)}, 3.0)
    ServerOptimizer(FLSection(aggregation="fedavg")).step(glob, agg.result())
    assert torch.allclose(glob["w"], torch.tensor([(1 + 15) / 4, (2 - 6) / 4]))
    assert torch.allclose(glob["bn.running_mean"], torch.tensor([(10 + 6) / 4]))  # BN: weighted mean of values
    assert int(glob["bn.num_batches_tracked"]) == 9


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimisers_follow_their_update_rules(rule):
    cfg = FLSection(aggregation=rule, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3, server_momentum=0.8)
    opt = ServerOptimizer(cfg)
    w = {"w": torch.tensor([1.0])}
    x, m, v, mom = 1.0, 0.0, cfg.tau**2, 0.0
    for delta in (0.5, -0.2, 0.3):
        opt.step(w, {"w": torch.tensor([delta])})
        if rule == "fedavgm":
            mom = 0.8 * mom + delta
            x += 0.1 * mom
        else:
            m = 0.9 * m + 0.1 * delta
            if rule == "fedadam":
                v = 0.99 * v + 0.01 * delta**2
            else:
                v = v - 0.01 * delta**2 * (1 if v - delta**2 > 0 else -1 if v - delta**2 < 0 else 0)
            x += 0.1 * m / (v**0.5 + cfg.tau)
        assert float(w["w"]) == pytest.approx(x, rel=1e-6)


def test_aggregator_rejects_bad_updates():
    agg = WeightedMean(toy_state(0.0), pool_batchnorm=True)
    bad = toy_state(1.0)
    bad["w"] = torch.tensor([float("nan"), 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        agg.add(bad, 1.0)
    bad = toy_state(1.0)
    bad["w"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        agg.add(bad, 1.0)
    bad = toy_state(1.0)
    del bad["w"]
    with pytest.raises(ValueError, match="keys"):
        agg.add(bad, 1.0)
    assert agg.count == 0


def test_a_mask_that_does_not_fit_its_tensor_is_an_error():
    with pytest.raises(ValueError, match=r"a: mask shape \(3,\) does not fit"):
        codec.encode({"a": torch.zeros(4)}, {"a": torch.ones(3, dtype=torch.bool)})


def test_payload_round_trip_and_masked_size():
    t = {"a": torch.randn(64, 32), "b": torch.arange(5)}
    back = codec.decode(codec.encode(t))
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    mask = torch.rand(64, 32) > 0.75
    masked = codec.decode(codec.encode(t, {"a": mask}))
    assert torch.equal(masked["a"], t["a"] * mask)
    def data_bytes(payload):  # payload minus magic, header length and JSON header
        return len(payload) - 8 - struct.unpack("<I", payload[4:8])[0]

    kept = int(mask.sum())
    assert data_bytes(codec.encode({"a": t["a"]})) == 4 * 64 * 32
    assert data_bytes(codec.encode({"a": t["a"]}, {"a": mask})) == 64 * 32 // 8 + 4 * kept


def weights(run_dir):
    ckpt = read_checkpoint(run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip())
    return ckpt["model"], ckpt


def test_same_seed_same_result_and_seed_matters(federation, tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        r = Runner(tmp_path / name, Federation(federation), small_cfg("fl.rounds=2", f"seed={seed}"))
        r.start()
        r.run_rounds()
        outs.append(weights(tmp_path / name)[0])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])
    rows = [yaml.safe_load(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("round_time", "client_time", "examples", "bytes_down", "bytes_up", "dev_wer"):
        assert key in rows[-1]
    # dense: an update costs what the download costs, up to the messages' small JSON headers
    assert rows[0]["bytes_down"] > 1e6 and abs(rows[0]["bytes_up"] - rows[0]["bytes_down"]) < 2 * 600


def test_failing_clients_are_dropped_and_logged(federation, tmp_path):
    fed = Federation(federation)
    victims = {}

    def flaky(name, model, state, data, cfg, **kw):
        res = train_client(name, model, state, data, cfg, **kw)
        kind = victims.setdefault(name, ["raise", "nan", "shape", "ok"][len(victims) % 4])
        if kind == "raise":
            raise RuntimeError("client crashed")
        if kind == "nan":
            k = next(iter(res.update))
            res.update[k] = res.update[k] * float("nan")
        if kind == "shape":
            k = next(iter(res.update))
            res.update[k] = torch.zeros(3)
        return ClientResult(res.client, res.update, res.num_examples, res.metrics)

    r = Runner(tmp_path / "run", fed, small_cfg("fl.rounds=1", "fl.clients_per_round=4"), client_fn=flaky)
    r.start()
    rows = r.run_rounds()
    reasons = sorted(d["reason"].split(":")[0] for d in rows[0]["dropped"])
    assert reasons == ["ClientRejected", "ClientRejected", "RuntimeError"]
    assert len(rows[0]["clients"]) == 4
    # not enough clients left: a clear error, and the last good checkpoint stays intact
    before = (tmp_path / "run" / "checkpoints" / "round_0001.pt").read_bytes()
    r2 = Runner.resume(tmp_path / "run", client_fn=flaky)
    r2.cfg.fl.rounds = 2
    r2.cfg.fl.min_clients = 2
    with pytest.raises(FedasrError, match=r"round 2: only 1 of 4 clients succeeded .*last good checkpoint: .*round_0001.pt"):
        r2.run_rounds()
    assert (tmp_path / "run" / "checkpoints" / "round_0001.pt").read_bytes() == before


@pytest.mark.parametrize("agg", ["fedavg", "fedadam"])
def test_sigkill_and_resume_gives_the_same_weights(federation, tmp_path, agg):
    """SIGKILL in the middle of round 2 (after its first client, before aggregation and the
    checkpoint: tests/faults.py), then --resume: the same weights as a straight run."""
    args = ["--federation", federation, *sets(*FAST, "fl.rounds=3", f"fl.aggregation={agg}", "fl.server_lr=0.5",
                                              "eval.every=2")]
    straight = run_cli("train", *args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(Path(__file__).parent / "faults.py"), "kill-in-round", "2", "train",
                             *map(str, args), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "checkpoints" / "latest").read_text().strip() == "round_0001.pt"
    assert not (out / "checkpoints" / "round_0002.pt").exists()
    resumed = run_cli("train", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    a, ca = weights(tmp_path / "straight")
    b, cb = weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (c["state"]["server"]["server_optimizer"]["state"] for c in (ca, cb))  # {param: {moment: tensor}}
    assert [(n, sorted(s)) for n, s in sa.items()] == [(n, sorted(s)) for n, s in sb.items()]
    assert all(torch.equal(sa[n][k], sb[n][k]) for n in sa for k in sa[n])
    assert bool(sa) == (agg == "fedadam")  # fedavg keeps no state; fedadam its moments
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [yaml.safe_load(r)["round"] for r in rows] == [1, 2, 3]


def test_centralized_baseline_runs_same_compute(federation, tmp_path):
    r = Runner(tmp_path / "c", Federation(federation), small_cfg("fl.rounds=1"), centralized=True)
    r.start()
    rows = r.run_rounds()
    assert rows[0]["clients"] == ["centralized"] and rows[0]["bytes_up"] == 0
    assert r.lr_step == 2 * 2  # clients_per_round x local_steps


@pytest.mark.parametrize("setting,expect", [
    ("fl.rounds=ten", "fl.rounds: expected an integer, got 'ten'"),
    ("fl.bogus=1", "fl.bogus: unknown key"),
    ("fl.aggregation=fedmagic", "fl.aggregation: unknown 'fedmagic'"),
    ("train.lr=-1", "train.lr: must be positive"),
    ("pruning.fedtiny=5", "pruning.fedtiny: expected a mapping"),
])
def test_bad_config_names_the_key(federation, tmp_path, setting, expect):
    r = run_cli("train", "--federation", federation, "--out", tmp_path / "r", "--set", setting)
    assert r.returncode != 0
    assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_centralized_resume_equals_straight_run(federation, tmp_path):
    straight = Runner(tmp_path / "a", Federation(federation), small_cfg("fl.rounds=2"), centralized=True)
    straight.start()
    straight.run_rounds()
    first = Runner(tmp_path / "b", Federation(federation), small_cfg("fl.rounds=2"), centralized=True)
    first.start()
    first.cfg.fl.rounds = 1  # stop after round 1; the config on disk still says 2
    first.run_rounds()
    resumed = Runner.resume(tmp_path / "b")
    assert resumed.round == 1 and resumed.cfg.fl.rounds == 2
    resumed.run_rounds()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("rule", ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedlamb"])
def test_pruned_positions_are_frozen_in_weights_and_optimiser_state(rule):
    """Five rounds of +0.01, then 20 rounds pruned (clients send 0 there): the pruned weight
    keeps its value at pruning, its optimiser state does not move, and it resumes from both."""
    opt = ServerOptimizer(FLSection(aggregation=rule,
                                    server_lr=0.1 if rule in ("fedadam", "fedyogi", "fedlamb") else 1.0))
    w = {"w": torch.tensor([0.5, 0.5])}
    for _ in range(5):
        opt.step(w, {"w": torch.tensor([0.01, 0.01])})
    at_pruning = w["w"].clone()
    state_at_pruning = {k: v.clone() for k, v in opt.state.get("w", {}).items()}
    mask = {"w": torch.tensor([False, True])}
    for _ in range(20):
        opt.step(w, {"w": torch.tensor([0.0, 0.01])}, mask)
    assert float(w["w"][0]) == float(at_pruning[0])  # exactly: no drift at all
    assert float(w["w"][1]) > float(at_pruning[1])  # the live weight kept training
    for k, v in opt.state.get("w", {}).items():
        assert float(v[0]) == float(state_at_pruning[k][0]), k
    # regrown: the next step is the one the weight would have taken right after round 5
    fresh = ServerOptimizer(opt.cfg)
    fresh.state = {"w": {k: v.clone() for k, v in state_at_pruning.items()}}
    ref = {"w": at_pruning.clone()}
    if rule == "fedlamb":  # the trust ratio is per tensor: the reference has the live weight's present
        ref["w"][1] = w["w"][1]
        fresh.state["w"] = {k: torch.stack([v[0], opt.state["w"][k][1]]) for k, v in state_at_pruning.items()}
    fresh.step(ref, {"w": torch.tensor([0.01, 0.01])})
    opt.step(w, {"w": torch.tensor([0.01, 0.01])})
    assert float(w["w"][0]) == pytest.approx(float(ref["w"][0]), abs=1e-7)
    assert float(w["w"][0]) != float(at_pruning[0])  # it moves again


def test_server_lr_defaults_per_aggregation():
    assert FLSection(aggregation="fedavg").effective_server_lr == 1.0
    assert FLSection(aggregation="fedavgm").effective_server_lr == 1.0
    assert FLSection(aggregation="fedadam").effective_server_lr == 0.01
    assert FLSection(aggregation="fedyogi").effective_server_lr == 0.01
    assert FLSection(aggregation="fedadam", server_lr=0.3).effective_server_lr == 0.3
    opt = ServerOptimizer(FLSection(aggregation="fedadam"))
    w = {"w": torch.tensor([0.0])}
    opt.step(w, {"w": torch.tensor([1.0])})
    assert abs(float(w["w"])) < 0.011  # round one moves a weight by ~server_lr, not by ~1


def test_batchnorm_variance_is_the_variance_of_the_pooled_data():
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(n, 3, generator=g) * s + m for n, s, m in ((50, 1.0, -2.0), (150, 0.5, 3.0), (30, 2.0, 0.0))]
    glob = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    agg = WeightedMean(glob, pool_batchnorm=True)
    for x in data:
        agg.add({"bn.running_mean": x.mean(0), "bn.running_var": x.var(0, unbiased=False)}, float(len(x)))
    ServerOptimizer(FLSection()).step(glob, agg.result())
    pooled = torch.cat(data)
    assert torch.allclose(glob["bn.running_mean"], pooled.mean(0), atol=1e-5)
    assert torch.allclose(glob["bn.running_var"], pooled.var(0, unbiased=False), atol=1e-4)


def test_fedavg_weights_by_client_dataset_size(federation, tmp_path):
    """weighting: examples is the client's dataset size n_k, not the utterances it processed."""
    fed = Federation(federation)
    seen = []

    def spy(name, model, state, data, cfg, **kw):
        res = train_client(name, model, state, data, cfg, **kw)
        seen.append((len(data), res.num_examples, res.metrics["processed"]))
        return res

    r = Runner(tmp_path / "run", fed, small_cfg("fl.rounds=1", "fl.local_steps=3"), client_fn=spy)
    r.start()
    row = r.run_rounds()[0]
    assert all(size == n for size, n, _ in seen)
    assert row["examples"] == sum(n for _, n, _ in seen)
    assert row["processed"] == sum(p for _, _, p in seen)
    assert row["processed"] != row["examples"]  # 3 steps of 20 s batches: not one epoch


def test_the_server_samples_reachable_clients_with_their_federation_seeds():
    """An engine that reaches only some clients (Flower with a SuperNode per client) narrows
    the sample, but a client keeps the seed of its place in the whole federation."""
    from fedasr.fl.server import Server

    cfg = load_config(None, ["fl.clients_per_round=2", "fl.rounds=5"])
    model = Transducer(ModelConfig.preset("tiny", vocab_size=16, num_layers=1))
    every = Server(cfg, model, ["a", "b", "c", "d"])
    some = Server(cfg, model, ["a", "b", "c", "d"], reachable=["b", "d"])
    assert all(some.sample_clients(r) == ["b", "d"] for r in range(1, 6))
    assert any(every.sample_clients(r) != ["b", "d"] for r in range(1, 6))
    assert some.client_header(3, "d") == every.client_header(3, "d") != every.client_header(3, "b")
