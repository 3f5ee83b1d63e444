"""Pinned patches of Flower's waits that sit on the critical path of a round (flwr 1.41
has no setting for them). Each is applied only to the exact code it was written for: the
sources of the functions it relies on are checked against their sha256 (flwr 1.41.0;
1.42.0 has the same), and anything else is a one-line error naming the function — read
the new code and update the hashes.

- The SuperNode's message loop (``flwr/supernode/start_client_internal.py``): with no
  message waiting it sleeps ``time.sleep(3)`` before pulling again, and it waits for the
  ClientApp's reply in steps of ``time.sleep(0.5)``; a slot that just replied misses the
  next message by up to 3 s. The module gets its own ``time`` whose ``sleep`` shortens
  those two waits to ``FEDASR_FLOWER_POLL`` seconds (default 0.1) and
  ``FEDASR_FLOWER_REPLY_POLL`` (default 0.02); every other use is the real ``time``.
- Object pulls (the SuperNode pulling a message's objects, the ClientApp pulling its
  message, the ServerApp pulling replies) retry an object that is not uploaded yet after
  1 s, doubling to 10 s; a message is visible before its objects are, so every hop paid
  up to twice the upload time. Here they retry after 0.02 s, doubling to 0.2 s (and give
  up after the same 2 h, not after 500 tries; in the ServerApp, at the round's deadline:
  a SuperNode that died while uploading its reply holds up the pulls until then).
"""

from __future__ import annotations

import ctypes
import hashlib
import inspect
import os
import time as _time

from fedasr.errors import FedasrError

POLL_ENV, REPLY_POLL_ENV = "FEDASR_FLOWER_POLL", "FEDASR_FLOWER_REPLY_POLL"
IDLE_SLEEP, REPLY_SLEEP = 3, 0.5  # the literals in flwr 1.41's SuperNode loop
PULL_BACKOFF, PULL_BACKOFF_CAP = 0.02, 0.2
PULL_DEADLINE: float | None = None  # set by the ServerApp's transport: a round's time.monotonic() deadline
# sha256 of inspect.getsource(...) of what the patches rely on (flwr 1.41.0 == 1.42.0)
SUPERNODE_EXPECTED = {
    "start_client_internal": "9e89a6eb68fbec6821e817cd2c09f7894fc7b0f5725c2365b19a7122307f11f3",
    "_push_messages": "00bb86faffdec114db87e7f716af2acd901d12284e44f51f5c2a84704db05f64",
    "_pull_and_store_message": "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
}
GRID_EXPECTED = {"pull_messages": "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83"}
RUNTIME_EXPECTED = {  # the flwr-clientapp steps fedasr's executor calls
    "pull_task_input": "5607a23e1673ee876930c1b35685b8dfdfd8b3776a436560b0467042e15fc695",
    "push_message": "07cb512c93e065a93a4cba3facc7d37dd99758c56835065a63fdfbfc604dcd8a",
    "push_task_output": "9206407456e79e17338d367de7c21e2d840d939de378c03ac61da6cc2b57a3c6",
}


def source_sha(fn) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def check_sources(owner, expected: dict[str, str]) -> None:
    """A one-line error unless every function of ``owner`` (a module or class) named in
    ``expected`` has that source."""
    import flwr

    for name, sha in expected.items():
        fn = getattr(owner, name, None)
        if fn is None or source_sha(fn) != sha:
            raise FedasrError(f"flwr {flwr.__version__}: {owner.__name__}.{name} is not the code fedasr's patch was "
                              f"written for (flwr 1.41.0); pin flwr==1.41.0 or update {__name__}")


def seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    try:
        v = float(raw) if raw else default
    except ValueError:
        v = -1.0
    if not 0.001 <= v <= 3.0:
        raise FedasrError(f"{env}={raw!r}: expected seconds between 0.001 and 3")
    return v


class PollTime:
    """The ``time`` module, except that the SuperNode loop's two waits are shorter."""

    def __init__(self, idle: float, reply: float):
        self.idle, self.reply = idle, reply

    def sleep(self, secs: float) -> None:
        if secs == IDLE_SLEEP:
            secs = self.idle
        elif secs == REPLY_SLEEP:
            secs = self.reply
        _time.sleep(secs)

    def __getattr__(self, name):
        return getattr(_time, name)


def _fast(fn):
    """``fn`` (flwr's pull_objects / pull_and_inflate_object_from_tree) with shorter retries."""
    if getattr(fn, "_fedasr_fast", False):
        return fn
    params = inspect.signature(fn).parameters
    if "initial_backoff" not in params or "backoff_cap" not in params:
        raise FedasrError(f"flwr: {fn.__module__}.{fn.__name__} has no initial_backoff/backoff_cap; update {__name__}")

    def fast(*args, **kwargs):
        kwargs.setdefault("initial_backoff", PULL_BACKOFF)
        kwargs.setdefault("backoff_cap", PULL_BACKOFF_CAP)
        kwargs.setdefault("max_tries_per_object", None)  # bounded by max_time (2 h) as before, not by tries
        if PULL_DEADLINE is not None:  # nor past the round's deadline
            kwargs.setdefault("max_time", max(1.0, PULL_DEADLINE - _time.monotonic()))
        return fn(*args, **kwargs)

    fast._fedasr_fast = True
    return fast


def trim_heap() -> None:
    """Hand freed heap back to the system (glibc's ``malloc_trim``; elsewhere nothing):
    messages of a few MB pass through these processes, and glibc keeps their peak."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def patch_supernode(idle: float | None = None, reply: float | None = None):
    """The SuperNode's loop without its 3 s / 0.5 s waits, faster object pulls, and its
    heap trimmed after each reply it sends."""
    import flwr.supernode.start_client_internal as sci

    check_sources(sci, SUPERNODE_EXPECTED)
    sci.time = PollTime(idle if idle is not None else seconds(POLL_ENV, 0.1),
                        reply if reply is not None else seconds(REPLY_POLL_ENV, 0.02))
    sci.pull_objects = _fast(sci.pull_objects)
    if not getattr(sci._push_messages, "_fedasr_trim", False):
        push = sci._push_messages

        def push_and_trim(*args, **kwargs):
            try:
                return push(*args, **kwargs)
            finally:
                trim_heap()

        push_and_trim._fedasr_trim, push_and_trim.__wrapped__ = True, push
        sci._push_messages = push_and_trim
    return sci


def patch_runtime():
    """flwr-clientapp's steps (run by fedasr's executor) with faster object pulls."""
    import flwr.supernode.runtime.run_clientapp as rc

    check_sources(rc, RUNTIME_EXPECTED)
    rc.pull_and_inflate_object_from_tree = _fast(rc.pull_and_inflate_object_from_tree)
    return rc


def patch_grid():
    """The ServerApp's grid with faster pulls of the replies' objects."""
    import flwr.superlink.grid.http_grid as hg

    check_sources(hg.HttpGrid, GRID_EXPECTED)
    hg.pull_objects = _fast(hg.pull_objects)
    return hg
