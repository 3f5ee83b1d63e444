"""What the Flower-facing processes need without torch: fedasr's payloads in Flower
``RecordDict`` s, and the frames of the local channel to a warm client worker.

A message is a ``RecordDict`` with the payload as one raw-bytes ``Array`` (Flower sends
it in 5 MB chunks) and the per-client header in a ``ConfigRecord``. On the channel
(:mod:`fedasr.fl.flower.worker`) every frame is ``<8-byte big-endian length><bytes>``.
"""

from __future__ import annotations

import socket
import struct

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

_LEN = struct.Struct(">Q")


def pack(payload: bytes, header: bytes | None = None) -> RecordDict:
    rec = {"fedasr": ArrayRecord({"payload": Array(dtype="bytes", shape=(len(payload),), stype="fedasr/payload",
                                                   data=payload)})}
    if header is not None:
        rec["header"] = ConfigRecord({"header": header.decode()})
    return RecordDict(rec)


def unpack(content: RecordDict) -> tuple[bytes, bytes | None]:
    payload = bytes(content["fedasr"]["payload"].data)
    header = content["header"]["header"].encode() if "header" in content else None
    return payload, header


class ChannelClosed(ConnectionError):
    """The other end of the channel went away (its process died)."""


def send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(f)) + f for f in frames))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ChannelClosed("the channel was closed")
        got += k
    return bytes(buf)


def recv_frames(sock: socket.socket, count: int) -> list[bytes]:
    return [_recv_exact(sock, _LEN.unpack(_recv_exact(sock, _LEN.size))[0]) for _ in range(count)]
