"""The server's own data: a train-server split that is never a client, centralized training
on it (the seed model), federated runs started from that seed, and the sweep that trains
the seed once."""

import math

import torch
from conftest import FAST, Stopped, StopAfterRound, run_cli, sets
from fedasr.config import load_config
from fedasr.data.federation import Federation
from fedasr.fl.runner import Runner
from fedasr.fsutil import file_sha256
from fedasr.rundir import RunDir


def cfg(*extra):
    return load_config(None, FAST + list(extra))


def test_server_split_never_leaks_into_clients(server_federation, corpus):
    fed = Federation(server_federation)
    server = fed.server_cuts()
    server_ids = {c.id for c in server}
    on_disk = {p.stem for p in (corpus / "train-server").rglob("*.flac")}
    assert server_ids == on_disk and len(server_ids) == 24
    client_ids = {c.id for n in fed.client_ids for c in fed.client_cuts(n)}
    assert client_ids and not server_ids & client_ids
    server_spk = {c.supervisions[0].speaker for c in server}
    assert len(server_spk) == 2
    for n in fed.client_ids:
        assert not {c.supervisions[0].speaker for c in fed.client_cuts(n)} & server_spk
    for split in fed.eval_splits:
        assert not {c.id for c in fed.split_cuts(split)} & server_ids
    meta = fed.meta
    assert meta["server"]["utterances"] == 24 and meta["source"]["server_splits"] == ["train-server"]
    assert meta["features"]["cmvn_from"] == "server"
    assert meta["tokenizer"]["source"] == "trained on the server's data"


def test_clients_are_those_of_a_federation_without_server_data(server_federation, federation):
    with_server, plain = Federation(server_federation), Federation(federation)
    assert with_server.client_ids == plain.client_ids
    for n in plain.client_ids:
        assert [c.id for c in with_server.client_cuts(n)] == [c.id for c in plain.client_cuts(n)]


def test_shard_server_split_errors(corpus, tmp_path):
    out = tmp_path / "fed"
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--server-split", "train", "--out", out)
    assert r.returncode != 0 and "split 'train' given twice" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--server-split", "nope", "--out", out)
    assert r.returncode != 0 and "nope" in r.stderr and not out.exists()


