"""The GPU path, checked on the CPU: device choice, device faults that stop a run, host
syncs of the training step, bf16, the prefetching loader (no GPU on the build machines:
everything here runs on the CPU, with fakes where a CUDA failure is needed)."""

import pytest
import torch

from conftest import FAST
from fedasr.config import load_config, resolve_device
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.fl.client import train_client
from fedasr.fl.round import DeviceFault, LocalTransport, device_fault_text, fault_reason
from fedasr.fl.runner import Runner
from fedasr.rundir import RunDir

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA device")


@no_cuda
def test_auto_warns_in_one_line_when_it_picks_the_cpu_and_cuda_is_an_error(capfd):
    assert resolve_device("auto") == torch.device("cpu") and capfd.readouterr().err == ""
    assert resolve_device("auto", warn=True) == torch.device("cpu")
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "training on the CPU" in err
    with pytest.raises(FedasrError, match="device: cuda:1 requested but no CUDA device is available"):
        resolve_device("cuda:1")
    assert load_config("recipes/librispeech100/federated_pruning.yaml").device == "cuda"
    assert load_config("recipes/librispeech/federated_pruning.yaml").device == "cuda"


class _Raising:
    def __init__(self, exc):
        self.exc, self.calls = exc, 0

    def handle(self, header, payload):
        self.calls += 1
        raise self.exc


def test_device_faults_stop_and_client_faults_drop():
    """An ordinary error drops the client; out of memory and CUDA errors (a device-side
    assert: AcceleratorError on torch >= 2.8, else a RuntimeError with CUDA's text) stop the
    round at that client, in the embedded engine and from a remote client's reason."""
    headers = {"a": b"", "b": b""}
    w = _Raising(RuntimeError("client crashed"))
    assert LocalTransport(w).exchange(1, "train", ["a", "b"], b"", headers) == {
        "a": (None, "RuntimeError: client crashed"), "b": (None, "RuntimeError: client crashed")}
    faults = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ...")]
    if hasattr(torch, "AcceleratorError"):
        faults.append(torch.AcceleratorError("CUDA error: device-side assert triggered"))
    for exc in faults:
        w = _Raising(exc)
        with pytest.raises(DeviceFault) as ei:
            LocalTransport(w).exchange(1, "train", ["a", "b"], b"", headers)
        assert w.calls == 1 and ei.value.client == "a" and ei.value.reason.startswith("device fault: ")
        assert "\n" not in ei.value.reason and device_fault_text(fault_reason(exc))
    # a Flower client's reason (a plain flower-supernode: the exception's class and text)
    assert device_fault_text("FlowerError 300: <class 'torch.OutOfMemoryError'>:<'CUDA out of memory.'>")
    assert not device_fault_text("FlowerError 300: <class 'ValueError'>:<'bad shape'>")


def test_out_of_memory_stops_the_run_naming_the_last_checkpoint(federation, tmp_path, capfd):
    """Round 1: one client raises an ordinary RuntimeError and is dropped, the round goes on.
    Round 2: the first client runs out of memory: the run stops there with one line naming
    the last good checkpoint, and no further client trains."""
    calls = []

    def faulty(name, model, state, data, cfg, **kw):
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("client crashed")
        if len(calls) == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
        return train_client(name, model, state, data, cfg, **kw)

    r = Runner(tmp_path / "run", Federation(federation), load_config(None, FAST + ["fl.rounds=2"]), client_fn=faulty)
    r.start()
    with pytest.raises(FedasrError) as ei:
        r.run_rounds()
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"round 2: {calls[2]}: device fault: OutOfMemoryError: CUDA out of memory")
    assert msg.endswith(str(tmp_path / "run" / "checkpoints" / "round_0001.pt"))
    assert len(calls) == 3 and r.history[0]["dropped"] == [{"client": calls[0], "reason": "RuntimeError: client crashed"}]
    assert RunDir(tmp_path / "run").latest().name == "round_0001.pt"
    if not torch.cuda.is_available():  # auto on this machine: the CPU, said once and recorded
        assert RunDir(tmp_path / "run").read_config()["device_resolved"] == "cpu"
        assert capfd.readouterr().err.count("device: auto found no CUDA device") == 1


# --------------------------------------------------------------------------- host syncs


