"""The feature pipeline the model consumes.

- 80-dim log-mel filterbanks (lhotse's Kaldi-compatible :class:`lhotse.Fbank`, 25 ms
  window, 10 ms shift), computed once by ``fedasr shard`` and stored lilcom-compressed
  in ``FED_DIR/feats``; manifests keep paths relative to the federation directory.
  Every option is spelled out (:data:`FBANK_OPTIONS`) and equals what sherpa-onnx's
  ``OfflineRecognizer`` computes from a waveform with kaldi-native-fbank (its
  ``FeatureExtractorConfig`` defaults: samples in [-1, 1], no dither, no edge snipping,
  povey window, DC removal, pre-emphasis 0.97, 20 Hz .. Nyquist - 400 Hz, log power
  mel energies floored at float epsilon), so an exported model sees at deployment the
  features it was trained on (tests/test_export.py measures the difference).
- Global mean/variance normalisation with statistics from the training clients.
- SpecAugment (frequency and time masks) for training, seeded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from lhotse import CutSet, Fbank, FbankConfig, LilcomChunkyWriter

from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_write_text

NUM_MEL_BINS = 80
FRAME_SHIFT = 0.01


# The front end, option by option (lhotse FbankConfig names; sherpa-onnx/kaldi-native-fbank
# use the same defaults: frame_opts.* and mel_opts.*, normalize_samples=True).
FBANK_OPTIONS = dict(sampling_rate=16000, frame_length=0.025, frame_shift=FRAME_SHIFT, dither=0.0, snip_edges=False,
                     window_type="povey", remove_dc_offset=True, preemph_coeff=0.97, round_to_power_of_two=True,
                     low_freq=20.0, high_freq=-400.0, num_filters=NUM_MEL_BINS, use_energy=False,
                     use_fft_mag=False)


def fbank_extractor() -> Fbank:
    return Fbank(FbankConfig(**FBANK_OPTIONS))


def compute_features(cuts: CutSet, fed_dir: Path, name: str, jobs: int = 1) -> CutSet:
    """Compute and store fbank for ``cuts`` under ``fed_dir/feats/name``.

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
        with_feats = cuts.compute_and_store_features(
            extractor=fbank_extractor(),
            storage_path=feats_dir / name,
            num_jobs=num_jobs,
            storage_type=LilcomChunkyWriter,
            progress_bar=False,
        )
    except Exception as e:  # name the audio file when decoding fails midway
        raise FedasrError(f"feature extraction failed for split/client {name!r}: {str(e).splitlines()[0][:200]}") from None
    finally:
        torch.set_num_threads(threads)
    root = str(Path(fed_dir).resolve())

    def relative(cut):
        p = Path(cut.features.storage_path)
        cut.features.storage_path = str(p.resolve().relative_to(root))
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
