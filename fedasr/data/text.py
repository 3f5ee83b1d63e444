"""Sentence generator for the transcripts of the synthetic speech corpus.

Two domains are available:

``small``
    A closed-vocabulary (at most 200 words) voice-assistant domain: alarms, timers,
    phone calls with digit strings, reminders and dates, thermostat, lights, media,
    weather, doors, clock questions and spoken arithmetic.  Sentences have 3 to 14
    words.  Easy to learn for a tiny model.
``open``
    A narrative English domain over word lists (more than 1,000 words: nouns with
    their plurals, verbs in five forms, adjectives, adverbs, names, places and
    function words).  Sentences have 4 to 20 words.  Hard to learn, on purpose.

Both grammars are acyclic weighted context-free grammars stored as data files shipped
with the package, ``fedasr/data/grammars/small.yaml`` and ``open.yaml``, in the notation
described in :func:`_load_grammar` (word lists, nouns whose plurals and verbs whose five
forms are derived here, rules with weighted alternatives); :class:`_Grammar` samples them.
Text follows the LibriSpeech transcript convention: upper case, words made of
``A``-``Z`` and apostrophe, single spaces.

Times are spoken as "SEVEN THIRTY IN THE EVENING" rather than "SEVEN THIRTY PM",
because espeak-ng reads "AM" as the word "am".

Everything is deterministic given the :class:`random.Random` state or the seed; no
output depends on set iteration order or on Python's hash randomisation.
"""

from __future__ import annotations

import bisect
import functools
import importlib.resources
import math
import random
import re
from collections.abc import Iterable, Mapping
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from fedasr.errors import FedasrError

__all__ = ["DOMAINS", "vocabulary", "generate_sentences", "split_sentences"]

DOMAINS: tuple[str, ...] = ("small", "open")

#: Inclusive sentence length bounds, in words, per domain.
LENGTH_LIMITS: dict[str, tuple[int, int]] = {"small": (3, 14), "open": (4, 20)}

_WORD_RE = re.compile(r"^[A-Z]+(?:'[A-Z]+)?$")
_REF_RE = re.compile(r"^<([a-z0-9_]+)>$")


# ---------------------------------------------------------------------------
# Grammar engine
# ---------------------------------------------------------------------------