def test_the_counter_sees_what_makes_the_host_wait():
    """A control for the counter: reads of device values, boolean indexing and blocking
    copies count; non-blocking copies and host tensors do not."""
    from fedasr.hostsync import HostSyncCounter

    w = torch.randn(4, 3)
    host = torch.tensor([1, 2, 3])
    with HostSyncCounter() as c:
        c.on_device([w])
        assert w.device.type == "cuda" and host.device.type == "cpu"
        x = w * 2
        float(x.sum())  # 1
        bool((x > 0).any())  # 2
        x[x > 0]  # 3: boolean indexing
        x.tolist()  # 4
        host.tolist(), int(host.max())  # host values: free
        d = host.to(w.device)  # 5: a blocking copy to the device
        e = host.to(w.device, non_blocking=True)  # a copy, no wait
        assert c.is_device(d) and c.is_device(e) and not c.is_device(host)
        torch.arange(3, device=x.device) + 1  # made on the device: free
    assert c.syncs == 5 and c.copies_to_device == 2
    assert c.kinds == {"item/int/float/bool": 2, "boolean indexing": 1, "tolist": 1, "blocking copy to the device": 1}
    assert w.device.type == "cpu"  # the emulation ends with the block


@pytest.mark.parametrize("loss", ["full", "pruned"])
def test_a_training_step_waits_for_the_device_once(loss):
    """One training step of a masked client (CTC, simple and RNN-T losses, BatchNorm with
    padding) reads the device once (its loss parts and gradient norm, together) and copies
    no mask to the device: the masks are moved once, at the first step."""
    from conftest import tiny_batch, tiny_model
    from fedasr.hostsync import HostSyncCounter
    from fedasr.methods.base import ClientHooks
    from fedasr.prune.masks import prunable_names
    from fedasr.trainer import make_optimizer, train_step

    model = tiny_model(0, simple_head=True, ctc_head=True).train()
    cfg = load_config(None, ["train.ctc_weight=0.3", "train.simple_loss_weight=0.5", f"train.loss={loss}",
                             "train.prune_range=2"]).train
    names = prunable_names(model, ["*"])
    g = torch.Generator().manual_seed(0)
    hooks = ClientHooks({n: torch.rand(p.shape, generator=g) > 0.5 for n, p in model.named_parameters() if n in names})
    opt = make_optimizer(model, cfg)
    batches = [tiny_batch([40, 31, 22], [5, 3, 4], seed=i) for i in range(3)]
    kw = dict(after_backward=hooks.after_backward, after_step=hooks.after_step)
    with HostSyncCounter() as c:
        c.on_device(model.parameters(), model.buffers())
        c.counting = False
        train_step(model, opt, batches[0], cfg, 0, **kw)
        c.counting = True
        for i in (1, 2):
            _, stats = train_step(model, opt, batches[i], cfg, i, **kw)
    assert c.kinds == {"tolist": 2}, c.where  # one read a step
    assert c.copies_to_device / 2 <= 13 < len(hooks.masks)  # the batch and lengths, not one per mask
    assert set(stats) == {"rnnt", "ctc", "simple", "loss"} and all(isinstance(v, float) for v in stats.values())
    params = dict(model.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in hooks.masks.items())


# --------------------------------------------------------------------------- bf16, prefetching, caching


@pytest.mark.parametrize("loss", ["full", "pruned"])
def test_a_bf16_step_runs_on_the_cpu_close_to_fp32(loss):
    """train.precision: bf16 (autocast on the CPU here): a finite step whose loss parts are
    within a few percent of fp32's on the same weights and batch, with float32 gradients."""
    from conftest import tiny_batch, tiny_model
    from fedasr.trainer import make_optimizer, train_step

    batch = tiny_batch([60, 47, 38], [6, 4, 5], seed=3)
    stats = {}
    for precision in ("fp32", "bf16"):
        model = tiny_model(0, simple_head=True, predictor="stateless").train()
        cfg = load_config(None, ["train.ctc_weight=0.3", "train.simple_loss_weight=0.5", f"train.loss={loss}",
                                 "train.prune_range=3", f"train.precision={precision}"]).train
        _, stats[precision] = train_step(model, make_optimizer(model, cfg), batch, cfg, 0)
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for k, v in stats["fp32"].items():
        assert stats["bf16"][k] == pytest.approx(v, rel=0.03), k
    assert stats["bf16"] != stats["fp32"]  # it did compute in bfloat16
    with pytest.raises(FedasrError, match="train.precision: unknown 'fp16'"):
        load_config(None, ["train.precision=fp16"])


def test_prefetch_keeps_the_order_raises_in_place_and_stops_its_thread():
    import threading

    from fedasr.data.batching import prefetch

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"item {i} is bad")
            yield i

    assert list(prefetch(items(50), 3)) == list(range(50)) == list(prefetch(items(50), 0))
    assert list(prefetch(items(5), 2, pin=lambda x: -x)) == [0, -1, -2, -3, -4]
    got = []
    with pytest.raises(ValueError, match="item 7 is bad"):
        for x in prefetch(items(10, fail_at=7), 2):
            got.append(x)
    assert got == list(range(7))
    before = threading.active_count()
    stream = prefetch(items(10**9), 2)
    assert next(stream) == 0 and threading.active_count() == before + 1
    stream.close()
    assert threading.active_count() == before


