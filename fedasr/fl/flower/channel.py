"""The executor's side of the warm client worker (:mod:`fedasr.fl.flower.worker`): starts
it on a socket pair, hands it each message's bytes, and turns its death into a one-line
error for that message (the client is dropped with the reason; the next message starts a
new worker). No torch here: this runs in the Flower-facing process.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

from fedasr.errors import FedasrError
from fedasr.fl.flower.wire import ChannelClosed, recv_frames, send_frames

CURRENT: "WorkerChannel | None" = None  # set by the executor; the ClientApp uses it when set


def _describe(rc: int | None) -> str:
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class WorkerChannel:
    def __init__(self, argv: list[str] | None = None):
        self.argv = argv or [sys.executable, "-m", "fedasr.fl.flower.worker"]
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.started = 0  # workers started so far

    def start(self) -> None:
        from fedasr.fl.flower.launch import _die_with_parent

        self.close()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen([*self.argv, "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                         stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        finally:
            theirs.close()  # only the worker holds that end: its death closes the channel
        self.sock = mine
        self.started += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def request(self, key: bytes, header: bytes, payload: bytes) -> bytes:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        pid = self.proc.pid
        try:
            send_frames(self.sock, key, header, payload)
            status, body = recv_frames(self.sock, 2)
        except (ChannelClosed, OSError):
            try:
                rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
            self.close()
            raise FedasrError(f"the client worker (pid {pid}) died ({_describe(rc)}) while handling the message; "
                              "the next message starts a new one") from None
        if status != b"ok":
            raise FedasrError(body.decode(errors="replace"))
        return body

    def close(self, grace: float = 5.0) -> None:
        if self.sock is not None:
            self.sock.close()  # the worker sees the channel close and exits
            self.sock = None
        if self.proc is not None:
            end = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
