"""Where a split's utterances come from, and the checks every source gets.

Two producers of lhotse CutSets feed ``fedasr shard``:

- a LibriSpeech-layout corpus (``--corpus``; :func:`fedasr.data.corpus.scan_split`);
- lhotse manifests (``--manifests SPLIT=PATH``; :func:`load_manifests`), where ``PATH`` is

  * a CutSet manifest (``cuts.jsonl.gz``: any file ``lhotse.load_manifest`` reads);
  * ``RECORDINGS,SUPERVISIONS``: a RecordingSet and a SupervisionSet, comma-separated (either order);
  * a directory holding, first match wins: ``*cuts_SPLIT.jsonl[.gz]`` (a lhotse recipe's or
    icefall's naming), ``*recordings_SPLIT.jsonl[.gz]`` + ``*supervisions_SPLIT.jsonl[.gz]``,
    ``cuts.jsonl[.gz]`` (``lhotse kaldi import``'s output), ``recordings.jsonl[.gz]`` +
    ``supervisions.jsonl[.gz]``.

A manifest becomes one cut per supervision (what lhotse's ``trim_to_supervisions`` makes,
channels included), named by the supervision id. Then :func:`prepare` runs on every source alike:

- the transcript is normalised (:func:`fedasr.data.tokenizer.normalize_transcript`); one
  with no words left is an error;
- the speaker is required (clients, the server's disjointness and per-client WER use it);
- the chapter, for ``--by chapter``, is the supervision's ``custom["chapter"]``;
- every audio file must exist and decode, with samples. For a single-file recording the
  file's own header is the truth: a manifest that declares another sample rate, channel
  count or length (``lhotse kaldi import`` takes one rate for the whole directory) is
  corrected to it, and counted. A ``command`` source (a Kaldi pipe) is run and in-memory
  audio read the same way; a URL is decoded once to check it, its declared rate trusted;
- an utterance must lie within its audio (lhotse's duration tolerance);
- channels: a cut on one channel of a multi-channel recording (a supervision with
  ``channel=1``) uses that channel; a cut on several channels, or a file with more
  channels than its manifest declares, is the mean of its channels (the features see the
  downmix, :class:`fedasr.data.features.ModelFbank`). Audio at any sample rate is
  resampled to 16 kHz there too; federation.yaml records each split's rates and channels.

Each problem is a :class:`~fedasr.data.corpus.Problem` naming the manifest and the
utterance (or, for the LibriSpeech layout, the file); it is an error unless
``skip_invalid``, which drops the utterance and lists it.
"""

from __future__ import annotations

import io
import os
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import soundfile as sf
from lhotse import AudioSource, CutSet, MonoCut, MultiCut, Recording, RecordingSet, SupervisionSet, load_manifest
from lhotse.audio.backend import info as lhotse_info
from lhotse.audio.utils import get_audio_duration_mismatch_tolerance
from lhotse.utils import fastcopy

from fedasr.data.corpus import Problem, SplitScan, fail_or_collect, first_line, scan_split
from fedasr.data.features import SAMPLE_RATE
from fedasr.data.tokenizer import normalize_transcript
from fedasr.errors import FedasrError, OptionError

ROLE_OPTIONS = {"train": "--train-split", "server": "--server-split", "dev": "--dev-split", "test": "--test-split"}


# ---------------------------------------------------------------- --manifests SPLIT=PATH

def parse_manifest_args(items: list[str]) -> dict[str, str]:
    """``["train=a.jsonl.gz", ...]`` -> ``{"train": "a.jsonl.gz"}``."""
    out: dict[str, str] = {}
    for item in items:
        split, sep, spec = (x.strip() for x in item.partition("="))
        if not sep or not split or not spec:
            raise OptionError(f"--manifests: expected SPLIT=PATH, got {item!r}")
        if split in out:
            raise OptionError(f"--manifests: split {split!r} given twice")
        out[split] = spec
    return out


