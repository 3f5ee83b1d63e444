"""Tests for the synthetic transcript generator (fedasr.data.text)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from fedasr.data import text

SENTENCE_RE = re.compile(r"^[A-Z']+(?: [A-Z']+)*$")
SPLITS = {"train": 1200, "dev": 100, "test-clean": 100, "test-other": 100}


@pytest.fixture(scope="module")
def small_sample() -> list[str]:
    return text.generate_sentences("small", 20_000, random.Random(0))


@pytest.fixture(scope="module")
def open_sample() -> list[str]:
    # generation speed is measured by scripts/bench_text.py, not asserted here
    return text.generate_sentences("open", 200_000, random.Random(0))


def _words(sentences: list[str]) -> set[str]:
    return {w for s in sentences for w in s.split(" ")}


# -- vocabulary ----------------------------------------------------------------


def test_domains() -> None:
    assert text.DOMAINS == ("small", "open")


def test_vocabulary_sizes_and_spelling() -> None:
    small, open_ = text.vocabulary("small"), text.vocabulary("open")
    assert isinstance(small, frozenset) and isinstance(open_, frozenset)
    assert 100 <= len(small) <= 200
    assert len(open_) >= 1000
    for word in small | open_:
        assert re.fullmatch(r"[A-Z]+(?:'[A-Z]+)?", word), word
    # vocabulary() is stable
    assert text.vocabulary("open") == open_


def test_unknown_domain() -> None:
    with pytest.raises(ValueError, match="tiny"):
        text.vocabulary("tiny")
    with pytest.raises(ValueError, match="tiny"):
        text.generate_sentences("tiny", 3, random.Random(0))
    with pytest.raises(ValueError, match="tiny"):
        text.split_sentences("tiny", {"train": 3}, 0)


def test_grammar_bounds() -> None:
    small = text._grammar("small")
    assert small.min_len[small.start] >= 3
    assert small.max_len[small.start] <= 14  # no sentence of the small grammar is ever rejected
    assert small.language_bound >= 20_000
    big = text._grammar("open")
    assert big.min_len[big.start] >= 4
    assert big.language_bound >= 200_000


# -- small domain --------------------------------------------------------------


def test_small_sentences(small_sample: list[str]) -> None:
    assert len(small_sample) == 20_000
    assert len(set(small_sample)) == 20_000
    vocab = text.vocabulary("small")
    for s in small_sample:
        assert SENTENCE_RE.match(s), s
        assert 3 <= len(s.split(" ")) <= 14, s
    words = _words(small_sample)
    assert words <= vocab, sorted(words - vocab)
    # every vocabulary word is reachable
    assert vocab <= words, sorted(vocab - words)


def test_small_examples_are_in_language(small_sample: list[str]) -> None:
    joined = "\n".join(small_sample)
    for prefix in ("SET AN ALARM FOR", "TURN OFF THE", "CALL ", "REMIND ME ON", "SET THE THERMOSTAT TO", "PLAY THE NEXT SONG"):
        assert "\n" + prefix in joined, prefix


# -- open domain ------------------------------------------------------------------


def test_open_sentences(open_sample: list[str]) -> None:
    assert len(open_sample) == 200_000
    assert len(set(open_sample)) == 200_000
    vocab = text.vocabulary("open")
    for s in open_sample:
        assert SENTENCE_RE.match(s), s
        assert 4 <= len(s.split(" ")) <= 20, s
    assert _words(open_sample) <= vocab


def test_open_coverage(open_sample: list[str]) -> None:
    vocab = text.vocabulary("open")
    first = open_sample[:50_000]
    # the first 50,000 are exactly what a request for 50,000 returns
    assert first == text.generate_sentences("open", 50_000, random.Random(0))
    covered = _words(first) & vocab
    assert len(covered) >= 0.9 * len(vocab), f"{len(covered)} of {len(vocab)}"
    assert "AN" in covered and "A" in covered


def test_open_articles(open_sample: list[str]) -> None:
    for s in open_sample[:20_000]:
        words = s.split(" ")
        for a, b in zip(words, words[1:]):
            if a == "A":
                assert not text._takes_an(b), s
            elif a == "AN":
                assert text._takes_an(b), s
    assert text._takes_an("OLD") and text._takes_an("HONEST") and text._takes_an("UMBRELLA")
    assert not text._takes_an("USEFUL") and not text._takes_an("SMALL")


# -- generate_sentences ----------------------------------------------------------


@pytest.mark.parametrize("domain", text.DOMAINS)
def test_determinism(domain: str) -> None:
    a = text.generate_sentences(domain, 300, random.Random(42))
    b = text.generate_sentences(domain, 300, random.Random(42))
    c = text.generate_sentences(domain, 300, random.Random(43))
    assert a == b
    assert a != c
    assert text.generate_sentences(domain, 100, random.Random(42)) == a[:100]


@pytest.mark.parametrize("domain", text.DOMAINS)
def test_exclude_is_honoured(domain: str) -> None:
    taken = text.generate_sentences(domain, 200, random.Random(1))
    fresh = text.generate_sentences(domain, 300, random.Random(1), exclude=set(taken))
    assert len(fresh) == len(set(fresh)) == 300
    assert not set(fresh) & set(taken)
    fresh2 = text.generate_sentences(domain, 300, random.Random(1), exclude=frozenset(taken))
    assert fresh2 == fresh


def test_zero_and_negative() -> None:
    assert text.generate_sentences("small", 0, random.Random(0)) == []
    with pytest.raises(ValueError, match="small"):
        text.generate_sentences("small", -1, random.Random(0))


def test_impossible_request_is_rejected_up_front() -> None:
    """10^12 sentences are more than the grammar has: refused before any is generated
    (the grammar's capacity is checked first; bench_text.py times it)."""
    n = 10**12
    with pytest.raises(ValueError) as info:
        text.generate_sentences("small", n, random.Random(0))
    assert "small" in str(info.value) and str(n) in str(info.value)


def test_attempts_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = text._Grammar({"s": ["ONE TWO THREE", "FOUR FIVE SIX", "<x> EIGHT NINE"], "x": ["SEVEN"]}, "s", (3, 14))
    assert tiny.vocabulary == frozenset("ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE".split())
    assert tiny.language_bound == 3
    monkeypatch.setattr(text, "_grammar", lambda domain: tiny)
    got = text.generate_sentences("small", 3, random.Random(0))
    assert sorted(got) == ["FOUR FIVE SIX", "ONE TWO THREE", "SEVEN EIGHT NINE"]
    with pytest.raises(ValueError) as info:
        text.generate_sentences("small", 2, random.Random(0), exclude={"ONE TWO THREE", "FOUR FIVE SIX"})
    assert "small" in str(info.value) and "2" in str(info.value)
    with pytest.raises(ValueError, match="4"):
        text.generate_sentences("small", 4, random.Random(0))


def test_grammar_validation() -> None:
    with pytest.raises(ValueError, match="never used"):
        text._Grammar({"s": ["A B C"], "unused": ["D"]}, "s", (1, 5))
    with pytest.raises(ValueError, match="recursive"):
        text._Grammar({"s": ["A <s>", "B C"]}, "s", (1, 5))
    with pytest.raises(ValueError, match="bad token"):
        text._Grammar({"s": ["A b C"]}, "s", (1, 5))
    with pytest.raises(ValueError, match="longer than"):
        text._Grammar({"s": ["A B", "A B C D E F"]}, "s", (1, 5))
    with pytest.raises(ValueError, match="unknown"):
        text._Grammar({"s": ["A <nothing>"]}, "s", (1, 5))


# -- split_sentences --------------------------------------------------------------


@pytest.mark.parametrize("domain", text.DOMAINS)
def test_splits(domain: str) -> None:
    splits = text.split_sentences(domain, SPLITS, seed=7)
    assert list(splits) == list(SPLITS)
    everything = []
    for name, count in SPLITS.items():
        assert len(splits[name]) == count
        assert len(set(splits[name])) == count
        everything += splits[name]
    assert len(set(everything)) == len(everything)  # disjoint across splits
    # deterministic, insensitive to the order of `counts`
    assert text.split_sentences(domain, SPLITS, seed=7) == splits
    reordered = dict(reversed(list(SPLITS.items())))
    assert text.split_sentences(domain, reordered, seed=7) == splits
    other = text.split_sentences(domain, SPLITS, seed=8)
    assert other["train"] != splits["train"] and other["dev"] != splits["dev"]
    # evaluation sets do not depend on the size of the training set
    bigger = text.split_sentences(domain, {**SPLITS, "train": 2000}, seed=7)
    for name in ("dev", "test-clean", "test-other"):
        assert bigger[name] == splits[name]
    assert bigger["train"][:1200] == splits["train"]


def test_split_validation() -> None:
    with pytest.raises(ValueError, match="train"):
        text.split_sentences("small", {"train": -1}, 0)
    assert text.split_sentences("small", {}, 0) == {}
    assert text.split_sentences("small", {"dev": 0}, 0) == {"dev": []}


def test_splits_ignore_hash_randomisation() -> None:
    code = (
        "import json; from fedasr.data import text; "
        "print(json.dumps(text.split_sentences('open', {'train': 50, 'dev': 20}, 3)))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]
    assert outputs[0] == text.split_sentences("open", {"train": 50, "dev": 20}, 3)
