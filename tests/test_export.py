"""`fedasr export` for sherpa-onnx: the metadata it reads, the front end it computes from the
waveform (kaldi-native-fbank) against the one `fedasr shard` stores (lhotse Fbank), int8
copies, and sherpa-onnx decoding an export to the hypotheses of `fedasr eval`."""

import csv
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_model
from fedasr.data.features import GlobalCMVN, fbank_extractor
from fedasr.data.tokenizer import train_tokenizer
from fedasr.evaluate import score
from fedasr.model.transducer import ModelConfig, Transducer

SR = 16000


def _waveform(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test signal in [-1, 1]: amplitude-modulated harmonics over noise, with a
    stretch of digital silence (where the log floor decides the features)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    x = 0.3 * x / np.abs(x).max() + 0.01 * rng.standard_normal(t.size)
    x[int(0.4 * SR):int(0.7 * SR)] = 0.0
    return x.astype(np.float32)


def _sherpa_fbank(wave: np.ndarray) -> np.ndarray:
    """kaldi-native-fbank with the options sherpa-onnx's OfflineRecognizer.from_transducer sets
    (its FeatureExtractorConfig; the other frame/mel options are kaldi-native-fbank's defaults,
    which sherpa-onnx keeps)."""
    knf = pytest.importorskip("kaldi_native_fbank")
    so = pytest.importorskip("sherpa_onnx")
    cfg = so.FeatureExtractorConfig()
    assert cfg.normalize_samples  # samples are fed in [-1, 1], not scaled by 32768
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = cfg.sampling_rate
    opts.frame_opts.dither = cfg.dither
    opts.frame_opts.snip_edges = cfg.snip_edges
    opts.mel_opts.num_bins = cfg.feature_dim
    opts.mel_opts.low_freq = cfg.low_freq
    opts.mel_opts.high_freq = cfg.high_freq
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(cfg.sampling_rate, wave.tolist())
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


def test_shard_features_equal_the_sherpa_onnx_front_end():
    for seconds, seed in ((1.37, 0), (2.0, 1)):
        wave = _waveform(seconds, seed)
        theirs = _sherpa_fbank(wave)
        ours = fbank_extractor().extract(wave, SR)
        assert ours.shape == theirs.shape == (round(seconds * 100), 80)
        diff = np.abs(ours - theirs)
        assert diff.max() < 2e-3 and diff.mean() < 1e-4, (diff.max(), diff.mean())
        assert theirs.min() == pytest.approx(np.log(np.finfo(np.float32).eps), abs=1e-3)  # the same floor


def _tiny_stateless(vocab_size: int) -> Transducer:
    return tiny_model(0, preset="tiny", vocab_size=vocab_size, num_layers=1, d_model=64, ffn_dim=128,
                      predictor="stateless", pred_embed_dim=64, joint_dim=64, dropout=0.0).eval()


def _onnx_meta(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_export_writes_sherpa_metadata_and_int8_copies(tmp_path):
    pytest.importorskip("onnxruntime")
    from fedasr.export import OnnxTransducer, export_model

    words = "the quick brown fox jumps over a lazy dog while seven red birds sing songs".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], None)
    model = _tiny_stateless(tok.vocab_size)
    with torch.no_grad():  # blank wins on some frames: greedy search both skips frames and emits
        model.joiner.output.bias[0] += 1.0
    cmvn = GlobalCMVN([-8.0] * 80, [3.0] * 80, 1)
    meta = export_model(model, tok, cmvn, tmp_path / "e", int8=True)
    d = tmp_path / "e"
    assert meta["sherpa_onnx"] and meta["int8"]
    for suffix in ("", ".int8"):
        dec = _onnx_meta(d / f"decoder{suffix}.onnx")
        assert (dec["vocab_size"], dec["context_size"]) == (str(tok.vocab_size), "2")
        assert _onnx_meta(d / f"encoder{suffix}.onnx")["model_type"] == "conformer"
        assert _onnx_meta(d / f"joiner{suffix}.onnx")["joiner_dim"] == "64"
    import onnx

    for name in ("encoder", "decoder"):  # int8 MatMul weights (the joiner's Gemms stay float, as in icefall)
        g = onnx.load(str(d / f"{name}.int8.onnx")).graph
        weights = {t.name for t in g.initializer}
        assert any(n.op_type == "MatMulInteger" for n in g.node), name
        assert not [n.name for n in g.node if n.op_type == "MatMul" and set(n.input) & weights], name
    assert (d / "encoder.int8.onnx").stat().st_size < 0.8 * (d / "encoder.onnx").stat().st_size
    lines = (d / "tokens.txt").read_text().splitlines()
    assert lines[0] == "<blk> 0" and len(lines) == tok.vocab_size
    assert all(line.rsplit(" ", 1)[1] == str(i) for i, line in enumerate(lines))

    # sherpa-onnx's start context [-1, blank] is the predictor's all-blank start context
    fp, q = OnnxTransducer(d), OnnxTransducer(d, int8=True)
    start = fp.decoder.run(None, {"y": np.array([[-1, 0], [0, 0]], np.int64)})[0]
    np.testing.assert_array_equal(start[0], start[1])
    with torch.no_grad():
        out, _ = model.predictor(torch.zeros(1, 1, dtype=torch.long))
        np.testing.assert_allclose(start[0], model.joiner.project_predictor(out[:, 0])[0].numpy(), atol=1e-5)
    feats = _sherpa_fbank(_waveform(1.5, 2))
    enc_fp = fp.encode(feats[None], np.array([len(feats)]))[0]
    enc_q = q.encode(feats[None], np.array([len(feats)]))[0]
    assert enc_fp.shape == enc_q.shape and 0 < np.abs(enc_fp - enc_q).max()

    # the joiner batched over frames is the frame-by-frame greedy search (a random model emits a lot)
    e, counts = enc_fp[0], []
    for m in (1, 2, 3):
        ref, (state, dec) = [], fp._decoder_start()
        for t in range(len(e)):
            for _ in range(m):
                tok = int(fp.joiner.run(None, {"encoder_out": e[t:t + 1], "decoder_out": dec})[0][0].argmax())
                if tok == fp.blank:
                    break
                ref.append(tok)
                state, dec = fp._decoder_step(state, tok)
        assert fp.greedy(e, m, chunk=8) == ref, m
        counts.append(len(ref))
    assert 0 < counts[0] < len(e) and counts[0] < counts[2], counts  # blank frames and frames with several symbols

    so = pytest.importorskip("sherpa_onnx")
    for suffix in ("", ".int8"):
        rec = so.OfflineRecognizer.from_transducer(
            encoder=str(d / f"encoder{suffix}.onnx"), decoder=str(d / f"decoder{suffix}.onnx"),
            joiner=str(d / f"joiner{suffix}.onnx"), tokens=str(d / "tokens.txt"), num_threads=1, feature_dim=80,
            decoding_method="greedy_search")
        s = rec.create_stream()
        s.accept_waveform(SR, _waveform(1.5, 2))
        rec.decode_stream(s)
        assert isinstance(s.result.text, str)


