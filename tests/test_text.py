"""Tests for the synthetic transcript generator (fedasr.data.text)."""

from __future__ import annotations

import configparser
import fnmatch
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedasr.data import text
from fedasr.errors import FedasrError

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


# -- grammar files ------------------------------------------------------------------

# SHA-256 of the sentences of split_sentences(domain, PINNED_SPLITS, 0), joined by newlines in
# split order, and of the sorted vocabulary joined by spaces: computed with the grammars as
# they were written in Python before they moved to fedasr/data/grammars/*.yaml, so the data
# files must reproduce them bit for bit.
PINNED_SPLITS = {"train": 1200, "dev": 100, "test-clean": 100, "test-other": 100, "train-server": 300}
PINNED = {
    "small": (
        "925feb061b72b77d0b167fbfc6dacb3bb58e6088412068ad93ae3fb21f85c8ae",
        "36e587d3b285ae85a704a723536c03ad63b6de578498f4fe3f08ad438fea963d",
        195,
        20_023_833_101,
    ),
    "open": (
        "1833a1c7e781c3fa55e1336db437444c6be4add4ff0161385a4b73149d3b9498",
        "9d4ddebc63dd7c183c31f35baa32a7f0671b6fda54c137363e86e45a0daa37cc",
        2278,
        2_992_799_526_233_993_691_403_302,
    ),
}


@pytest.mark.parametrize("domain", text.DOMAINS)
def test_grammar_files_reproduce_the_pinned_outputs(domain: str) -> None:
    split_sha, vocab_sha, vocab_size, bound = PINNED[domain]
    splits = text.split_sentences(domain, PINNED_SPLITS, 0)
    joined = "\n".join(s for name in PINNED_SPLITS for s in splits[name])
    assert hashlib.sha256(joined.encode()).hexdigest() == split_sha
    vocab = sorted(text.vocabulary(domain))
    assert len(vocab) == vocab_size
    assert hashlib.sha256(" ".join(vocab).encode()).hexdigest() == vocab_sha
    assert text._grammar(domain).language_bound == bound