class _Grammar:
    """An acyclic weighted context-free grammar that samples word sequences.

    ``rules`` maps a nonterminal name to its alternatives.  Each alternative is a
    string of space-separated tokens, where ``<name>`` refers to a nonterminal and
    every other token is a word; the empty string is an empty alternative.  An
    alternative may also be a ``(weight, string)`` pair; plain strings weigh 1.
    Alternatives of a rule are chosen with probability proportional to weight.

    Construction checks that every word is well formed, every reference exists,
    every rule is reachable from ``start``, the grammar has no cycles, and that
    every alternative of every rule occurs in at least one sentence whose length is
    within ``length`` (so every word of :attr:`vocabulary` can really be produced;
    sampled sentences outside ``length`` are rejected).

    With ``articles=True`` the word ``A`` becomes ``AN`` before a word that starts
    with a vowel sound (see :func:`_takes_an`).
    """

    def __init__(
        self,
        rules: Mapping[str, Iterable[str | tuple[float, str]]],
        start: str,
        length: tuple[int, int],
        articles: bool = False,
    ) -> None:
        names = list(rules)
        index = {name: i for i, name in enumerate(names)}
        if start not in index:
            raise ValueError(f"grammar has no start rule {start!r}")
        self.start = index[start]
        self.names = names
        self.length = length
        self.articles = articles
        # alts[i][j]: tuple of items; an item is a word (str) or a rule index (int)
        self.alts: list[list[tuple[str | int, ...]]] = []
        self.cum: list[list[float] | None] = []
        for name in names:
            parsed: list[tuple[str | int, ...]] = []
            weights: list[float] = []
            for alt in rules[name]:
                weight, text = (1.0, alt) if isinstance(alt, str) else alt
                if not weight > 0:
                    raise ValueError(f"rule <{name}>: non-positive weight {weight!r}")
                items: list[str | int] = []
                for token in text.split():
                    ref = _REF_RE.match(token)
                    if ref:
                        if ref.group(1) not in index:
                            raise ValueError(f"rule <{name}> refers to unknown <{ref.group(1)}>")
                        items.append(index[ref.group(1)])
                    elif _WORD_RE.match(token):
                        items.append(token)
                    else:
                        raise ValueError(f"rule <{name}>: bad token {token!r}")
                parsed.append(tuple(items))
                weights.append(float(weight))
            if not parsed:
                raise ValueError(f"rule <{name}> has no alternatives")
            self.alts.append(parsed)
            if len(set(weights)) == 1:
                self.cum.append(None)
            else:
                acc, cum = 0.0, []
                for w in weights:
                    acc += w
                    cum.append(acc)
                self.cum.append([c / acc for c in cum])
        self._order = self._topological_order()
        self._check_reachable()
        self.min_len, self.max_len, self.n_derivations = self._measure()
        self._check_lengths()
        words = {item for alts in self.alts for alt in alts for item in alt if isinstance(item, str)}
        if articles and "A" in words:
            words.add("AN")
        self.vocabulary = frozenset(words)

    # -- static analysis ----------------------------------------------------

    def _topological_order(self) -> list[int]:
        """Rule indices, each after every rule it refers to; raises on cycles."""
        state = [0] * len(self.alts)  # 0 new, 1 on stack, 2 done
        order: list[int] = []
        for root in range(len(self.alts)):
            if state[root]:
                continue
            stack = [(root, iter(self._children(root)))]
            state[root] = 1
            while stack:
                node, children = stack[-1]
                for child in children:
                    if state[child] == 1:
                        raise ValueError(f"grammar is recursive through <{self.names[child]}>")
                    if state[child] == 0:
                        state[child] = 1
                        stack.append((child, iter(self._children(child))))
                        break
                else:
                    stack.pop()
                    state[node] = 2
                    order.append(node)
        return order

    def _children(self, i: int) -> list[int]:
        return [item for alt in self.alts[i] for item in alt if isinstance(item, int)]

    def _check_reachable(self) -> None:
        seen = {self.start}
        todo = [self.start]
        while todo:
            for child in self._children(todo.pop()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        unused = [f"<{name}>" for i, name in enumerate(self.names) if i not in seen]
        if unused:
            raise ValueError(f"grammar rules never used: {', '.join(unused)}")

    def _alt_min(self, alt: tuple[str | int, ...], lo: list[int]) -> int:
        return sum(1 if isinstance(item, str) else lo[item] for item in alt)

    def _measure(self) -> tuple[list[int], list[int], list[int]]:
        n = len(self.alts)
        lo, hi, count = [0] * n, [0] * n, [0] * n
        for i in self._order:
            los, his, total = [], [], 0
            for alt in self.alts[i]:
                a_lo = a_hi = 0
                a_count = 1
                for item in alt:
                    if isinstance(item, str):
                        a_lo += 1
                        a_hi += 1
                    else:
                        a_lo += lo[item]
                        a_hi += hi[item]
                        a_count *= count[item]
                los.append(a_lo)
                his.append(a_hi)
                total += a_count
            lo[i], hi[i], count[i] = min(los), max(his), total
        return lo, hi, count

    def _check_lengths(self) -> None:
        lo_limit, hi_limit = self.length
        if self.min_len[self.start] < lo_limit:
            raise ValueError(f"grammar can produce {self.min_len[self.start]}-word sentences (< {lo_limit})")
        # outside[i]: fewest words a sentence needs around an occurrence of rule i
        inf = 1 << 60
        outside = [inf] * len(self.alts)
        outside[self.start] = 0
        for i in reversed(self._order):  # parents before children
            if outside[i] >= inf:
                continue
            for alt in self.alts[i]:
                base = outside[i] + self._alt_min(alt, self.min_len)
                for item in alt:
                    if isinstance(item, int):
                        outside[item] = min(outside[item], base - self.min_len[item])
        for i, alts in enumerate(self.alts):
            for alt in alts:
                shortest = outside[i] + self._alt_min(alt, self.min_len)
                if shortest > hi_limit:
                    raise ValueError(
                        f"rule <{self.names[i]}> alternative {alt!r} only occurs in sentences "
                        f"longer than {hi_limit} words"
                    )

    @property
    def language_bound(self) -> int:
        """Number of derivations: an upper bound on the number of distinct sentences."""
        return self.n_derivations[self.start]

    # -- sampling -------------------------------------------------------------

    def sample(self, rng: random.Random) -> str:
        """One sentence within the length limits (rejection sampling)."""
        lo_limit, hi_limit = self.length
        alts, cums, rand = self.alts, self.cum, rng.random
        bisect_right = bisect.bisect_right

        def expand(i: int, out: list[str]) -> None:
            options = alts[i]
            cum = cums[i]
            if cum is None:
                alt = options[int(rand() * len(options))]
            else:
                alt = options[bisect_right(cum, rand())] if len(options) > 1 else options[0]
            for item in alt:
                if item.__class__ is int:
                    expand(item, out)  # type: ignore[arg-type]
                else:
                    out.append(item)  # type: ignore[arg-type]

        while True:
            words: list[str] = []
            expand(self.start, words)
            if lo_limit <= len(words) <= hi_limit:
                break
        if self.articles:
            for k in range(len(words) - 1):
                if words[k] == "A" and _takes_an(words[k + 1]):
                    words[k] = "AN"
        return " ".join(words)


_A_BEFORE = frozenset(
    "ONE ONCE USEFUL USUAL USUALLY UNIFORM UNIQUE UNIVERSITY UNICORN USED UTENSIL EUROPEAN EULOGY".split()
)
_AN_BEFORE = frozenset("HONEST HONESTLY HOUR HOURS HONOR HONORABLE HEIR".split())


def _takes_an(word: str) -> bool:
    """Whether the indefinite article before ``word`` is ``AN`` (by sound)."""
    if word in _AN_BEFORE:
        return True
    if word in _A_BEFORE:
        return False
    return word[0] in "AEIOU"


# ---------------------------------------------------------------------------
# Word-list helpers
# ---------------------------------------------------------------------------


def _w(text: str) -> tuple[str, ...]:
    """Whitespace-separated words, order kept, duplicates dropped."""
    return tuple(dict.fromkeys(text.split()))


def _p(text: str) -> tuple[str, ...]:
    """``|``-separated phrases (alternatives of several words)."""
    return tuple(dict.fromkeys(" ".join(part.split()) for part in text.split("|") if part.strip()))


_IRREGULAR_PLURALS = {"POTATO": "POTATOES", "TOMATO": "TOMATOES", "HERO": "HEROES"}


def _plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("S", "X", "Z", "CH", "SH")):
        return noun + "ES"
    if noun.endswith("Y") and noun[-2] not in "AEIOU":
        return noun[:-1] + "IES"
    return noun + "S"


