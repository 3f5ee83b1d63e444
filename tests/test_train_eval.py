"""Local trainer, checkpoints and `fedasr eval`."""

import json

import pytest
import torch

from conftest import run_cli, tiny_model
from fedasr.checkpoint import load_checkpoint, save_checkpoint
from fedasr.config import TrainSection
from fedasr.data.batching import AsrDataset
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.evaluate import evaluate, score
from fedasr.model.transducer import ModelConfig, Transducer
from fedasr.rundir import RunDir
from fedasr.trainer import lr_at, make_optimizer, train_steps


def test_tiny_model_overfits_a_handful_of_utterances_to_wer_zero(federation):
    fed = Federation(federation)
    cuts = fed.client_cuts(fed.client_ids[0]).subset(first=4)
    model = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, dropout=0.0)
    cfg = TrainSection(lr=2e-3, warmup_steps=10, lr_schedule="constant", max_duration=60.0,
                       spec_augment=False, ctc_weight=0.3)
    ds = AsrDataset(cuts, fed.tokenizer, fed.cmvn)
    opt = make_optimizer(model, cfg)
    wer = None
    for chunk in range(8):  # at most 200 steps
        res = train_steps(model, opt, ds, cfg, seed=0, num_steps=25, global_step=25 * chunk)
        result, decoded = evaluate(model, cuts, fed.tokenizer, fed.cmvn)
        wer = result["wer"]
        if wer == 0.0:
            break
    assert wer == 0.0, f"WER {wer} after {25 * (chunk + 1)} steps, last loss {res.loss}"
    assert [d.hyp for d in decoded] == [d.ref for d in decoded]


def test_lr_schedule():
    cfg = TrainSection(lr=1e-3, warmup_steps=100, lr_schedule="noam")
    assert lr_at(cfg, 0) == pytest.approx(1e-5)
    assert lr_at(cfg, 99) == pytest.approx(1e-3)
    assert lr_at(cfg, 399) == pytest.approx(5e-4)
    const = TrainSection(lr=1e-3, warmup_steps=10, lr_schedule="constant")
    assert lr_at(const, 4) == pytest.approx(5e-4) and lr_at(const, 1000) == pytest.approx(1e-3)


def test_score_counts_errors():
    r = score(["A B C D", "E F"], ["A X C", "E F G"])
    assert (r["substitutions"], r["deletions"], r["insertions"], r["words"]) == (1, 1, 1, 6)
    assert r["wer"] == pytest.approx(3 / 6)


