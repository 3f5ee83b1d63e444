import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_cli
from fedasr.data.batching import AsrDataset
from fedasr.data.features import SpecAugment, fbank_extractor
from fedasr.data.federation import Federation

SPLIT_ARGS = ["--train-split", "train", "--dev-split", "dev", "--test-split", "test-clean",
              "--test-split", "test-other"]


def test_federation_directory(federation, corpus):
    fed = Federation(federation)
    meta = fed.meta
    assert meta["scheme"]["by"] == "speaker"
    assert len(fed.client_ids) == 4 and meta["summary"]["utterances"] == 48
    ids = set()
    for c in fed.client_ids:
        cuts = fed.client_cuts(c)
        spk = {cut.supervisions[0].speaker for cut in cuts}
        assert len(spk) == 1 and meta["clients"][c]["speakers"] == sorted(spk)
        for cut in cuts:
            assert cut.supervisions[0].custom["chapter"] == cut.id.split("-")[1]
        ids |= {cut.id for cut in cuts}
    assert ids == {p.stem for p in (corpus / "train").rglob("*.flac")}
    assert set(fed.eval_splits) == {"dev", "test-clean", "test-other"}
    assert fed.tokenizer.vocab_size == 48
    text = fed.client_cuts(fed.client_ids[0])[0].supervisions[0].text
    assert fed.tokenizer.decode(fed.tokenizer.encode(text)) == text


