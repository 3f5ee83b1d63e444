"""The messages of a federated round, as bytes: what every engine carries.

Server to client: one payload shared by the round's clients (:func:`encode_down`: the
weights, the masks, the pruning method's instructions, the architecture the weights belong
to, the tokenizer's SHA-256) plus a small JSON header per client (:func:`client_header`:
who it is, the seed it trains with, the global step). Client to server: the update, the
method's report and a JSON object of metrics (:func:`encode_up`). Everything is encoded
by :mod:`fedasr.codec`, so ``bytes_down``/``bytes_up`` count what an engine really sends.

A message is of one of two kinds: ``train`` (local training) or ``phase`` (an
evaluate-only phase of the pruning method, e.g. FedTiny's BatchNorm selection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from fedasr import codec
from fedasr.methods.base import Instructions, Report
from fedasr.prune.masks import Masks

TRAIN, PHASE = "train", "phase"


def derive_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (run seed, round, client index, ...): the seed a
    client is told to train with, the server's client sample, the run's initial model."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0] >> 1)


def encode_down(kind: str, rnd: int, phase: str | None, weights: dict[str, torch.Tensor], masks: Masks,
                instructions: Instructions, arch: dict | None = None, tokenizer: str | None = None) -> bytes:
    """``arch``: the model config the weights belong to (a compacted model has its own widths);
    ``tokenizer``: the sha256 of the server's tokenizer (a client with another one refuses)."""
    tensors = {f"w/{k}": v for k, v in weights.items()}
    tensors.update({f"i/{k}": v for k, v in instructions.tensors.items()})
    meta = {"kind": kind, "round": rnd, "phase": phase, "instructions": instructions.meta, "arch": arch,
            "tokenizer": tokenizer}
    return codec.encode(tensors, {f"w/{k}": m for k, m in masks.items()}, meta)


@dataclass
class Down:
    kind: str
    round: int
    phase: str | None
    weights: dict[str, torch.Tensor]
    masks: Masks
    instructions: Instructions
    arch: dict | None = None
    tokenizer: str | None = None


def decode_down(payload: bytes) -> Down:
    tensors, masks, meta = codec.decode_message(payload)
    weights = {k[2:]: v for k, v in tensors.items() if k.startswith("w/")}
    instr = Instructions({k[2:]: v for k, v in tensors.items() if k.startswith("i/")}, meta.get("instructions", {}))
    return Down(meta["kind"], int(meta["round"]), meta.get("phase"), weights,
                {k[2:]: m for k, m in masks.items()}, instr, meta.get("arch"), meta.get("tokenizer"))


def client_header(client: str, seed: int, global_step: int) -> bytes:
    return json.dumps({"client": client, "seed": seed, "global_step": global_step}).encode()


def encode_up(update: dict[str, torch.Tensor], masks: Masks, report: Report, meta: dict) -> bytes:
    tensors = {f"u/{k}": v for k, v in update.items()}
    tensors.update({f"r/{k}": v for k, v in report.tensors.items()})
    return codec.encode(tensors, {f"u/{k}": m for k, m in masks.items()}, {**meta, "report": report.meta})


@dataclass
class Up:
    update: dict[str, torch.Tensor]
    report: Report
    meta: dict


def decode_up(payload: bytes) -> Up:
    tensors, _, meta = codec.decode_message(payload)
    update = {k[2:]: v for k, v in tensors.items() if k.startswith("u/")}
    report = Report({k[2:]: v for k, v in tensors.items() if k.startswith("r/")}, meta.get("report", {}))
    return Up(update, report, meta)
