"""Synthetic LibriSpeech-layout speech corpus made with text-to-speech.

LibriSpeech cannot be downloaded on the machines this project is developed on, so the
tests and the demo use a corpus that this module generates with espeak-ng (and flite
when installed). It is written in the exact LibriSpeech layout::

    ROOT/LibriSpeech/SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac   (16 kHz mono FLAC)
    ROOT/LibriSpeech/SPLIT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt  (upper case)
    ROOT/LibriSpeech/SPEAKERS.TXT

so that every later stage runs the same code path it runs on the real corpus.

A *speaker* is a voice: an engine voice (accent), a voice variant, a pitch and a rate.
Splits: ``train``; ``dev`` and ``test-clean`` (speakers seen in training, new
sentences); ``test-other`` (speakers never seen in training); optionally
``train-server`` (``server_speakers`` further speakers: the server's own data, e.g. for a
seed model; sentences disjoint from every other split). Adding server speakers leaves
every other split's voices, sentences and audio unchanged.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from fedasr.data import text as textgen
from fedasr.errors import FedasrError, OptionError
from fedasr.fsutil import atomic_dir

SAMPLE_RATE = 16000

# Accents of espeak-ng's English voices and the variants that sound like people
# (robot, whisper and croak variants are left out).
ESPEAK_ACCENTS = (
    "en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-029",
)
ESPEAK_VARIANTS = (
    ("m1", "M"), ("m2", "M"), ("m3", "M"), ("m4", "M"), ("m5", "M"), ("m6", "M"),
    ("m7", "M"), ("m8", "M"), ("f1", "F"), ("f2", "F"), ("f3", "F"), ("f4", "F"),
    ("f5", "F"), ("klatt", "M"), ("klatt2", "M"), ("klatt3", "M"), ("adam", "M"),
    ("Alicia", "F"), ("Andy", "M"), ("Annie", "F"), ("aunty", "F"), ("belinda", "F"),
    ("benjamin", "M"), ("caleb", "M"), ("david", "M"), ("ed", "M"), ("edward", "M"),
    ("john", "M"), ("linda", "F"), ("max", "M"), ("Michael", "M"), ("paul", "M"),
    ("rob", "M"), ("robert", "M"), ("steph", "F"), ("travis", "M"), ("victor", "M"),
    ("grandma", "F"), ("grandpa", "M"), ("shelby", "F"), ("norbert", "M"), ("quincy", "M"),
)
FLITE_VOICES = (("slt", "F"), ("rms", "M"), ("awb", "M"), ("kal16", "M"))

SPLITS = ("train", "dev", "test-clean", "test-other", "train-server")
SERVER_SPLIT = "train-server"


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker."""

    engine: str  # "espeak-ng" or "flite"
    voice: str  # espeak "accent+variant", or a flite voice name
    sex: str
    pitch: int  # espeak pitch 0-99; flite: mean F0 in Hz
    rate: int  # espeak words per minute; flite: duration stretch in percent

    @property
    def name(self) -> str:
        return f"{self.engine}:{self.voice}:p{self.pitch}:r{self.rate}"

    def command(self, text: str) -> list[str]:
        # Engines get lower case: upper-case espeak-ng spells out IT and US as letters.
        text = text.lower()
        if self.engine == "espeak-ng":
            return ["espeak-ng", "-v", self.voice, "-p", str(self.pitch), "-s", str(self.rate),
                    "--stdout", text]
        return ["flite", "-voice", self.voice, "--setf", f"int_f0_target_mean={self.pitch}",
                "--setf", f"duration_stretch={self.rate / 100:.2f}", "-t", text, "-o", "/dev/stdout"]


def available_engines() -> list[str]:
    return [e for e in ("espeak-ng", "flite") if shutil.which(e)]


# What `fedasr synth` runs (and nothing else in fedasr does): espeak-ng speaks, sox converts
# its 22.05 kHz output to 16 kHz; flite, when installed, adds four voices.
REQUIRED_TOOLS = ("espeak-ng", "sox")


def require_tools() -> None:
    """One error naming the missing programs and the Debian packages that bring them."""
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        raise FedasrError(f"fedasr synth: {' and '.join(missing)} not found; the synthetic corpus needs the Debian "
                          "packages espeak-ng and sox (flite adds voices): `sudo apt-get install espeak-ng sox "
                          "flite` or `make system-deps` (shard, train and eval on real data need none of them)")


