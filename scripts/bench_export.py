#!/usr/bin/env python
"""A `fedasr export` in sherpa-onnx, fp32 against `--int8`, measured in one run.

For a checkpoint (a stateless-predictor model, e.g. the ci recipe's dense run): the export's
size on disk, WER through sherpa-onnx (its own kaldi-native-fbank front end from the
waveform, greedy search) for the fp32 and int8 models beside `fedasr eval`'s greedy search
(PyTorch, stored features; with 1 and 3 symbols a frame), the share of utterances whose
hypotheses equal eval's, and the real-time factor of sherpa-onnx decoding with one thread:
fp32 and int8 interleaved, the median of ``--repeat`` passes over the split's first
``--speed-utts`` utterances, one stream at a time.

    python scripts/bench_export.py CKPT [--federation FED_DIR] [--split test-clean] [--repeat 9]
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
    args = ap.parse_args()

    import torch

    from fedasr.checkpoint import load_checkpoint
    from fedasr.data.federation import Federation
    from fedasr.evaluate import decode_cuts, score
    from fedasr.commands.export import export_checkpoint

    torch.set_num_threads(1)
    model, tok, ckpt = load_checkpoint(args.checkpoint)
    fed = Federation(args.federation or ckpt["config"]["federation"])
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        meta = export_checkpoint(args.checkpoint, d, args.federation, int8=True)
        assert meta["sherpa_onnx"], "sherpa-onnx needs a stateless predictor"
        size = {s: sum((d / f"{n}{s}.onnx").stat().st_size for n in ("encoder", "decoder", "joiner"))
                for s in ("", ".int8")}
        recs = {"fp32": recognizer(d, ""), "int8": recognizer(d, ".int8")}
        print(f"export size: fp32 {size[''] / 1e6:.2f} MB, int8 {size['.int8'] / 1e6:.2f} MB "
              f"({size[''] / size['.int8']:.2f}x smaller); {meta['parameters']:,} parameters")
        for split in args.split or ["test-clean", "test-other"]:
            cuts = fed.split_cuts(split)
            refs = [c.supervisions[0].text for c in cuts]
            waves = [c.load_audio()[0] for c in cuts]
            row = {}
            for m in (1, 3):
                dec, _ = decode_cuts(model, cuts, tok, fed.cmvn, max_symbols_per_frame=m)
                row[f"eval m{m}"] = [" ".join(x.hyp.split()) for x in dec]  # words (sherpa-onnx strips spaces)
                refs = [x.ref for x in dec]
            for name, rec in recs.items():
                row[f"sherpa {name}"] = decode(rec, waves)
            print(f"\n{split} ({len(cuts)} utts): WER, and utterances identical to `fedasr eval "
                  f"--max-symbols-per-frame 1`")
            for name, hyps in row.items():
                same = sum(a == b for a, b in zip(hyps, row["eval m1"]))
                print(f"  {name:<12} WER {100 * score(refs, hyps)['wer']:6.2f}%   identical {same}/{len(cuts)}")
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
        print(f"\nsherpa-onnx RTF, 1 thread, {len(cuts)} utts ({audio:.0f} s), median of {args.repeat}: "
              f"fp32 {med['fp32']:.4f}, int8 {med['int8']:.4f} ({med['fp32'] / med['int8']:.2f}x faster)")


if __name__ == "__main__":
    main()