def test_checkpoint_round_trip_and_mismatches(federation, tmp_path):
    fed = Federation(federation)
    model = tiny_model(None, preset="tiny", vocab_size=fed.tokenizer.vocab_size)
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, fed.tokenizer, config={"seed": 1})
    loaded, tok, ckpt = load_checkpoint(path)
    assert tok.proto == fed.tokenizer.proto and ckpt["config"] == {"seed": 1}
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # another architecture: weights do not fit the stored config
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["num_layers"] = 2
    torch.save(ckpt, tmp_path / "arch.pt")
    with pytest.raises(FedasrError, match=r"arch.pt: weights do not fit the model architecture"):
        load_checkpoint(tmp_path / "arch.pt")
    # another vocabulary size than the tokenizer's
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["vocab_size"] = 99
    torch.save(ckpt, tmp_path / "vocab.pt")
    with pytest.raises(FedasrError, match=r"vocab.pt: model vocabulary has 99 tokens but the tokenizer has"):
        load_checkpoint(tmp_path / "vocab.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(FedasrError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


@pytest.fixture(scope="module")
def short_run(federation, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = run_cli("train", "--federation", federation, "--out", out, "--set", "fl.rounds=1",
                "--set", "fl.clients_per_round=2", "--set", "fl.local_steps=2", "--set", "train.max_duration=20")
    assert r.returncode == 0, r.stderr
    return out


def test_eval_cli_writes_results(short_run, federation):
    r = run_cli("eval", "--run", short_run, "--split", "test-clean", "--split", "test-other", "--beam", "2")
    assert r.returncode == 0, r.stderr
    results = json.loads((short_run / "results.json").read_text())
    assert set(results) == {"test-clean", "test-other"}
    for split, res in results.items():
        assert res["utterances"] == 8 and res["beam"] == 2
        assert res["wer"] >= 0 and 0 <= res["cer"]
        assert res["substitutions"] + res["deletions"] <= res["words"]
        assert res["decode_seconds"] > 0 and res["rtf"] == pytest.approx(res["decode_seconds"] / (3600 * res["hours"]))
        lines = (short_run / "decode" / f"{split}-beam2.tsv").read_text().splitlines()
        assert len(lines) == 9
    # test-clean speakers are the training clients' speakers; test-other speakers are unseen
    assert set(results["test-clean"]["per_client"]) == set(Federation(federation).client_ids)
    assert "per_client" not in results["test-other"]
    assert "WER" in r.stdout
    assert all(res["decoding"] == "modified beam search, beam 2 (1 symbol per frame)" for res in results.values())
    # the default: the deployed greedy search; RUN/checkpoints/latest names the run's newest checkpoint,
    # and the run (where results.json goes) is the checkpoint's own
    r = run_cli("eval", short_run / "checkpoints" / "latest", "--split", "test-clean")
    assert r.returncode == 0, r.stderr
    res = json.loads((short_run / "results.json").read_text())["test-clean"]
    assert res["checkpoint"] == str(RunDir(short_run).latest())
    assert res["decoding"] == "greedy search, 1 symbol per frame" and res["max_symbols_per_frame"] == 1
    assert "1 symbol per frame" in r.stdout


def test_eval_cli_errors(short_run, tmp_path):
    """A bad option value is a usage error (exit 2), a bad input a runtime error (exit 1)."""
    r = run_cli("eval", "--run", short_run, "--split", "nope")
    assert r.returncode == 2 and "--split: unknown split 'nope'" in r.stderr
    r = run_cli("eval", "--run", tmp_path)
    assert r.returncode == 1 and "not a run directory" in r.stderr
    r = run_cli("eval", tmp_path / "missing.pt", "--run", short_run)
    assert r.returncode == 1 and "missing.pt: checkpoint does not exist" in r.stderr


def test_non_finite_gradient_is_rejected_before_the_step(federation):
    """A NaN gradient (with a finite loss) stops training like a non-finite loss does,
    before the optimizer touches the weights."""
    fed = Federation(federation)
    cuts = fed.client_cuts(fed.client_ids[0]).subset(first=2)
    model = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for clip in (5.0, 0.0):
        cfg = TrainSection(max_duration=60.0, spec_augment=False, grad_clip=clip)

        def poison(m):
            m.joiner.output.weight.grad[0, 0] = float("nan")

        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            train_steps(model, make_optimizer(model, cfg), AsrDataset(cuts, fed.tokenizer, fed.cmvn), cfg,
                        seed=0, num_steps=1, after_backward=poison)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" not in k
                   and "num_batches" not in k)


def test_eden_schedule():
    cfg = TrainSection(lr=1e-3, warmup_steps=10, lr_schedule="eden", lr_decay_steps=100)
    assert lr_at(cfg, 4) == pytest.approx(5e-4 * (1 + 0.05**2) ** -0.25)
    assert lr_at(cfg, 99) == pytest.approx(1e-3 * 2 ** -0.25)  # s = D: 2^-1/4
    assert lr_at(cfg, 9999) == pytest.approx(1e-3 * (1 + 1e4) ** -0.25, rel=1e-6)  # ~ sqrt(D / s)


def test_auxiliary_losses_enter_the_training_loss(federation):
    """CTC and simple-loss weights add their (reported) losses to the RNN-T loss."""
    from fedasr.trainer import transducer_loss

    fed = Federation(federation)
    cuts = fed.client_cuts(fed.client_ids[0]).subset(first=3)
    model = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=1, predictor="stateless",
                       simple_head=True).eval()
    batch = next(AsrDataset(cuts, fed.tokenizer, fed.cmvn).batches(60.0, shuffle=False, num_buckets=1))
    loss, stats = transducer_loss(model, batch, ctc_weight=0.3, simple_weight=0.5)
    assert set(stats) == {"rnnt", "ctc", "simple", "loss"}
    assert stats["loss"] == pytest.approx(stats["rnnt"] + 0.3 * stats["ctc"] + 0.5 * stats["simple"], rel=1e-5)
    assert stats["simple"] > 0 and float(loss) == pytest.approx(stats["loss"])


def test_batch_stream_resumes_and_continues_epochs(federation):
    from fedasr.trainer import BatchStream

    fed = Federation(federation)
    ds = AsrDataset(fed.client_cuts(fed.client_ids[0]), fed.tokenizer, fed.cmvn)
    cfg = TrainSection(max_duration=15.0, spec_augment=False)
    a = BatchStream(ds, cfg, seed=3)
    first = [(e, b.ids) for e, b in (next(a) for _ in range(12))]
    assert first[-1][0] >= 1  # the stream crossed into the next epoch (a reshuffle)
    b = BatchStream(ds, cfg, seed=3, consumed=5)
    assert [(e, x.ids) for e, x in (next(b) for _ in range(7))] == first[5:]
    item = next(b)
    b.push_back(item)
    assert b.consumed == 12 and next(b)[1].ids == item[1].ids and b.consumed == 13
    per_epoch = sum(1 for e, _ in first if e == 0)
    # one epoch from a persistent stream: exactly that epoch's batches; the next starts the next epoch
    stream = BatchStream(ds, cfg, seed=3)
    model = tiny_model(None, preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=1, d_model=64, ffn_dim=64,
                       pred_hidden=32, pred_embed_dim=32, joint_dim=32)
    res = train_steps(model, make_optimizer(model, cfg), ds, cfg, seed=0, num_epochs=1, stream=stream)
    assert res.steps == per_epoch and res.epochs == 1 and stream.consumed == per_epoch
    assert (lambda e_b: (e_b[0], e_b[1].ids))(next(stream)) == first[per_epoch]


def test_a_run_directory_is_claimed_only_when_empty_or_with_overwrite(tmp_path):
    """RunDir.claim: the one rule for starting a run in a directory (`train`, both engines)."""
    from fedasr.rundir import RunDir

    assert RunDir(tmp_path / "new").claim() is False  # does not exist
    (tmp_path / "empty").mkdir()
    assert RunDir(tmp_path / "empty").claim() is False
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FedasrError, match=r"used: run directory exists \(use --resume to continue it or --overwrite\)"):
        RunDir(tmp_path / "used").claim()
    assert RunDir(tmp_path / "used").claim(overwrite=True) is True
    assert (tmp_path / "used" / "config.yaml").is_file()  # claiming clears nothing: the caller does
