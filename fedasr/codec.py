"""Payload encoding of everything that travels between server and clients.

Every transfer is really encoded and decoded (by the embedded engine and the Flower
engine alike), so the byte counts in metrics.jsonl are measured, not estimated. Format
(little endian)::

    b"FASR" | u32 header length | JSON header | tensor data ...

The header holds ``meta`` (any JSON object: message kind, round, method instructions,
metrics) and, per tensor, its name, dtype, shape and encoding:

- ``dense``: the raw values (fp32 for float tensors);
- ``masked``: a packed bitmask of the tensor's shape (1 bit per element, ``np.packbits``)
  followed by only the kept values — what a pruned model costs on the wire; the receiver
  gets the mask back (:func:`decode_message`);
- ``bits``: a boolean tensor as a packed bitmask (1 bit per element, e.g. a candidate mask).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import torch

MAGIC = b"FASR"

_DTYPES = {
    torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2", torch.int64: "<i8",
    torch.int32: "<i4", torch.uint8: "|u1", torch.bool: "|b1",
}
_TORCH = {v: k for k, v in _DTYPES.items()}


def encode(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None,
           meta: dict | None = None) -> bytes:
    """Serialise ``tensors`` (+ a JSON ``meta``); those with a mask of their shape travel as
    bitmask + kept values, boolean tensors as bitmasks."""
    masks = masks or {}
    header = []
    chunks: list[bytes] = []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            t = t.float()
        dt = _DTYPES[t.dtype]
        arr = t.numpy()
        entry = {"name": name, "dtype": dt, "shape": list(t.shape)}
        m = masks.get(name)
        if m is not None and tuple(m.shape) != tuple(t.shape):
            raise ValueError(f"{name}: mask shape {tuple(m.shape)} does not fit the tensor's {tuple(t.shape)}")
        if m is not None:
            keep = m.detach().cpu().numpy().astype(bool).reshape(-1)
            bits = np.packbits(keep).tobytes()
            vals = np.ascontiguousarray(arr.reshape(-1)[keep]).astype(dt).tobytes()
            entry.update(encoding="masked", bits=len(bits), values=len(vals))
            chunks += [bits, vals]
        elif t.dtype == torch.bool:
            bits = np.packbits(arr.reshape(-1)).tobytes()
            entry.update(encoding="bits", values=len(bits))
            chunks.append(bits)
        else:
            data = np.ascontiguousarray(arr).astype(dt).tobytes()
            entry.update(encoding="dense", values=len(data))
            chunks.append(data)
        header.append(entry)
    head = json.dumps({"meta": meta or {}, "tensors": header}, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])


def decode_message(payload: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """Inverse of :func:`encode`: ``(tensors, masks, meta)``; pruned positions of masked
    tensors come back as zeros and their masks in ``masks``."""
    if payload[:4] != MAGIC:
        raise ValueError("not a fedasr payload")
    (n,) = struct.unpack("<I", payload[4:8])
    head = json.loads(payload[8:8 + n])
    pos = 8 + n
    out: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for e in head["tensors"]:
        dt = np.dtype(e["dtype"])
        numel = int(np.prod(e["shape"])) if e["shape"] else 1
        if e["encoding"] == "masked":
            keep = np.unpackbits(np.frombuffer(payload, np.uint8, e["bits"], pos))[:numel].astype(bool)
            pos += e["bits"]
            vals = np.frombuffer(payload, dt, int(keep.sum()), pos)
            pos += e["values"]
            flat = np.zeros(numel, dt)
            flat[keep] = vals
            masks[e["name"]] = torch.from_numpy(keep.reshape(e["shape"]).copy())
        elif e["encoding"] == "bits":
            flat = np.unpackbits(np.frombuffer(payload, np.uint8, e["values"], pos))[:numel].astype(bool)
            pos += e["values"]
        else:
            flat = np.frombuffer(payload, dt, numel, pos).copy()
            pos += e["values"]
        out[e["name"]] = torch.from_numpy(flat.reshape(e["shape"])).to(_TORCH[e["dtype"]])
    if pos != len(payload):
        raise ValueError(f"payload has {len(payload) - pos} trailing bytes")
    return out, masks, head["meta"]


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a payload (see :func:`decode_message`)."""
    return decode_message(payload)[0]