def _one(directory: Path, pattern: str) -> list[Path]:
    return sorted(p for p in directory.glob(pattern) if p.is_file())


def manifest_files(split: str, spec: str) -> list[Path]:
    """The manifest file(s) of ``--manifests SPLIT=SPEC``: one CutSet, or recordings + supervisions."""
    if "," in spec:
        paths = [Path(p.strip()) for p in spec.split(",")]
        if len(paths) != 2 or not all(str(p) for p in paths):
            raise OptionError(f"--manifests {split}: expected CUTS, RECORDINGS,SUPERVISIONS or a directory, got {spec!r}")
    else:
        path = Path(spec)
        if path.is_dir():
            return _find_in_dir(split, path)
        paths = [path]
    for p in paths:
        if not p.is_file():
            raise FedasrError(f"--manifests {split}: {p} does not exist")
    return paths


def _find_in_dir(split: str, d: Path) -> list[Path]:
    conventions = [(f"*cuts_{split}.jsonl*",), (f"*recordings_{split}.jsonl*", f"*supervisions_{split}.jsonl*"),
                   ("cuts.jsonl*",), ("recordings.jsonl*", "supervisions.jsonl*")]
    for patterns in conventions:
        found = [_one(d, p) for p in patterns]
        if not any(found):
            continue
        for pattern, files in zip(patterns, found):
            if not files:
                raise FedasrError(f"--manifests {split}: {d} has {found[0][0].name if found[0] else found[1][0].name} "
                                  f"but no {pattern}")
            if len(files) > 1:
                raise FedasrError(f"--manifests {split}: {d} has several {pattern} "
                                  f"({', '.join(f.name for f in files)}); name the file(s)")
        return [files[0] for files in found]
    raise FedasrError(f"--manifests {split}: {d} holds no lhotse manifests for split {split!r} (expected "
                      f"*cuts_{split}.jsonl.gz, *recordings_{split}.jsonl.gz + *supervisions_{split}.jsonl.gz, "
                      "cuts.jsonl.gz, or recordings.jsonl.gz + supervisions.jsonl.gz)")


def _read(path: Path):
    try:
        return load_manifest(path)
    except Exception as e:
        raise FedasrError(f"{path}: not a readable lhotse manifest ({first_line(e)})") from None


def _utterance(sup, rec: Recording, offset: float, custom):
    """The cut of one supervision (lhotse's trim_to_supervisions, without its checks: the
    supervision's span and channels are checked against the audio in :func:`prepare`)."""
    channel = sup.channel
    if isinstance(channel, (list, tuple)) and len(channel) == 1:
        channel = channel[0]
    kind = MultiCut if isinstance(channel, (list, tuple)) else MonoCut
    return kind(id=sup.id, start=offset + sup.start, duration=sup.duration, channel=channel, recording=rec,
                supervisions=[fastcopy(sup, start=0.0)], custom=custom)


