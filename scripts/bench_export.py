#!/usr/bin/env python
"""A `fedasr export` in sherpa-onnx, fp32 against `--int8` (each quantisation scheme),
measured in one run.

For a checkpoint (a stateless-predictor model, e.g. the ci recipe's dense run): the export's
size on disk, WER through sherpa-onnx (its own kaldi-native-fbank front end from the
waveform, greedy search) for the fp32 model and the int8 models of every ``--scheme``
beside `fedasr eval`'s greedy search (PyTorch, stored features; with 1 and 3 symbols a
frame; for a federation sharded when dev/test features were lilcom-compressed, also on
fbank recomputed from the waveform uncompressed), the share of utterances whose hypotheses equal eval's, and the real-time factor of
sherpa-onnx decoding with one thread: the models interleaved, the median of ``--repeat``
passes over the split's first ``--speed-utts`` utterances, one stream at a time.

``--emulate-cpu MODEL`` also decodes with sherpa-onnx under ``qemu-x86_64 -cpu MODEL``
(e.g. Haswell: AVX2, no AVX-512, no VNNI), where onnxruntime picks that CPU's int8
kernels: what a deployment on such a machine gets (WER only: emulated time means nothing).

    python scripts/bench_export.py CKPT [--federation FED_DIR] [--split test-clean] [--repeat 9] \
        [--scheme u8u8 --scheme u8s8-7bit --scheme u8s8] [--emulate-cpu Haswell]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def recognizer(d: Path, suffix: str):
    import sherpa_onnx

    return sherpa_onnx.OfflineRecognizer.from_transducer(
        encoder=str(d / f"encoder{suffix}.onnx"), decoder=str(d / f"decoder{suffix}.onnx"),
        joiner=str(d / f"joiner{suffix}.onnx"), tokens=str(d / "tokens.txt"), num_threads=1, feature_dim=80,
        decoding_method="greedy_search")


_EMULATED = """
import json, sys, numpy as np, sherpa_onnx
d, suffix, waves = sys.argv[1], sys.argv[2], np.load(sys.argv[3], allow_pickle=True)
rec = sherpa_onnx.OfflineRecognizer.from_transducer(
    encoder=f"{d}/encoder{suffix}.onnx", decoder=f"{d}/decoder{suffix}.onnx", joiner=f"{d}/joiner{suffix}.onnx",
    tokens=f"{d}/tokens.txt", num_threads=1, feature_dim=80, decoding_method="greedy_search")
out = []
for w in waves:
    s = rec.create_stream(); s.accept_waveform(16000, w); rec.decode_stream(s); out.append(" ".join(s.result.text.split()))
