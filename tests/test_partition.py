import random
from collections import Counter

import pytest

from fedasr.data.partition import Utt, partition
from fedasr.errors import FedasrError


def make_utts(n_speakers=12, seed=0):
    rng = random.Random(seed)
    utts = []
    for s in range(n_speakers):
        spk = str(100 + s)
        for ch in range(rng.randint(1, 3)):
            chapter = f"{spk}{ch}"
            for k in range(rng.randint(2, 15)):
                utts.append(Utt(f"{spk}-{chapter}-{k:04d}", spk, chapter, rng.uniform(1, 5)))
    return utts


def exactly_once(utts, p):
    counts = Counter(u for ids in p.clients.values() for u in ids)
    assert set(counts) == {u.id for u in utts}
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("scheme,kw", [
    ("speaker", {}), ("chapter", {}), ("iid", {"num_clients": 7}),
    ("dirichlet", {"num_clients": 5, "alpha": 0.3}), ("dirichlet", {"num_clients": 5, "alpha": 100.0}),
])
def test_every_utterance_in_exactly_one_client_and_deterministic(scheme, kw):
    utts = make_utts()
    p = partition(utts, scheme, seed=3, **kw)
    exactly_once(utts, p)
    assert partition(list(reversed(utts)), scheme, seed=3, **kw).clients == p.clients


def test_speaker_scheme_is_speaker_disjoint_with_one_client_per_speaker():
    utts = make_utts()
    p = partition(utts, "speaker")
    spk = {u.id: u.speaker for u in utts}
    assert len(p.clients) == len({u.speaker for u in utts})
    for ids in p.clients.values():
        assert len({spk[i] for i in ids}) == 1


def test_chapter_scheme_one_chapter_per_client():
    utts = make_utts()
    p = partition(utts, "chapter")
    ch = {u.id: (u.speaker, u.chapter) for u in utts}
    assert len(p.clients) == len(set(ch.values()))
    for ids in p.clients.values():
        assert len({ch[i] for i in ids}) == 1


def test_iid_sizes_differ_by_at_most_one_and_seed_matters():
    utts = make_utts()
    p = partition(utts, "iid", seed=1, num_clients=6)
    sizes = [len(v) for v in p.clients.values()]
    assert len(sizes) == 6 and max(sizes) - min(sizes) <= 1
    assert partition(utts, "iid", seed=2, num_clients=6).clients != p.clients


def test_dirichlet_alpha_controls_heterogeneity():
    utts = make_utts(n_speakers=20)
    spk = {u.id: u.speaker for u in utts}

    def mean_top_speaker_share(alpha):
        p = partition(utts, "dirichlet", seed=0, num_clients=5, alpha=alpha)
        shares = []
        for ids in p.clients.values():
            c = Counter(spk[i] for i in ids)
            shares.append(max(c.values()) / len(ids))
        return sum(shares) / len(shares)

    assert mean_top_speaker_share(0.05) > mean_top_speaker_share(1000.0) + 0.2


def test_filters_exclude_and_report():
    utts = make_utts()
    full = partition(utts, "speaker")
    small = sorted(c for c, v in full.clients.items() if len(v) < 10)
    assert small, "fixture should have small speakers"
    p = partition(utts, "speaker", min_utterances=10)
    assert sorted(p.excluded_clients) == small
    assert all(len(v) >= 10 for v in p.clients.values())
    q = partition(utts, "speaker", max_clients=4, seed=5)
    assert len(q.clients) == 4 and len(q.excluded_clients) == len(full.clients) - 4
    assert partition(utts, "speaker", max_clients=4, seed=5).clients == q.clients


@pytest.mark.parametrize("scheme,kw,match", [
    ("iid", {"num_clients": 0}, "--num-clients"),
    ("iid", {}, "--num-clients"),
    ("dirichlet", {"num_clients": 3, "alpha": 0.0}, "--alpha"),
    ("iid", {"num_clients": 100000}, "--num-clients"),
    ("bogus", {}, "--by"),
    ("speaker", {"min_utterances": 10**6}, "--min-utterances"),
])
def test_bad_options(scheme, kw, match):
    with pytest.raises(FedasrError, match=match):
        partition(make_utts(), scheme, **kw)