def test_federation_dir_is_relocatable(federation, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(federation, moved)
    fed = Federation(moved)
    cut = fed.split_cuts("test-other")[0]
    assert str(moved.resolve()) in cut.features.storage_path
    assert cut.load_features().shape[1] == 80


def test_eval_features_are_exactly_what_the_front_end_computes(federation):
    """Dev/test features are stored uncompressed: `fedasr eval` decodes the very fbank a
    deployment computes from the waveform (lilcom's steps of 1/32 moved the demo's dense WER by
    0.35 points against sherpa-onnx). Training features stay lilcom-compressed."""
    fed = Federation(federation)
    assert fed.meta["features"]["storage"] == {"train": "lilcom_chunky", "eval": "numpy_files"}
    ex = fbank_extractor()
    for split in fed.eval_splits:
        for cut in fed.split_cuts(split)[:3]:
            want = ex.extract(cut.load_audio(), cut.sampling_rate)
            got = cut.load_features()
            assert got.dtype == np.float32 and np.array_equal(got, want), (split, cut.id)
    cut = fed.client_cuts(fed.client_ids[0])[0]
    diff = np.abs(cut.load_features() - ex.extract(cut.load_audio(), cut.sampling_rate))
    assert 0 < diff.max() <= 1 / 64 + 1e-4  # lilcom: rounded to the nearest 1/32


def test_features_shapes_and_normalisation(federation):
    fed = Federation(federation)
    cuts = [c for name in fed.client_ids for c in fed.client_cuts(name)]
    ds = AsrDataset(fed.client_cuts(fed.client_ids[0]), fed.tokenizer, fed.cmvn)
    for cut in cuts[:5]:
        f = cut.load_features()
        assert f.shape[1] == 80 and abs(f.shape[0] - round(cut.duration * 100)) <= 2
    allf = torch.cat([fed.cmvn.apply(torch.from_numpy(c.load_features())) for c in cuts])
    assert allf.mean(0).abs().max() < 0.02  # lilcom quantisation leaves tiny offsets
    assert (allf.std(0) - 1).abs().max() < 0.02
    batches = list(ds.batches(max_duration=8.0, seed=1))
    assert sum(len(b) for b in batches) == len(ds)
    for b in batches:
        assert b.feats.shape[0] == len(b) and b.feats.shape[2] == 80
        assert b.feats.shape[1] == int(b.feat_lens.max())
        assert int(b.target_lens.max()) == b.targets.shape[1]
        assert sum(c.duration for c in ds.cuts.subset(cut_ids=b.ids)) <= 8.0 + 1e-6 or len(b) == 1
        for i in range(len(b)):  # padding is zero
            assert torch.all(b.feats[i, b.feat_lens[i]:] == 0)
    again = [b.ids for b in ds.batches(max_duration=8.0, seed=1)]
    assert again == [b.ids for b in batches]
    assert [b.ids for b in ds.batches(max_duration=8.0, seed=2)] != again


def test_spec_augment_masks_and_is_seeded():
    x = torch.randn(300, 80)
    aug = SpecAugment(freq_masks=2, freq_width=20, time_masks=4, time_mask_ratio=0.05)
    a = aug(x, 300, torch.Generator().manual_seed(0))
    b = aug(x, 300, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    zero_cols = int((a == 0).all(0).sum())
    zero_rows = int((a == 0).all(1).sum())
    assert 0 < zero_cols <= 40 and zero_rows <= 4 * 15
    assert torch.equal(a[a != 0], x[a != 0])


@pytest.mark.parametrize("by,extra,expect_clients", [
    ("chapter", [], 12), ("iid", ["--num-clients", "3"], 3),
    ("dirichlet", ["--num-clients", "3", "--alpha", "1.0", "--seed", "1"], 3),
])
def test_cli_schemes(corpus, tmp_path, by, extra, expect_clients):
    out = tmp_path / "fed"
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--by", by, *extra,
                "--vocab-size", "40", "--out", out)
    assert r.returncode == 0, r.stderr
    meta = yaml.safe_load((out / "federation.yaml").read_text())
    assert len(meta["clients"]) == expect_clients
    assert sum(c["utterances"] for c in meta["clients"].values()) == 48
    assert "utterances / client" in r.stdout


def corrupt_copy(corpus: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """Copy the corpus and break it; returns (root, text expected in the error)."""
    root = tmp_path / "LibriSpeech"
    shutil.copytree(corpus, root)
    trans = sorted((root / "train").rglob("*.trans.txt"))[0]
    lines = trans.read_text().splitlines()
    first_id = lines[0].split()[0]
    flac = trans.parent / f"{first_id}.flac"
    if how == "line_without_audio":
        flac.unlink()
        return root, f"{trans}:1: transcript line without audio"
    if how == "audio_without_line":
        trans.write_text("\n".join(lines[1:]) + "\n")
        return root, f"{flac}: audio without a transcript line"
    if how == "empty_transcript":
        trans.write_text("\n".join([first_id] + lines[1:]) + "\n")
        return root, f"{trans}:1: empty transcript for {first_id}"
    if how == "undecodable":
        flac.write_bytes(b"fLaC" + bytes(range(256)) * 4)
        return root, f"{flac}: undecodable audio"
    if how == "no_transcripts":
        for t in (root / "train").rglob("*.trans.txt"):
            t.unlink()
        return root, f"{root / 'train'}: no *.trans.txt transcripts"
    raise ValueError(how)


def assert_clean_failure(r, out: Path, expect: str):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert expect in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temporary output left"


@pytest.mark.parametrize("how", ["line_without_audio", "audio_without_line", "empty_transcript",
                                 "undecodable", "no_transcripts"])
def test_bad_corpus_fails_cleanly(corpus, tmp_path, how):
    root, expect = corrupt_copy(corpus, tmp_path, how)
    out = tmp_path / "out" / "fed"
    out.parent.mkdir()
    r = run_cli("shard", "--corpus", root, *SPLIT_ARGS, "--vocab-size", "40", "--out", out)
    assert_clean_failure(r, out, expect)


@pytest.mark.parametrize("how", ["line_without_audio", "empty_transcript", "undecodable"])
def test_skip_invalid_drops_and_records(corpus, tmp_path, how):
    root, expect = corrupt_copy(corpus, tmp_path, how)
    out = tmp_path / "fed"
    r = run_cli("shard", "--corpus", root, *SPLIT_ARGS, "--vocab-size", "40", "--out", out, "--skip-invalid")
    assert r.returncode == 0, r.stderr
    meta = yaml.safe_load((out / "federation.yaml").read_text())
    assert meta["summary"]["utterances"] == 47
    assert len(meta["dropped"]) == 1
    assert expect.split(": ", 1)[1].split(" (")[0] in meta["dropped"][0]["reason"]


@pytest.mark.parametrize("args,expect", [
    (["--corpus", "/nonexistent/LibriSpeech", *SPLIT_ARGS], "/nonexistent/LibriSpeech: corpus directory does not exist"),
    (["--train-split", "train-clean-100"], "unknown split 'train-clean-100'"),
    (["--train-split", "train", "--by", "iid", "--num-clients", "0"], "'--num-clients': 0 is not in the range x>=1"),
    (["--train-split", "train", "--vocab-size", "5000"], "--vocab-size: 5000 is larger"),
    (["--train-split", "train", "--by", "nope"], "'--by': 'nope' is not one of 'speaker', 'chapter'"),
])
def test_bad_options_fail_cleanly(corpus, tmp_path, args, expect):
    out = tmp_path / "fed"
    if "--corpus" not in args:
        args = ["--corpus", corpus, *args]
    r = run_cli("shard", *args, "--out", out)
    assert_clean_failure(r, out, expect)
    # a bad option value is a usage error (exit 2, Click's or ours), a bad corpus a runtime error (1)
    assert r.returncode == (2 if "--" in expect else 1)


def test_existing_output_is_not_clobbered(federation, corpus):
    before = (federation / "federation.yaml").read_text()
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--out", federation)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (federation / "federation.yaml").read_text() == before


def test_given_tokenizer_is_used(corpus, federation, tmp_path):
    out = tmp_path / "fed2"
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--tokenizer",
                federation / "tokenizer.model", "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").read_bytes() == (federation / "tokenizer.model").read_bytes()


@pytest.mark.e2e
def test_cli_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("synth", "shard", "train", "eval"):
        assert cmd in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("fedasr ")


def test_default_vocabulary_fits_a_small_corpus(corpus, tmp_path):
    """The documented command without --vocab-size works on a corpus too small for 256 pieces."""
    out = tmp_path / "fed"
    r = run_cli("shard", "--corpus", corpus, "--train-split", "train", "--out", out)
    assert r.returncode == 0, r.stderr
    meta = yaml.safe_load((out / "federation.yaml").read_text())
    assert meta["tokenizer"]["requested"] == "auto" and 3 < meta["tokenizer"]["vocab_size"] < 256
    assert f"tokenizer: {meta['tokenizer']['vocab_size']} pieces (chosen automatically" in r.stdout