def _nouns(text: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Singulars and plurals from ``"BOX KNIFE/KNIVES ..."`` (``/`` gives the plural)."""
    singular, plural = [], []
    for token in text.split():
        sg, _, pl = token.partition("/")
        singular.append(sg)
        plural.append(pl or _plural(sg))
    return tuple(dict.fromkeys(singular)), tuple(dict.fromkeys(plural))


_VERB_FORMS = ("base", "s", "past", "pp", "ing")


def _verb(spec: str) -> tuple[str, str, str, str, str]:
    """Base, third person, past, past participle and -ing forms of a verb.

    ``spec`` is ``BASE[+][/PAST[/PARTICIPLE]]`` optionally followed by particle words
    (``PICK UP``).  ``+`` doubles the final consonant (``DROP+``); the past
    participle defaults to the past.
    """
    head, *particle = spec.split()
    base, *irregular = head.split("/")
    double = base.endswith("+")
    base = base.rstrip("+")
    if base.endswith(("S", "X", "Z", "CH", "SH", "O")):
        third = base + "ES"
    elif base.endswith("Y") and base[-2] not in "AEIOU":
        third = base[:-1] + "IES"
    else:
        third = base + "S"
    if double:
        past = base + base[-1] + "ED"
        ing = base + base[-1] + "ING"
    else:
        if base.endswith("E"):
            past = base + "D"
        elif base.endswith("Y") and base[-2] not in "AEIOU":
            past = base[:-1] + "IED"
        else:
            past = base + "ED"
        if base.endswith("IE"):
            ing = base[:-2] + "YING"
        elif base.endswith("E") and not base.endswith(("EE", "OE", "YE")) and len(base) > 2:
            ing = base[:-1] + "ING"
        else:
            ing = base + "ING"
    if irregular:
        past = irregular[0]
    participle = irregular[1] if len(irregular) > 1 else past
    tail = "".join(" " + p for p in particle)
    return tuple(form + tail for form in (base, third, past, participle, ing))  # type: ignore[return-value]


def _verb_rules(prefix: str, text: str) -> dict[str, tuple[str, ...]]:
    """Rules ``<prefix_base>``, ``<prefix_s>``, ... from ``;``-separated verb specs."""
    verbs = [_verb(spec.strip()) for spec in text.split(";") if spec.strip()]
    return {
        f"{prefix}_{form}": tuple(dict.fromkeys(v[k] for v in verbs)) for k, form in enumerate(_VERB_FORMS)
    }


# ---------------------------------------------------------------------------
# Grammar files
# ---------------------------------------------------------------------------

_GRAMMAR_PACKAGE = __name__.rpartition(".")[0]  # fedasr.data
_GRAMMAR_DIR = "grammars"
_GRAMMAR_KEYS = ("articles", "nouns", "verbs", "possessives", "rules")
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_FORM_NAME_RE = re.compile(r"^[a-z0-9_]*FORM[a-z0-9_]*$")
_FORM_REF_RE = re.compile(r"<([a-z0-9_]*)FORM([a-z0-9_]*)>")
_NOUN_RE = re.compile(r"^[A-Z]{2,}(?:/[A-Z]+(?:'[A-Z]+)?)?$")
_VERB_HEAD_RE = re.compile(r"^[A-Z]{2,}\+?(?:/[A-Z]+(?:'[A-Z]+)?){0,2}$")


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader (libyaml's when there), refusing duplicate keys (a second rule of a
    name would replace the first)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    mapping: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in mapping
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _grammar_file(domain: str) -> Traversable:
    """The data file of ``domain``'s grammar, shipped in the package (setup.cfg package_data)."""
    return importlib.resources.files(_GRAMMAR_PACKAGE) / _GRAMMAR_DIR / f"{domain}.yaml"


def _load_grammar(source: Traversable | Path, length: tuple[int, int]) -> _Grammar:
    """Read a grammar file; any problem is a :class:`FedasrError` naming the file (and the rule).

    A grammar file is a YAML mapping with these keys (all optional but ``rules``):

    ``articles: true``
        ``A`` becomes ``AN`` before a word that starts with a vowel sound.
    ``nouns: {NAME: "BOX KNIFE/KNIVES ..."}``
        Rules ``<NAME_sg>`` and ``<NAME_pl>``; a plural is derived from the singular
        (:func:`_plural`) unless given after ``/``.
    ``verbs: {NAME: "FIND/FOUND; DROP+; PICK UP; ..."}``
        Rules ``<NAME_base>``, ``<NAME_s>``, ``<NAME_past>``, ``<NAME_pp>`` and
        ``<NAME_ing>`` from ``;``-separated specs (:func:`_verb`).
    ``possessives: {NAME: OTHER}``
        Rule ``<NAME>``: every (one-word) alternative of ``<OTHER>`` followed by ``'S``.
    ``rules: {NAME: VALUE}``
        ``VALUE`` is a word list (``"ONE TWO THREE"``, one alternative per word), a phrase
        list (``"AT HOME | AT WORK"``, one alternative per ``|``-separated phrase) or a
        YAML list of alternatives, each ``"TEXT"`` (weight 1) or ``{WEIGHT: "TEXT"}``
        (written ``- 8: TEXT``); ``""`` is the empty alternative, and an item
        ``"A | B"`` stands for several alternatives of the item's weight.  A rule whose
        name contains ``FORM`` (``pred_FORM``) stands for five rules, one per verb form
        (``base s past pp ing``), with ``FORM`` in its references (``<vt_FORM>``)
        replaced by that form.

    Sentences start at rule ``<s>``; ``<NAME>`` refers to a rule and every other token is
    a word.  Word lists drop repeated words; the alternatives of a list are kept as
    written.  The engine then checks the grammar (:class:`_Grammar`): every reference
    exists, every rule is used, no rule is recursive, and every alternative fits in a
    sentence within ``length``.
    """
    try:
        raw = source.read_text(encoding="utf-8")
    except OSError as e:
        raise FedasrError(
            f"{source}: cannot read the grammar file ({e.strerror or e}); an installed fedasr ships "
            f"fedasr/data/{_GRAMMAR_DIR}/*.yaml as package data"
        ) from None
    try:
        data = yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 (_StrictLoader is a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FedasrError(f"{source}{where}: invalid YAML ({problem})") from None
    origin: dict[str, str] = {}
    try:
        rules, articles = _compile_grammar(data, origin)
        return _Grammar(rules, "s", length, articles=articles)
    except ValueError as e:
        message = str(e)
        # rules derived from nouns, verbs, possessives and FORM rules: name the entry that made them
        made_by = dict.fromkeys(origin[r] for r in re.findall(r"<([a-z0-9_]+)>", message) if r in origin)
        made_by.pop("rules", None)
        hint = [f for f in made_by if f not in message]
        if hint:
            message += f" (from {'; '.join(hint)})"
        raise FedasrError(f"{source}: {message}") from None


def _section(data: Mapping, key: str, name_re: re.Pattern = _NAME_RE) -> dict:
    section = data.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"{key}: expected a mapping from rule names, got {type(section).__name__}")
    for name in section:
        if not (isinstance(name, str) and (name_re.match(name) or _NAME_RE.match(name))):
            raise ValueError(f"{key}: bad rule name {name!r} (lower-case letters, digits and _)")
    return section


def _text(key: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key}: {name}: expected a string, got {value!r}")
    return value


def _alternatives(name: str, value: object) -> list[tuple[float, str]]:
    """The ``(weight, text)`` alternatives of a ``rules`` entry."""
    if isinstance(value, str):
        if "|" in value:
            return [(1, phrase) for phrase in _p(value)]
        words = _w(value)
        for word in words:
            if not _WORD_RE.match(word):
                raise ValueError(
                    f"rule <{name}>: bad word {word!r} in a word list (write alternatives with "
                    f"references as a YAML list)"
                )
        return [(1, word) for word in words]
    if not isinstance(value, list):
        raise ValueError(
            f"rule <{name}>: expected a word list, a |-separated phrase list or a list of "
            f"alternatives, got {value!r}"
        )
    out: list[tuple[float, str]] = []
    for item in value:
        weight: object = 1
        if isinstance(item, dict) and len(item) == 1:
            ((weight, item),) = item.items()
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"rule <{name}>: weight {weight!r} is not a number")
        if not isinstance(item, str):
            raise ValueError(
                f"rule <{name}>: alternative {item!r} is not a string (quote words that YAML reads "
                f"otherwise, such as ON, OFF, YES and NO; write the empty alternative as \"\")"
            )
        if "|" in item:
            out += [(weight, phrase) for phrase in _p(item)]  # type: ignore[misc]
        else:
            out.append((weight, item))  # type: ignore[arg-type]
    return out