def test_grammar_files_are_package_data() -> None:
    """setup.cfg ships every grammar file, so a non-editable install can read them."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parents[1] / "setup.cfg")
    patterns = cfg["options.package_data"]["fedasr.data"].split()
    data_dir = Path(text.__file__).parent
    files = sorted(p.relative_to(data_dir).as_posix() for p in (data_dir / "grammars").iterdir())
    assert files == [f"grammars/{d}.yaml" for d in sorted(text.DOMAINS)]
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), (name, patterns)
    assert text._grammar_file("open").read_text(encoding="utf-8").count("\n") > 100


def _load(tmp_path: Path, body: str, length: tuple[int, int] = (1, 10)) -> text._Grammar:
    path = tmp_path / "g.yaml"
    path.write_text(textwrap.dedent(body))
    return text._load_grammar(path, length)


def test_grammar_file_notation(tmp_path: Path) -> None:
    """Nouns, verbs, possessives, word and phrase lists, weights and FORM rules as documented."""
    g = _load(
        tmp_path,
        """
        articles: true
        nouns:
          thing: BOX KNIFE/KNIVES CHERRY
        verbs:
          v: DROP+; TAKE/TOOK/TAKEN; PICK UP
        possessives:
          who_poss: who
        rules:
          s:
            - 3: <who> <clause_base> <clause_s> <clause_past> <clause_pp> <clause_ing>
            - <who_poss> <thing_pl> FELL | <who_poss> <thing_sg> <adj> FELL
          who: ANNA OLIVER ANNA
          adj: RED | VERY OLD
          clause_FORM:
            - 2: <v_FORM> A <thing_sg>
            - 1.5: ""
        """,
        (1, 20),
    )
    rules = {name: g.alts[i] for i, name in enumerate(g.names)}
    words = lambda name: [" ".join(str(t) for t in alt) for alt in rules[name]]  # noqa: E731
    assert words("thing_sg") == ["BOX", "KNIFE", "CHERRY"]
    assert words("thing_pl") == ["BOXES", "KNIVES", "CHERRIES"]
    assert words("v_past") == ["DROPPED", "TOOK", "PICKED UP"]
    assert words("v_pp") == ["DROPPED", "TAKEN", "PICKED UP"]
    assert words("v_ing") == ["DROPPING", "TAKING", "PICKING UP"]
    assert words("who") == ["ANNA", "OLIVER"]  # word lists drop repeats
    assert words("who_poss") == ["ANNA'S", "OLIVER'S"]
    assert words("adj") == ["RED", "VERY OLD"]
    assert sorted(n for n in g.names if n.startswith("clause_")) == [f"clause_{f}" for f in sorted(text._VERB_FORMS)]
    assert g.cum[g.names.index("clause_pp")] == [2 / 3.5, 1.0]  # "" has weight 1.5
    s = g.names.index("s")
    assert len(g.alts[s]) == 3 and g.cum[s] == [3 / 5, 4 / 5, 1.0]  # "A | B" are two alternatives of weight 1
    assert g.articles and "AN" in g.vocabulary and "TAKEN" in g.vocabulary


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("rules: {s: [A <nothing>]}", r"rule <s> refers to unknown <nothing>"),
        ("rules: {s: ONE Two}", r"rule <s>: bad word 'Two'"),
        ("rules: {s: [A b]}", r"rule <s>: bad token 'b'"),
        ("rules: {s: [A B], x: C D}", r"never used: <x>$"),
        ("rules: {s: [ON]}", r"rule <s>: alternative True is not a string \(quote"),
        ("rules: {s: [{many: A}]}", r"rule <s>: weight 'many' is not a number"),
        ("rules: {s: [{0: A}]}", r"rule <s>: non-positive weight"),
        ("rules:\n  s: [<x>]\n  x: A\n  x: B\n", r"line 4: invalid YAML \(duplicate key 'x'\)"),
        ("rules: {s: [A, <x]}", r"rule <s>: bad token '<x'"),
        ("rules: {s: [<x_FORM>], x_FORM: [A]}", r"rule <s>: '<x_FORM>' refers to a FORM rule"),
        ("nouns: {thing: BOX KNIFE/}\nrules: {s: [<thing_sg> <thing_pl>]}", r"nouns: thing: bad noun 'KNIFE/'"),
        ("verbs: {v: GO/WENT; 9X}\nrules: {s: [<v_base>]}", r"verbs: v: bad verb '9X'"),
        ("verbs: {v: GO/WENT}\nrules: {s: [<v_base> <v_s> <v_past> <v_pp> <v_ing> <v_bad>]}", r"unknown <v_bad>"),
        ("nouns: {x: BOX}\nrules: {s: [<x_sg> <x_pl>], x_pl: BOXES}", r"rule <x_pl> is defined twice"),
        ("possessives: {p: nobody}\nrules: {s: [<p>]}", r"possessives: p: unknown rule <nobody>"),
        ("rules: {s: [A B], Bad: C}", r"rules: bad rule name 'Bad'"),
        ("grammar: {}\nrules: {s: A}", r"unknown key\(s\) grammar"),
        ("articles: maybe\nrules: {s: A}", r"articles: expected true or false"),
        ("- just a list", r"expected a mapping"),
        ("rules: {s: [A B C D E F G H I J K L]}", r"produce 12-word sentences|longer than 10 words"),
    ],
)
def test_bad_grammar_files(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(FedasrError) as info:
        _load(tmp_path, body)
    assert str(tmp_path / "g.yaml") in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_derived_rule_errors_name_their_entry(tmp_path: Path) -> None:
    with pytest.raises(FedasrError, match=r"never used: <v_s>, <v_past>, <v_pp>, <v_ing> \(from verbs: v\)$"):
        _load(tmp_path, "verbs: {v: GO/WENT}\nrules: {s: [<v_base>]}")
    with pytest.raises(FedasrError, match=r"rule <p_base> refers to unknown <w_base> \(from rules: p_FORM\)$"):
        _load(tmp_path, "rules: {s: [<p_base> <p_s> <p_past> <p_pp> <p_ing>], p_FORM: [<w_FORM>]}")


def test_missing_grammar_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "grammars" / "small.yaml"
    monkeypatch.setattr(text, "_grammar_file", lambda domain: missing)
    text._grammar.cache_clear()
    try:
        with pytest.raises(FedasrError, match=re.escape(str(missing)) + ": cannot read the grammar file"):
            text.vocabulary("small")
    finally:
        monkeypatch.undo()
        text._grammar.cache_clear()
    assert len(text.vocabulary("small")) == 195
