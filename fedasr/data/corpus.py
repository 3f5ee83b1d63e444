"""Reading a LibriSpeech-layout corpus (real or generated) into lhotse manifests.

The utterances themselves are parsed by lhotse's LibriSpeech recipe
(:func:`lhotse.recipes.librispeech.parse_utterance`); this module adds the validation a
real tool needs before it: every transcript line has audio, every audio file has a
transcript line, no transcript is empty, every FLAC decodes. Each problem is an error
naming the file, unless ``skip_invalid`` is set, in which case the utterance is dropped
and the problem is recorded.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
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


def _fail_or_collect(problems: list[Problem], skip_invalid: bool) -> None:
    if problems and not skip_invalid:
        more = f" ({len(problems) - 1} more problems; --skip-invalid drops bad utterances)" if len(problems) > 1 else ""
        raise FedasrError(f"{problems[0]}{more}")


def _check_audio(path: Path) -> str | None:
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        return f"undecodable audio ({str(e).splitlines()[0][:120]})"
    if info.frames <= 0:
        return "audio has no samples"
    if info.channels != 1:
        return f"audio has {info.channels} channels, expected mono"
    return None


def scan_split(corpus: str | Path, split: str, skip_invalid: bool = False, jobs: int = 4) -> SplitScan:
    """Validate one split directory of a LibriSpeech-layout corpus and return its cuts.

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

    def check(item: tuple[Path, str]) -> Problem | None:
        reason = _check_audio(item[0])
        return Problem(str(item[0]), reason) if reason else None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        bad = [p for p in ex.map(check, lines) if p is not None]
    problems.extend(bad)
    bad_paths = {p.path for p in bad}
    good = [(a, line) for a, line in lines if str(a) not in bad_paths]
    _fail_or_collect(problems, skip_invalid)
    if not good:
        raise FedasrError(f"{split_dir}: no valid utterances")

    def parse(item: tuple[Path, str]):
        return parse_utterance(split_dir, item[1], {})

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        parsed = list(ex.map(parse, good))
    recordings, supervisions = [], []
    for (audio, _), result in zip(good, parsed):
        if result is None:  # lhotse could not find the file after all
            problems.append(Problem(str(audio), "transcript line without audio"))
            continue
        rec, sup = result
        sup.custom = {"chapter": UTT_ID.match(rec.id).group(2)}
        recordings.append(rec)
        supervisions.append(sup)
    _fail_or_collect(problems, skip_invalid)
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings(recordings),
        supervisions=SupervisionSet.from_segments(supervisions),
    )
    # one cut per utterance, named by the LibriSpeech utterance id
    cuts = CutSet.from_cuts(fastcopy(c, id=c.supervisions[0].id) for c in cuts)
    return SplitScan(split, cuts, problems)