def test_prefetched_batches_are_the_batches(federation):
    """The training stream with prefetching gives the same batches as without, SpecAugment
    included, and a resumed stream continues where it was."""
    from fedasr.fl.client import make_dataset
    from fedasr.trainer import BatchStream, batch_stream

    fed = Federation(federation)
    cfg = load_config(None, FAST)
    data = make_dataset(fed.client_cuts(fed.client_ids[0]), fed.tokenizer, fed.cmvn, cfg)

    def take(stream, n):
        return [(e, b.ids, b.feats.clone()) for (e, b), _ in zip(stream, range(n))]

    plain = take(batch_stream(data, load_config(None, FAST + ["train.prefetch=0"]).train, seed=5), 12)
    ahead = take(batch_stream(data, cfg.train, seed=5), 12)
    assert [(e, ids) for e, ids, _ in plain] == [(e, ids) for e, ids, _ in ahead] and plain[-1][0] >= 1
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(plain, ahead))
    resumed = take(BatchStream(data, cfg.train, seed=5, consumed=7), 5)
    assert [ids for _, ids, _ in resumed] == [ids for _, ids, _ in plain[7:]]


def test_the_embedded_worker_keeps_client_features_within_its_budget(federation):
    from conftest import tiny_model
    from fedasr.fl.client import ClientWorker

    fed = Federation(federation)
    cfg = load_config(None, FAST)
    w = ClientWorker(cfg, fed, tiny_model(0), cache_clients=10)
    a, b = fed.client_ids[:2]
    da = w.dataset(a)
    list(da.batches(20.0))  # its features are loaded now
    assert w.dataset(a) is da and w.dataset(b) is not da  # kept between rounds
    size = sum(t.numel() * t.element_size() for t in da.cache.values())
    w.cache_bytes = size + 1  # room for one client's features: the least recently served goes
    db = w.dataset(b)
    list(db.batches(20.0))
    w._trim_cache()
    assert list(w._cache) == [b] and w.dataset(a) is not da


# --------------------------------------------------------------------------- decoding on the device


@pytest.mark.parametrize("predictor", ["lstm", "stateless"])
def test_decoding_reads_the_device_a_fixed_number_of_times(predictor):
    """Greedy and beam search on a (emulated) CUDA device: the hypotheses are read back once
    at the end, however many frames; the same hypotheses as on the CPU."""
    from conftest import tiny_model
    from fedasr.hostsync import HostSyncCounter
    from fedasr.model.decode import beam_search, greedy_search

    model = tiny_model(3, num_layers=1, predictor=predictor, pred_context=3).eval()
    with torch.no_grad():
        model.joiner.output.weight.mul_(3.0)
    counts = {}
    for T in (6, 30):
        g = torch.Generator().manual_seed(T)
        enc, lens = torch.randn(3, T, 16, generator=g), torch.tensor([T, T - 2, 1])
        want = greedy_search(model, enc, lens), beam_search(model, enc, lens, beam=4)
        with HostSyncCounter() as c:
            c.on_device(model.parameters(), model.buffers(), [enc])
            got = greedy_search(model, enc, lens), beam_search(model, enc, lens, beam=4)
        assert got == want and any(want[0]) and any(want[1])
        counts[T] = c.syncs
    assert counts[6] == counts[30] <= 5, counts


# --------------------------------------------------------------------------- scripts/gpu_check.py


def test_gpu_check_runs_cpu_vs_cpu(federation, tmp_path):
    """scripts/gpu_check.py --device cpu: every check of the GPU run, CPU against CPU (the
    device paths forced where they differ), small shapes; a table and a JSON file."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--federation", str(federation),
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in res["checks"]}
    assert list(checks) == ["device", "losses", "model loss", "masked step", "throughput", "federated", "decoding",
                            "flower"]
    assert all(c["ok"] for n, c in checks.items() if n != "flower") and checks["flower"]["ok"] is None
    assert checks["masked step"]["pruned_nonzero"] == 0
    assert checks["throughput"]["fp32"]["host_syncs_per_step"] == checks["throughput"]["bf16"]["host_syncs_per_step"] == 1
    assert checks["federated"]["fedtiny"]["rounds"] == checks["federated"]["federated_pruning"]["rounds"] == 2
    assert "gpu_check on cpu" in r.stdout
