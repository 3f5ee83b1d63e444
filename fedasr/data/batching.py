"""Duration-bucketed batches of normalised features and token targets.

Batches are formed by lhotse's :class:`DynamicBucketingSampler` (utterances of similar
duration together, up to ``max_duration`` seconds of audio per batch), seeded so the
same (seed, epoch) always gives the same batches.
"""

from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from lhotse import CutSet
from lhotse.dataset.sampling import DynamicBucketingSampler, DynamicCutSampler

from fedasr.data.features import GlobalCMVN, SpecAugment
from fedasr.data.tokenizer import Tokenizer
from fedasr.errors import FedasrError


@dataclass
class Batch:
    ids: list[str]
    texts: list[str]
    feats: torch.Tensor  # (B, T, 80) float32, normalised, zero padded
    feat_lens: torch.Tensor  # (B,) int64
    targets: torch.Tensor  # (B, U) int64, padded with 0 (blank)
    target_lens: torch.Tensor  # (B,) int64

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch on ``device`` (itself when it is there). ``non_blocking``: the host does
        not wait for the copies (from pinned memory they overlap with the device's work)."""
        if self.feats.device == torch.device(device):
            return self
        return Batch(self.ids, self.texts, *(t.to(device, non_blocking=non_blocking) for t in
                                             (self.feats, self.feat_lens, self.targets, self.target_lens)))


    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (a copy to a CUDA device then runs asynchronously)."""
        return Batch(self.ids, self.texts, *(t.pin_memory() for t in
                                             (self.feats, self.feat_lens, self.targets, self.target_lens)))


_DONE = object()


def prefetch(items: Iterator, depth: int, pin: Callable | None = None) -> Iterator:
    """``items`` produced ``depth`` ahead by a background thread (the collation of the next
    batches overlaps with training on the current one), in the same order; ``pin``: applied
    to each item in that thread (e.g. ``Batch.pin_memory`` before a copy to CUDA). An
    exception of the producer is raised here, at its place in the sequence. Closing this
    generator (or dropping it) stops the thread. ``depth`` 0: ``items`` as they are, in
    this thread."""
    if depth <= 0:
        for item in items:
            yield pin(item) if pin is not None else item
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(pin(item) if pin is not None else item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)
            return
        put(_DONE)

    thread = threading.Thread(target=produce, name="fedasr-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        thread.join()


class AsrDataset:
    """Cuts + tokenizer + normalisation; yields :class:`Batch` objects.

    Features are loaded from storage once and kept in memory when ``cache`` is set
    (the demo corpus is small; a real client's data is too).
    """

    def __init__(self, cuts: CutSet, tokenizer: Tokenizer, cmvn: GlobalCMVN,
                 spec_augment: SpecAugment | None = None, cache: bool = True):
        self.cuts = cuts
        self.tokenizer = tokenizer
        self.cmvn = cmvn
        self.spec_augment = spec_augment
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None
        self._tokens: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.cuts)

    def features(self, cut) -> torch.Tensor:
        if self.cache is not None and cut.id in self.cache:
            return self.cache[cut.id]
        try:
            f = self.cmvn.apply(torch.from_numpy(cut.load_features()).float())
        except Exception as e:
            raise FedasrError(f"{cut.features.storage_path}: cannot load features of {cut.id} ({e})") from None
        if self.cache is not None:
            self.cache[cut.id] = f
        return f

    def tokens(self, cut) -> list[int]:
        if cut.id not in self._tokens:
            self._tokens[cut.id] = self.tokenizer.encode(cut.supervisions[0].text)
        return self._tokens[cut.id]

    def collate(self, cuts: list, generator: torch.Generator | None = None) -> Batch:
        feats = [self.features(c) for c in cuts]
        if self.spec_augment is not None:
            if generator is None:
                raise ValueError("SpecAugment needs a seeded generator")
            feats = [self.spec_augment(f, f.shape[0], generator) for f in feats]
        toks = [self.tokens(c) for c in cuts]
        B = len(cuts)
        T = max(f.shape[0] for f in feats)
        U = max(1, max(len(t) for t in toks))
        x = torch.zeros(B, T, feats[0].shape[1])
        y = torch.zeros(B, U, dtype=torch.long)
        for i, (f, t) in enumerate(zip(feats, toks)):
            x[i, : f.shape[0]] = f
            y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return Batch(
            ids=[c.id for c in cuts],
            texts=[c.supervisions[0].text for c in cuts],
            feats=x,
            feat_lens=torch.tensor([f.shape[0] for f in feats], dtype=torch.long),
            targets=y,
            target_lens=torch.tensor([len(t) for t in toks], dtype=torch.long),
        )

    def batches(self, max_duration: float, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                num_buckets: int = 4, max_cuts: int | None = None) -> Iterator[Batch]:
        """One epoch of duration-bucketed batches; SpecAugment (if set) seeded by (seed, epoch)."""
        with warnings.catch_warnings():
            # lhotse warns that eager CutSets gain nothing from dynamic samplers; clients are small
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            sampler = self._sampler(max_duration, seed, shuffle, num_buckets, max_cuts)
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for batch_cuts in sampler:
            yield self.collate(list(batch_cuts), gen if self.spec_augment else None)

    def _sampler(self, max_duration, seed, shuffle, num_buckets, max_cuts):
        if num_buckets > 1 and len(self.cuts) > 1:
            return DynamicBucketingSampler(
                self.cuts, max_duration=max_duration, max_cuts=max_cuts, shuffle=shuffle,
                num_buckets=min(num_buckets, len(self.cuts)), seed=seed, drop_last=False,
                world_size=1, rank=0,
            )
        else:  # one bucket: for evaluation, sort by duration to minimise padding
            cuts = self.cuts if shuffle else self.cuts.sort_by_duration()
            sampler = DynamicCutSampler(cuts, max_duration=max_duration, max_cuts=max_cuts,
                                        shuffle=shuffle, seed=seed, drop_last=False, world_size=1, rank=0)
        return sampler
