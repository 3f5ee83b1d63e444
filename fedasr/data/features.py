"""The feature pipeline the model consumes.

- 80-dim log-mel filterbanks (lhotse's Kaldi-compatible :class:`lhotse.Fbank`, 25 ms
  window, 10 ms shift), computed once by ``fedasr shard`` and stored in ``FED_DIR/feats``;
  manifests keep paths relative to the federation directory. Training data (clients',
  server's) is stored lilcom-compressed (steps of 1/32 in log energy: about a quarter of the
  disk); dev and test splits uncompressed (float32 ``.npy``), so the WER ``fedasr eval``
  reports is computed on the features a deployment computes from the waveform
  (:data:`STORAGE`; with lilcom the demo's dense model read 0.35 points off sherpa-onnx).
  Every option is spelled out (:data:`FBANK_OPTIONS`) and equals what sherpa-onnx's
  ``OfflineRecognizer`` computes from a waveform with kaldi-native-fbank (its
  ``FeatureExtractorConfig`` defaults: samples in [-1, 1], no dither, no edge snipping,
  povey window, DC removal, pre-emphasis 0.97, 20 Hz .. Nyquist - 400 Hz, log power
  mel energies floored at float epsilon), so an exported model sees at deployment the
  features it was trained on (tests/test_export.py measures the difference).
- The model hears 16 kHz mono. :class:`ModelFbank` takes any audio lhotse loads: several
  channels are averaged (downmix) and another sample rate is resampled to 16 kHz with
  lhotse's own resampler (:class:`lhotse.augmentation.resample.Resample`, torchaudio's
  windowed-sinc algorithm in plain torch, with a sharper filter than its default:
  :data:`RESAMPLER_ZERO_CROSSINGS`), so the features do not depend on whether torchaudio
  or scipy happen to be installed (lhotse's ``cut.resample`` needs one of them). The
  stored cuts then carry ``recording.resample(16000)``, so their metadata and
  ``load_audio()`` say 16 kHz too (that path resamples with lhotse's default filter).
- Global mean/variance normalisation with statistics from the training clients.
- SpecAugment (frequency and time masks) for training, seeded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter, NumpyFilesWriter
from lhotse.augmentation.resample import Resample
from lhotse.utils import fastcopy

from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_write_text

NUM_MEL_BINS = 80
FRAME_SHIFT = 0.01
SAMPLE_RATE = 16000


# The front end, option by option (lhotse FbankConfig names; sherpa-onnx/kaldi-native-fbank
# use the same defaults: frame_opts.* and mel_opts.*, normalize_samples=True).
FBANK_OPTIONS = dict(sampling_rate=SAMPLE_RATE, frame_length=0.025, frame_shift=FRAME_SHIFT, dither=0.0, snip_edges=False,
                     window_type="povey", remove_dc_offset=True, preemph_coeff=0.97, round_to_power_of_two=True,
                     low_freq=20.0, high_freq=-400.0, num_filters=NUM_MEL_BINS, use_energy=False,
                     use_fft_mag=False)


# lhotse's (and torchaudio's) default windowed sinc has 6 zero crossings a side: its transition
# band starts near 6.5 kHz, and 44.1 kHz audio resampled with it lost 0.7 (log) in the top mel
# bin against the same audio recorded at 16 kHz. 64 crossings keep the whole 20-7600 Hz band of
# the features (0.004 there; tests/test_sources.py), at no cost measurable beside the fbank.
RESAMPLER_ZERO_CROSSINGS = 64

# How ``fedasr shard`` stores features, by use: lhotse writer names (federation.yaml records them).
STORAGE = {"train": LilcomChunkyWriter, "eval": NumpyFilesWriter}


@functools.lru_cache(maxsize=8)
def _resampler(rate: int) -> Resample:
    return Resample(orig_freq=rate, new_freq=SAMPLE_RATE, lowpass_filter_width=RESAMPLER_ZERO_CROSSINGS)


def to_model_audio(samples, sampling_rate: int) -> np.ndarray:
    """``(channels, samples)`` (or 1-D) audio at any rate -> ``(1, samples)`` float32 at
    16 kHz: the mean of the channels, resampled."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.shape[0] > 1:
        x = x.mean(0, keepdim=True)
    if int(sampling_rate) != SAMPLE_RATE:
        x = _resampler(int(sampling_rate))(x)
    return x.numpy()


class ModelFbank(Fbank):
    """lhotse's Kaldi-compatible Fbank (:data:`FBANK_OPTIONS`) on :func:`to_model_audio`."""

    def extract(self, samples, sampling_rate: int) -> np.ndarray:
        return super().extract(to_model_audio(samples, sampling_rate), SAMPLE_RATE)

    def extract_from_samples_and_store(self, samples, storage, sampling_rate, offset=0, channel=None,
                                       augment_fn=None):
        # the features manifest then says 16 kHz, as the frames were computed
        return super().extract_from_samples_and_store(to_model_audio(samples, sampling_rate), storage, SAMPLE_RATE,
                                                      offset=offset, channel=channel, augment_fn=augment_fn)


def fbank_extractor() -> ModelFbank:
    return ModelFbank(FbankConfig(**FBANK_OPTIONS))


