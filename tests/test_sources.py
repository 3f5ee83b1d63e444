"""Own corpora (docs/data.md): lhotse manifests, a Kaldi data directory and a CSV converted with
lhotse, at 8 and 44.1 kHz, shard into the federation the LibriSpeech layout of the same audio
gives; bad manifests fail in one line; real data needs no speech synthesizer."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from lhotse import AudioSource, CutSet, MonoCut, MultiCut, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.kaldi import load_kaldi_data_dir
from lhotse.utils import fastcopy

from conftest import FAST, run_cli, sets, tiny_model
from fedasr.data.federation import Federation, ShardOptions, shard
from fedasr.data.features import NUM_MEL_BINS, fbank_extractor
from fedasr.data.sources import parse_manifest_args
from fedasr.data.tokenizer import normalize_transcript
from fedasr.errors import FedasrError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "data.md"


def doc_block(marker: str) -> str:
    """The python block of docs/data.md that contains ``marker`` (the docs' own code, run here)."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


@contextmanager
def cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def train_utterances(corpus: Path) -> list[tuple[str, str, str, Path]]:
    """(id, text, speaker, flac) of the corpus' train split."""
    out = []
    for trans in sorted((corpus / "train").rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, text = line.split(" ", 1)
            out.append((uid, text, uid.split("-")[0], trans.parent / f"{uid}.flac"))
    return out


def band_limited(x: np.ndarray, sr: int, rate: int) -> np.ndarray:
    """Exact band-limited resampling (the spectrum cut, or zero-padded, at the lower Nyquist):
    the test's own converter, so that what differs after sharding is fedasr's resampler."""
    m = int(round(len(x) * rate / sr))
    spec = np.fft.rfft(x)
    out = np.zeros(m // 2 + 1, complex)
    k = min(len(spec), len(out)) - 1
    out[:k] = spec[:k]
    return (np.fft.irfft(out, m) * (m / len(x))).astype(np.float32)


def mel_upper_edges_hz() -> np.ndarray:
    """Upper edge of each fbank bin (Kaldi mel scale, 20 Hz .. 16 kHz Nyquist - 400 Hz)."""
    mel = lambda f: 1127 * np.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20.0), mel(7600.0)
    right = lo + (np.arange(NUM_MEL_BINS) + 2) * (hi - lo) / (NUM_MEL_BINS + 1)
    return 700 * (np.exp(right / 1127) - 1)


@pytest.fixture(scope="module")
def own_corpora(corpus, tmp_path_factory):
    """The corpus' train split (48 utterances, 4 speakers) as (a) a CSV of 44.1 kHz FLACs with
    lower-case punctuated text, converted to a CutSet by docs/data.md's snippet, and (b) a
    Kaldi data directory of 8 kHz WAVs, converted by the docs' load_kaldi_data_dir snippet."""
    root = tmp_path_factory.mktemp("own")
    (root / "a44").mkdir()
    (root / "kaldi" / "wav").mkdir(parents=True)
    utts = train_utterances(corpus)
    with open(root / "train.csv", "w", newline="") as f, open(root / "kaldi" / "wav.scp", "w") as scp, \
            open(root / "kaldi" / "text", "w") as text, open(root / "kaldi" / "utt2spk", "w") as u2s:
        table = csv.writer(f)
        table.writerow(["id", "audio", "text", "speaker"])
        for uid, words, spk, flac in utts:
            x, sr = sf.read(flac, dtype="float32")
            sf.write(root / "a44" / f"{uid}.flac", band_limited(x, sr, 44100), 44100, subtype="PCM_16")
            table.writerow([uid, f"a44/{uid}.flac", words.lower().capitalize() + ".", spk])
            sf.write(root / "kaldi" / "wav" / f"{uid}.wav", band_limited(x, sr, 8000), 8000, subtype="PCM_16")
            scp.write(f"{uid} {root / 'kaldi' / 'wav' / uid}.wav\n")
            text.write(f"{uid} {words}\n")
            u2s.write(f"{uid} {spk}\n")
    with cwd(root):
        exec(doc_block("csv.DictReader"), {})
        exec(doc_block("load_kaldi_data_dir").replace('"data/train"', '"kaldi"'), {})
    return root


def shard_manifests(out: Path, manifests: dict, **kw) -> dict:
    opts = dict(corpus=None, train_splits=["train"], dev_splits=[], test_splits=[], out=out, vocab_size=48,
                jobs=1, manifests=manifests)
    return shard(ShardOptions(**{**opts, **kw}))


# The tolerance, derived: the features are stored lilcom-compressed in steps of 1/32, so two
# stores of the same audio differ by 1/96 ~ 0.010 on average (the difference of two roundings);
# resampling adds little on top where the band survives. 44.1 kHz keeps the whole 20-7600 Hz
# band of the features, so all 80 bins are compared; 8 kHz keeps 0-4 kHz and fedasr's resampler
# passes up to ~3.96 kHz, so the 59 bins whose upper edge lies below 3.8 kHz are compared.
TOLERANCE = {44100: (8000, 0.02, 0.1), 8000: (3800, 0.03, 0.25)}  # rate: (band Hz, mean, 99th percentile)


@pytest.mark.parametrize("rate", [44100, 8000])
def test_own_corpus_shards_like_the_librispeech_layout(own_corpora, federation, tmp_path, rate):
    spec = {44100: str(own_corpora / "train_cuts.jsonl.gz"),
            8000: f"{own_corpora}/train_recordings.jsonl.gz,{own_corpora}/train_supervisions.jsonl.gz"}[rate]
    with cwd(own_corpora):  # the CSV's audio paths are relative: lhotse's rule, the current directory
        meta = shard_manifests(tmp_path / "fed", {"train": spec})
    ref, fed = Federation(federation), Federation(tmp_path / "fed")
    assert fed.client_ids == ref.client_ids  # spk1931, ...: the supervisions' speakers
    assert meta["source"]["splits"]["train"]["sample_rates"] == {rate: 48}
    assert meta["source"]["splits"]["train"]["resampled_to_16k"] == 48
    assert meta["source"]["corpus"] is None and meta["text"]["normalization"].startswith("fedasr-1")
    # the CSV's "Set a timer for seven minutes." is the corpus' SET A TIMER FOR SEVEN MINUTES
    assert fed.tokenizer.proto == ref.tokenizer.proto
    band, mean_tol, p99_tol = TOLERANCE[rate]
    keep = mel_upper_edges_hz() < band
    diffs, lost = [], []
    for client in ref.client_ids:
        a, b = ref.client_cuts(client), fed.client_cuts(client)
        assert sorted(a.ids) == sorted(b.ids)
        for cut in a:
            other = b[cut.id]
            assert other.supervisions[0].text == cut.supervisions[0].text
            assert other.sampling_rate == 16000 and other.recording.sampling_rate == 16000
            fa, fb = cut.load_features(), other.load_features()
            assert abs(len(fa) - len(fb)) <= 1
            n = min(len(fa), len(fb))
            diffs.append(np.abs(fa[:n] - fb[:n])[:, keep])
            lost.append(np.abs(fa[:n] - fb[:n])[:, ~keep])
    d = np.concatenate(diffs)
    assert d.mean() < mean_tol and np.percentile(d, 99) < p99_tol, (d.mean(), np.percentile(d, 99))
    if rate == 8000:  # the comparison can fail: above 4 kHz the band is gone
        assert np.concatenate(lost)[:, -10:].mean() > 1.0


def test_a_kaldi_import_directory_and_the_options_of_shard(own_corpora, tmp_path):
    """`lhotse kaldi import`'s output directory as --manifests, with a server split and dirichlet."""
    from click.testing import CliRunner
    from lhotse.bin.modes.kaldi import kaldi

    r = CliRunner().invoke(kaldi, ["import", str(own_corpora / "kaldi"), "8000", str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"cuts.jsonl.gz", "recordings.jsonl.gz"}
    cuts = CutSet.from_file(tmp_path / "m" / "cuts.jsonl.gz")
    server_spk = sorted({c.supervisions[0].speaker for c in cuts})[0]
    CutSet.from_cuts(c for c in cuts if c.supervisions[0].speaker == server_spk).to_file(tmp_path / "server_cuts.jsonl.gz")
    CutSet.from_cuts(c for c in cuts if c.supervisions[0].speaker != server_spk).to_file(tmp_path / "cuts_train.jsonl.gz")
    # train: the directory convention *cuts_SPLIT.jsonl.gz; server: a CutSet file
    meta = shard_manifests(tmp_path / "fed", {"train": str(tmp_path), "server": str(tmp_path / "server_cuts.jsonl.gz")},
                           server_splits=["server"], scheme="dirichlet", num_clients=2, alpha=1.0, seed=1)
    assert meta["source"]["splits"]["train"]["from"] == str((tmp_path / "cuts_train.jsonl.gz").resolve())
    assert meta["server"]["utterances"] == 48 // 4 and meta["server"]["speakers"] == [server_spk]
    assert meta["summary"]["clients"] == 2 and meta["summary"]["utterances"] == 36
    # `lhotse kaldi import`'s directory (cuts.jsonl.gz) holds every speaker, the server's too
    with pytest.raises(FedasrError, match="--server-split: utterance .* is in a training split too"):
        shard_manifests(tmp_path / "fed2", {"train": str(tmp_path / "m"), "server": str(tmp_path / "server_cuts.jsonl.gz")},
                        server_splits=["server"])
    assert not (tmp_path / "fed2").exists()


def test_kaldi_pipes_and_a_wrong_declared_rate(own_corpora, tmp_path):
    """wav.scp pipes are run (as lhotse runs them), and a rate given wrongly to the Kaldi import
    (16000 for 8 kHz audio) is corrected to the audio's header: the features are the 8 kHz audio's."""
    kaldi = tmp_path / "kaldi"
    kaldi.mkdir()
    lines = (own_corpora / "kaldi" / "wav.scp").read_text().splitlines()[:3]
    (kaldi / "wav.scp").write_text("".join(f"{u} cat {p} |\n" for u, p in (line.split() for line in lines)))
    ids = [line.split()[0] for line in lines]
    for name in ("text", "utt2spk"):
        keep = [line for line in (own_corpora / "kaldi" / name).read_text().splitlines() if line.split()[0] in ids]
        (kaldi / name).write_text("\n".join(keep) + "\n")
    # lhotse reads pipes' durations from reco2dur (or with kaldi_native_io installed)
    (kaldi / "reco2dur").write_text("".join(f"{u} {sf.info(p).duration}\n" for u, p in (line.split() for line in lines)))
    recordings, supervisions, _ = load_kaldi_data_dir(kaldi, sampling_rate=16000)
    assert recordings[ids[0]].sources[0].type == "command"
    write(kaldi, recordings, supervisions)
    meta = shard_manifests(tmp_path / "fed", {"train": str(kaldi)}, vocab_size=None)
    audio = meta["source"]["splits"]["train"]
    assert audio["sample_rates"] == {8000: 3} and audio["manifest_corrected"] == 3
    fed = Federation(tmp_path / "fed")
    ex = fbank_extractor()
    for cut in (c for n in fed.client_ids for c in fed.client_cuts(n)):
        want = ex.extract(sf.read(own_corpora / "kaldi" / "wav" / f"{cut.id}.wav", dtype="float32")[0], 8000)
        got = cut.load_features()
        assert got.shape == want.shape and np.abs(got - want).max() < 1 / 32
    bad = tmp_path / "bad"
    bad.mkdir()
    recordings, supervisions, _ = load_kaldi_data_dir(kaldi, sampling_rate=8000)
    recordings = RecordingSet.from_recordings(fastcopy(r, sources=[fastcopy(r.sources[0], source="false")])
                                              if r.id == ids[0] else r for r in recordings)
    write(bad, recordings, supervisions)
    with pytest.raises(FedasrError, match=rf"{bad}/supervisions.jsonl.gz: {ids[0]}: audio command false failed"):
        shard_manifests(tmp_path / "fed2", {"train": str(bad)}, vocab_size=None)


def stereo_manifest(corpus: Path, root: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """One 16 kHz stereo file, two utterances' audio on its channels, with three supervisions:
    both channels (downmix), the right channel alone, and (Kaldi-style, declared mono) the file."""
    (a, _, _, fa), (b, _, _, fb) = train_utterances(corpus)[:2]
    left, _ = sf.read(fa, dtype="float32")
    right, _ = sf.read(fb, dtype="float32")
    n = min(len(left), len(right))
    left, right = left[:n], right[:n]
    sf.write(root / "stereo.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    rec = Recording.from_file(root / "stereo.wav")
    sups = [SupervisionSegment(id="both", recording_id=rec.id, start=0, duration=rec.duration, channel=[0, 1],
                               text="set a timer", speaker="s1"),
            SupervisionSegment(id="right", recording_id=rec.id, start=0, duration=rec.duration, channel=1,
                               text="set a timer", speaker="s2")]
    # what `lhotse kaldi import DIR 8000` would say of it: one channel at 8 kHz
    mono_decl = Recording(id="declared_mono", sources=[AudioSource(type="file", channels=[0],
                                                                   source=str(root / "stereo.wav"))],
                          sampling_rate=8000, num_samples=n // 2, duration=n / 16000)
    sups.append(SupervisionSegment(id="kaldi", recording_id="declared_mono", start=0, duration=n / 16000, channel=0,
                                   text="set a timer", speaker="s3"))
    RecordingSet.from_recordings([rec, mono_decl]).to_file(root / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(root / "supervisions.jsonl.gz")
    return root, left, right


def test_stereo_is_downmixed_and_a_chosen_channel_is_kept(corpus, federation, tmp_path):
    root, left, right = stereo_manifest(corpus, tmp_path)
    meta = shard_manifests(tmp_path / "fed", {"train": str(root)}, tokenizer=federation / "tokenizer.model")
    audio = meta["source"]["splits"]["train"]
    assert audio["channels"] == {1: 1, 2: 2} and audio["downmixed"] == 2
    assert audio["manifest_corrected"] == 1 and audio["sample_rates"] == {16000: 3}
    fed = Federation(tmp_path / "fed")
    cuts = {c.id: c for n in fed.client_ids for c in fed.client_cuts(n)}
    assert isinstance(cuts["both"], MultiCut) and isinstance(cuts["right"], MonoCut)
    assert isinstance(cuts["kaldi"], MultiCut) and cuts["kaldi"].recording.sampling_rate == 16000
    ex = fbank_extractor()
    for cid, audio in (("both", (left + right) / 2), ("kaldi", (left + right) / 2), ("right", right)):
        want = ex.extract(audio, 16000)
        got = cuts[cid].load_features()
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1 / 32 + 1e-3, cid  # lilcom's rounding alone
    # the left channel alone would not pass: the test tells channels apart
    assert np.abs(cuts["both"].load_features() - ex.extract(left, 16000)).mean() > 0.3


def small_manifest(corpus: Path, root: Path, n: int = 4):
    """Recordings + supervisions of ``n`` train utterances (2 speakers), files copied beside."""
    recs, sups = [], []
    utts = train_utterances(corpus)
    for uid, text, spk, flac in utts[:n // 2] + utts[-(n // 2):]:
        shutil.copy(flac, root / flac.name)
        rec = Recording.from_file(root / flac.name, recording_id=uid)
        recs.append(rec)
        sups.append(SupervisionSegment(id=uid, recording_id=uid, start=0, duration=rec.duration, channel=0,
                                       text=text, speaker=spk))
    return recs, sups


def write(root: Path, recs, sups) -> str:
    RecordingSet.from_recordings(recs).to_file(root / "recordings.jsonl.gz")
    SupervisionSet.from_segments(sups).to_file(root / "supervisions.jsonl.gz")
    return str(root)


def break_manifest(corpus: Path, root: Path, how: str) -> tuple[dict, dict, str]:
    """A manifest set broken one way; returns (manifests, extra shard options, expected error)."""
    recs, sups = small_manifest(corpus, root)
    first = sups[0].id
    where = f"{root / 'supervisions.jsonl.gz'}: {first}: "
    kw = {}
    if how == "missing_audio":
        Path(recs[0].sources[0].source).unlink()
        expect = where + f"audio file {root / first}.flac does not exist"
    elif how == "empty_text":
        sups[0] = SupervisionSegment(**{**sups[0].to_dict(), "text": " "})
        expect = where + "empty transcript"
    elif how == "no_words":
        sups[0] = SupervisionSegment(**{**sups[0].to_dict(), "text": "...!"})
        expect = where + "transcript '...!' has no words"
    elif how == "undecodable":
        Path(recs[0].sources[0].source).write_bytes(b"fLaC" + bytes(range(256)) * 4)
        expect = where + f"undecodable audio {root / first}.flac ("
    elif how == "no_speaker":
        sups[0] = SupervisionSegment(**{**sups[0].to_dict(), "speaker": None})
        expect = where + "no speaker"
    elif how == "outside_audio":
        sups[0] = SupervisionSegment(**{**sups[0].to_dict(), "duration": sups[0].duration + 5})
        expect = where + f"utterance [0.000, {sups[0].duration:.3f}] s lies outside its audio (0 to"
    elif how == "unknown_recording":
        sups[0] = SupervisionSegment(**{**sups[0].to_dict(), "recording_id": "nope"})
        expect = where + f"recording nope is not in {root / 'recordings.jsonl.gz'}"
    elif how == "duplicate_id":
        sups[1] = SupervisionSegment(**{**sups[1].to_dict(), "id": first})
        expect = where + "duplicate supervision id"
    elif how == "truncated":  # the header is whole, the audio is not: found when the features are computed
        path = Path(recs[0].sources[0].source)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 3])
        return {"train": write(root, recs, sups)}, kw, \
            f"{path}: audio of utterance {first} could not be decoded while computing features for 'train'"
    elif how == "unknown_split":
        return {"train": write(root, recs, sups), "extra": str(root)}, kw, \
            "--manifests: split 'extra' has no role"
    elif how == "split_without_manifests":
        return {"train": write(root, recs, sups)}, {"test_splits": ["test"]}, \
            "--test-split: split 'test' has no --manifests test=PATH"
    elif how == "chapter_needed":
        return {"train": write(root, recs, sups)}, {"scheme": "chapter"}, \
            f"--by chapter: utterance {sorted(s.id for s in sups)[0]} has no chapter"
    elif how == "not_a_manifest":
        (root / "cuts.jsonl.gz").write_bytes(b"junk")
        return {"train": str(root / "cuts.jsonl.gz")}, kw, f"{root / 'cuts.jsonl.gz'}: not a readable lhotse manifest"
    elif how == "no_source":
        return {}, kw, "--corpus or --manifests: give a LibriSpeech-layout corpus or lhotse manifests"
    elif how == "recordings_only":
        write(root, recs, sups)
        return {"train": str(root / "recordings.jsonl.gz")}, kw, \
            f"{root / 'recordings.jsonl.gz'}: a RecordingSet, expected a CutSet"
    elif how == "empty_directory":
        return {"train": str(root)}, kw, f"--manifests train: {root} holds no lhotse manifests for split 'train'"
    else:
        raise ValueError(how)
    return {"train": write(root, recs, sups)}, kw, expect


def meta_first(manifests: dict) -> str:
    return sorted(SupervisionSet.from_file(Path(manifests["train"]) / "supervisions.jsonl.gz").ids)[0]


BAD_ENTRIES = ["missing_audio", "empty_text", "no_words", "undecodable", "no_speaker", "outside_audio",
               "unknown_recording", "duplicate_id"]


@pytest.mark.parametrize("how", BAD_ENTRIES + ["truncated", "unknown_split", "split_without_manifests", "chapter_needed",
                                               "not_a_manifest", "empty_directory", "no_source",
                                               "recordings_only"])
def test_bad_manifests_fail_in_one_line_and_leave_nothing(corpus, tmp_path, how):
    root = tmp_path / "m"
    root.mkdir()
    manifests, kw, expect = break_manifest(corpus, root, how)
    out = tmp_path / "out" / "fed"
    out.parent.mkdir()
    with pytest.raises(FedasrError) as e:
        shard_manifests(out, manifests, **{"vocab_size": None, **kw})
    msg = str(e.value)
    assert msg.startswith(expect) and "\n" not in msg, msg
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("how", BAD_ENTRIES)
def test_skip_invalid_drops_and_lists_bad_entries(corpus, tmp_path, how):
    root = tmp_path / "m"
    root.mkdir()
    manifests, kw, expect = break_manifest(corpus, root, how)
    meta = shard_manifests(tmp_path / "fed", manifests, skip_invalid=True, vocab_size=None)
    assert meta["summary"]["utterances"] == 3
    assert meta["source"]["splits"]["train"]["utterances"] == 3
    dropped = [f"{d['path']}: {d['reason']}" for d in meta["dropped"]]
    assert dropped[0].startswith(expect)
    # a supervision of an unknown recording leaves its own recording without a supervision
    assert dropped[1:] == ([f"{manifests['train']}/recordings.jsonl.gz: {meta_first(manifests)}: recording without "
                            "a supervision (no transcript)"] if how == "unknown_recording" else [])


def test_cli_manifests_error_is_one_line(corpus, tmp_path):
    """Even an error found while the features are computed (lhotse logs its own lines there)."""
    root = tmp_path / "m"
    root.mkdir()
    manifests, _, expect = break_manifest(corpus, root, "truncated")
    out = tmp_path / "fed"
    r = run_cli("shard", "--manifests", f"train={manifests['train']}", "--train-split", "train", "--out", out)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".fed")]


@pytest.mark.parametrize("arg,expect", [("train", "expected SPLIT=PATH"), ("=x", "expected SPLIT=PATH"),
                                        ("train=", "expected SPLIT=PATH")])
def test_manifest_argument_format(arg, expect):
    with pytest.raises(FedasrError, match=expect):
        parse_manifest_args([arg])
    with pytest.raises(FedasrError, match="split 'a' given twice"):
        parse_manifest_args(["a=x", "a=y"])
    assert parse_manifest_args(["a=x,y", "b=d/"]) == {"a": "x,y", "b": "d/"}


@pytest.mark.parametrize("text,want", [
    ("Don't stop, Mr. O’Neil!", "DON'T STOP MR O'NEIL"), ("well-known", "WELL KNOWN"), ("7 A.M.", "7 A M"),
    ("Straße café", "STRASSE CAFÉ"), ("Ｆｕｌｌ width", "FULL WIDTH"), ("  'quoted'  ", "'QUOTED'"),
    ("HORSES' HOOVES", "HORSES' HOOVES"), ("'TIS", "'TIS"), (" ' - ", ""), (None, ""),
])
def test_normalize_transcript(text, want):
    assert normalize_transcript(text) == want
    assert normalize_transcript(want) == want


def test_librispeech_transcripts_are_left_as_they_are(corpus):
    lines = [line.split(" ", 1)[1] for t in corpus.rglob("*.trans.txt") for line in t.read_text().splitlines()]
    assert len(lines) > 90 and all(normalize_transcript(t) == t for t in lines)


def test_eval_scores_normalised_references(federation):
    """The references eval scores are normalised like the transcripts shard stored."""
    from fedasr.evaluate import decode_cuts

    fed = Federation(federation)
    cuts = fed.split_cuts("test-clean").subset(first=2)
    raw = CutSet.from_cuts(fastcopy(c, supervisions=[fastcopy(c.supervisions[0],
                                                              text=c.supervisions[0].text.lower() + "?!")])
                           for c in cuts)
    model = tiny_model(num_features=80, vocab_size=fed.tokenizer.vocab_size)
    decoded, _ = decode_cuts(model, raw, fed.tokenizer, fed.cmvn)
    assert [d.ref for d in decoded] == [c.supervisions[0].text for c in cuts]


NO_SYNTH = """
import json, shutil, sys
from fedasr.cli import app
assert shutil.which("espeak-ng") is None and shutil.which("flite") is None and shutil.which("sox") is None
for args in json.loads(sys.argv[1]):
    app(args, standalone_mode=False)
assert "fedasr.data.synth" not in sys.modules, "shard/train/eval imported the synthesizer module"
print("OK")
"""


def test_real_data_needs_no_speech_synthesizer(own_corpora, tmp_path):
    """With a PATH that holds no espeak-ng, flite or sox: shard (manifests), train and eval run;
    `fedasr synth` fails with one line naming the Debian packages."""
    empty = tmp_path / "bin"
    empty.mkdir()
    cuts = CutSet.from_file(own_corpora / "train_cuts.jsonl.gz")
    speakers = sorted({c.supervisions[0].speaker for c in cuts})
    CutSet.from_cuts(c for c in cuts if c.supervisions[0].speaker in speakers[:2]).to_file(tmp_path / "train.jsonl.gz")
    CutSet.from_cuts([c for c in cuts if c.supervisions[0].speaker == speakers[2]][:2]).to_file(tmp_path / "test.jsonl.gz")
    fed, run = tmp_path / "fed", tmp_path / "run"
    steps = [["shard", "--manifests", f"train={tmp_path}/train.jsonl.gz", "--manifests",
              f"test={tmp_path}/test.jsonl.gz", "--train-split", "train", "--test-split", "test", "--vocab-size", "32",
              "--jobs", "1", "--out", str(fed)],
             ["train", "--federation", str(fed), "--out", str(run), *sets("fl.rounds=1", *FAST)],
             ["eval", "--run", str(run)]]
    env = {**os.environ, "PATH": str(empty)}
    r = subprocess.run([sys.executable, "-c", NO_SYNTH, json.dumps(steps)], cwd=own_corpora, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["utterances"] == 2
    r = run_cli("synth", "--out", tmp_path / "synth", env={"PATH": str(empty)})
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "espeak-ng and sox not found" in r.stderr and "apt-get install espeak-ng sox flite" in r.stderr
    assert not (tmp_path / "synth").exists()