def load_manifests(split: str, spec: str) -> tuple[CutSet, list[Problem], Callable, str]:
    """Read ``--manifests SPLIT=SPEC`` into one-supervision cuts named by their supervision.

    Returns (cuts, problems, ``where(cut)`` naming a cut in messages, a description of the source)."""
    files = manifest_files(split, spec)
    manifests = [_read(p) for p in files]
    problems: list[Problem] = []
    if len(files) == 1:
        (path,), (cuts,) = files, manifests
        if not isinstance(cuts, CutSet):
            raise FedasrError(f"{path}: a {type(cuts).__name__}, expected a CutSet (or give "
                              f"{split}=RECORDINGS,SUPERVISIONS)")
        label = str(path)
        pieces = []  # (supervision, recording, offset of the supervision's times, custom)
        for cut in cuts:
            if not isinstance(cut, (MonoCut, MultiCut)):
                problems.append(Problem(f"{label}: {cut.id}", f"a {type(cut).__name__}; fedasr shards cuts "
                                        "of one recording (MonoCut, MultiCut)"))
            elif not cut.supervisions:
                problems.append(Problem(f"{label}: {cut.id}", "cut without a supervision (no transcript)"))
            elif cut.recording is None:
                problems.append(Problem(f"{label}: {cut.id}", "cut without a recording (no audio)"))
            else:
                pieces += [(s, cut.recording, cut.start, cut.custom) for s in cut.supervisions]
    else:
        by_type = {type(m): (p, m) for p, m in zip(files, manifests)}
        if set(by_type) != {RecordingSet, SupervisionSet}:
            kinds = " and ".join(f"{p} ({type(m).__name__})" for p, m in zip(files, manifests))
            raise FedasrError(f"--manifests {split}: expected a RecordingSet and a SupervisionSet, got {kinds}")
        rec_path, recordings = by_type[RecordingSet]
        sup_path, supervisions = by_type[SupervisionSet]
        label = str(sup_path)
        rec_ids = {r.id for r in recordings}
        kept = []
        for s in supervisions:
            if s.recording_id in rec_ids:
                kept.append(s)
            else:
                problems.append(Problem(f"{label}: {s.id}", f"recording {s.recording_id} is not in {rec_path}"))
        used = {s.recording_id for s in kept}
        problems += [Problem(f"{rec_path}: {r.id}", "recording without a supervision (no transcript)")
                     for r in recordings if r.id not in used]
        by_id = {r.id: r for r in recordings}
        pieces = [(s, by_id[s.recording_id], 0.0, None) for s in kept]
    seen: set[str] = set()
    out = []
    for sup, rec, offset, custom in pieces:
        if sup.id in seen:
            problems.append(Problem(f"{label}: {sup.id}", "duplicate supervision id"))
            continue
        seen.add(sup.id)
        out.append(_utterance(sup, rec, offset, custom))
    return CutSet.from_cuts(out), problems, lambda cut: f"{label}: {cut.id}", ",".join(str(p.resolve()) for p in files)


# ---------------------------------------------------------------- checks for every source

class _Bad(Exception):
    """An audio problem; :data:`_FILE` in the reason stands where the file's name goes."""


_FILE = "\0"


@dataclass
class _Checked:
    recording: Recording | None = None
    reason: str | None = None
    file: str | None = None
    corrected: bool = False
    more_channels: bool = False  # the file has more channels than the manifest declared


def _absolute(source: AudioSource) -> AudioSource:
    # lhotse resolves a relative path against the current directory: keep that meaning
    return fastcopy(source, source=os.path.abspath(source.source)) if source.type == "file" else source


@dataclass(frozen=True)
class _Info:
    samplerate: int
    channels: int
    frames: int


def _info(what) -> _Info:
    """Rate, channels and length from the header (soundfile; lhotse's backends for other formats)."""
    try:
        i = sf.info(what)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        try:
            if isinstance(what, io.BytesIO):
                what.seek(0)
            i = lhotse_info(what)
        except Exception:
            raise _Bad(f"undecodable audio{_FILE} ({first_line(e, 120)})") from None
    if i.frames <= 0:
        raise _Bad(f"audio{_FILE} has no samples")
    return _Info(int(i.samplerate), int(i.channels), int(i.frames))


def _source_info(src: AudioSource) -> _Info | None:
    """The audio of one source as its own header tells it; None where it cannot be read
    without decoding it (a URL, a Shar placeholder)."""
    if src.type == "file":
        if not Path(src.source).is_file():
            raise _Bad(f"audio file{_FILE} does not exist")
        return _info(src.source)
    if src.type == "command":  # a Kaldi pipe ("flac -c -d -s X.flac |"), which lhotse runs likewise
        proc = subprocess.run(src.source, shell=True, capture_output=True)
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise _Bad(f"audio command{_FILE} failed ({(err[0] if err else f'exit {proc.returncode}')[:120]})")
        return _info(io.BytesIO(proc.stdout))
    if src.type == "memory":
        return _info(io.BytesIO(src.source))
    return None