def _one_matmul(tmp_path, weight: np.ndarray):
    """A one-MatMul fp32 ONNX model y = x @ weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, weight.shape[1]])],
                          [numpy_helper.from_array(weight.astype(np.float32), "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "fp.onnx"))
    return tmp_path / "fp.onnx"


# The worst case of onnxruntime's U8S8 kernel without VNNI: all-positive activations (uint8
# near 255) times same-sign int8 weights near 127, so that a pair of products exceeds int16.
_ADVERSARIAL = np.random.default_rng(0)
_ADV_W = -np.abs(_ADVERSARIAL.normal(1, 0.05, (64, 8)))
_ADV_X = np.abs(_ADVERSARIAL.normal(1, 0.05, (4, 64))).astype(np.float32)


@pytest.mark.parametrize("scheme", ["u8u8", "u8s8-7bit", "u8s8"])
def test_int8_schemes_saturation_and_quantisation_bound(tmp_path, scheme):
    """Every quantised MatMul of an int8 export stays within the error bound its quantisation
    guarantees (fedasr.export.int8_matmul_errors): on the tiny model's real activations and on
    the worst case for a saturating kernel. The default scheme, and u8s8-7bit, cannot saturate
    on any CPU; u8s8 can on x86 without VNNI (int8_can_saturate), which is why it is not the
    default (the qemu test below shows it)."""
    pytest.importorskip("onnxruntime")
    from fedasr.export import INT8_DEFAULT, _quantize_int8, export_model
    from fedasr.int8 import int8_can_saturate, int8_matmul_errors

    fp = _one_matmul(tmp_path, _ADV_W)
    _quantize_int8(fp, tmp_path / "q.onnx", scheme)
    assert int8_can_saturate(tmp_path / "q.onnx") == (scheme == "u8s8")
    rows = int8_matmul_errors(fp, tmp_path / "q.onnx", {"x": _ADV_X})
    assert len(rows) == 1
    if scheme != "u8s8":  # (u8s8 holds only where the CPU has VNNI: see the qemu test)
        assert rows[0]["violations"] == 0, rows
    # the real model: every MatMul of the encoder within its bound, on speech-like features
    words = "the quick brown fox jumps over a lazy dog".split()
    tok = train_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], None)
    cmvn = GlobalCMVN([-8.0] * 80, [3.0] * 80, 1)
    export_model(_tiny_stateless(tok.vocab_size), tok, cmvn, tmp_path / "e", int8=True, int8_scheme=scheme)
    feats = _sherpa_fbank(_waveform(1.5, 2))[None].astype(np.float32)
    rows = int8_matmul_errors(tmp_path / "e" / "encoder.onnx", tmp_path / "e" / "encoder.int8.onnx",
                              {"x": feats, "x_lens": np.array([feats.shape[1]], np.int64)})
    assert len(rows) >= 8 and all(r["max_error"] > 0 for r in rows)  # really quantised
    if scheme != "u8s8":
        assert all(r["violations"] == 0 for r in rows), rows
    assert INT8_DEFAULT == "u8u8"


@pytest.mark.skipif(not shutil.which("qemu-x86_64"), reason="qemu-user (to emulate a CPU without VNNI) missing")
def test_int8_default_is_accurate_on_an_avx2_cpu_without_vnni(tmp_path):
    """On an emulated Haswell (AVX2, no AVX-512, no VNNI: `qemu-x86_64 -cpu Haswell`) the
    saturating scheme u8s8 breaks its quantisation bound on the worst case, by far; the
    default stays within it."""
    pytest.importorskip("onnxruntime")
    import json
    import subprocess
    import sys

    from fedasr.export import INT8_DEFAULT, _quantize_int8

    fp = _one_matmul(tmp_path, _ADV_W)
    np.save(tmp_path / "x.npy", _ADV_X)
    for scheme in (INT8_DEFAULT, "u8s8"):
        _quantize_int8(fp, tmp_path / f"{scheme}.onnx", scheme)
    code = ("import json, sys, numpy as np; from fedasr.int8 import int8_matmul_errors; d = sys.argv[1]; "
            "x = np.load(d + '/x.npy'); print(json.dumps({s: int8_matmul_errors(d + '/fp.onnx', d + f'/{s}.onnx', "
            "{'x': x})[0] for s in sys.argv[2:]}))")
    r = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code, str(tmp_path), INT8_DEFAULT,
                        "u8s8"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows[INT8_DEFAULT]["violations"] == 0, rows
    assert rows["u8s8"]["violations"] > 0 and rows["u8s8"]["max_error"] > 0.1 * rows["u8s8"]["max_abs"], rows


def _read_tsv(path) -> dict:
    with open(path, newline="") as f:
        return {r["id"]: (r["ref"], r["hyp"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


def test_sherpa_onnx_decodes_an_export_as_fedasr_eval_does(federation, tmp_path, single_thread):
    """A briefly trained checkpoint: `fedasr eval` on the stored features and sherpa-onnx on
    the waveforms (its own front end and greedy search) give the same hypotheses. sherpa-onnx's
    greedy search emits at most one symbol a frame: `--max-symbols-per-frame 1`."""
    so = pytest.importorskip("sherpa_onnx")
    import yaml

    from fedasr.checkpoint import save_checkpoint
    from fedasr.config import TrainSection
    from fedasr.data.batching import AsrDataset
    from fedasr.data.federation import Federation
    from fedasr.rundir import RunDir
    from fedasr.trainer import make_optimizer, train_steps

    fed = Federation(federation)
    cuts = fed.split_cuts("dev")  # the utterances it learns (a little) and is decoded on
    model = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=2, d_model=96, ffn_dim=192,
                       predictor="stateless", pred_embed_dim=96, joint_dim=96, simple_head=True, dropout=0.0)
    cfg = TrainSection(lr=3e-3, warmup_steps=10, lr_schedule="constant", max_duration=60.0, spec_augment=False,
                       ctc_weight=0.5, simple_loss_weight=0.5)
    train_steps(model, make_optimizer(model, cfg), AsrDataset(cuts, fed.tokenizer, fed.cmvn), cfg, seed=0,
                num_steps=170)
    run = RunDir(tmp_path / "run")
    run.ckpt_dir.mkdir(parents=True)
    run.config_path.write_text(yaml.safe_dump({"federation": str(federation)}))
    save_checkpoint(run.checkpoint(1), model, fed.tokenizer, config={"federation": str(federation)})
    run.set_latest(run.checkpoint(1))

    r = run_cli("eval", "--run", run.root, "--split", "dev", "--split", "test-clean", "--max-symbols-per-frame", "1")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", run.checkpoint(1), "--out", tmp_path / "onnx", "--int8")
    assert r.returncode == 0, r.stderr
    d = tmp_path / "onnx"
    import json

    conf = json.loads((d / "config.json").read_text())  # the WER measured on this checkpoint, and how
    assert conf["decoding"]["sherpa_onnx"] == "greedy_search" and conf["decoding"]["max_symbols_per_frame"] == 1
    assert set(conf["measured"]) == {"dev", "test-clean"}
    assert conf["measured"]["dev"]["decoding"] == "greedy search, 1 symbol per frame"
    assert conf["measured"]["dev"]["wer"] == json.loads((run.root / "results.json").read_text())["dev"]["wer"]
    assert all((d / f"{n}.int8.onnx").is_file() for n in ("encoder", "decoder", "joiner"))
    rec = so.OfflineRecognizer.from_transducer(encoder=str(d / "encoder.onnx"), decoder=str(d / "decoder.onnx"),
                                               joiner=str(d / "joiner.onnx"), tokens=str(d / "tokens.txt"),
                                               num_threads=1, feature_dim=80, decoding_method="greedy_search")
    for split in ("dev", "test-clean"):
        ours = _read_tsv(run.root / "decode" / f"{split}-beam1.tsv")
        split_cuts = list(fed.split_cuts(split))
        streams = []
        for c in split_cuts:
            s = rec.create_stream()
            s.accept_waveform(c.sampling_rate, c.load_audio()[0])
            streams.append(s)
        rec.decode_streams(streams)  # one padded batch, as a server would
        theirs = [" ".join(s.result.text.split()) for s in streams]
        refs = [ours[c.id][0] for c in split_cuts]
        hyps = [" ".join(ours[c.id][1].split()) for c in split_cuts]  # the words (a final "▁" leaves a space)
        same = sum(a == b for a, b in zip(hyps, theirs))
        assert same >= 0.98 * len(split_cuts), list(zip(hyps, theirs))
        wer, wer_sherpa = score(refs, hyps)["wer"], score(refs, theirs)["wer"]
        assert abs(wer - wer_sherpa) <= 0.003, (wer, wer_sherpa)
        if split == "dev":  # the trained-on split: a model that has learnt something
            assert wer < 0.9 and sum(bool(h) for h in hyps) >= 0.75 * len(hyps), (wer, hyps)
