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

Both grammars are acyclic weighted context-free grammars written with the tiny
notation described in :class:`_Grammar`.  Text follows the LibriSpeech transcript
convention: upper case, words made of ``A``-``Z`` and apostrophe, single spaces.

Times are spoken as "SEVEN THIRTY IN THE EVENING" rather than "SEVEN THIRTY PM",
because espeak-ng reads "AM" as the word "am".

Everything is deterministic given the :class:`random.Random` state or the seed; no
output depends on set iteration order or on Python's hash randomisation.
"""

from __future__ import annotations

import bisect
import functools
import random
import re
from collections.abc import Iterable, Mapping

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
        unused = [name for i, name in enumerate(self.names) if i not in seen]
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
# The "small" domain: voice-assistant commands
# ---------------------------------------------------------------------------


def _small_rules() -> dict[str, object]:
    digits = "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE"
    weekdays = "MONDAY TUESDAY WEDNESDAY THURSDAY FRIDAY SATURDAY SUNDAY"
    ordinals = (
        "FIRST SECOND THIRD FOURTH FIFTH SIXTH SEVENTH EIGHTH NINTH TENTH ELEVENTH TWELFTH "
        "THIRTEENTH FOURTEENTH FIFTEENTH SIXTEENTH SEVENTEENTH EIGHTEENTH NINETEENTH TWENTIETH"
    ).split()
    ordinal_days = ordinals + [f"TWENTY {o}" for o in ordinals[:9]] + ["THIRTIETH", "THIRTY FIRST"]
    return {
        "s": [
            (14, "<alarm>"),
            (10, "<timer>"),
            (12, "<call>"),
            (12, "<reminder>"),
            (8, "<thermostat>"),
            (12, "<lights>"),
            (10, "<media>"),
            (10, "<weather>"),
            (5, "<door>"),
            (5, "<clock>"),
            (6, "<math>"),
        ],
        # -- numbers --------------------------------------------------------
        "digit1": _w(digits),
        "digit": _w("ZERO " + digits),
        "teen": _w("TEN ELEVEN TWELVE THIRTEEN FOURTEEN FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN"),
        "tens": _w("TWENTY THIRTY FORTY FIFTY"),
        "digit1_opt": ["", *_w(digits)],
        "num_2_59": [(8, "<digit1>"), (10, "<teen>"), (40, "<tens> <digit1_opt>")],
        "num_0_99": [
            (1, "ZERO"),
            (9, "<digit1>"),
            (10, "<teen>"),
            (80, "<tens99> <digit1_opt>"),
        ],
        "tens99": _w("TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY"),
        # -- times and dates ---------------------------------------------------
        "hour": _w("ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE"),
        "minute": [(9, "OH <digit1>"), (10, "<teen>"), (40, "<tens> <digit1_opt>")],
        "part_of_day": _p("IN THE MORNING | IN THE AFTERNOON | IN THE EVENING | AT NIGHT"),
        "time": [
            (30, "<hour> <minute>"),
            (30, "<hour> <minute> <part_of_day>"),
            (8, "<hour> O'CLOCK"),
            (8, "<hour> O'CLOCK <part_of_day>"),
            (4, "HALF PAST <hour>"),
            (4, "QUARTER PAST <hour>"),
            (4, "QUARTER TO <hour>"),
            (1, "NOON"),
            (1, "MIDNIGHT"),
        ],
        "weekday": _w(weekdays),
        "month": _w(
            "JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER NOVEMBER DECEMBER"
        ),
        "ordinal_day": tuple(ordinal_days),
        "date": [(3, "<month> <ordinal_day>"), (1, "THE <ordinal_day> OF <month>")],
        "day": [
            (2, "TODAY"),
            (3, "TOMORROW"),
            (1, "TONIGHT"),
            (1, "NEXT WEEK"),
            (3, "THIS <day_part>"),
            (7, "ON <weekday>"),
            (7, "NEXT <weekday>"),
        ],
        "day_part": _w("MORNING AFTERNOON EVENING"),
        "day_opt": [(6, ""), (3, "TOMORROW"), (4, "ON <weekday>"), (3, "EVERY <weekday>"), (1, "EVERY DAY")],
        # -- alarms and timers ------------------------------------------------
        "alarm": [
            (8, "SET AN ALARM FOR <time> <day_opt>"),
            (3, "SET AN ALARM FOR <weekday> AT <time>"),
            (3, "CANCEL MY ALARM FOR <time>"),
            (1, "TURN OFF THE ALARM"),
        ],
        "timer": [
            (8, "SET A TIMER FOR <duration>"),
            (3, "SET A <num_2_59> MINUTE TIMER"),
            (1, "<timer_verb> THE TIMER"),
        ],
        "timer_verb": _w("CANCEL STOP PAUSE"),
        "duration": [
            (6, "<num_2_59> MINUTES"),
            (3, "<num_2_59> SECONDS"),
            (1, "<hour_count> HOURS"),
            (1, "ONE MINUTE"),
            (1, "ONE HOUR"),
            (1, "HALF AN HOUR"),
            (3, "<hour_count> HOURS AND <num_2_59> MINUTES"),
            (2, "ONE HOUR AND <num_2_59> MINUTES"),
        ],
        "hour_count": _w("TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE"),
        # -- calls --------------------------------------------------------------
        "call": [
            (6, "CALL <phone>"),
            (3, "DIAL <phone>"),
            (3, "CALL <contact> <call_where>"),
            (1, "CALL <contact> BACK"),
        ],
        "call_where": _p("AT HOME | AT WORK"),
        "contact": _w("MOM DAD ANNA DAVID"),
        "phone3": ["<digit> <digit> <digit>"],
        "phone4": ["<digit> <phone3>"],
        "phone5": ["<digit> <phone4>"],
        "phone6": ["<digit> <phone5>"],
        "phone7": ["<digit> <phone6>"],
        "phone10": ["<phone3> <phone7>"],
        "phone": ["<phone3>", "<phone4>", "<phone5>", "<phone6>", "<phone7>", "<phone10>"],
        # -- reminders and calendar ---------------------------------------------
        "reminder": [
            (4, "REMIND ME TO <task> AT <time>"),
            (3, "REMIND ME TO <task> <day>"),
            (2, "REMIND ME TO <task> ON <date>"),
            (4, "REMIND ME ON <month> <ordinal_day> AT <time>"),
            (2, "REMIND ME ON <date> TO <task>"),
            (2, "REMIND ME <day> AT <time>"),
        ],
        "task": _p(
            "CALL <contact> | TAKE MY MEDICINE | WATER THE PLANTS | BUY MILK | PAY THE BILLS | "
            "FEED THE CAT | FEED THE DOG | WALK THE DOG"
        ),
        # -- home ---------------------------------------------------------------
        "room": _p(
            "KITCHEN | BEDROOM | BATHROOM | LIVING ROOM | DINING ROOM | HALLWAY | OFFICE | "
            "GARAGE | GARDEN"
        ),
        "indoor_room": _p("KITCHEN | BEDROOM | BATHROOM | LIVING ROOM | DINING ROOM | OFFICE"),
        "temperature": [
            (5, "<teen>"),
            (10, "TWENTY <digit1_opt>"),
            (10, "SIXTY <digit1_opt>"),
            (10, "SEVENTY <digit1_opt>"),
        ],
        "thermostat": [
            (5, "SET THE THERMOSTAT TO <temperature> DEGREES"),
            (5, "SET THE <room> THERMOSTAT TO <temperature> DEGREES"),
            (3, "SET THE TEMPERATURE TO <temperature> DEGREES"),
            (2, "TURN THE HEAT <up_down>"),
            (1, "TURN <up_down> THE HEAT"),
            (2, "WHAT IS THE TEMPERATURE IN THE <room>"),
        ],
        "up_down": _w("UP DOWN"),
        "on_off": _w("ON OFF"),
        "device": [(4, "LIGHTS"), (1, "LAMP"), (1, "FAN"), (1, "RADIO")],
        "percent": [(8, "<tens99>"), (8, "<tens99> FIVE"), (1, "ONE HUNDRED")],
        "lights": [
            (6, "TURN <on_off> THE <room> <device>"),
            (4, "TURN THE <room> <device> <on_off>"),
            (3, "TURN <on_off> THE <device> IN THE <room>"),
            (2, "DIM THE <room> LIGHTS"),
            (3, "DIM THE <room> LIGHTS TO <percent> PERCENT"),
            (3, "SET THE <room> LIGHTS TO <percent> PERCENT"),
        ],
        "door": [
            (4, "<lock_verb> THE <door_kind> DOOR"),
            (3, "<open_close> THE BLINDS IN THE <indoor_room>"),
            (1, "<open_close> THE <indoor_room> BLINDS"),
        ],
        "lock_verb": _w("LOCK UNLOCK OPEN CLOSE"),
        "open_close": _w("OPEN CLOSE"),
        "door_kind": _w("FRONT BACK GARAGE"),
        # -- media --------------------------------------------------------------
        "media": [
            (2, "PLAY THE <next_prev> SONG"),
            (1, "SKIP THIS SONG"),
            (2, "<music_verb> THE MUSIC"),
            (3, "PLAY SOME <genre> MUSIC"),
            (4, "PLAY SOME <genre> MUSIC IN THE <room>"),
            (3, "SET THE VOLUME TO <level>"),
            (1, "TURN THE VOLUME <up_down>"),
            (1, "TURN <up_down> THE VOLUME"),
            (1, "PLAY THE RADIO IN THE <room>"),
        ],
        "next_prev": _w("NEXT PREVIOUS"),
        "music_verb": _w("PAUSE STOP"),
        "genre": _w("JAZZ ROCK CLASSICAL COUNTRY"),
        "level": [(10, "<hour>"), (1, "ZERO")],
        # -- weather and clock ----------------------------------------------------
        "city": _p(
            "LONDON | PARIS | TOKYO | BOSTON | CHICAGO | BERLIN"
        ),
        "weather": [
            (2, "WHAT IS THE WEATHER <day>"),
            (5, "WHAT IS THE WEATHER IN <city> <day>"),
            (3, "WILL IT RAIN <day>"),
            (4, "WILL IT RAIN IN <city> <day>"),
            (2, "WHAT IS THE TEMPERATURE IN <city>"),
        ],
        "clock": [
            (3, "WHAT TIME IS IT IN <city>"),
            (2, "WHAT DAY OF THE WEEK IS <date>"),
            (2, "HOW MANY DAYS UNTIL <date>"),
        ],
        "math": ["WHAT IS <num_0_99> <operator> <num_0_99>"],
        "operator": _w("PLUS MINUS TIMES"),
    }


# ---------------------------------------------------------------------------
# The "open" domain: narrative English
# ---------------------------------------------------------------------------

_PEOPLE = _nouns(
    "FARMER SOLDIER TEACHER DOCTOR SAILOR FISHERMAN/FISHERMEN HUNTER MERCHANT BAKER PRIEST "
    "KING QUEEN PRINCE PRINCESS KNIGHT SERVANT STRANGER TRAVELER NEIGHBOR CHILD/CHILDREN BOY "
    "GIRL WOMAN/WOMEN MAN/MEN LADY GENTLEMAN/GENTLEMEN STUDENT WRITER PAINTER DRIVER GUARD "
    "NURSE CAPTAIN CLERK LAWYER JUDGE MINER SHEPHERD WIDOW MAYOR POET SINGER DANCER BUTCHER "
    "CARPENTER BLACKSMITH TAILOR WEAVER MILLER COOK GARDENER MESSENGER PILOT ENGINEER SCIENTIST "
    "DETECTIVE THIEF/THIEVES BEGGAR PEASANT DUKE DUCHESS BISHOP MONK NUN WIZARD WITCH GIANT "
    "OFFICER SHERIFF BANKER PROFESSOR PRISONER VILLAGER SHOPKEEPER INNKEEPER LANDLORD TRADER "
    "PEDDLER HERMIT PILGRIM SCHOLAR ARTIST MUSICIAN FIDDLER ORPHAN SURGEON SECRETARY WAITER "
    "STABLEBOY WATCHMAN FERRYMAN/FERRYMEN"
)
_FAMILY = _nouns(
    "MOTHER FATHER SISTER BROTHER UNCLE AUNT COUSIN GRANDMOTHER GRANDFATHER DAUGHTER SON "
    "WIFE/WIVES HUSBAND FRIEND NEPHEW NIECE GUEST COMPANION MASTER"
)
_NAMES = _w(
    "JOHN MARY THOMAS ELIZABETH WILLIAM SARAH JAMES MARGARET HENRY ANNA GEORGE EMMA CHARLES "
    "ALICE EDWARD CLARA ROBERT LUCY ARTHUR HELEN FRANK GRACE PETER RUTH SAMUEL JANE DAVID ELLEN "
    "MICHAEL ROSE DANIEL EMILY JOSEPH MARTHA PAUL SUSAN RICHARD KATE HAROLD LAURA WALTER EDITH "
    "ALBERT NANCY OLIVER AMELIA HUGH DOROTHY"
)
_ANIMALS = _nouns(
    "DOG CAT HORSE COW SHEEP/SHEEP GOAT PIG FOX WOLF/WOLVES BEAR DEER/DEER RABBIT MOUSE/MICE "
    "RAT BIRD CROW OWL EAGLE DUCK GOOSE/GEESE HEN ROOSTER DONKEY MULE OX/OXEN LION TIGER MONKEY "
    "SNAKE FROG TURTLE SQUIRREL SPIDER SWAN PONY CALF/CALVES LAMB KITTEN PUPPY PARROT"
)
_THINGS = _nouns(
    "BOX BASKET LETTER BOOK KEY COIN CUP BOTTLE KNIFE/KNIVES LAMP CANDLE HAT COAT SHOE GLOVE "
    "RING NECKLACE MAP PICTURE BLANKET ROPE LADDER HAMMER AXE SWORD SHIELD BELL CLOCK WATCH "
    "MIRROR BUCKET JAR BAG SACK TRUNK CHEST DRUM FLUTE VIOLIN PEN PENCIL NOTEBOOK NEWSPAPER "
    "PHOTOGRAPH TICKET PURSE WALLET UMBRELLA SCARF DRESS JACKET BOOT STONE SHELL FEATHER "
    "FLOWER APPLE PEAR LOAF/LOAVES CAKE PIE EGG ONION POTATO CARROT LEMON PLATE BOWL SPOON FORK "
    "KETTLE POT PAN PILLOW CARPET CURTAIN WHEEL CART WAGON BICYCLE BOAT CANOE RADIO TELEPHONE "
    "CAMERA SHOVEL SPADE RAKE NAIL NEEDLE BUTTON RIBBON CROWN GIFT PACKAGE PARCEL ENVELOPE "
    "SCROLL DIARY CHAIN LOCK LANTERN TORCH BRUSH COMB TOWEL QUILT SADDLE WHISTLE TRUMPET GUITAR "
    "BALL DOLL KITE PUZZLE STATUE VASE TEAPOT PEBBLE JEWEL DIAMOND PEARL MEDAL TROPHY COMPASS "
    "TELESCOPE BRACELET BROOCH PAINTING SKETCH SHIRT CLOAK APRON BELT BISCUIT HANDKERCHIEF CAGE "
    "BARREL CRATE TRAY JUG GOBLET FLASK POUCH SATCHEL SUITCASE CANE STICK BRANCH LOG PLANK "
    "BRICK ANCHOR HELMET"
)
_FURNITURE = _w(
    "TABLE BENCH SHELF DESK BED STOOL CHAIR CUPBOARD DRESSER COUNTER WINDOWSILL DOORSTEP "
    "FIREPLACE STOVE ALTAR CABINET SOFA CARRIAGE WORKBENCH MANTELPIECE"
)
_PLACES = _w(
    "RIVER FOREST MARKET CHURCH VILLAGE CASTLE BRIDGE HARBOR STATION TOWER GARDEN MEADOW HILL "
    "VALLEY LAKE SHORE BEACH CAVE MILL FARM BARN STABLE INN TAVERN LIBRARY SCHOOL HOSPITAL "
    "PALACE CHAPEL CEMETERY SQUARE STREET ROAD PATH FIELD ORCHARD WELL FOUNTAIN DOCK PIER "
    "ISLAND MOUNTAIN CLIFF DESERT SWAMP MARSH WOODS KITCHEN CELLAR ATTIC PARLOR HALL CORRIDOR "
    "STAIRCASE BALCONY COTTAGE CABIN HUT TENT CAMP FACTORY WORKSHOP BAKERY SHOP OFFICE PRISON "
    "COURTHOUSE MUSEUM THEATER HOTEL RESTAURANT PARK CORNER GATE WALL ROOF CANAL POND STREAM "
    "WATERFALL MONASTERY FORTRESS VINEYARD LIGHTHOUSE WAREHOUSE GRAVEYARD SCHOOLHOUSE COAST "
    "CROSSROADS GROVE HARBOR QUARRY RAILWAY PLATFORM"
)
_HOME_PLACES = _w("HOUSE GARDEN KITCHEN ROOM BEDROOM STUDY OFFICE SHOP FARM CABIN COTTAGE TENT HOME")
_CITIES = _w(
    "LONDON PARIS ROME BOSTON CHICAGO DUBLIN EDINBURGH VENICE VIENNA BERLIN MADRID LISBON ATHENS "
    "CAIRO MOSCOW TORONTO MONTREAL NAPLES GENEVA AMSTERDAM PRAGUE FLORENCE OXFORD CAMBRIDGE YORK "
    "BRISTOL LIVERPOOL ENGLAND FRANCE SPAIN ITALY GERMANY IRELAND SCOTLAND CANADA AMERICA EGYPT "
    "INDIA CHINA JAPAN MEXICO RUSSIA GREECE NORWAY SWEDEN HOLLAND"
)
# adjectives for people and animals
_PERSON_ADJ = _w(
    "OLD YOUNG TALL KIND CRUEL BRAVE CLEVER WISE FOOLISH HONEST PROUD HUMBLE POOR RICH WEALTHY "
    "HUNGRY TIRED ANGRY HAPPY SAD LONELY GENTLE STRICT FRIENDLY NERVOUS CAREFUL CURIOUS LAZY "
    "BUSY QUIET CHEERFUL SILENT WEARY STUBBORN POLITE RUDE FAMOUS HANDSOME BEAUTIFUL ELDERLY "
    "SLEEPY SICK WOUNDED WICKED GREEDY GENEROUS JEALOUS FAITHFUL PATIENT ANXIOUS FRIGHTENED "
    "CONFUSED GRATEFUL CLUMSY SHY GLOOMY LUCKY"
)
_SIZE_ADJ = _w(
    "SMALL LARGE BIG LITTLE TINY HUGE ENORMOUS TALL SHORT LONG NARROW WIDE THICK THIN HEAVY DEEP"
)
_AGE_ADJ = _w("OLD NEW ANCIENT MODERN RUSTY FRESH")
_COLOR_ADJ = _w("RED BLUE GREEN YELLOW WHITE BLACK BROWN GRAY PURPLE ORANGE GOLDEN SILVER PINK DARK PALE")
_MATERIAL_ADJ = _w(
    "WOODEN IRON LEATHER WOOLEN COTTON SILK COPPER BRASS STEEL CLAY MARBLE VELVET LINEN STONE "
    "GLASS PAPER TIN"
)
_QUALITY_ADJ = _w(
    "BEAUTIFUL STRANGE CURIOUS PRECIOUS BROKEN EMPTY SIMPLE PLAIN FANCY ELEGANT UGLY DIRTY "
    "CLEAN SHINY DUSTY WORN VALUABLE USEFUL FAMILIAR MYSTERIOUS ORDINARY PERFECT WONDERFUL "
    "TERRIBLE LOVELY PRETTY FINE RARE SECRET HIDDEN FORGOTTEN SPLENDID CHEAP EXPENSIVE "
    "DELICATE ROUGH SMOOTH SHARP SOFT HARD WARM COLD WET DRY HEAVY"
)
_PLACE_ADJ = _w(
    "OLD QUIET BUSY EMPTY DARK DISTANT FAMOUS ANCIENT SILENT PEACEFUL NOISY LONELY ABANDONED "
    "DESERTED CROWDED NEAREST GRAND SMALL LITTLE BIG NEW HIDDEN FORGOTTEN MUDDY FROZEN SUNNY "
    "SHADY MISTY WINDY ROCKY BROAD GLOOMY COLD WARM"
)
_MANNER_ADV = _w(
    "SLOWLY QUICKLY QUIETLY CAREFULLY SILENTLY SUDDENLY GENTLY EAGERLY NERVOUSLY PATIENTLY "
    "CALMLY BRAVELY HAPPILY SADLY ANGRILY PROUDLY SOFTLY LOUDLY BOLDLY CAUTIOUSLY HURRIEDLY "
    "LAZILY WEARILY CHEERFULLY POLITELY SECRETLY OPENLY IMMEDIATELY GLADLY FIRMLY FOOLISHLY "
    "WISELY NEATLY RAPIDLY STEADILY GRACEFULLY CLUMSILY AWKWARDLY ANXIOUSLY CURIOUSLY "
    "THOUGHTFULLY SLEEPILY RELUCTANTLY WILLINGLY BRISKLY SMOOTHLY HEAVILY"
)
_FREQ_ADV = _w("OFTEN SOMETIMES ALWAYS NEVER RARELY USUALLY SELDOM ALMOST ONCE FINALLY")

_TRANSITIVE = _verb_rules(
    "vt",
    "FIND/FOUND; CARRY; OPEN; CLOSE; LIFT; DROP+; HOLD/HELD; BRING/BROUGHT; TAKE/TOOK/TAKEN; "
    "SELL/SOLD; BUY/BOUGHT; HIDE/HID/HIDDEN; LOSE/LOST; STEAL/STOLE/STOLEN; BREAK/BROKE/BROKEN; "
    "MEND; REPAIR; PAINT; WASH; CLEAN; POLISH; WRAP+; PACK; EXAMINE; NOTICE; SEE/SAW/SEEN; "
    "KEEP/KEPT; LEAVE/LEFT; FORGET+/FORGOT/FORGOTTEN; CHOOSE/CHOSE/CHOSEN; PICK UP; "
    "THROW/THREW/THROWN; CATCH/CAUGHT; PUSH; PULL; DRAG+; SHAKE/SHOOK/SHAKEN; FILL; EMPTY; BURY; "
    "MAKE/MADE; BUILD/BUILT; DRAW/DREW/DRAWN; SHOW/SHOWED/SHOWN; BORROW; TOUCH; GRAB+; SEIZE; "
    "WEIGH; MEASURE; INSPECT; ADMIRE; WANT; NEED; LOVE; HATE; SAVE; GUARD; DESTROY; BURN; "
    "SWING/SWUNG; UNLOCK; SEAL; TIE; FOLD; TEAR/TORE/TORN; CUT+/CUT; BEND/BENT; COVER; DISCOVER; "
    "RECOGNIZE; DESCRIBE; WIN+/WON; DELIVER; RECEIVE; ACCEPT; REFUSE; COLLECT; GATHER; PREPARE; "
    "DECORATE; CLUTCH; SQUEEZE; HANG/HUNG; LOAD; UNPACK; SEARCH; SNATCH; STUDY; SKETCH",
)
_MOTION = _verb_rules(
    "vm",
    "WALK; RUN+/RAN/RUN; HURRY; RIDE/RODE/RIDDEN; DRIVE/DROVE/DRIVEN; SAIL; SWIM+/SWAM/SWUM; "
    "WANDER; CLIMB; CRAWL; MARCH; RUSH; STROLL; LIMP; TRAVEL; RETURN; COME/CAME/COME; "
    "GO/WENT/GONE; FLY/FLEW/FLOWN; STUMBLE; WADE; ROW; RACE; CREEP/CREPT; SNEAK; DASH; JOG+; "
    "TRUDGE; HEAD; STRIDE/STRODE/STRIDDEN; GALLOP; FLEE/FLED; MOVE; STEP+; DRIFT; ROAM",
)
_LOCATIVE = _verb_rules(
    "vl",
    "WAIT; SLEEP/SLEPT; SIT+/SAT; STAND/STOOD; LIVE; WORK; STAY; REST; PLAY; SING/SANG/SUNG; "
    "PRAY; DANCE; WEEP/WEPT; LAUGH; CRY; LISTEN; SETTLE; REMAIN; APPEAR; VANISH; SHOUT; "
    "WHISPER; READ/READ; STUDY; HIDE/HID/HIDDEN; KNEEL/KNELT; LINGER; SHIVER; PAUSE; GATHER; "
    "CAMP; FISH; HUNT; EAT/ATE/EATEN; DINE; BATHE; LIE/LAY/LAIN; SUFFER; FIGHT/FOUGHT",
)
_PERSONAL = _verb_rules(
    "vp",
    "MEET/MET; VISIT; HELP; FOLLOW; CALL; WARN; THANK; GREET; KISS; PAY/PAID; HIRE; TRUST; "
    "FORGIVE/FORGAVE/FORGIVEN; BLAME; PUNISH; REWARD; INVITE; WELCOME; RESCUE; CHASE; "
    "ADMIRE; OBEY; TEASE; ANSWER; ASK; SCOLD; COMFORT; ENCOURAGE; WATCH; IGNORE; AVOID; JOIN; "
    "ACCOMPANY; TEACH/TAUGHT; LEAD/LED; HUG+; CARRY; FEED/FED; GUIDE; AMUSE; BETRAY; DEFEND; "
    "EMBRACE; INTERRUPT; OBSERVE; PERSUADE; PROTECT; QUESTION; REMIND; SEARCH FOR; WAIT FOR; "
    "LOOK FOR; LISTEN TO; TALK TO; SMILE AT; LAUGH AT; STARE AT; WAVE AT",
)
_GIVING = _verb_rules(
    "vg",
    "GIVE/GAVE/GIVEN; SEND/SENT; SHOW/SHOWED/SHOWN; OFFER; HAND; SELL/SOLD; LEND/LENT; "
    "BRING/BROUGHT; THROW/THREW/THROWN; PASS; RETURN; PROMISE; MAIL; TOSS",
)
_PUTTING = _verb_rules(
    "vo",
    "PUT+/PUT; PLACE; LEAVE/LEFT; HIDE/HID/HIDDEN; DROP+; SET+/SET; LAY/LAID; STORE; TUCK; "
    "DUMP; STACK; LEAN; PROP+; BALANCE; ARRANGE; SPREAD/SPREAD; FORGET+/FORGOT/FORGOTTEN",
)
_SAYING = _w(
    "SAID KNEW BELIEVED THOUGHT HOPED NOTICED REMEMBERED EXPLAINED DREAMED FEARED SUSPECTED "
    "PROMISED REALIZED DISCOVERED HEARD ADMITTED INSISTED CLAIMED DOUBTED IMAGINED GUESSED "
    "ANNOUNCED WROTE WHISPERED COMPLAINED FORGOT SWORE DECIDED LEARNED FELT"
)
_THINKING = _w("THINK BELIEVE KNOW HOPE SUPPOSE GUESS FEAR DOUBT SUSPECT EXPECT IMAGINE")


def _open_rules() -> dict[str, object]:
    adverb_opt = [(3, ""), (1, "<adv_manner>")]
    classes = {
        # class: (weight, verb rule prefix, complement)
        "vt": (10, "<thing> <tail_opt>"),
        "vm": (6, "<adv_opt> <direction> <place>"),
        "vl": (5, "<adv_opt> <locpp>"),
        "vp": (6, "<obj_person> <person_tail>"),
        "vg": (3, "<obj_person> <thing> | <thing> TO <obj_person>"),
        "vo": (3, "<thing> <put_prep> THE <furniture_np>"),
    }
    rules: dict[str, object] = {
        "s": [
            (34, "<clause>"),
            (9, "<time> <clause>"),
            (8, "<clause> <time>"),
            (12, "<short> <conj> <short>"),
            (8, "<report>"),
            (9, "<question>"),
            (6, "<imperative>"),
            (10, "<copula>"),
            (4, "<passive>"),
        ],
        "clause": [
            (30, "<subj> <freq_opt> <pred_past>"),
            (6, "<subj_sg3> <freq_opt> <pred_s>"),
            (6, "<subj_plp> <freq_opt> <pred_base>"),
            (6, "<subj_was> WAS <pred_ing>"),
            (5, "<subj_were> WERE <pred_ing>"),
            (8, "<subj> HAD <perf_adv_opt> <pred_pp>"),
            (9, "<subj> <modal> <pred_base>"),
            (3, "<subj> <motion_start> <pred_base>"),
        ],
        "motion_start": _p(
            "WANTED TO | TRIED TO | DECIDED TO | REFUSED TO | HOPED TO | BEGAN TO | "
            "HAD TO | USED TO | NEEDED TO | FORGOT TO | PROMISED TO | MANAGED TO"
        ),
        "modal": _p(
            "WILL | WOULD | COULD | SHOULD | MIGHT | MUST | CAN | MAY | WON'T | WOULDN'T | "
            "COULDN'T | SHOULDN'T | CAN'T | DIDN'T | DID NOT | COULD NOT | WOULD NEVER | "
            "MUST NOT"
        ),
        "perf_adv_opt": [(4, ""), *_w("ALREADY NEVER JUST ONCE ALWAYS RECENTLY")],
        "freq_opt": [(6, ""), *_FREQ_ADV],
        "adv_opt": adverb_opt,
        "adv_manner": _MANNER_ADV,
        # -- noun phrases ---------------------------------------------------------
        "person_sg": _PEOPLE[0],
        "person_pl": _PEOPLE[1],
        "family_sg": _FAMILY[0],
        "family_pl": _FAMILY[1],
        "name": _NAMES,
        "name_poss": tuple(n + "'S" for n in _NAMES),
        "animal_sg": _ANIMALS[0],
        "animal_pl": _ANIMALS[1],
        "thing_sg": _THINGS[0],
        "thing_pl": _THINGS[1],
        "furniture": _FURNITURE,
        "place_noun": _PLACES,
        "home_place": _HOME_PLACES,
        "city": _CITIES,
        "poss": _w("HIS HER THEIR MY OUR YOUR"),
        "padj": _PERSON_ADJ,
        "padj_opt": [(3, ""), (2, "<padj>")],
        "aadj_opt": [(3, ""), (1, "<padj>"), (1, "<size_adj>"), (1, "<color_adj>")],
        "size_adj": _SIZE_ADJ,
        "age_adj": _AGE_ADJ,
        "color_adj": _COLOR_ADJ,
        "material_adj": _MATERIAL_ADJ,
        "quality_adj": _QUALITY_ADJ,
        "ladj": _PLACE_ADJ,
        "tadj": [
            (4, "<quality_adj>"),
            (3, "<size_adj>"),
            (3, "<color_adj>"),
            (3, "<material_adj>"),
            (1, "<age_adj>"),
            (2, "<size_adj> <material_adj>"),
            (2, "<size_adj> <color_adj>"),
            (1, "<age_adj> <material_adj>"),
            (1, "<quality_adj> <color_adj>"),
            (1, "<color_adj> <material_adj>"),
            (1, "<quality_adj> <age_adj>"),
        ],
        "tadj_opt": [(2, ""), (3, "<tadj>")],
        "number": _w("TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE TWENTY HUNDRED"),
        "quantity": [(6, "<number>"), *_p("SEVERAL | MANY | SOME | A FEW | THOSE | THESE | ALL THE")],
        "pers_sg": [
            (6, "THE <padj_opt> <person_sg>"),
            (3, "A <padj_opt> <person_sg>"),
            (4, "<poss> <padj_opt> <family_sg>"),
            (5, "<name>"),
            (2, "<name_poss> <family_sg>"),
            (1, "THE <person_sg> FROM <city>"),
        ],
        "pers_pl": [
            (5, "THE <padj_opt> <person_pl>"),
            (3, "<poss> <family_pl>"),
            (2, "<name> AND <name>"),
            (3, "<quantity> <padj_opt> <person_pl>"),
        ],
        "animal_np_sg": ["THE <aadj_opt> <animal_sg>", "A <aadj_opt> <animal_sg>", "<poss> <animal_sg>"],
        "animal_np_pl": ["THE <aadj_opt> <animal_pl>", "<quantity> <animal_pl>"],
        "subj_sg3": [(10, "<pers_sg>"), (3, "HE"), (3, "SHE"), (3, "<animal_np_sg>")],
        "subj_plp": [(8, "<pers_pl>"), (3, "THEY"), (2, "WE"), (1, "YOU"), (2, "I"), (2, "<animal_np_pl>")],
        "subj_was": [(8, "<subj_sg3>"), (1, "I")],
        "subj_were": [(6, "<pers_pl>"), (2, "THEY"), (2, "WE"), (1, "YOU"), (1, "<animal_np_pl>")],
        "subj": [(5, "<subj_sg3>"), (3, "<subj_plp>")],
        "obj_person": [(6, "<pers_sg>"), (3, "<pers_pl>"), (3, "<obj_pron>"), (1, "<animal_np_sg>")],
        "obj_pron": _w("HIM HER THEM US ME YOU"),
        "thing": [
            (6, "THE <tadj_opt> <thing_sg>"),
            (5, "A <tadj_opt> <thing_sg>"),
            (3, "<poss> <tadj_opt> <thing_sg>"),
            (1, "<name_poss> <tadj_opt> <thing_sg>"),
            (3, "<quantity> <tadj_opt> <thing_pl>"),
            (2, "THE <tadj_opt> <thing_pl>"),
        ],
        "furniture_np": [
            (3, "<furniture>"),
            (1, "<size_adj> <furniture>"),
            (1, "<material_adj> <furniture>"),
            (1, "<age_adj> <furniture>"),
        ],
        "local_place": [
            (8, "THE <ladj_opt> <place_noun>"),
            (2, "<poss> <home_place>"),
            (1, "<name_poss> <home_place>"),
        ],
        "place": [(11, "<local_place>"), (3, "<city>")],
        "ladj_opt": [(3, ""), (2, "<ladj>")],
        # -- prepositional phrases and tails ---------------------------------------
        "direction": _p(
            "TO | TOWARD | INTO | ACROSS | THROUGH | ALONG | PAST | AROUND | BEYOND | OVER | FROM | "
            "UP TO | DOWN TO | BACK TO | OUT OF | AWAY FROM | TOWARDS | AS FAR AS"
        ),
        "loc_prep": _p(
            "IN | NEAR | BEHIND | BESIDE | INSIDE | OUTSIDE | AT | BY | ON | BELOW | ABOVE | "
            "OPPOSITE | NOT FAR FROM | CLOSE TO | IN FRONT OF"
        ),
        "put_prep": _p("ON | UNDER | BEHIND | BESIDE | NEAR | INSIDE | BENEATH | NEXT TO | ON TOP OF"),
        "city_prep": _p("IN | NEAR | OUTSIDE | NOT FAR FROM | CLOSE TO | SOMEWHERE IN | FAR FROM"),
        "locpp": [(6, "<loc_prep> <local_place>"), (1, "<city_prep> <city>")],
        "locpp_short": [
            (3, "<loc_prep> THE <place_noun>"),
            (1, "<loc_prep> <poss> <home_place>"),
            (1, "<city_prep> <city>"),
        ],
        "tail_opt": [(6, ""), (3, "<locpp>"), (1, "<adv_manner>"), (1, "<time>"), (1, "FOR <obj_person>")],
        "person_tail": [(3, "<locpp>"), (2, "<time>"), (2, "<adv_manner>"), (1, "AGAIN"), (1, "AT ONCE")],
        # -- time phrases ------------------------------------------------------
        "time": [
            (3, "IN THE <pod>"),
            (2, "EARLY IN THE <pod>"),
            (2, "THAT <pod>"),
            (2, "THE NEXT <pod_day>"),
            (2, "ONE <weather> <pod>"),
            (1, "EARLY ONE <pod>"),
            (2, "LAST <season>"),
            (2, "IN THE <season>"),
            (2, "ON <weekday>"),
            (2, "ON <weekday> <pod>"),
            (1, "LAST <weekday>"),
            (2, "IN <month>"),
            (2, "AT <moment>"),
            (2, "<meal_prep> <meal>"),
            (2, "<number> <unit> <later>"),
            (1, "A FEW <unit> <later>"),
            (2, "<time_word>"),
        ],
        "pod": _w("MORNING AFTERNOON EVENING NIGHT"),
        "pod_day": _w("MORNING AFTERNOON EVENING NIGHT DAY WEEK SPRING SUMMER AUTUMN WINTER"),
        "season": _w("SPRING SUMMER AUTUMN WINTER"),
        "weekday": _w("MONDAY TUESDAY WEDNESDAY THURSDAY FRIDAY SATURDAY SUNDAY"),
        "month": _w(
            "JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER NOVEMBER DECEMBER"
        ),
        "moment": _w("DAWN NOON MIDNIGHT SUNSET SUNRISE DUSK DAYBREAK NIGHTFALL"),
        "meal": _w("BREAKFAST LUNCH DINNER SUPPER"),
        "meal_prep": _w("AFTER BEFORE DURING"),
        "unit": _w("MINUTES HOURS DAYS WEEKS MONTHS YEARS"),
        "later": _w("LATER AGO"),
        "time_word": _w("YESTERDAY TODAY TOMORROW MEANWHILE AFTERWARDS EVENTUALLY SOON TONIGHT"),
        "weather": _w("COLD WARM RAINY STORMY FOGGY WINDY BRIGHT CLEAR SNOWY CHILLY GRAY HOT"),
        # -- compound sentences ----------------------------------------------------
        "conj": _w("AND BUT SO WHILE BECAUSE WHEN BEFORE AFTER UNTIL ALTHOUGH SINCE AS"),
        "short": [
            (5, "<subj_short> <vt_past> <thing_short>"),
            (3, "<subj_short> <vm_past> <direction> <place_short>"),
            (3, "<subj_short> <vl_past> <locpp_short>"),
            (3, "<subj_short> <vp_past> <obj_short>"),
            (2, "<subj_short> HAD <vt_pp> <thing_short>"),
            (2, "<subj_short_sg> WAS <degree_opt> <padj>"),
            (1, "<subj_short_pl> WERE <degree_opt> <padj>"),
            (2, "<subj_short> <modal> <vt_base> <thing_short>"),
            (1, "THE <thing_sg> WAS <degree_opt> <quality_adj>"),
            (1, "THE <place_noun> WAS <degree_opt> <ladj>"),
            (1, "IT WAS <degree_opt> <weather>"),
        ],
        "subj_short_sg": [(3, "HE"), (3, "SHE"), (1, "I"), (3, "<name>"), (2, "THE <person_sg>"), (1, "<poss> <family_sg>")],
        "subj_short_pl": [(3, "THEY"), (2, "WE"), (1, "YOU"), (2, "THE <person_pl>"), (1, "<poss> <family_pl>")],
        "subj_short": [(3, "<subj_short_sg>"), (2, "<subj_short_pl>")],
        "obj_short": [(3, "<obj_pron>"), (2, "<name>"), (2, "THE <person_sg>"), (1, "<poss> <family_sg>")],
        "thing_short": [
            (3, "THE <thing_sg>"),
            (2, "A <tadj1> <thing_sg>"),
            (2, "<poss> <thing_sg>"),
            (1, "THE <thing_pl>"),
            (1, "SOME <thing_pl>"),
        ],
        "tadj1": ["<quality_adj>", "<size_adj>", "<color_adj>", "<material_adj>"],
        "place_short": [(3, "THE <place_noun>"), (2, "<city>"), (1, "<poss> <home_place>")],
        "degree_opt": [(3, ""), *_w("VERY RATHER QUITE SO TOO EXTREMELY FAIRLY REALLY SOMEWHAT TERRIBLY")],
        # -- reported speech -------------------------------------------------------
        "report": [
            (5, "<subj_short> <say> THAT <short>"),
            (2, "<subj_short> TOLD <obj_short> THAT <short>"),
            (2, "I <think> THAT <short>"),
            (1, "<subj_short> ASKED <obj_short> <wh_word> <subj_short> HAD <vt_pp> <thing_short>"),
        ],
        "say": _SAYING,
        "think": _THINKING,
        # -- questions and commands ------------------------------------------------
        "question": [
            (5, "<wh_word> DID <subj> <pred_base>"),
            (3, "DID <subj> <pred_base>"),
            (2, "<wh_word> WAS <subj_was> <pred_ing>"),
            (2, "<wh_word> WERE <subj_were> <pred_ing>"),
            (3, "WHO <pred_past>"),
            (2, "HAVE YOU EVER <pred_pp>"),
            (2, "WHAT DID <subj> <vt_base> <what_tail>"),
        ],
        "wh_word": _w("WHERE WHY WHEN HOW"),
        "what_tail": [(3, "<locpp>"), (2, "<time>")],
        "imperative": [
            (4, "PLEASE <pred_base>"),
            (2, "DON'T <pred_base>"),
            (1, "NEVER <pred_base>"),
            (1, "LET'S <pred_base>"),
            (1, "YOU MUST <pred_base>"),
        ],
        # -- descriptions ---------------------------------------------------------
        "copula": [
            (5, "<subj_was> WAS <padj_pred>"),
            (3, "<subj_were> WERE <padj_pred>"),
            (3, "THE <tadj_opt> <thing_sg> WAS <tadj_pred>"),
            (1, "THE <thing_pl> WERE <tadj_pred>"),
            (2, "THE <place_noun> WAS <ladj_pred>"),
            (1, "<city> WAS <ladj_pred>"),
            (2, "THERE WAS A <tadj_opt> <thing_sg> <locpp>"),
            (2, "THERE WERE <quantity> <tadj_opt> <thing_pl> <locpp>"),
            (1, "IT WAS A <weather> <pod>"),
            (1, "IT WAS <degree_opt> <weather> <time>"),
        ],
        "degree": _w("VERY RATHER QUITE SO TOO EXTREMELY FAIRLY REALLY SOMEWHAT TERRIBLY"),
        "padj_pred": ["<degree> <padj>", "<padj> AND <padj>", "<degree> <padj> AND <padj>"],
        "tadj_pred": ["<degree> <quality_adj>", "<quality_adj> AND <quality_adj>", "<degree> <size_adj>"],
        "ladj_pred": ["<degree> <ladj>", "<ladj> AND <ladj>"],
        "passive": [
            (3, "<thing_passive_sg> WAS <vt_pp> <passive_tail>"),
            (1, "<thing_passive_pl> WERE <vt_pp> <passive_tail>"),
        ],
        "thing_passive_sg": ["THE <tadj_opt> <thing_sg>", "<poss> <tadj_opt> <thing_sg>"],
        "thing_passive_pl": ["THE <tadj_opt> <thing_pl>", "<quantity> <thing_pl>"],
        "passive_tail": [(3, "BY <pers_sg>"), (3, "<locpp>"), (2, "<time>"), (1, "BY <pers_pl> <locpp>")],
    }
    rules.update(_TRANSITIVE)
    rules.update(_MOTION)
    rules.update(_LOCATIVE)
    rules.update(_PERSONAL)
    rules.update(_GIVING)
    rules.update(_PUTTING)
    # predicates: <pred_FORM> -> <vX_FORM> <complement of class X>
    for form in _VERB_FORMS:
        alternatives = []
        for prefix, (weight, complement) in classes.items():
            comps = [c.strip() for c in complement.split("|")]
            for comp in comps:
                alternatives.append((weight / len(comps), f"<{prefix}_{form}> {comp}"))
        rules[f"pred_{form}"] = alternatives
    return rules


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


@functools.cache
def _grammar(domain: str) -> _Grammar:
    if domain == "small":
        return _Grammar(_small_rules(), "s", LENGTH_LIMITS["small"])
    if domain == "open":
        return _Grammar(_open_rules(), "s", LENGTH_LIMITS["open"], articles=True)
    raise ValueError(f"unknown text domain {domain!r}; expected one of: {', '.join(DOMAINS)}")


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
