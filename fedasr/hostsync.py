"""Count, on the CPU, the host syncs a CUDA run would make: :class:`HostSyncCounter`.

On a GPU the host queues kernels and runs ahead; anything that needs a value computed on
the device (``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``, boolean
indexing, which needs the number of True elements, ``ctc_loss`` with its lengths on the
device) or a blocking host-to-device copy (``t.to("cuda")`` without ``non_blocking=True``,
``torch.tensor(data, device="cuda")``) makes it wait until the device has caught up: a *host
sync*. A training step with hundreds of them runs at the speed of the host's Python, not of
the GPU. ``torch.cuda.set_sync_debug_mode`` reports them on a GPU; this counts the same on a
machine without one.

The counter emulates a CUDA device on the CPU. Tensors marked with :meth:`on_device` (the
model's parameters and buffers) *are on the device*: their ``.device`` says ``cuda`` (so
code that asks a tensor where it lives, ``x.device``, ``next(model.parameters()).device``,
takes its CUDA path), as does everything computed from them, copied to ``cuda`` with
``.to(...)`` or made by a factory given ``device=<cuda>``; the data stay on the CPU. Copies
between the host and the emulated device are counted (a copy to the host always waits, a
copy to the device unless ``non_blocking=True``), and so are the reads of device values
listed above. Everything else is a host tensor, and reading it costs nothing. A torch
function given ``device=cuda`` that the counter does not know fails ("Torch not compiled
with CUDA enabled"), so nothing is miscounted silently.
"""

from __future__ import annotations

import collections
import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten
CUDA = torch.device("cuda")

# ops that read a device tensor's values on the host (the first tensor argument decides)
_READS = {aten._local_scalar_dense.default: "item/int/float/bool", aten.nonzero.default: "nonzero",
          aten.masked_select.default: "masked_select", aten.unique_consecutive.default: "unique",
          aten._unique2.default: "unique", aten.repeat_interleave.Tensor: "repeat_interleave"}
# torch functions with a device= argument: the result is on the emulated device when it says cuda
_FACTORIES = ("arange", "zeros", "ones", "full", "empty", "randn", "rand", "randint", "linspace", "eye",
              "zeros_like", "ones_like", "full_like", "empty_like", "tensor", "as_tensor")
_COPIES = ("tensor", "as_tensor")  # data from the host: to the device, a blocking copy
_NEW = ("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")


def _is_cuda(where) -> bool:
    if isinstance(where, torch.device):
        return where.type == "cuda"
    return isinstance(where, str) and where.startswith("cuda")


