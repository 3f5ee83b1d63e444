"""`fedasr shard`: a LibriSpeech-layout corpus or lhotse manifests -> a federation directory.

Each split comes from ``--manifests SPLIT=PATH`` when that names it, else from ``--corpus``
(:mod:`fedasr.data.sources`); from there on every split is a lhotse CutSet of checked,
normalised utterances.

Layout of ``FED_DIR``::

    federation.yaml            source, scheme, seed, clients, server data, eval splits, dropped utterances
    tokenizer.model            SentencePiece model (blank = id 0)
    cmvn.json                  global mean/std of the fbank features (the server's data when the
                               federation has it, else the training clients')
    clients/CLIENT.jsonl.gz    one lhotse CutSet per client (with stored features)
    server.jsonl.gz            the server's own utterances (``--server-split``; never a client)
    eval/SPLIT.jsonl.gz        dev and test CutSets
    feats/                     fbank features: lilcom-compressed for training, exact float32 (.npy)
                               for dev/test (what a deployment computes from the audio)

The directory is built under a temporary name and renamed into place at the end: on any
error nothing is left behind.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from lhotse import CutSet

from fedasr.data import partition as part
from fedasr.data.corpus import Problem
from fedasr.data.features import SAMPLE_RATE, STORAGE, GlobalCMVN, compute_features, load_manifest
from fedasr.data.sources import chapter_of, check_roles, read_split
from fedasr.data.tokenizer import TEXT_NORMALIZATION, Tokenizer, train_tokenizer
from fedasr.errors import FedasrError, OptionError
from fedasr.fsutil import atomic_dir

FEDERATION_FILE = "federation.yaml"
FORMAT_VERSION = 1
SERVER_MANIFEST = "server.jsonl.gz"


def _check_server_disjoint(server: CutSet, train: CutSet) -> None:
    """The server's data is its own: no utterance (and no speaker) of it may be a client's."""
    if not len(server):
        return
    train_ids = {c.id for c in train}
    shared = sorted(c.id for c in server if c.id in train_ids)
    if shared:
        raise FedasrError(f"--server-split: utterance {shared[0]} is in a training split too")
    train_spk = {c.supervisions[0].speaker for c in train}
    spk = sorted({c.supervisions[0].speaker for c in server} & train_spk)
    if spk:
        raise FedasrError(f"--server-split: speaker {spk[0]} also speaks in a training split "
                          "(the server's data must not overlap the clients')")


@dataclass
class ShardOptions:
    corpus: Path | None  # LibriSpeech layout; None: every split from ``manifests``
    train_splits: list[str]
    dev_splits: list[str]
    test_splits: list[str]
    out: Path
    server_splits: list[str] = field(default_factory=list)  # the server's own data, never a client
    scheme: str = "speaker"
    num_clients: int | None = None
    alpha: float = 0.5
    min_utterances: int = 1
    max_clients: int | None = None
    seed: int = 0
    vocab_size: int | None = None  # None: the most the transcripts allow (<= AUTO_MAX_VOCAB)
    tokenizer_type: str = "unigram"
    tokenizer: Path | None = None
    skip_invalid: bool = False
    jobs: int = 2
    overwrite: bool = False
    manifests: dict[str, str] = field(default_factory=dict)  # split -> lhotse manifest(s) (--manifests)


def _hours(cuts: CutSet) -> float:
    return sum(c.duration for c in cuts) / 3600


def shard(opts: ShardOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """Build the federation directory; returns the federation.yaml content."""
    if not opts.train_splits:
        raise OptionError("--train-split: at least one training split is required")
    names = opts.train_splits + opts.server_splits + opts.dev_splits + opts.test_splits
    dupes = sorted({s for s in names if names.count(s) > 1})
    if dupes:
        raise OptionError(f"--train-split/--server-split/--dev-split/--test-split: split {dupes[0]!r} given twice")
    roles = {"train": opts.train_splits, "server": opts.server_splits, "dev": opts.dev_splits,
             "test": opts.test_splits}
    check_roles(roles, opts.corpus, opts.manifests)
    corpus = None
    if opts.corpus is not None:
        corpus = Path(opts.corpus).resolve()
        if not corpus.is_dir():
            raise FedasrError(f"{opts.corpus}: corpus directory does not exist")
    if opts.out.exists() and not opts.overwrite:
        raise FedasrError(f"{opts.out}: already exists (use --overwrite to replace it)")
    if opts.scheme in ("iid", "dirichlet") and opts.num_clients is not None and opts.num_clients < 1:
        raise OptionError(f"--num-clients: must be at least 1, got {opts.num_clients}")
    given_tok = Tokenizer.load(opts.tokenizer) if opts.tokenizer else None

    dropped: list[Problem] = []
    scans = {}
    for split in names:
        log(f"reading {split}")
        scan = read_split(split, corpus, opts.manifests, skip_invalid=opts.skip_invalid, jobs=opts.jobs)
        scans[split] = scan
        dropped.extend(scan.dropped)

    train = CutSet.from_cuts(c for s in opts.train_splits for c in scans[s].cuts)
    if opts.scheme == "chapter":
        no_chapter = next((c for c in train if chapter_of(c) is None), None)
        if no_chapter is not None:
            raise FedasrError(f"--by chapter: utterance {no_chapter.id} has no chapter (its supervision's "
                              "custom field 'chapter'); use --by speaker or add chapters to the manifest")
    utts = [part.Utt(c.id, c.supervisions[0].speaker, chapter_of(c) or "", c.duration) for c in train]
    partition = part.partition(utts, opts.scheme, seed=opts.seed, num_clients=opts.num_clients,
                               alpha=opts.alpha, min_utterances=opts.min_utterances,
                               max_clients=opts.max_clients)
    kept_ids = {u for ids in partition.clients.values() for u in ids}
    server = CutSet.from_cuts(c for s in opts.server_splits for c in scans[s].cuts)
    _check_server_disjoint(server, train)
    # What the server owns decides the tokenizer and the normalisation when it has data:
    # they exist before any client is asked (the seed model needs them); else the clients'.
    if opts.server_splits:
        tok_texts = [c.supervisions[0].text for c in server]
    else:
        tok_texts = [c.supervisions[0].text for c in train if c.id in kept_ids]
    if given_tok is None:
        log("training tokenizer")
        tokenizer = train_tokenizer(tok_texts, opts.vocab_size, opts.tokenizer_type)
    else:
        tokenizer = given_tok

    with atomic_dir(opts.out, overwrite=opts.overwrite) as tmp:
        tokenizer.save(tmp / "tokenizer.model")
        log("computing features (train)")
        train_feats = compute_features(train.subset(cut_ids=sorted(kept_ids)), tmp, "train", opts.jobs)
        by_id = {c.id: c for c in train_feats}
        clients_meta = {}
        (tmp / "clients").mkdir()
        for name, ids in partition.clients.items():
            cs = CutSet.from_cuts(by_id[i] for i in ids)
            cs.to_file(tmp / "clients" / f"{name}.jsonl.gz")
            clients_meta[name] = {
                "manifest": f"clients/{name}.jsonl.gz",
                "utterances": len(ids),
                "hours": round(_hours(cs), 5),
                "speakers": sorted({c.supervisions[0].speaker for c in cs}),
            }
        server_meta = None
        stats_cuts = train_feats
        if opts.server_splits:
            log("computing features (server)")
            server_feats = compute_features(server, tmp, "server", opts.jobs)
            server_feats.to_file(tmp / SERVER_MANIFEST)
            server_meta = {"splits": list(opts.server_splits), "manifest": SERVER_MANIFEST,
                           "utterances": len(server_feats), "hours": round(_hours(server_feats), 5),
                           "speakers": sorted({c.supervisions[0].speaker for c in server_feats})}
            stats_cuts = server_feats
        log("normalisation statistics")
        cmvn = GlobalCMVN.from_cuts(CutSet.from_cuts(c for c in stats_cuts).with_features_path_prefix(str(tmp.resolve())))
        cmvn.save(tmp / "cmvn.json")
        eval_meta = {}
        (tmp / "eval").mkdir()
        for role, splits in (("dev", opts.dev_splits), ("test", opts.test_splits)):
            for split in splits:
                log(f"computing features ({split})")
                cs = compute_features(scans[split].cuts, tmp, split, opts.jobs, use="eval")
                cs.to_file(tmp / "eval" / f"{split}.jsonl.gz")
                eval_meta[split] = {
                    "role": role,
                    "manifest": f"eval/{split}.jsonl.gz",
                    "utterances": len(cs),
                    "hours": round(_hours(cs), 5),
                    "speakers": len({c.supervisions[0].speaker for c in cs}),
                }
        sizes = [m["utterances"] for m in clients_meta.values()]
        hours = [m["hours"] for m in clients_meta.values()]
        meta = {
            "format_version": FORMAT_VERSION,
            "source": {"corpus": None if corpus is None else str(corpus),
                       "manifests": {s: scans[s].origin for s in opts.manifests}, "train_splits": opts.train_splits,
                       "server_splits": opts.server_splits,
                       "dev_splits": opts.dev_splits, "test_splits": opts.test_splits,
                       "splits": {s: {"from": scans[s].origin, "utterances": len(scans[s].cuts), **scans[s].audio}
                                  for s in names}},
            "text": {"normalization": TEXT_NORMALIZATION},
            "scheme": {"by": opts.scheme, "num_clients": opts.num_clients,
                       "alpha": opts.alpha if opts.scheme == "dirichlet" else None,
                       "min_utterances": opts.min_utterances, "max_clients": opts.max_clients},
            "seed": opts.seed,
            "tokenizer": {"file": "tokenizer.model", "vocab_size": tokenizer.vocab_size,
                          "requested": opts.vocab_size if given_tok is None and opts.vocab_size else
                          ("given" if given_tok is not None else "auto"),
                          "type": opts.tokenizer_type if given_tok is None else "given",
                          "source": str(opts.tokenizer) if opts.tokenizer else
                          ("trained on the server's data" if opts.server_splits else "trained on training clients"),
                          "blank_id": 0},
            "features": {"type": "fbank", "num_mel_bins": 80, "frame_shift": 0.01, "sampling_rate": SAMPLE_RATE,
                         "audio": "channels averaged, resampled to 16 kHz (lhotse's resampler)",
                         "storage": {use: w.name for use, w in STORAGE.items()}, "cmvn": "cmvn.json",
                         "cmvn_from": "server" if opts.server_splits else "clients"},
            "summary": {
                "clients": len(sizes),
                "utterances": sum(sizes),
                "hours": round(sum(hours), 5),
                "utterances_per_client": {"min": min(sizes), "median": statistics.median(sizes),
                                          "max": max(sizes)},
                "hours_per_client": {"min": min(hours), "median": statistics.median(hours),
                                     "max": max(hours)},
            },
            "clients": clients_meta,
            "server": server_meta,
            "eval": eval_meta,
            "excluded_clients": partition.excluded_clients,
            "dropped": [{"path": p.path, "reason": p.reason} for p in dropped],
        }
        (tmp / FEDERATION_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    return meta


class Federation:
    """Read access to a federation directory made by :func:`shard`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / FEDERATION_FILE
        if not meta_path.is_file():
            raise FedasrError(f"{self.root}: not a federation directory ({FEDERATION_FILE} missing)")
        try:
            self.meta = yaml.safe_load(meta_path.read_text())
            self.meta["clients"], self.meta["eval"]  # noqa: B018 - presence check
        except (yaml.YAMLError, KeyError, TypeError) as e:
            raise FedasrError(f"{meta_path}: unreadable federation file ({e})") from None
        self._tokenizer: Tokenizer | None = None
        self._cmvn: GlobalCMVN | None = None

    @property
    def client_ids(self) -> list[str]:
        return list(self.meta["clients"])

    @property
    def eval_splits(self) -> dict[str, dict]:
        return self.meta["eval"]

    @property
    def has_server_data(self) -> bool:
        return bool(self.meta.get("server"))

    def server_cuts(self) -> CutSet:
        """The server's own utterances (``fedasr shard --server-split``)."""
        if not self.has_server_data:
            raise FedasrError(f"{self.root}: the federation holds no server data "
                              "(shard it with --server-split SPLIT)")
        return load_manifest(self.root / self.meta["server"]["manifest"], self.root)

    def all_client_cuts(self) -> CutSet:
        """The union of every client's utterances (the centralized baseline's data)."""
        return CutSet.from_cuts(c for n in sorted(self.client_ids) for c in self.client_cuts(n))

    def client_cuts(self, client: str) -> CutSet:
        if client not in self.meta["clients"]:
            raise FedasrError(f"{self.root}: unknown client {client!r}")
        return load_manifest(self.root / self.meta["clients"][client]["manifest"], self.root)

    def split_cuts(self, split: str) -> CutSet:
        if split not in self.meta["eval"]:
            raise OptionError(
                f"--split: unknown split {split!r} (federation has: {', '.join(self.meta['eval']) or 'none'})")
        return load_manifest(self.root / self.meta["eval"][split]["manifest"], self.root)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.root / self.meta["tokenizer"]["file"])
        return self._tokenizer

    @property
    def cmvn(self) -> GlobalCMVN:
        if self._cmvn is None:
            self._cmvn = GlobalCMVN.load(self.root / self.meta["features"]["cmvn"])
        return self._cmvn