def voice_pool(seed: int) -> list[Voice]:
    """All distinct voices the installed engines offer, in a seeded order.

    espeak-ng alone offers 7 accents x 42 variants with a seeded pitch and rate each.
    """
    require_tools()
    engines = available_engines()
    rng = random.Random(f"voices-{seed}")
    # Round r pairs every variant with an accent; the first round alone gives 42 speakers
    # with distinct variants, later rounds reuse variants with other accents.
    variants = list(ESPEAK_VARIANTS)
    rng.shuffle(variants)
    accents = list(ESPEAK_ACCENTS)
    rng.shuffle(accents)
    combos = [(accents[(i + r) % len(accents)], v, s)
              for r in range(len(accents)) for i, (v, s) in enumerate(variants)]
    voices = [
        Voice("espeak-ng", f"{a}+{v}", s, pitch=rng.randint(30, 70), rate=rng.randint(140, 185))
        for a, v, s in combos
    ]
    if "flite" in engines:
        flite = [
            Voice("flite", v, s, pitch=rng.randint(95, 125) if s == "M" else rng.randint(165, 205),
                  rate=rng.randint(90, 115))
            for v, s in FLITE_VOICES
        ]
        # interleave so that small corpora also get some flite speakers
        for i, v in enumerate(flite):
            voices.insert(min(len(voices), 3 + 7 * i), v)
    return voices


@dataclass(frozen=True)
class Utterance:
    split: str
    speaker: int
    chapter: int
    index: int
    text: str
    voice: Voice
    seed: int

    @property
    def id(self) -> str:
        return f"{self.speaker}-{self.chapter}-{self.index:04d}"

    def relpath(self) -> Path:
        return Path(self.split) / str(self.speaker) / str(self.chapter) / f"{self.id}.flac"


@dataclass
class SynthPlan:
    utterances: list[Utterance]
    speakers: dict[int, tuple[Voice, str]]  # speaker id -> (voice, split it belongs to)


