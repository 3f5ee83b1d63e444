"""The warm client worker: a long-lived process per SuperNode that keeps the model, the
tokenizer and normalisation, and the datasets of the last clients it served, loaded
between Flower messages (``python -m fedasr.fl.flower.worker --fd N``; started by
:class:`fedasr.fl.flower.channel.WorkerChannel`).

It serves one request at a time over the socket it inherited: a request is three frames
(:mod:`fedasr.fl.flower.wire`) — the key (JSON: the run config and the federation
directory), the client header and the payload — and the answer two: ``ok`` and the
encoded reply, or ``error`` and a one-line reason. A new key (another run) rebuilds the
state. The worker exits when the channel closes (its executor is gone).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback

from fedasr.fl.flower.patches import trim_heap
from fedasr.fl.flower.wire import ChannelClosed, recv_frames, send_frames

CACHE_CLIENTS_ENV = "FEDASR_FLOWER_CACHE_CLIENTS"
DEVICE_ENV = "FEDASR_DEVICE"  # where this worker trains, instead of the run config's device
DEFAULT_CACHE_CLIENTS = 8


class Worker:
    def __init__(self, cache_clients: int):
        import torch

        if "OMP_NUM_THREADS" in os.environ:  # the same thread count as an embedded run at that setting
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        self.cache_clients = cache_clients
        self.key: bytes | None = None
        self.client = None

    def _client(self, key: bytes):
        if key != self.key:
            from fedasr.fl.client import ClientWorker

            self.client = self.key = None  # the previous run's state goes first
            k = json.loads(key)
            # a SuperNode slot's own device (FEDASR_DEVICE, set per slot with its CUDA_VISIBLE_DEVICES)
            self.client = ClientWorker.for_run(json.loads(k["config"]), k["federation"], self.cache_clients,
                                               device=os.environ.get(DEVICE_ENV) or None)
            self.key = key
        return self.client

    def serve(self, sock: socket.socket) -> None:
        from fedasr.errors import FedasrError
        from fedasr.fl.round import fault_reason, is_device_fault

        while True:
            try:
                key, header, payload = recv_frames(sock, 3)
            except (ChannelClosed, OSError):
                return
            fatal = False
            try:
                reply = [b"ok", self._client(key).handle(header, payload)]
            except FedasrError as e:
                reply = [b"error", str(e).encode()]
            except Exception as e:  # noqa: BLE001 - reported to the server as this client's failure
                traceback.print_exc()
                # a device fault (out of memory, CUDA error) is marked so that the server stops
                # the run; this process exits after replying (its CUDA context may be unusable)
                fatal = is_device_fault(e)
                reply = [b"error", fault_reason(e).encode()]
            try:
                send_frames(sock, *reply)
            except OSError:
                return
            if fatal:
                return
            trim_heap()  # batch shapes vary per client: glibc would keep the peak


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fedasr's warm client worker (started by the fedasr Flower executor)")
    ap.add_argument("--fd", type=int, required=True, help="the inherited socket's file descriptor")
    a = ap.parse_args(argv)
    sock = socket.socket(fileno=a.fd)
    cache = int(os.environ.get(CACHE_CLIENTS_ENV, DEFAULT_CACHE_CLIENTS))
    Worker(cache).serve(sock)
    sock.close()


if __name__ == "__main__":
    sys.exit(main())
