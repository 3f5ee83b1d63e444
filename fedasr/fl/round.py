"""One federated round, the same for every engine: :func:`run_round`.

    sample the round's clients
    for each evaluate-only phase of the pruning method (e.g. FedTiny's BatchNorm selection):
        configure (server.phase_exchange) -> send / receive (transport) -> aggregate (server.finish)
    configure (server.train_exchange)    -> send / receive (transport) -> aggregate (server.finish)

Engines differ only in their :class:`Transport`, which carries one encoded message to the
round's clients and brings their replies back: :class:`LocalTransport` hands it to an
in-process :class:`~fedasr.fl.client.ClientWorker` (the embedded engine), Flower's
(:class:`fedasr.fl.flower.transport.FlowerTransport`) to SuperNodes. Replies are absorbed
in the clients' order whatever order they arrived in, so aggregation is deterministic.
"""

from __future__ import annotations

from typing import Protocol

from fedasr.errors import FedasrError
from fedasr.fl.client import ClientWorker
from fedasr.fl.messages import TRAIN
from fedasr.fl.server import ClientRejected, Exchange, RoundInfo, Server

# a client's failure that drops it from the round (anything else stops the run), except a
# device fault (below), which is a RuntimeError too
CLIENT_FAULTS = (ClientRejected, FloatingPointError, RuntimeError, ValueError, KeyError, FedasrError)

# What the device (not the client's data) failed with: out of memory, or a CUDA error such as a
# device-side assert, after which every later kernel on that device fails. Dropping the client
# would bias the aggregate (an OOM drops the clients with long utterances) or silently drop every
# later client, so the run stops instead. Matched in exception texts and in the reasons remote
# clients report (Flower).
DEVICE_FAULT = "device fault: "
DEVICE_FAULT_MARKERS = ("out of memory", "OutOfMemoryError", "AcceleratorError", "CUDA error", "device-side assert",
                        "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error")


class DeviceFault(Exception):
    """A client's local training hit a device fault: the run stops (see :data:`DEVICE_FAULT_MARKERS`)."""

    def __init__(self, client: str, reason: str):
        super().__init__(f"client {client}: {reason}")
        self.client, self.reason = client, reason


def is_device_fault(e: BaseException) -> bool:
    """``e`` is an out-of-memory error or a CUDA error (``torch.OutOfMemoryError``,
    ``torch.AcceleratorError`` on torch >= 2.8, or a RuntimeError whose text says so)."""
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                  if k is not None)
    return isinstance(e, kinds) or (isinstance(e, RuntimeError) and device_fault_text(str(e)))


def device_fault_text(reason: str) -> bool:
    return DEVICE_FAULT in reason or any(m in reason for m in DEVICE_FAULT_MARKERS)


def fault_reason(e: BaseException) -> str:
    """A client failure in one line, as metrics.jsonl's ``dropped`` records it (a device fault
    starts with :data:`DEVICE_FAULT`)."""
    text = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return DEVICE_FAULT + text if is_device_fault(e) else text


class Events(Protocol):
    """What a caller is told while a run progresses (progress bars)."""

    def round_start(self, rnd: int, clients: list[str]) -> None: ...
    def client_done(self, client: str, ok: bool) -> None: ...
    def round_end(self, row: dict) -> None: ...


class NoEvents:
    def round_start(self, rnd, clients): pass
    def client_done(self, client, ok): pass
    def round_end(self, row): pass


class Transport(Protocol):
    """How an engine carries a message to clients and their replies back."""

    def connect(self, clients: list[str]) -> list[str] | None:
        """Once, before the first round, with every client of the federation: those that
        can be served (the server samples among them), or None for all."""
        ...

    def exchange(self, rnd: int, kind: str, clients: list[str], payload: bytes,
                 headers: dict[str, bytes]) -> dict[str, tuple[bytes | None, str | None]]:
        """Per client: (reply, None), or (None, reason) when it failed."""
        ...


class LocalTransport:
    """The embedded engine: one in-process client worker handles every client in turn."""

    def __init__(self, worker: ClientWorker):
        self.worker = worker

    def connect(self, clients: list[str]) -> None:
        return None

    def exchange(self, rnd, kind, clients, payload, headers):
        out = {}
        for name in clients:
            try:
                out[name] = (self.worker.handle(headers[name], payload), None)
            except CLIENT_FAULTS as e:
                if is_device_fault(e):  # no further client: after a device-side assert every one fails
                    raise DeviceFault(name, fault_reason(e)) from None
                out[name] = (None, fault_reason(e))
        return out


def exchange(server: Server, transport: Transport, ex: Exchange, clients: list[str], info: RoundInfo,
             events: Events) -> None:
    """Send the exchange's message to every client and absorb the replies in the clients'
    order; a client that fails or whose reply is rejected is dropped with its reason. A
    client that reports a device fault stops the round: :class:`DeviceFault`."""
    headers = {name: server.client_header(ex.rnd, name) for name in clients}
    for name in clients:
        info.bytes_down += server.down_bytes(ex.payload, headers[name])
    replies = transport.exchange(ex.rnd, ex.kind, clients, ex.payload, headers)
    for name in clients:
        error = replies[name][1]
        if error is not None and device_fault_text(error):
            raise DeviceFault(name, error)
    for name in clients:
        reply, error = replies[name]
        if reply is not None:
            try:
                server.absorb(ex, reply, info)
            except CLIENT_FAULTS as e:
                reply, error = None, fault_reason(e)
        if error is not None:
            info.drop(name, error)
        if ex.kind == TRAIN:
            events.client_done(name, reply is not None)


def run_round(server: Server, transport: Transport, rnd: int, events: Events | None = None) -> dict:
    """Round ``rnd`` from the client sample to the next masks; returns its metrics row
    (without the run's own additions: round number, sparsity, dev evaluation, times).
    Fewer successful clients than ``fl.min_clients`` in a phase or in training raises
    :class:`~fedasr.fl.server.TooFewClients`."""
    events = events or NoEvents()
    clients = server.sample_clients(rnd)
    events.round_start(rnd, clients)
    info = RoundInfo(clients)
    for phase in server.phases(rnd):
        ex = server.phase_exchange(rnd, phase)
        exchange(server, transport, ex, clients, info, events)
        server.finish(ex, info)
    ex = server.train_exchange(rnd)
    exchange(server, transport, ex, clients, info, events)
    server.finish(ex, info)
    return info.row()
