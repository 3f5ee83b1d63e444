#!/usr/bin/env python
"""CPU inference speed of compacted models, measured in one run: dense vs 50% and 80% unit
sparsity (Federated Pruning's ``unit`` pattern, then `fedasr compact`), ``small`` preset.

For each model: the real-time factor of batch-1 greedy decoding of 10 s utterances (1,000
feature frames) in PyTorch (the fastest of ``--repeat``) and in onnxruntime (`fedasr export`,
`OnnxTransducer`: the median of ``--repeat``, every model timed in each repeat, interleaved),
with one thread and with all cores; printed with the speed-up over dense, beside the
parameter and FLOP ratios.
Weights are random (speed depends on shapes only); the joiner's blank bias is raised so
that every model emits no token, i.e. the measured path is the encoder plus the greedy loop
over blank frames (PyTorch: one joiner call per frame; onnxruntime: `OnnxTransducer`
batches the joiner over 32 frames) — a trained model adds a predictor step and a joiner
call per emitted token (a few per second of speech), the same work for every model up to
the smaller predictor and joiner. The encoder alone is timed too.

    python scripts/bench_compact.py [--preset small] [--seconds 10] [--repeat 9] [--no-torch]
        [--what-if-subsampling 13]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from benchlib import best_time


def unit_pruned(model, sparsity: float):
    from fedasr.config import PruningSection
    from fedasr.methods.federated_pruning import FederatedPruning, FederatedPruningConfig
    from fedasr.model.compact import compact_with_masks
    from fedasr.prune.masks import apply_masks

    fp = FederatedPruning(FederatedPruningConfig(pattern="unit", allocation="uniform"),
                          PruningSection(method="federated_pruning", target_sparsity=sparsity), model, 1, 0)
    masks = fp.compute(1, dict(model.state_dict()), {})
    pruned = type(model)(model.cfg)
    pruned.load_state_dict(model.state_dict())
    apply_masks(pruned, masks)
    small, _, _ = compact_with_masks(pruned, masks)
    return small.eval()


class _Tok:
    """A stand-in tokenizer for the export (pieces are not needed to time decoding)."""

    def __init__(self, vocab: int):
        class SP:
            def id_to_piece(self, i):
                return f"t{i}"

            def get_piece_size(self):
                return vocab

        self.sp = SP()


class _Cmvn:
    mean = [0.0] * 80
    std = [1.0] * 80


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.8])
    ap.add_argument("--no-torch", action="store_true", help="onnxruntime columns only")
    ap.add_argument("--what-if-subsampling", type=int, default=None, metavar="C",
                    help="also time the most pruned model with C subsampling conv channels (random weights: what "
                         "pruning the subsampling front end as a unit family would buy; not a real compaction)")
    args = ap.parse_args()

    from fedasr.export import OnnxTransducer, export_model
    from fedasr.model.flops import count_flops
    from fedasr.model.decode import greedy_search
    from fedasr.model.transducer import ModelConfig, Transducer

    cores = os.cpu_count() or 1
    torch.manual_seed(0)
    dense = Transducer(ModelConfig.preset(args.preset, vocab_size=256, predictor="stateless")).eval()
    with torch.no_grad():
        dense.joiner.output.bias[dense.blank_id] += 50.0  # every model emits blanks only (see above)
    models = {"dense": dense}
    for s in args.sparsity:
        models[f"unit {s:.0%}"] = unit_pruned(dense, s)
    if args.what_if_subsampling:
        import dataclasses

        last = models[f"unit {args.sparsity[-1]:.0%}"]
        what_if = Transducer(dataclasses.replace(last.cfg, subsampling_channels=args.what_if_subsampling)).eval()
        with torch.no_grad():
            what_if.joiner.output.bias[what_if.blank_id] += 50.0
        models[f"+sub {args.what_if_subsampling}"] = what_if
    frames = int(args.seconds * 100)
    feats = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([frames])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        for name, m in models.items():
            fl = count_flops(m, args.seconds)
            row = {"model": name, "params": m.num_parameters(), "flops": fl["flops"]}
            with torch.no_grad():
                for threads in (1, cores):
                    if args.no_torch:
                        row[f"torch_enc_{threads}"] = row[f"torch_{threads}"] = float("nan")
                        continue
                    torch.set_num_threads(threads)
                    enc_t = best_time(args.repeat, lambda: m.encode(feats, lens))

                    def greedy():
                        enc, el = m.encode(feats, lens)
                        return greedy_search(m, enc, el)

                    row[f"torch_enc_{threads}"] = enc_t / args.seconds
                    row[f"torch_{threads}"] = best_time(args.repeat, greedy) / args.seconds
            d = os.path.join(tmp, name.replace(" ", "_").replace("%", ""))
            export_model(m, _Tok(256), _Cmvn(), d)
            onnx[name] = {t: OnnxTransducer(d, threads=t) for t in (1, cores)}
            rows.append(row)
            print(f"measured {name} (torch), exported", flush=True)
        # onnxruntime: every model in each repeat (interleaved), the median of the repeats
        x = feats.numpy()
        for threads in (1, cores):
            times = {name: {"enc": [], "all": []} for name in models}
            for _ in range(args.repeat):
                for name in models:
                    o = onnx[name][threads]
                    t0 = time.perf_counter()
                    enc, el = o.encode(x, np.array([frames]))
                    t1 = time.perf_counter()
                    o.greedy(enc[0, : int(el[0])])
                    t2 = time.perf_counter()
                    times[name]["enc"].append(t1 - t0)
                    times[name]["all"].append(t2 - t0)
            for row in rows:
                t = times[row["model"]]
                row[f"ort_enc_{threads}"] = statistics.median(t["enc"]) / args.seconds
                row[f"ort_{threads}"] = statistics.median(t["all"]) / args.seconds
    base = rows[0]
    cols = [("torch", 1), ("torch", cores), ("ort", 1), ("ort", cores)]
    print(f"\n{args.preset} preset, batch-1 greedy decoding of {args.seconds:g} s; RTF (speed-up vs dense)")
    print(f"{'model':<10} {'params':>11} {'x':>6} {'FLOPs x':>8} " + " ".join(
        f"{f'{b} {t}t':>17}" for b, t in cols) + f" {'ort enc 1t':>17}")
    for r in rows:
        cells = " ".join(("-" if r[f"{b}_{t}"] != r[f"{b}_{t}"] else  # nan: not measured (--no-torch)
                          f"{r[f'{b}_{t}']:.4f} ({base[f'{b}_{t}'] / r[f'{b}_{t}']:.2f}x)").rjust(17) for b, t in cols)
        enc = f"{r['ort_enc_1']:.4f} ({base['ort_enc_1'] / r['ort_enc_1']:.2f}x)".rjust(17)
        print(f"{r['model']:<10} {r['params']:>11,} {r['params'] / base['params']:6.3f} "
              f"{r['flops'] / base['flops']:8.3f} {cells} {enc}")


if __name__ == "__main__":
    main()