def test_data_server_trains_on_server_utterances_only(server_federation, federation, tmp_path):
    fed = Federation(server_federation)
    runner = Runner(tmp_path / "seed", fed, cfg("fl.rounds=1"), centralized=True, data="server")
    runner.start()
    trained_on = {c.id for c in runner.worker.dataset("centralized").cuts}
    assert trained_on == {c.id for c in fed.server_cuts()}
    before = {k: v.clone() for k, v in runner.model.state_dict().items()}
    rows = runner.run_rounds()
    assert rows[-1]["processed"] > 0 and math.isfinite(rows[-1]["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in runner.model.state_dict().items())
    assert RunDir(runner.run.root).read_config()["data"] == "server"
    # clients' union is the default; bad combinations are one-line errors
    default = Runner(tmp_path / "c", fed, cfg("fl.rounds=1"), centralized=True)
    assert {c.id for c in default.worker.dataset("centralized").cuts} == {
        c.id for n in fed.client_ids for c in fed.client_cuts(n)}
    r = run_cli("train", "--federation", federation, "--out", tmp_path / "x", "--centralized", "--data", "server",
                *sets(*FAST))
    assert r.returncode != 0 and "holds no server data" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train", "--federation", server_federation, "--out", tmp_path / "y", "--data", "server", *sets(*FAST))
    assert r.returncode != 0 and "only with --centralized" in r.stderr


def test_resume_of_a_run_started_from_a_seed_is_bit_identical(server_federation, tmp_path):
    fed = Federation(server_federation)
    seed = Runner(tmp_path / "seed", fed, cfg("fl.rounds=1"), centralized=True, data="server")
    seed.start()
    seed.run_rounds()
    seed_ckpt = seed.run.latest()
    c = cfg("fl.rounds=3", "fl.aggregation=fedadam")
    straight = Runner(tmp_path / "straight", fed, c)
    straight.start(init_from=seed_ckpt)
    straight.run_rounds()
    half = Runner(tmp_path / "half", fed, c, events=StopAfterRound(1))
    half.start(init_from=seed_ckpt)
    try:
        half.run_rounds()
    except Stopped:
        pass
    resumed = Runner.resume(tmp_path / "half")
    assert resumed.round == 1
    resumed.run_rounds()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    conf = RunDir(tmp_path / "half").read_config()
    assert conf["init_from_sha256"] == file_sha256(seed_ckpt)
    # the run really started from the seed: it differs from a run from scratch
    scratch = Runner(tmp_path / "scratch", fed, c)
    scratch.start()
    scratch.run_rounds()
    s = scratch.model.state_dict()
    assert any(not torch.equal(a[k], s[k]) for k in a if a[k].is_floating_point())


def test_init_from_a_checkpoint_written_before_a_model_field_existed(server_federation, tmp_path):
    """A seed whose model config lacks a field added later (conv_norm) is the same
    architecture when the field's default is what the run uses."""
    fed = Federation(server_federation)
    seed = Runner(tmp_path / "seed", fed, cfg("fl.rounds=1", "fl.local_steps=1"), centralized=True, data="server")
    seed.start()
    seed.run_rounds()
    old = torch.load(seed.run.latest(), weights_only=True)
    del old["model_config"]["conv_norm"]
    torch.save(old, tmp_path / "old.pt")
    run = Runner(tmp_path / "run", fed, cfg("fl.rounds=1"))
    run.start(init_from=tmp_path / "old.pt")
    assert all(torch.equal(v, seed.model.state_dict()[k]) for k, v in run.model.state_dict().items())


def _first_round_steps(fed, c, tmp_path, name, init_from):
    """The global steps (learning-rate schedule positions) the clients of round 1 start at."""
    from fedasr.fl.client import train_client

    seen = []

    def spy(*args, **kw):
        seen.append(kw["global_step"])
        return train_client(*args, **kw)

    run = Runner(tmp_path / name, fed, c, client_fn=spy)
    run.start(init_from=init_from)
    run.run_rounds()
    return seen


def test_a_run_from_a_checkpoint_continues_its_learning_rate_schedule(server_federation, tmp_path):
    """From a seed trained 2 x 3 steps with a 5-step warm-up, the clients of round 1 start at
    schedule position 6 (past the warm-up: the recipe's learning rate), not at 0 (1/5 of it);
    restarting the warm-up is the explicit setting train.warmup_on_init."""
    from fedasr.trainer import lr_at

    fed = Federation(server_federation)
    seed = Runner(tmp_path / "seed", fed, cfg("fl.rounds=2", "fl.local_steps=3", "fl.clients_per_round=1"),
                  centralized=True, data="server")
    seed.start()
    seed.run_rounds()
    assert seed.lr_step == 6
    c = cfg("fl.rounds=1", "train.lr_schedule=constant")
    steps = _first_round_steps(fed, c, tmp_path, "continue", seed.run.latest())
    assert steps == [6, 6]
    assert lr_at(c.train, steps[0]) == c.train.lr
    rewarm = cfg("fl.rounds=1", "train.lr_schedule=constant", "train.warmup_on_init=true")
    assert _first_round_steps(fed, rewarm, tmp_path, "rewarm", seed.run.latest()) == [0, 0]
    assert lr_at(rewarm.train, 0) == rewarm.train.lr / 5
    # a checkpoint without a schedule position (a one-shot pruned one): the end of the warm-up
    pruned = torch.load(seed.run.latest(), weights_only=True)
    pruned["state"] = {}
    torch.save(pruned, tmp_path / "pruned.pt")
    assert _first_round_steps(fed, c, tmp_path, "nostate", tmp_path / "pruned.pt") == [5, 5]


def test_batchnorm_recalibrated_on_the_server_data_after_a_mask_change(server_federation, federation, tmp_path):
    """pruning.recalibrate_bn: after each change of the masks the global BatchNorm statistics
    are those of the served (masked) model on N batches of the server's data; rounds whose
    masks do not change keep the clients' pooled statistics."""
    import itertools

    import pytest

    from fedasr.data.batching import AsrDataset
    from fedasr.errors import FedasrError
    from fedasr.fl.messages import derive_seed
    from fedasr.model.transducer import Transducer
    from fedasr.trainer import recalibrate_batchnorm

    fed = Federation(server_federation)
    fp = ["pruning.method=federated_pruning", "pruning.target_sparsity=0.5",
          "pruning.federated_pruning.schedule=cubic", "pruning.federated_pruning.start_round=1",
          "pruning.federated_pruning.end_round=2", "pruning.federated_pruning.refine_until=2"]
    c = cfg("fl.rounds=3", "pruning.recalibrate_bn=2", *fp)
    rows, after_round1 = [], {}

    class Spy(StopAfterRound):
        def round_end(self, row):
            rows.append((row["round"], row.get("bn_recalibrated_on")))
            if row["round"] == 1:
                after_round1.update(served=run.server.served_state())

    run = Runner(tmp_path / "r", fed, c, events=Spy(99))
    run.start()
    run.run_rounds()
    # the masks change after round 1 (cubic step 2 of 2), then stay: recalibrated after round 1 only
    assert [(r, n is not None) for r, n in rows] == [(1, True), (2, False), (3, False)]
    # ... to the served model's statistics on the round's draw of the server's data, recomputed here
    served = Transducer(run.model.cfg)
    served.load_state_dict(after_round1["served"])
    ds = AsrDataset(fed.server_cuts(), fed.tokenizer, fed.cmvn)
    batches = ds.batches(c.train.max_duration, seed=derive_seed(c.seed, 1, 7), shuffle=True, num_buckets=1)
    stats = {k: v.clone() for k, v in served.state_dict().items() if "running_" in k}
    assert recalibrate_batchnorm(served, itertools.islice(batches, 2)) == rows[0][1] > 0
    mine = {k: v for k, v in served.state_dict().items() if "running_" in k}
    assert all(torch.allclose(mine[k], stats[k], atol=1e-6) for k in mine)
    # without it they are the clients' pooled statistics, which differ
    plain = Runner(tmp_path / "plain", fed, cfg("fl.rounds=1", *fp))
    plain.start()
    plain.run_rounds()
    assert any(not torch.allclose(plain.server.served_state()[k], mine[k], atol=1e-3) for k in mine)
    # a federation without server data: a one-line config error
    with pytest.raises(FedasrError, match="pruning.recalibrate_bn: .* holds no server data"):
        Runner(tmp_path / "x", Federation(federation), c)