def _check_recording(rec: Recording) -> _Checked:
    sources = [_absolute(s) for s in rec.sources]
    infos = []
    for s in sources:
        try:
            infos.append(_source_info(s))
        except _Bad as e:
            name = s.source if s.type in ("file", "command") else f"(in-memory audio of recording {rec.id})"
            return _Checked(reason=str(e), file=name)
    try:
        if None in infos:  # a URL: decode it once, and trust its declared rate
            try:
                audio = rec.load_audio()
            except Exception as e:
                raise _Bad(f"undecodable audio of recording {rec.id} ({first_line(e, 120)})") from None
            if audio.shape[-1] == 0:
                raise _Bad(f"recording {rec.id} has no samples")
            return _Checked(fastcopy(rec, sources=sources))
        if len(sources) == 1:
            info, src = infos[0], sources[0]
            declared = (rec.sampling_rate, len(src.channels), rec.num_samples)
            if declared == (info.samplerate, info.channels, info.frames):
                return _Checked(fastcopy(rec, sources=sources))
            if rec.transforms and rec.sampling_rate != info.samplerate:
                raise _Bad(f"recording {rec.id} declares {rec.sampling_rate} Hz but its audio is "
                           f"{info.samplerate} Hz, and it has transforms: fix the manifest")
            channels = list(range(info.channels))
            fixed = Recording(id=rec.id, sources=[fastcopy(src, channels=channels)], sampling_rate=info.samplerate,
                              num_samples=info.frames, duration=info.frames / info.samplerate,
                              channel_ids=channels, transforms=rec.transforms)
            return _Checked(fixed, corrected=declared[:2] != (info.samplerate, info.channels),
                            more_channels=info.channels > len(src.channels))
        for s, info in zip(sources, infos):  # one file per channel: no guessing, they must agree
            if info.samplerate != rec.sampling_rate or info.channels != len(s.channels):
                raise _Bad(f"recording {rec.id}: {s.source} is {info.samplerate} Hz with {info.channels} channel(s), "
                           f"the manifest declares {rec.sampling_rate} Hz with {len(s.channels)}")
        return _Checked(fastcopy(rec, sources=sources))
    except _Bad as e:
        return _Checked(reason=str(e))


@dataclass
class SplitData:
    """A split ready for features: normalised, checked cuts and what was dropped."""
    split: str
    cuts: CutSet
    dropped: list[Problem]
    origin: str
    # federation.yaml's source.splits: utterances by original sample rate and by channels used,
    # how many were resampled, downmixed, or had their manifest's rate/channels corrected to the file's
    audio: dict = field(default_factory=dict)


def chapter_of(cut) -> str | None:
    custom = cut.supervisions[0].custom or {}
    ch = custom.get("chapter")
    return None if ch is None else str(ch)