class HostSyncCounter(TorchDispatchMode):
    """A context that counts host syncs (see the module's docstring) by kind::

        with HostSyncCounter() as c:
            c.on_device(model.parameters(), model.buffers())
            c.counting = False
            train_step(...)  # a warm-up: what it makes on the device (optimizer state) is followed
            c.counting = True
            train_step(...)
        c.syncs, c.kinds, c.where, c.copies_to_device
    """

    def __init__(self):
        super().__init__()
        self._dev = WeakIdKeyDictionary()
        self.kinds: collections.Counter = collections.Counter()
        self.where: collections.Counter = collections.Counter()  # (kind, fedasr's file:line) -> count
        self.copies_to_device = 0  # host-to-device copies (blocking or not)
        self.counting = True  # False: follow the tensors, count nothing (a warm-up)
        self._saved: list = []

    @property
    def syncs(self) -> int:
        return sum(self.kinds.values())

    def on_device(self, *tensors) -> None:
        """Put tensors (or iterables of them) on the emulated device."""
        for group in tensors:
            self._mark(list(group) if not isinstance(group, torch.Tensor) else group)

    def is_device(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t in self._dev

    def _mark(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._dev[t] = True

    def _sync(self, kind: str) -> None:
        if self.counting:
            self.kinds[kind] += 1
            self.where[(kind, _caller())] += 1

    def _copy(self, blocking: bool) -> None:
        if self.counting:
            self.copies_to_device += 1
        if blocking:
            self._sync("blocking copy to the device")

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_dev = any(t in self._dev for t in tensors)
        if on_dev:
            kind = _READS.get(func)
            if kind is not None and tensors[0] in self._dev:
                self._sync(kind)
            elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                self._sync("boolean indexing")
            elif func is aten._ctc_loss.Tensor and (args[2] in self._dev or args[3] in self._dev):
                self._sync("ctc_loss lengths on the device")
        out = func(*args, **kwargs)
        if on_dev:
            self._mark(out)
        return out

    # ------------------------------------------------------------------ the emulated device
    def __enter__(self):
        self._patch()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, fn in reversed(self._saved):
                if fn is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, fn)
            self._saved = []

    def _replace(self, owner, name, value) -> None:
        self._saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, value)

    def _patch(self) -> None:
        c = self
        base = torch._C.TensorBase
        self._replace(torch.Tensor, "device", property(lambda t: CUDA if c.is_device(t) else base.device.__get__(t)))
        self._replace(torch.Tensor, "is_cuda", property(lambda t: c.is_device(t)))

        def to_host(kind):
            fn = getattr(torch.Tensor, kind)

            @functools.wraps(fn)
            def wrapped(t, *a, **kw):
                if c.is_device(t):
                    c._sync(kind)
                    if kind == "cpu":
                        return t.clone() if not a and not kw else fn(t, *a, **kw).clone()
                return fn(t, *a, **kw)
            return wrapped

        for name in ("tolist", "numpy", "cpu"):
            self._replace(torch.Tensor, name, to_host(name))

        tensor_to = torch.Tensor.to

        @functools.wraps(tensor_to)
        def to(t, *a, **kw):
            a = list(a)
            target, at = kw.get("device"), None
            for i, x in enumerate(a):
                if isinstance(x, (str, torch.device)):
                    target, at = x, i
                elif isinstance(x, torch.Tensor):  # t.to(other): other's device and dtype
                    target, a[i], at = x.device, x.dtype, None
            if target is None:
                return tensor_to(t, *a, **kw)
            if at is not None:
                a[at] = "cpu"
            else:
                kw["device"] = "cpu"
            if _is_cuda(target):
                if c.is_device(t):
                    return tensor_to(t, *a, **kw)
                c._copy(blocking=not kw.get("non_blocking", False))
                out = tensor_to(t, *a, **kw)
                out = out.clone() if out is t else out  # the device copy is another tensor
                c._mark(out)
                return out
            if c.is_device(t):  # to the host: always waits
                c._sync("copy to the host")
                out = tensor_to(t, *a, **kw)
                return out.clone() if out is t else out
            return tensor_to(t, *a, **kw)

        self._replace(torch.Tensor, "to", to)

        def factory(fn, copy: bool):
            @functools.wraps(fn)
            def wrapped(*a, **kw):
                where = kw.get("device")
                if not _is_cuda(where):
                    return fn(*a, **kw)
                kw["device"] = "cpu"
                from_device = bool(a) and c.is_device(a[0])
                out = fn(*a, **kw)
                if copy and not from_device:
                    c._copy(blocking=True)
                if copy and from_device and out is a[0]:
                    return out
                c._mark(out)
                return out
            return wrapped

        group = torch._C._group_tensors_by_device_and_dtype

        def grouped(tensorlistlist, *a, **kw):  # the foreach helpers (optimizers, clipping) group by device
            out = group(tensorlistlist, *a, **kw)
            return {((CUDA if any(c.is_device(t) for t in v[0][0] if t is not None) else dev), dt): v
                    for (dev, dt), v in out.items()}

        self._replace(torch._C, "_group_tensors_by_device_and_dtype", grouped)
        for name in _FACTORIES:
            self._replace(torch, name, factory(getattr(torch, name), name in _COPIES))
        for name in _NEW:
            self._replace(torch.Tensor, name, factory(getattr(torch.Tensor, name), name == "new_tensor"))


def _caller() -> str:
    """The innermost frame of fedasr's own code (not this module) on the stack."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "fedasr" in name and not name.endswith("hostsync.py"):
            return f"{name.split('fedasr', 1)[-1].lstrip('/')}:{f.f_lineno}"
        f = f.f_back
    return "?"