def _compile_grammar(data: object, origin: dict[str, str]) -> tuple[dict[str, list], bool]:
    """Rules for :class:`_Grammar` and the ``articles`` flag from a parsed grammar file.

    ``origin`` receives, for every rule, the entry of the file that defines it.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping with the keys {', '.join(_GRAMMAR_KEYS)}")
    unknown = [str(k) for k in data if k not in _GRAMMAR_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; expected: {', '.join(_GRAMMAR_KEYS)}")
    if "rules" not in data:
        raise ValueError("no 'rules'")
    articles = data.get("articles", False)
    if not isinstance(articles, bool):
        raise ValueError(f"articles: expected true or false, got {articles!r}")
    rules: dict[str, list] = {}

    def define(name: str, alternatives: Iterable, where: str) -> None:
        if name in rules:
            raise ValueError(f"rule <{name}> is defined twice ({origin[name]}; {where})")
        rules[name] = list(alternatives)
        origin[name] = where

    for key, value in _section(data, "nouns").items():
        text = _text("nouns", key, value)
        for token in text.split():
            if not _NOUN_RE.match(token):
                raise ValueError(f"nouns: {key}: bad noun {token!r} (SINGULAR or SINGULAR/PLURAL)")
        singular, plural = _nouns(text)
        define(f"{key}_sg", singular, f"nouns: {key}")
        define(f"{key}_pl", plural, f"nouns: {key}")
    for key, value in _section(data, "verbs").items():
        text = _text("verbs", key, value)
        for spec in text.split(";"):
            head, *particle = spec.split() or [""]
            if spec.strip() and not (_VERB_HEAD_RE.match(head) and all(_WORD_RE.match(p) for p in particle)):
                raise ValueError(
                    f"verbs: {key}: bad verb {spec.strip()!r} (BASE[+][/PAST[/PARTICIPLE]] [PARTICLE ...])"
                )
        for name, forms in _verb_rules(key, text).items():
            define(name, forms, f"verbs: {key}")
    for key, value in _section(data, "rules", _FORM_NAME_RE).items():
        alternatives = _alternatives(key, value)
        if _FORM_NAME_RE.match(key):
            for form in _VERB_FORMS:
                concrete = [(w, _FORM_REF_RE.sub(rf"<\g<1>{form}\g<2>>", t)) for w, t in alternatives]
                define(key.replace("FORM", form), concrete, f"rules: {key}")
        else:
            for _, alt in alternatives:
                if _FORM_REF_RE.search(alt):
                    raise ValueError(f"rule <{key}>: {alt!r} refers to a FORM rule, but <{key}> is not one")
            define(key, alternatives, "rules")
    for key, value in _section(data, "possessives").items():
        other = _text("possessives", key, value)
        if other not in rules:
            raise ValueError(f"possessives: {key}: unknown rule <{other}>")
        owners = []
        for alt in rules[other]:
            weight, word = (1, alt) if isinstance(alt, str) else alt
            if not _WORD_RE.match(word) or "'" in word:
                raise ValueError(f"possessives: {key}: <{other}> has {word!r}, not a single word")
            owners.append((weight, word + "'S"))
        define(key, owners, f"possessives: {key}")
    return rules, articles


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


@functools.cache
def _grammar(domain: str) -> _Grammar:
    if domain not in DOMAINS:
        raise ValueError(f"unknown text domain {domain!r}; expected one of: {', '.join(DOMAINS)}")
    return _load_grammar(_grammar_file(domain), LENGTH_LIMITS[domain])


def vocabulary(domain: str) -> frozenset[str]:
    """Every word the domain's grammar can emit, and nothing else."""
    return _grammar(domain).vocabulary