print(json.dumps(out))
"""


def decode_emulated(cpu: str, d: Path, suffix: str, waves: list, tmp: Path) -> list[str]:
    """sherpa-onnx decoding under ``qemu-x86_64 -cpu CPU`` (its onnxruntime sees that CPU)."""
    import json
    import subprocess
    import sys

    import numpy as np

    arr = np.empty(len(waves), dtype=object)
    arr[:] = waves
    np.save(tmp / "waves.npy", arr, allow_pickle=True)
    r = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, "-c", _EMULATED, str(d), suffix,
                        str(tmp / "waves.npy")], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"emulated decoding failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def decode(rec, waves: list) -> list[str]:
    out = []
    for w in waves:
        s = rec.create_stream()
        s.accept_waveform(16000, w)
        rec.decode_stream(s)
        out.append(" ".join(s.result.text.split()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--federation", default=None)
    ap.add_argument("--split", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--speed-utts", type=int, default=30)
    ap.add_argument("--scheme", action="append", default=None, help="int8 scheme(s) [default: all]")
    ap.add_argument("--emulate-cpu", default=None, help="also decode under qemu-x86_64 -cpu MODEL (e.g. Haswell)")
    args = ap.parse_args()

    import torch

    from fedasr.checkpoint import load_checkpoint
    from lhotse import CutSet

    from fedasr.data.federation import Federation
    from fedasr.data.features import STORAGE, compute_features
    from fedasr.evaluate import decode_cuts, score
    from fedasr.commands.export import export_checkpoint
    from fedasr.export import INT8_SCHEMES

    torch.set_num_threads(1)
    model, tok, ckpt = load_checkpoint(args.checkpoint)
    fed = Federation(args.federation or ckpt["config"]["federation"])
    schemes = args.scheme or list(INT8_SCHEMES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs, recs, suffix = {}, {}, {}
        for scheme in schemes:
            d = dirs[scheme] = tmp / scheme
            meta = export_checkpoint(args.checkpoint, d, args.federation, int8=True, int8_scheme=scheme)
            assert meta["sherpa_onnx"], "sherpa-onnx needs a stateless predictor"
            if not recs:
                recs["fp32"], dirs["fp32"], suffix["fp32"] = recognizer(d, ""), d, ""
            recs[f"int8 {scheme}"], dirs[f"int8 {scheme}"], suffix[f"int8 {scheme}"] = recognizer(d, ".int8"), d, ".int8"
        for name, d in dirs.items():
            if name in recs:
                size = sum((d / f"{n}{suffix[name]}.onnx").stat().st_size for n in ("encoder", "decoder", "joiner"))
                print(f"export size, {name}: {size / 1e6:.2f} MB")
        print(f"{meta['parameters']:,} parameters")
        for split in args.split or ["test-clean", "test-other"]:
            cuts = fed.split_cuts(split)
            refs = [c.supervisions[0].text for c in cuts]
            waves = [c.load_audio()[0] for c in cuts]
            row = {}
            for m in (1, 3):
                dec, _ = decode_cuts(model, cuts, tok, fed.cmvn, max_symbols_per_frame=m)
                row[f"eval m{m}"] = [" ".join(x.hyp.split()) for x in dec]  # words (sherpa-onnx strips spaces)
                refs = [x.ref for x in dec]
            if cuts[0].features.storage_type != STORAGE["eval"].name:
                # a federation sharded when dev/test were lilcom-compressed (up to 0.016 off the
                # front end's fbank): the same search on the features `fedasr shard` stores now
                raw = compute_features(CutSet.from_cuts([c.drop_features() for c in cuts]), tmp, f"fbank-{split}",
                                       use="eval").with_features_path_prefix(str(tmp.resolve()))
                dec, _ = decode_cuts(model, raw, tok, fed.cmvn, max_symbols_per_frame=1)
                row["eval m1, uncompressed fbank"] = [" ".join(x.hyp.split()) for x in dec]
            for name, rec in recs.items():
                row[f"sherpa {name}"] = decode(rec, waves)
                if args.emulate_cpu:
                    row[f"sherpa {name} @{args.emulate_cpu}"] = decode_emulated(args.emulate_cpu, dirs[name],
                                                                               suffix[name], waves, tmp)
            print(f"\n{split} ({len(cuts)} utts): WER, and utterances identical to `fedasr eval "
                  f"--max-symbols-per-frame 1`")
            for name, hyps in row.items():
                same = sum(a == b for a, b in zip(hyps, row["eval m1"]))
                print(f"  {name:<30} WER {100 * score(refs, hyps)['wer']:6.2f}%   identical {same}/{len(cuts)}")
        # speed: interleaved passes, one thread, one stream at a time
        cuts = list(fed.split_cuts((args.split or ["test-clean"])[0]))[: args.speed_utts]
        waves = [c.load_audio()[0] for c in cuts]
        audio = sum(c.duration for c in cuts)
        times = {k: [] for k in recs}
        for _ in range(args.repeat):
            for name, rec in recs.items():
                t0 = time.perf_counter()
                decode(rec, waves)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) / audio for k, v in times.items()}
        print(f"\nsherpa-onnx RTF, 1 thread, {len(cuts)} utts ({audio:.0f} s), median of {args.repeat}: " +
              ", ".join(f"{k} {v:.4f} ({med['fp32'] / v:.2f}x fp32's speed)" for k, v in med.items()))


if __name__ == "__main__":
    main()
