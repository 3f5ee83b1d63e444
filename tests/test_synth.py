import hashlib
import re

import pytest

import soundfile as sf

from fedasr.data import synth
from fedasr.data.text import vocabulary

ID = re.compile(r"^(\d+)-(\d+)-(\d{4})$")


def read_split(root, split):
    out = {}
    for trans in sorted((root / split).rglob("*.trans.txt")):
        spk, ch = trans.name[: -len(".trans.txt")].split("-")
        assert trans.parent.name == ch and trans.parent.parent.name == spk
        for line in trans.read_text().splitlines():
            uid, text = line.split(" ", 1)
            m = ID.match(uid)
            assert m and m.group(1) == spk and m.group(2) == ch
            out[uid] = (spk, text, trans.parent / f"{uid}.flac")
    return out


def test_librispeech_layout_and_audio(corpus):
    splits = {s: read_split(corpus, s) for s in synth.SPLITS}
    assert [len(splits[s]) for s in synth.SPLITS] == [48, 8, 8, 8, 24]
    words = vocabulary("small")
    for split, utts in splits.items():
        for uid, (spk, text, flac) in utts.items():
            assert flac.is_file()
            assert text == text.upper() and re.fullmatch(r"[A-Z' ]+", text)
            assert set(text.split()) <= words
        info = sf.info(str(next(iter(utts.values()))[2]))
        assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
    # every flac has a transcript line
    flacs = {p.stem for p in corpus.rglob("*.flac")}
    assert flacs == {u for s in splits.values() for u in s}
    train_spk = {v[0] for v in splits["train"].values()}
    assert {v[0] for v in splits["test-clean"].values()} <= train_spk
    assert {v[0] for v in splits["dev"].values()} <= train_spk
    assert not {v[0] for v in splits["test-other"].values()} & train_spk
    # the server's speakers are in no other split
    server_spk = {v[0] for v in splits["train-server"].values()}
    assert len(server_spk) == 2
    assert not server_spk & {v[0] for s, u in splits.items() if s != "train-server" for v in u.values()}
    # sentences disjoint across splits
    texts = [v[1] for s in splits.values() for v in s.values()]
    assert len(texts) == len(set(texts))
    # several chapters per speaker
    chapters = {(v[0], v[2].parent.name) for v in splits["train"].values()}
    assert len(chapters) == 3 * 4
    assert "Synthetic" in (corpus / "SPEAKERS.TXT").read_text()


def test_speakers_are_distinct_voices_and_enough_of_them():
    pool = synth.voice_pool(0)
    assert len(pool) >= 20
    assert len({v.name for v in pool}) == len(pool)
    first = [v.voice.split("+")[-1] for v in pool[:30] if v.engine == "espeak-ng"]
    assert len(first) == len(set(first)), "the first speakers should use distinct voice variants"


def test_server_speakers_leave_the_other_splits_unchanged():
    kw = dict(speakers=3, utterances_per_speaker=4, seed=5, test_other_speakers=1, dev_per_speaker=1,
              test_per_speaker=1)
    plain = synth.plan_corpus(**kw)
    with_server = synth.plan_corpus(**kw, server_speakers=2)
    server = [u for u in with_server.utterances if u.split == "train-server"]
    assert [u for u in with_server.utterances if u.split != "train-server"] == plain.utterances
    assert len(server) == 2 * 4 and len({u.speaker for u in server}) == 2
    assert not {u.speaker for u in server} & {u.speaker for u in plain.utterances}
    assert not {u.voice for u in server} & {u.voice for u in plain.utterances}
    assert not {u.text for u in server} & {u.text for u in plain.utterances}
    with pytest.raises(synth.FedasrError, match="--server-speakers"):
        synth.plan_corpus(**kw, server_speakers=-1)


@pytest.mark.e2e
def test_deterministic_for_a_seed(tmp_path):
    def digest(root, seed):
        plan = synth.plan_corpus(speakers=2, utterances_per_speaker=2, seed=seed, test_other_speakers=1,
                                 dev_per_speaker=1, test_per_speaker=1)
        synth.synthesize_corpus(root, plan, jobs=2)
        h = hashlib.sha256()
        for p in sorted((root / "LibriSpeech").rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(root)).encode() + p.read_bytes())
        return h.hexdigest()

    first = digest(tmp_path / "a", 3)
    assert digest(tmp_path / "b", 3) == first
    assert digest(tmp_path / "c", 4) != first
