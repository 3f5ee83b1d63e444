"""Partitioning training utterances into federated pseudo-clients.

Schemes (``--by``):

- ``speaker``: one client per speaker — the natural non-IID setting of federated ASR.
- ``chapter``: one client per (speaker, chapter).
- ``iid``: utterances shuffled and dealt evenly to ``num_clients`` clients.
- ``dirichlet``: for every speaker, its utterances are spread over ``num_clients`` clients
  in proportions drawn from Dirichlet(alpha); small alpha gives clients dominated by a
  few speakers and very unequal sizes, large alpha approaches iid. Draws are repeated
  (at most 100 times) until every client has ``min_utterances`` (at least one).

Every utterance lands in exactly one client. Filters then apply: ``min_utterances``
drops smaller clients and ``max_clients`` keeps a seeded random subset of clients;
their utterances are reported as excluded, never silently moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedasr.errors import FedasrError, OptionError

SCHEMES = ("speaker", "chapter", "iid", "dirichlet")


@dataclass(frozen=True)
class Utt:
    id: str
    speaker: str
    chapter: str
    duration: float


@dataclass
class Partition:
    clients: dict[str, list[str]]  # client id -> utterance ids
    excluded_clients: dict[str, int] = field(default_factory=dict)  # client id -> utterances dropped


def _group(utts: list[Utt], key) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for u in sorted(utts, key=lambda u: u.id):
        groups.setdefault(key(u), []).append(u.id)
    return groups


def _dirichlet(utts: list[Utt], num_clients: int, alpha: float, seed: int, min_size: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    by_speaker = _group(utts, lambda u: u.speaker)
    if num_clients > len(utts):
        raise FedasrError(f"--num-clients: {num_clients} clients but only {len(utts)} training utterances")
    for _ in range(100):
        clients: list[list[str]] = [[] for _ in range(num_clients)]
        for spk in sorted(by_speaker):
            ids = list(by_speaker[spk])
            rng.shuffle(ids)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(ids)).round().astype(int)
            for k, part in enumerate(np.split(np.array(ids, dtype=object), cuts)):
                clients[k].extend(part.tolist())
        if min(len(c) for c in clients) >= max(1, min_size):
            width = len(str(num_clients - 1))
            return {f"client{k:0{width}d}": sorted(c) for k, c in enumerate(clients)}
    raise FedasrError(
        f"--alpha: Dirichlet({alpha}) over {num_clients} clients left some client with fewer than "
        f"{max(1, min_size)} utterances in 100 draws; raise --alpha or lower --num-clients"
    )


def partition(
    utts: list[Utt],
    scheme: str,
    seed: int = 0,
    num_clients: int | None = None,
    alpha: float = 0.5,
    min_utterances: int = 1,
    max_clients: int | None = None,
) -> Partition:
    if not utts:
        raise FedasrError("training splits: no utterances to partition")
    if scheme not in SCHEMES:
        raise OptionError(f"--by: unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    if min_utterances < 1:
        raise OptionError("--min-utterances: must be at least 1")
    if max_clients is not None and max_clients < 1:
        raise OptionError("--max-clients: must be at least 1")
    if scheme in ("iid", "dirichlet"):
        if num_clients is None:
            raise OptionError(f"--num-clients: required with --by {scheme}")
        if num_clients < 1:
            raise OptionError(f"--num-clients: must be at least 1, got {num_clients}")
    if scheme == "dirichlet" and not alpha > 0:
        raise OptionError(f"--alpha: must be positive, got {alpha}")

    if scheme == "speaker":
        clients = {f"spk{k}": v for k, v in _group(utts, lambda u: u.speaker).items()}
    elif scheme == "chapter":
        clients = {f"spk{k[0]}-ch{k[1]}": v
                   for k, v in _group(utts, lambda u: (u.speaker, u.chapter)).items()}
    elif scheme == "iid":
        if num_clients > len(utts):
            raise FedasrError(f"--num-clients: {num_clients} clients but only {len(utts)} training utterances")
        ids = sorted(u.id for u in utts)
        order = np.random.default_rng(seed).permutation(len(ids))
        width = len(str(num_clients - 1))
        clients = {f"client{k:0{width}d}": sorted(ids[i] for i in order[k::num_clients])
                   for k in range(num_clients)}
    else:
        clients = _dirichlet(utts, num_clients, alpha, seed, min_utterances)

    excluded = {c: len(v) for c, v in clients.items() if len(v) < min_utterances}
    kept = {c: v for c, v in clients.items() if len(v) >= min_utterances}
    if max_clients is not None and len(kept) > max_clients:
        names = sorted(kept)
        chosen = set(np.random.default_rng(seed + 1).choice(len(names), max_clients, replace=False).tolist())
        for i, name in enumerate(names):
            if i not in chosen:
                excluded[name] = len(kept.pop(name))
    if not kept:
        raise FedasrError(f"--min-utterances: no client has at least {min_utterances} utterances")
    return Partition(dict(sorted(kept.items())), dict(sorted(excluded.items())))
