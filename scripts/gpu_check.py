#!/usr/bin/env python
"""Check the CUDA path in a few minutes on one GPU, and the same checks CPU-vs-CPU in seconds.

    python scripts/gpu_check.py --federation FED                 # on a GPU machine (cuda)
    python scripts/gpu_check.py --device cpu --federation FED    # anywhere: small shapes, seconds

In order (each a row of the table and an entry of the JSON file):

 1. device      CUDA visible and chosen (``device: auto`` picks it; name, memory, torch/CUDA)
 2. losses      each RNN-T loss (full, simple, pruned) on the device vs the CPU on the same
                inputs, forward and gradient, at a small shape and at B16 T300 U100 V256
 3. model loss  the model's training loss and gradients, device vs CPU, TF32 off
 4. masked step one train_step with pruning masks: the pruned weights stay exactly zero
 5. throughput  steps/s, peak memory and host syncs per step, fp32 and bf16, at the
                LibriSpeech recipe's batch (200 s of audio, its model and loss)
 6. federated   one embedded round with Federated Pruning and one with FedTiny on the
                device, a checkpoint, a resumed round, the checkpoint reloaded on the CPU
 7. decoding    greedy and beam search on the device give the CPU's hypotheses
 8. flower      two Flower SuperNode slots on two devices (where there are two)

With ``--device cpu`` the "device" side is the CPU too, with the device paths forced where
they differ (the losses' whole-batch passes; host syncs counted by fedasr.hostsync's
emulation), at small shapes; the test suite runs it. Without ``--federation`` a small
synthetic federation is built in ``--out`` (needs espeak-ng or flite). Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import torch  # noqa: E402

from benchlib import AnonPeak, synthetic_batch  # noqa: E402

RECIPE = REPO / "recipes/librispeech100/federated_pruning.yaml"
FAST = ["fl.clients_per_round=2", "fl.local_steps=2", "train.max_duration=20", "eval.dev_max_utterances=4",
        "train.warmup_steps=5", "eval.every=0",
        "model.overrides={num_layers: 1, d_model: 64, ffn_dim: 128, pred_hidden: 64, pred_embed_dim: 64, "
        "joint_dim: 64, simple_head: true}", "train.simple_loss_weight=0.5", "train.ctc_weight=0.3"]


class Check:
    def __init__(self, name: str):
        self.name, self.ok, self.detail, self.data, self.seconds = name, None, "", {}, 0.0

    def result(self, ok: bool | None, detail: str, **data) -> "Check":
        self.ok, self.detail = ok, detail
        self.data.update(data)
        return self


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ---------------------------------------------------------------------------- the checks
def check_device(dev: torch.device) -> Check:
    from fedasr.config import resolve_device

    c = Check("device")
    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if dev.type == "cpu":
        return c.result(True, f"CPU-vs-CPU run (CUDA available: {info['cuda_available']})", **info)
    auto = resolve_device("auto")
    props = torch.cuda.get_device_properties(dev)
    info.update(name=props.name, memory_gib=props.total_memory / 2**30, auto=str(auto),
                capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    return c.result(auto.type == "cuda", f"{props.name}, {info['memory_gib']:.0f} GiB, CUDA {torch.version.cuda}; "
                                         f"device: auto -> {auto}", **info)


def check_losses(dev: torch.device, quick: bool) -> Check:
    from fedasr.model import loss as L

    c = Check("losses")
    shapes = [(4, 30, 8, 20)] + ([] if quick else [(16, 300, 100, 256)])
    worst, rows = 0.0, {}
    for B, T, U, V in shapes:
        g = torch.Generator().manual_seed(B * T)
        t_lens = torch.randint(T // 2, T + 1, (B,), generator=g)
        u_lens = torch.randint(U // 2, U + 1, (B,), generator=g)
        t_lens[0], u_lens[0] = T, U
        y = torch.randint(1, V, (B, U), generator=g)
        inputs = {"full": [torch.randn(B, T, U + 1, V, generator=g)],
                  "simple": [torch.randn(B, T, V, generator=g), torch.randn(B, U + 1, V, generator=g)],
                  "pruned": [torch.randn(B, T, 5, V, generator=g)]}
        occ = torch.rand(B, U + 1, T, generator=g)
        ranges = L.prune_ranges(occ, t_lens, u_lens, 5)
        fns = {"full": lambda x: L.rnnt_loss(x, y, t_lens, u_lens, reduction="none"),
               "simple": lambda a, m: L.rnnt_loss_simple(a, m, y, t_lens, u_lens, reduction="none"),
               "pruned": lambda x: L.rnnt_loss_pruned(x, y, ranges.to(x.device), t_lens, u_lens, reduction="none")}
        for name, fn in fns.items():
            out = {}
            for side, where in (("cpu", torch.device("cpu")), ("device", dev)):
                L.BATCH_UTTERANCES = True if (side == "device" and dev.type == "cpu") else None
                xs = [x.to(where).requires_grad_(True) for x in inputs[name]]
                loss = fn(*xs)
                loss.sum().backward()
                out[side] = (loss, [x.grad for x in xs])
            L.BATCH_UTTERANCES = None
            d = max([rel_diff(out["device"][0], out["cpu"][0])] +
                    [rel_diff(a, b) for a, b in zip(out["device"][1], out["cpu"][1])])
            rows[f"{name} B{B} T{T} U{U} V{V}"] = d
            worst = max(worst, d)
    return c.result(worst < 1e-4, f"worst relative difference {worst:.1e} (losses and gradients, "
                                  f"{len(rows)} cases)", relative_difference=rows)


def _model(preset: str, overrides: dict, seed: int = 0):
    from fedasr.model.transducer import ModelConfig, Transducer

    torch.manual_seed(seed)
    return Transducer(ModelConfig.preset(preset, vocab_size=256, **{**overrides, "dropout": 0.0}))


def check_model_loss(dev: torch.device, quick: bool, recipe) -> Check:
    from fedasr.trainer import transducer_loss

    c = Check("model loss")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = _model("tiny" if quick else recipe.model.preset, recipe.model.overrides).train()
    batch = synthetic_batch(4, 200 if quick else 600, 20 if quick else 50, 256, seed=1)
    res = {}
    for side, where in (("cpu", torch.device("cpu")), ("device", dev)):
        m = copy.deepcopy(model).to(where)
        loss, parts = transducer_loss(m, batch, 0.3, 0.5, loss="pruned", prune_range=5)
        loss.backward()
        res[side] = (parts, {n: p.grad.cpu() for n, p in m.named_parameters() if p.grad is not None})
    d_loss = max(abs(res["device"][0][k] - v) / abs(v) for k, v in res["cpu"][0].items())
    d_grad = max(rel_diff(res["device"][1][n], g) for n, g in res["cpu"][1].items())
    return c.result(d_loss < 1e-4 and d_grad < 1e-3, f"loss parts within {d_loss:.1e}, gradients within "
                    f"{d_grad:.1e} (relative, TF32 off)", loss=res["cpu"][0], loss_diff=d_loss, grad_diff=d_grad)


def check_masked_step(dev: torch.device) -> Check:
    from fedasr.config import load_config
    from fedasr.methods.base import ClientHooks
    from fedasr.prune.masks import prunable_names
    from fedasr.trainer import make_optimizer, train_step

    c = Check("masked step")
    model = _model("tiny", {}).to(dev).train()
    g = torch.Generator().manual_seed(0)
    names = set(prunable_names(model, ["encoder.layers.*", "joiner.*"]))
    masks = {n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters() if n in names}
    hooks = ClientHooks(masks)
    cfg = load_config(None, []).train
    opt = make_optimizer(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n].to(p.device, p.dtype))
    _, stats = train_step(model, opt, synthetic_batch(3, 150, 12, 256, seed=2), cfg, 0,
                          after_backward=hooks.after_backward, after_step=hooks.after_step)
    params = dict(model.named_parameters())
    nonzero = sum(int((params[n].detach().cpu()[~m] != 0).sum()) for n, m in masks.items())
    moved = sum(int((params[n].detach().cpu()[m] != 0).sum()) for n, m in masks.items())
    on_dev = all(m.device == params[n].device for n, m in hooks.device_masks(model).items())
    return c.result(nonzero == 0 and moved > 0 and on_dev and math.isfinite(stats["loss"]),
                    f"{len(masks)} masked tensors: {nonzero} pruned weights nonzero after the step, masks on "
                    f"{dev.type}: {on_dev}", pruned_nonzero=nonzero, loss=stats["loss"])


def _syncs_per_step(model, opt, batch, cfg, dev: torch.device) -> float:
    """Host syncs of one training step: torch's sync debug mode on CUDA, the emulation on the CPU."""
    from fedasr.trainer import train_step

    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_step(model, opt, batch, cfg, 1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return float(sum("synchroniz" in str(w.message) for w in caught))
    from fedasr.hostsync import HostSyncCounter

    with HostSyncCounter() as counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (autocast for the emulated CUDA device is off: nothing to warn about)
        counter.on_device(model.parameters(), model.buffers())
        counter.counting = False
        train_step(model, opt, batch, cfg, 1)
        counter.counting = True
        train_step(model, opt, batch, cfg, 2)
    return float(counter.syncs)


def check_throughput(dev: torch.device, quick: bool, recipe) -> Check:
    from fedasr.trainer import make_optimizer, train_step

    c = Check("throughput")
    # the recipe's batch: max_duration seconds of audio, 100 frames a second; utterances of ~12.5 s
    B, T, U = (2, 200, 20) if quick else (max(1, int(recipe.train.max_duration / 12.5)), 1250, 60)
    steps = 2 if quick else 10
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = copy.deepcopy(recipe.train)
        cfg.precision = precision
        model = _model("tiny" if quick else recipe.model.preset, recipe.model.overrides).to(dev).train()
        opt = make_optimizer(model, cfg)
        batches = [synthetic_batch(B, T, U, 256, seed=i) for i in range(3)]
        train_step(model, opt, batches[0], cfg, 0)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        with AnonPeak() as peak:
            t0 = time.perf_counter()
            for i in range(steps):
                train_step(model, opt, batches[i % 3], cfg, i + 1)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            elapsed = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else peak.peak_kb / 2**20
        out[precision] = {"steps_per_s": steps / elapsed, "peak_gib": mem,
                          "host_syncs_per_step": _syncs_per_step(model, opt, batches[1], cfg, dev)}
    detail = "; ".join(f"{p}: {v['steps_per_s']:.2f} steps/s, peak {v['peak_gib']:.2f} GiB"
                       f"{' (process RSS)' if dev.type == 'cpu' else ''}, {v['host_syncs_per_step']:g} host syncs/step"
                       for p, v in out.items())
    return c.result(all(v["host_syncs_per_step"] <= 2 for v in out.values()),
                    f"B{B} T{T} U{U} ({'tiny model' if quick else recipe.model.preset}): {detail}",
                    batch=[B, T, U], **out)


def check_federated(dev: torch.device, fed_dir: Path, work: Path) -> Check:
    from fedasr.checkpoint import build_model, read_checkpoint
    from fedasr.config import load_config
    from fedasr.data.federation import Federation
    from fedasr.fl.runner import Runner
    from fedasr.trainer import transducer_loss

    c = Check("federated")
    fed = Federation(fed_dir)
    methods = {"federated_pruning": ["pruning.method=federated_pruning", "pruning.target_sparsity=0.5"],
               "fedtiny": ["pruning.method=fedtiny", "pruning.target_sparsity=0.5",
                           "pruning.fedtiny={candidates: 2, start_round: 1, update_every: 1, end_round: 2, "
                           "phase_batches: 1}"]}
    summary = {}
    for name, sets in methods.items():
        cfg = load_config(None, FAST + sets + ["fl.rounds=2", f"device={dev}"])
        run = work / f"federated-{name}"
        r = Runner(run, fed, cfg)
        r.start(overwrite=True)
        r.cfg.fl.rounds = 1
        r.run_rounds()  # round 1 and its checkpoint
        resumed = Runner.resume(run)  # round 2 from the checkpoint
        rows = resumed.run_rounds()
        ckpt = read_checkpoint(resumed.run.latest())
        model = build_model(ckpt, resumed.run.latest())  # on the CPU
        zeros = all(bool((model.state_dict()[n][~m] == 0).all()) for n, m in ckpt["masks"].items())
        batch = next(iter(resumed.worker.dataset(fed.client_ids[0]).batches(20.0, shuffle=False)))
        with torch.no_grad():
            loss, _ = transducer_loss(model.eval(), batch)
        summary[name] = {"rounds": len(rows), "sparsity": rows[-1]["sparsity"], "dropped": len(rows[-1]["dropped"]),
                         "cpu_loss": float(loss), "masked_zero": zeros, "dev_wer": rows[-1].get("dev_wer")}
    ok = all(s["rounds"] == 2 and s["masked_zero"] and s["dropped"] == 0 and math.isfinite(s["cpu_loss"])
             and abs(s["sparsity"] - 0.5) < 0.05 for s in summary.values())
    return c.result(ok, "; ".join(f"{k}: 2 rounds (1 resumed), sparsity {v['sparsity']:.2f}, reloaded on the "
                                  f"CPU: loss {v['cpu_loss']:.1f}" for k, v in summary.items()), **summary)


def check_decoding(dev: torch.device) -> Check:
    from fedasr.model.decode import beam_search, greedy_search

    c = Check("decoding")
    model = _model("tiny", {"num_layers": 1}, seed=3).eval()
    with torch.no_grad():
        model.joiner.output.weight.mul_(3.0)
    g = torch.Generator().manual_seed(4)
    lens = torch.randint(5, 60, (8,), generator=g)
    enc = torch.randn(8, int(lens.max()), model.cfg.d_model, generator=g)
    got = {}
    for side, where in (("cpu", torch.device("cpu")), ("device", dev)):
        m = copy.deepcopy(model).to(where)
        e = enc.to(where)
        got[side] = (greedy_search(m, e, lens), beam_search(m, e, lens, beam=4))
    same = [sum(a == b for a, b in zip(got["cpu"][i], got["device"][i])) for i in (0, 1)]
    return c.result(same == [8, 8], f"greedy {same[0]}/8, beam 4 {same[1]}/8 utterances as on the CPU",
                    greedy_same=same[0], beam_same=same[1])


def check_flower(dev: torch.device, fed_dir: Path, work: Path, force: bool) -> Check:
    c = Check("flower")
    if dev.type == "cuda" and torch.cuda.device_count() < 2:
        return c.result(None, f"skipped: {torch.cuda.device_count()} CUDA device")
    if dev.type == "cpu" and not force:
        return c.result(None, "skipped on the CPU (--flower runs it with cpu,cpu)")
    devices = ["cuda:0", "cuda:1"] if dev.type == "cuda" else ["cpu", "cpu"]
    run = work / "flower"
    args = [sys.executable, "-m", "fedasr.cli", "train", "--federation", str(fed_dir), "--out", str(run),
            "--overwrite", "--engine", "flower", *[a for d in devices for a in ("--devices", d)], "--slots", "2"]
    for s in FAST + ["fl.rounds=1", f"device={dev}"]:
        args += ["--set", s]
    p = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    logs = {i: (run / "flower" / f"supernode-{i}.log") for i in range(2)}
    seen = {i: next((line.split("training on ", 1)[1].strip() for line in
                     (f.read_text(errors="replace").splitlines() if f.is_file() else []) if "training on " in line), "")
            for i, f in logs.items()}
    ok = p.returncode == 0 and all(seen.values())
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or [""]
    return c.result(ok, f"slots' workers: {seen}" + ("" if p.returncode == 0 else f"; failed: {tail[0][:200]}"),
                    workers=seen)


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (CPU-vs-CPU, small shapes)")
    ap.add_argument("--federation", type=Path, help="a federation directory [default: a small synthetic one]")
    ap.add_argument("--out", type=Path, default=Path("gpu_check"), help="work directory (runs, JSON)")
    ap.add_argument("--json", type=Path, help="the results [default: OUT/gpu_check.json]")
    ap.add_argument("--quick", action="store_true", help="small shapes on a GPU too")
    ap.add_argument("--flower", action="store_true", help="run the Flower check on the CPU too (cpu,cpu)")
    a = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from fedasr.config import load_config, resolve_device
    from fedasr.errors import FedasrError

    try:
        dev = resolve_device(a.device)
    except FedasrError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    quick = a.quick or dev.type == "cpu"
    a.out.mkdir(parents=True, exist_ok=True)
    recipe = load_config(RECIPE, [f"device={dev}"])
    fed_dir = a.federation
    if fed_dir is None:
        from check_equivalence import build_federation

        fed_dir = build_federation(a.out)
    checks = [("device", lambda: check_device(dev)), ("losses", lambda: check_losses(dev, quick)),
              ("model loss", lambda: check_model_loss(dev, quick, recipe)),
              ("masked step", lambda: check_masked_step(dev)),
              ("throughput", lambda: check_throughput(dev, quick, recipe)),
              ("federated", lambda: check_federated(dev, fed_dir, a.out)),
              ("decoding", lambda: check_decoding(dev)),
              ("flower", lambda: check_flower(dev, fed_dir, a.out, a.flower))]
    results = []
    for name, run in checks:
        t0 = time.perf_counter()
        try:
            c = run()
        except Exception as e:  # noqa: BLE001 - a failed check is a row, the others still run
            c = Check(name).result(False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        c.seconds = time.perf_counter() - t0
        results.append(c)
        if c.name == "device" and c.ok is False:
            break
    table = Table(title=f"gpu_check on {dev} ({'small shapes' if quick else 'full shapes'})")
    for col in ("check", "result", "s", "detail"):
        table.add_column(col, justify="right" if col == "s" else "left", overflow="fold")
    for c in results:
        mark = {True: "[green]pass", False: "[bold red]FAIL", None: "[yellow]skip"}[c.ok]
        table.add_row(c.name, mark, f"{c.seconds:.1f}", c.detail)
    Console(width=160).print(table)
    out = a.json or a.out / "gpu_check.json"
    out.write_text(json.dumps({"device": str(dev), "quick": quick, "measured_on": results[0].data,
                               "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "seconds": c.seconds,
                                           **c.data} for c in results]}, indent=1, default=str))
    print(f"wrote {out}")
    return 0 if all(c.ok is not False for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