def prepare(cuts: CutSet, where: Callable, skip_invalid: bool, jobs: int = 4, files_named: bool = False
            ) -> tuple[CutSet, list[Problem], dict]:
    """The checks and conversions of every source (module docstring). ``where(cut)`` names an
    utterance in messages; ``files_named``: audio problems are named by the file alone
    (the LibriSpeech layout, whose file names are the utterance ids)."""
    recordings = {c.recording.id: c.recording for c in cuts}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        checked = dict(zip(recordings, ex.map(_check_recording, recordings.values())))
    tolerance = get_audio_duration_mismatch_tolerance()
    problems: list[Problem] = []
    out = []
    rates, channels = Counter(), Counter()
    downmixed = corrected = 0
    for cut in cuts:
        sup = cut.supervisions[0]
        chk = checked[cut.recording.id]
        if chk.reason is not None:
            if files_named and chk.file is not None:
                problems.append(Problem(chk.file, chk.reason.replace(_FILE, "")))
            else:
                problems.append(Problem(where(cut), chk.reason.replace(_FILE, f" {chk.file}")))
            continue
        text = normalize_transcript(sup.text)
        if not text:
            problems.append(Problem(where(cut), "empty transcript" if not (sup.text or "").strip() else
                                    f"transcript {sup.text!r} has no words (after normalisation)"))
            continue
        if not sup.speaker or not str(sup.speaker).strip():
            problems.append(Problem(where(cut), "no speaker (supervision.speaker)"))
            continue
        rec = chk.recording
        if cut.start < 0 or cut.end > rec.duration + tolerance:
            problems.append(Problem(where(cut), f"utterance [{cut.start:.3f}, {cut.end:.3f}] s lies outside its "
                                                f"audio (0 to {rec.duration:.3f} s)"))
            continue
        if chk.more_channels:  # the manifest thought it mono (e.g. `lhotse kaldi import`): the whole file
            used = list(rec.channel_ids)
        else:
            used = list(cut.channel) if isinstance(cut.channel, (list, tuple)) else [cut.channel]
            missing = [c for c in used if c not in rec.channel_ids]
            if missing:
                problems.append(Problem(where(cut), f"uses channel {missing[0]} but its audio has channels "
                                                    f"{rec.channel_ids}"))
                continue
        channel = used if len(used) > 1 else used[0]
        kind = MultiCut if len(used) > 1 else MonoCut
        if chk.more_channels or type(cut) is not kind:
            cut = kind(id=cut.id, start=cut.start, duration=cut.duration, channel=channel, recording=rec,
                       supervisions=[], custom=cut.custom)
        cut = fastcopy(cut, recording=rec, supervisions=[fastcopy(sup, text=text, speaker=str(sup.speaker),
                                                                  channel=channel)])
        out.append(cut)
        rates[rec.sampling_rate] += 1
        channels[len(used)] += 1
        downmixed += len(used) > 1
        corrected += chk.corrected
    fail_or_collect(problems, skip_invalid)
    audio = {"sample_rates": dict(sorted(rates.items())), "channels": dict(sorted(channels.items())),
             "resampled_to_16k": sum(n for r, n in rates.items() if r != SAMPLE_RATE),
             "downmixed": downmixed, "manifest_corrected": corrected}
    return CutSet.from_cuts(out), problems, audio


def read_split(split: str, corpus: Path | None, manifests: dict[str, str], skip_invalid: bool = False,
               jobs: int = 4) -> SplitData:
    """One split from its manifests (when ``--manifests`` names it) or from the corpus."""
    if split in manifests:
        cuts, problems, where, origin = load_manifests(split, manifests[split])
        fail_or_collect(problems, skip_invalid)
        files_named = False
    else:
        scan: SplitScan = scan_split(corpus, split, skip_invalid=skip_invalid, jobs=jobs)
        cuts, problems, origin = scan.cuts, scan.dropped, str(Path(corpus) / split)
        files_named = True

        def where(cut):
            return cut.recording.sources[0].source

    cuts, more, audio = prepare(cuts, where, skip_invalid, jobs, files_named=files_named)
    if not len(cuts):
        raise FedasrError(f"{origin}: no valid utterances")
    return SplitData(split, cuts, problems + more, origin, audio)


def check_roles(roles: dict[str, list[str]], corpus: Path | None, manifests: dict[str, str]) -> None:
    """Every split named in a role has a source, and every manifest a role."""
    if corpus is None and not manifests:
        raise OptionError("--corpus or --manifests: give a LibriSpeech-layout corpus or lhotse manifests")
    named = {s for splits in roles.values() for s in splits}
    for split in manifests:
        if split not in named:
            raise OptionError(f"--manifests: split {split!r} has no role (name it in --train-split, --server-split, "
                              "--dev-split or --test-split)")
    if corpus is None:
        for role, splits in roles.items():
            for split in splits:
                if split not in manifests:
                    raise FedasrError(f"{ROLE_OPTIONS[role]}: split {split!r} has no --manifests {split}=PATH "
                                      "(and no --corpus)")