class _QuietAudioErrors(logging.Filter):
    """lhotse logs (several lines) each cut whose audio fails to load and drops it; fedasr
    reports the cut itself, in one line (:func:`compute_features`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Suppressed AudioLoadingError" not in str(record.msg)


@contextlib.contextmanager
def _quiet_audio_errors():
    root, quiet = logging.getLogger(), _QuietAudioErrors()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def compute_features(cuts: CutSet, fed_dir: Path, name: str, jobs: int = 1, use: str = "train") -> CutSet:
    """Compute and store fbank for ``cuts`` under ``fed_dir/feats/name``, in the storage
    :data:`STORAGE` gives ``use`` ("train": lilcom-compressed; "eval": exact float32).

    The returned cuts reference their features relative to ``fed_dir`` (see
    :func:`load_manifest`), so a federation directory can be moved or renamed.
    """
    feats_dir = Path(fed_dir) / "feats"
    feats_dir.mkdir(parents=True, exist_ok=True)
    num_jobs = max(1, jobs) if len(cuts) >= 64 else 1
    threads = torch.get_num_threads()
    if num_jobs > 1:
        torch.set_num_threads(1)  # lhotse: worker processes with several threads each can hang
    try:
        with _quiet_audio_errors():
            with_feats = cuts.compute_and_store_features(
                extractor=fbank_extractor(),
                storage_path=feats_dir / name,
                num_jobs=num_jobs,
                storage_type=STORAGE[use],
                progress_bar=False,
            ).to_eager()
    except Exception as e:  # name the audio file when decoding fails midway
        raise FedasrError(f"feature extraction failed for split/client {name!r}: {str(e).splitlines()[0][:200]}") from None
    finally:
        torch.set_num_threads(threads)
    lost = sorted(set(cuts.ids) - set(with_feats.ids))
    if lost:  # lhotse drops a cut whose audio fails to load (a file corrupt past its header)
        src = cuts[lost[0]].recording.sources[0].source if cuts[lost[0]].recording else "?"
        raise FedasrError(f"{src}: audio of utterance {lost[0]} could not be decoded while computing features "
                          f"for {name!r}" + (f" ({len(lost) - 1} more)" if len(lost) > 1 else ""))
    root = str(Path(fed_dir).resolve())

    def relative(cut):
        p = Path(cut.features.storage_path)
        cut.features.storage_path = str(p.resolve().relative_to(root))
        if cut.recording is not None and cut.recording.sampling_rate != SAMPLE_RATE:
            # metadata only: the features were computed from 16 kHz audio (ModelFbank)
            cut = fastcopy(cut, recording=cut.recording.resample(SAMPLE_RATE))
        return cut

    return with_feats.map(relative).to_eager()


def load_manifest(path: str | Path, fed_dir: str | Path) -> CutSet:
    """Load a client/dev/test manifest with feature paths resolved against ``fed_dir``."""
    path = Path(path)
    if not path.is_file():
        raise FedasrError(f"{path}: manifest does not exist")
    try:
        cuts = CutSet.from_file(path).to_eager()
    except Exception as e:
        raise FedasrError(f"{path}: not a readable lhotse CutSet ({str(e).splitlines()[0][:120]})") from None
    return cuts.with_features_path_prefix(str(Path(fed_dir).resolve()))


@dataclass
class GlobalCMVN:
    mean: list[float]
    std: list[float]
    frames: int

    @classmethod
    def from_cuts(cls, cuts: CutSet) -> "GlobalCMVN":
        total = np.zeros(NUM_MEL_BINS, np.float64)
        total_sq = np.zeros(NUM_MEL_BINS, np.float64)
        frames = 0
        for cut in cuts:
            f = cut.load_features().astype(np.float64)
            total += f.sum(0)
            total_sq += (f**2).sum(0)
            frames += f.shape[0]
        if frames == 0:
            raise FedasrError("training clients: no feature frames to compute normalisation statistics")
        mean = total / frames
        var = np.maximum(total_sq / frames - mean**2, 1e-8)
        return cls(mean.tolist(), np.sqrt(var).tolist(), frames)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "GlobalCMVN":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            stats = cls(list(d["mean"]), list(d["std"]), int(d["frames"]))
        except FileNotFoundError:
            raise FedasrError(f"{path}: normalisation statistics do not exist") from None
        except (ValueError, KeyError, TypeError) as e:
            raise FedasrError(f"{path}: bad normalisation statistics ({e})") from None
        if len(stats.mean) != NUM_MEL_BINS or len(stats.std) != NUM_MEL_BINS:
            raise FedasrError(f"{path}: expected {NUM_MEL_BINS}-dim statistics")
        return stats

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=feats.dtype)
        std = torch.tensor(self.std, dtype=feats.dtype)
        return (feats - mean) / std


@dataclass
class SpecAugment:
    """Frequency and time masking (Park et al., 2019) on normalised features.

    Time masks are sized relative to the utterance (``time_mask_ratio`` of its frames
    at most per mask), as in the adaptive SpecAugment used for LibriSpeech Conformers.
    Masked values are set to 0, the normalised mean.
    """

    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 4
    time_mask_ratio: float = 0.05

    def __call__(self, feats: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
        out = feats.clone()
        num_bins = out.shape[1]
        for _ in range(self.freq_masks):
            w = int(torch.randint(0, self.freq_width + 1, (1,), generator=generator))
            w = min(w, num_bins)
            f0 = int(torch.randint(0, num_bins - w + 1, (1,), generator=generator))
            out[:, f0:f0 + w] = 0.0
        max_w = int(math.floor(self.time_mask_ratio * length))
        if max_w > 0:
            for _ in range(self.time_masks):
                w = int(torch.randint(0, max_w + 1, (1,), generator=generator))
                t0 = int(torch.randint(0, max(1, length - w + 1), (1,), generator=generator))
                out[t0:t0 + w, :] = 0.0
        return out
