"""Reading a LibriSpeech-layout corpus (real or generated) into lhotse manifests.

One of the producers of CutSets that ``fedasr shard`` reads (:mod:`fedasr.data.sources`
has the other, lhotse manifests, and the checks both get afterwards: audio, sample rate,
channels, transcript normalisation). The utterances themselves are parsed by lhotse's
LibriSpeech recipe (:func:`lhotse.recipes.librispeech.parse_utterance`); this module adds
the checks of the layout: every transcript line has audio, every audio file has a
transcript line, no transcript is empty, ids follow ``SPEAKER-CHAPTER-NNNN``. Each problem
is an error naming the file, unless ``skip_invalid`` is set, in which case the utterance
is dropped and the problem is recorded.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lhotse import CutSet, RecordingSet, SupervisionSet
from lhotse.recipes.librispeech import parse_utterance
from lhotse.utils import fastcopy

from fedasr.errors import FedasrError

UTT_ID = re.compile(r"^(\d+)-(\d+)-(\d+)$")


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class SplitScan:
    split: str
    cuts: CutSet
    dropped: list[Problem]


def first_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one line of a message."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def fail_or_collect(problems: list[Problem], skip_invalid: bool) -> None:
    if problems and not skip_invalid:
        more = f" ({len(problems) - 1} more problems; --skip-invalid drops bad utterances)" if len(problems) > 1 else ""
        raise FedasrError(f"{problems[0]}{more}")


def scan_split(corpus: str | Path, split: str, skip_invalid: bool = False, jobs: int = 4) -> SplitScan:
    """Validate one split directory of a LibriSpeech-layout corpus and return its cuts
    (audio, rates and channels are checked afterwards, :func:`fedasr.data.sources.prepare`).

    Cut ids are the utterance ids (``SPEAKER-CHAPTER-NNNN``); each supervision keeps
    ``speaker`` and carries ``custom={"chapter": ...}``.
    """
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise FedasrError(f"{corpus}: corpus directory does not exist")
    split_dir = corpus / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in corpus.iterdir() if p.is_dir())
        raise FedasrError(f"{split_dir}: unknown split {split!r} (found: {', '.join(found) or 'none'})")
    trans_files = sorted(split_dir.rglob("*.trans.txt"))
    if not trans_files:
        raise FedasrError(f"{split_dir}: no *.trans.txt transcripts found")

    problems: list[Problem] = []
    lines: list[tuple[Path, str]] = []  # (transcript file, line)
    referenced: set[Path] = set()
    seen_ids: set[str] = set()
    for trans in trans_files:
        prefix = trans.name[: -len(".trans.txt")]
        try:
            content = trans.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(str(trans), f"unreadable transcript ({e})"))
            continue
        for lineno, raw in enumerate(content.splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            utt_id = parts[0]
            where = f"{trans}:{lineno}"
            m = UTT_ID.match(utt_id)
            if not m or not utt_id.startswith(prefix + "-"):
                problems.append(Problem(where, f"bad utterance id {utt_id!r} (expected {prefix}-NNNN)"))
                continue
            if utt_id in seen_ids:
                problems.append(Problem(where, f"duplicate utterance id {utt_id}"))
                continue
            seen_ids.add(utt_id)
            audio = trans.parent / f"{utt_id}.flac"
            referenced.add(audio)
            if len(parts) < 2 or not parts[1].strip():
                problems.append(Problem(where, f"empty transcript for {utt_id}"))
                continue
            if not audio.is_file():
                problems.append(Problem(where, f"transcript line without audio ({audio.name} missing)"))
                continue
            lines.append((audio, line))

    for flac in sorted(split_dir.rglob("*.flac")):
        if flac not in referenced:
            problems.append(Problem(str(flac), "audio without a transcript line"))

    fail_or_collect(problems, skip_invalid)
    if not lines:
        raise FedasrError(f"{split_dir}: no valid utterances")

    def parse(item: tuple[Path, str]):
        try:
            return parse_utterance(split_dir, item[1], {})
        except Exception as e:  # lhotse reads the header: an undecodable file fails here
            return f"undecodable audio ({first_line(e, 120)})"

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        parsed = list(ex.map(parse, lines))
    recordings, supervisions = [], []
    for (audio, _), result in zip(lines, parsed):
        if result is None:  # lhotse could not find the file after all
            problems.append(Problem(str(audio), "transcript line without audio"))
            continue
        if isinstance(result, str):
            problems.append(Problem(str(audio), result))
            continue
        rec, sup = result
        sup.custom = {"chapter": UTT_ID.match(rec.id).group(2)}
        recordings.append(rec)
        supervisions.append(sup)
    fail_or_collect(problems, skip_invalid)
    if not recordings:
        raise FedasrError(f"{split_dir}: no valid utterances")
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings(recordings),
        supervisions=SupervisionSet.from_segments(supervisions),
    )
    # one cut per utterance, named by the LibriSpeech utterance id
    cuts = CutSet.from_cuts(fastcopy(c, id=c.supervisions[0].id) for c in cuts)
    return SplitScan(split, cuts, problems)