def plan_corpus(
    speakers: int,
    utterances_per_speaker: int,
    seed: int,
    domain: str = "small",
    test_other_speakers: int | None = None,
    dev_per_speaker: int | None = None,
    test_per_speaker: int | None = None,
    chapters_per_speaker: int = 3,
    server_speakers: int = 0,
) -> SynthPlan:
    """Decide every utterance (speaker, chapter, text, voice) before any audio is made."""
    if speakers < 1:
        raise OptionError("--speakers: must be at least 1")
    if utterances_per_speaker < 1:
        raise OptionError("--utterances-per-speaker: must be at least 1")
    if chapters_per_speaker < 1:
        raise OptionError("--chapters-per-speaker: must be at least 1")
    if server_speakers < 0:
        raise OptionError("--server-speakers: must be >= 0")
    if domain not in textgen.DOMAINS:
        raise OptionError(f"--domain: unknown domain {domain!r} (choose from {', '.join(textgen.DOMAINS)})")
    n_other = max(1, speakers // 4) if test_other_speakers is None else test_other_speakers
    n_dev = max(1, utterances_per_speaker // 10) if dev_per_speaker is None else dev_per_speaker
    n_test = max(1, utterances_per_speaker // 10) if test_per_speaker is None else test_per_speaker
    pool = voice_pool(seed)
    if speakers + n_other + server_speakers > len(pool):
        raise FedasrError(
            f"--speakers: {speakers} training + {n_other} test-other + {server_speakers} server speakers "
            f"requested, but the installed TTS engines offer {len(pool)} voices"
        )
    n_other_utts = math.ceil(speakers * n_test / n_other) if n_other else 0
    counts = {
        "train": speakers * utterances_per_speaker,
        "dev": speakers * n_dev,
        "test-clean": speakers * n_test,
        "test-other": n_other * n_other_utts,
    }
    if server_speakers:  # drawn after "train": the other splits keep their sentences
        counts[SERVER_SPLIT] = server_speakers * utterances_per_speaker
    try:
        texts = textgen.split_sentences(domain, counts, seed)
    except ValueError as e:
        raise FedasrError(f"--utterances-per-speaker: {e}") from None
    rng = random.Random(f"speakers-{seed}")
    ids = rng.sample(range(100, 9000), speakers + n_other)
    # the server's speaker ids from a stream of their own: the other splits stay as they were
    taken = set(ids)
    ids += random.Random(f"server-speakers-{seed}").sample(
        [i for i in range(100, 9000) if i not in taken], server_speakers)
    per_speaker_counts = {"train": utterances_per_speaker, "dev": n_dev, "test-clean": n_test,
                          SERVER_SPLIT: utterances_per_speaker}
    utts: list[Utterance] = []
    spk_table: dict[int, tuple[Voice, str]] = {}
    seen = [(ids[i], pool[i]) for i in range(speakers)]
    unseen = [(ids[speakers + i], pool[speakers + i]) for i in range(n_other)]
    first = speakers + n_other
    server = [(ids[first + i], pool[first + i]) for i in range(server_speakers)]
    for spk, voice in seen:
        spk_table[spk] = (voice, "train")
    for spk, voice in unseen:
        spk_table[spk] = (voice, "test-other")
    for spk, voice in server:
        spk_table[spk] = (voice, SERVER_SPLIT)
    groups = {"test-other": unseen, SERVER_SPLIT: server}
    for split in SPLITS:  # train-server last: the other splits' utterance seeds stay the same
        group = groups.get(split, seen)
        per = n_other_utts if split == "test-other" else per_speaker_counts[split]
        pending = iter(texts.get(split, []))
        for spk, voice in group:
            # chapters are numbered per speaker and split so that no chapter spans splits
            n_ch = min(chapters_per_speaker, per) if per else 0
            base = spk * 100 + SPLITS.index(split) * 10
            for k in range(per):
                chapter = base + (k * n_ch // per)
                text = next(pending)
                utts.append(Utterance(split, spk, chapter, k, text, voice,
                                      seed=rng.randrange(2**31)))
    return SynthPlan(utts, spk_table)


def _run_tts(voice: Voice, text: str) -> np.ndarray:
    """Synthesize ``text`` with ``voice`` and return 16 kHz mono float32 samples."""
    tts = subprocess.run(voice.command(text), capture_output=True, check=False)
    if tts.returncode != 0 or not tts.stdout:
        raise FedasrError(f"{voice.engine}: failed for voice {voice.voice}: "
                          f"{tts.stderr.decode(errors='replace').strip()[:200]}")
    conv = subprocess.run(
        ["sox", "-q", "-D", "-t", "wav", "-", "-t", "wav", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-"],
        input=tts.stdout, capture_output=True, check=False,
    )
    if conv.returncode != 0:
        raise FedasrError(f"sox: resampling failed: {conv.stderr.decode(errors='replace').strip()[:200]}")
    audio, sr = sf.read(io.BytesIO(conv.stdout), dtype="float32")
    assert sr == SAMPLE_RATE
    return audio


def render(utt: Utterance) -> np.ndarray:
    """Audio for one utterance: TTS, random leading/trailing silence, gain and a low noise floor."""
    audio = _run_tts(utt.voice, utt.text)
    rng = np.random.default_rng(utt.seed)
    lead = int(rng.uniform(0.05, 0.35) * SAMPLE_RATE)
    trail = int(rng.uniform(0.05, 0.35) * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead, np.float32), audio, np.zeros(trail, np.float32)])
    peak = float(np.max(np.abs(audio))) or 1.0
    audio = audio * (rng.uniform(0.25, 0.9) / peak)
    rms = float(np.sqrt(np.mean(audio**2))) or 1e-3
    snr_db = rng.uniform(30.0, 50.0)
    audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * rms * 10 ** (-snr_db / 20)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _speakers_txt(plan: SynthPlan, durations: dict[str, float]) -> str:
    minutes: dict[int, float] = {}
    for u in plan.utterances:
        minutes[u.speaker] = minutes.get(u.speaker, 0.0) + durations[u.id] / 60
    lines = [
        "; Synthetic speakers generated by `fedasr synth` (text-to-speech, not human speech).",
        "; ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    for spk in sorted(plan.speakers):
        voice, split = plan.speakers[spk]
        lines.append(f"{spk:<5}| {voice.sex} | {split:<16} | {minutes.get(spk, 0):5.2f} | {voice.name}")
    return "\n".join(lines) + "\n"


def synthesize_corpus(
    out: str | Path,
    plan: SynthPlan,
    jobs: int = 2,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Render ``plan`` into ``out/LibriSpeech`` atomically; returns per-split hours and counts."""
    out = Path(out)
    target = out / "LibriSpeech"
    durations: dict[str, float] = {}
    with atomic_dir(target, overwrite=overwrite) as tmp:

        def work(utt: Utterance) -> tuple[str, float]:
            audio = render(utt)
            path = tmp / utt.relpath()
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            return utt.id, len(audio) / SAMPLE_RATE

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            for uid, dur in ex.map(work, plan.utterances):
                durations[uid] = dur
                if progress:
                    progress(1)
        transcripts: dict[Path, list[str]] = {}
        for u in plan.utterances:
            trans = tmp / u.relpath().parent / f"{u.speaker}-{u.chapter}.trans.txt"
            transcripts.setdefault(trans, []).append(f"{u.id} {u.text}")
        for path, lines in transcripts.items():
            path.write_text("\n".join(lines) + "\n")
        (tmp / "SPEAKERS.TXT").write_text(_speakers_txt(plan, durations))
        summary: dict[str, dict[str, float]] = {}
        for u in plan.utterances:
            s = summary.setdefault(u.split, {"utterances": 0, "hours": 0.0, "speakers": 0})
            s["utterances"] += 1
            s["hours"] += durations[u.id] / 3600
        for split in summary:
            summary[split]["speakers"] = len({u.speaker for u in plan.utterances if u.split == split})
        (tmp / "synth.json").write_text(json.dumps(
            {"summary": summary, "voices": {str(k): asdict(v) for k, (v, _) in plan.speakers.items()}},
            indent=2))
    return summary