def generate_sentences(
    domain: str,
    n: int,
    rng: random.Random,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """``n`` distinct sentences of ``domain`` that are not in ``exclude``.

    Sentences are drawn from the grammar with ``rng`` (the result is deterministic
    given its state, and the first ``k`` sentences do not depend on ``n``).  Raises
    :class:`ValueError` naming the domain and ``n`` if the grammar cannot provide
    them within ``20 * n + 1000`` draws.
    """
    grammar = _grammar(domain)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"domain {domain!r}: number of sentences must be a non-negative integer, got {n!r}")
    if n > grammar.language_bound:
        raise ValueError(
            f"domain {domain!r}: cannot generate {n} distinct sentences; the grammar has at most "
            f"{grammar.language_bound}"
        )
    out: list[str] = []
    seen: set[str] = set()
    budget = 20 * n + 1000
    sample = grammar.sample
    while len(out) < n:
        if budget == 0:
            raise ValueError(
                f"domain {domain!r}: could not generate {n} distinct new sentences "
                f"(got {len(out)} after {20 * n + 1000} draws)"
            )
        budget -= 1
        sentence = sample(rng)
        if sentence in seen or sentence in exclude:
            continue
        seen.add(sentence)
        out.append(sentence)
    return out


def split_sentences(domain: str, counts: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Distinct sentences for several splits, disjoint across splits.

    Each split draws from its own random stream, seeded from ``(domain, seed,
    split name)``.  Held-out splits are drawn first (sorted by name) and splits whose
    name starts with ``train`` last, each excluding the sentences already taken, so
    evaluation sets do not change when the training set grows.  The result keeps the
    order of ``counts``.
    """
    _grammar(domain)  # validates the domain
    for name, count in counts.items():
        if not isinstance(name, str):
            raise ValueError(f"split names must be strings, got {name!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"split {name!r}: count must be a non-negative integer, got {count!r}")
    taken: set[str] = set()
    result: dict[str, list[str]] = {}
    for name in sorted(counts, key=lambda s: (s.startswith("train"), s)):
        rng = random.Random(f"fedasr.text:{domain}:{seed}:{name}")
        sentences = generate_sentences(domain, counts[name], rng, exclude=taken)
        taken.update(sentences)
        result[name] = sentences
    return {name: result[name] for name in counts}
