"""Carrying fedasr's messages over Flower's Message API (flwr 1.41).

A message carries fedasr's payload and the per-client header (:mod:`.wire`); message types are
``train`` (local training) and ``query.phase`` (an evaluate-only phase of the pruning
method). Replies carry the client's encoded reply the same way.

Nodes: a SuperNode whose node config names a ``client-id`` serves that client only (its
own data, on its own machine); the others are *slots* that serve any client of the
federation (one machine: the data is shared). Each slot works on one message at a time; a
node that errs with ``NODE_UNAVAILABLE`` / ``MESSAGE_UNAVAILABLE`` or misses the round's
deadline is not used again.
"""

from __future__ import annotations

import time
from typing import Callable

from flwr.app import ConfigRecord, Message, RecordDict

from fedasr.errors import FedasrError
from fedasr.fl.flower import patches
from fedasr.fl.flower.wire import pack, unpack  # noqa: F401 - re-exported
from fedasr.fl.messages import PHASE

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode
MESSAGE_UNAVAILABLE = 3  # a reply whose objects never arrived (its SuperNode died uploading it)
NODE_GONE = (MESSAGE_UNAVAILABLE, NODE_UNAVAILABLE)
KIND_TO_TYPE = {PHASE: "query.phase", "train": "train"}


class FlowerTransport:
    def __init__(self, grid, round_timeout: float = 900.0, poll: float = 0.05, wait_nodes: float = 300.0,
                 log: Callable[[str], None] = lambda s: None):
        self.grid = grid
        self.round_timeout = round_timeout
        self.poll = poll
        self.wait_nodes = wait_nodes
        self.log = log
        self.dead: set[int] = set()
        self._deadline: tuple[int, float] | None = None  # (round, monotonic deadline)
        self.owner: dict[int, str | None] = {}

    def connect(self, clients: list[str]) -> list[str] | None:
        """Find the SuperNodes (:meth:`_discover`); the clients that can be served: None when
        slots serve any client, else those whose own SuperNode answered (the server samples
        among them)."""
        self.owner = self._discover(set(clients), self.wait_nodes)
        if any(c is None for c in self.owner.values()):
            return None
        return sorted(c for c in self.owner.values() if c is not None)

    def _hello(self) -> dict[int, str | None]:
        nodes = sorted(self.grid.get_node_ids())
        if not nodes:
            return {}
        msgs = [Message(RecordDict({"hello": ConfigRecord({})}), n, "query.hello", ttl=60.0) for n in nodes]
        replies, _ = self._send(msgs, 120.0)
        owner = {}
        for n, r in replies.items():
            if not r.has_error():
                cid = r.content["hello"].get("client-id", "")
                owner[n] = str(cid) if cid != "" else None
        return owner

    def _discover(self, clients: set[str], wait: float) -> dict[int, str | None]:
        """Ask every node who it is: {node id: the client it serves, or None (a slot)}. Waits
        up to ``wait`` seconds for a slot or for every client's SuperNode; then goes on with
        the clients whose SuperNode answered."""
        deadline = time.monotonic() + wait
        while True:
            owner = self._hello()
            fixed = {c for c in owner.values() if c is not None}
            unknown = fixed - clients
            if unknown:
                raise FedasrError(f"SuperNode client-id {sorted(unknown)[0]!r} is not a client of the federation")
            done = any(c is None for c in owner.values()) or fixed == clients
            if done or (time.monotonic() > deadline and fixed):
                self.log(f"flower: {len(owner)} SuperNodes ({len(fixed)} serving their own client, "
                         f"{len(owner) - len(fixed)} slots)")
                return owner
            if time.monotonic() > deadline:
                raise FedasrError(f"flower: no SuperNode answered within {wait:.0f} s")
            time.sleep(1.0)

    def _send(self, msgs: list[Message], timeout: float) -> tuple[dict[int, Message], set[int]]:
        """Push, then pull every ``poll`` seconds until every reply or the deadline
        (``grid.send_and_receive`` sleeps 3 s between pulls)."""
        ids = list(self.grid.push_messages(msgs))
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, msgs)}
        pending = set(node_of)
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for r in self.grid.pull_messages(list(pending)):
                mid = r.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[node_of[mid]] = r
            if pending:
                time.sleep(self.poll)
        return replies, {node_of[m] for m in pending}

    def _reply(self, r: Message, node: int) -> tuple[bytes | None, str | None]:
        if r.has_error():
            if r.error.code in NODE_GONE:
                self.dead.add(node)
            return None, f"FlowerError {r.error.code}: {r.error.reason.splitlines()[0][:200]}"
        return unpack(r.content)[0], None

    def _pull(self, busy: dict[str, tuple[str, int]], out: dict, deadline: float) -> bool:
        """Pull the replies that are there into ``out`` (their objects waited for until
        ``deadline`` at most); whether any came."""
        patches.PULL_DEADLINE = deadline
        try:
            pulled = self.grid.pull_messages(list(busy))
        finally:
            patches.PULL_DEADLINE = None
        got = False
        for r in pulled:
            mid = r.metadata.reply_to_message_id
            if mid in busy:
                c, n = busy.pop(mid)
                out[c] = self._reply(r, n)
                got = True
        return got

    def exchange(self, rnd: int, kind: str, clients: list[str], payload: bytes,
                 headers: dict[str, bytes]) -> dict[str, tuple[bytes | None, str | None]]:
        """Every client's message, each slot taking the next client as soon as it replied
        (a slow or dead SuperNode holds up only its own client); a client with its own
        SuperNode goes there. Replies until the round's deadline (one for all of the
        round's exchanges); a SuperNode that missed it is not used again."""

        out: dict[str, tuple[bytes | None, str | None]] = {}
        fixed = {c: n for n, c in self.owner.items() if c is not None}
        if self._deadline is None or self._deadline[0] != rnd:  # one deadline for the whole round
            self._deadline = (rnd, time.monotonic() + self.round_timeout)
        deadline = self._deadline[1]
        queue = list(clients)
        busy: dict[str, tuple[str, int]] = {}  # message id -> (client, node)
        while queue or busy:
            idle = [n for n, c in self.owner.items()
                    if c is None and n not in self.dead and all(n != b for _, b in busy.values())]
            wave: list[tuple[str, int]] = []
            for c in list(queue):
                node = fixed.get(c)
                if node is None:
                    if not idle:
                        continue
                    node = idle.pop(0)
                elif node in self.dead:
                    out[c] = (None, f"NodeUnavailable: the SuperNode of {c} is gone")
                    queue.remove(c)
                    continue
                wave.append((c, node))
                queue.remove(c)
            if wave:
                msgs = [Message(pack(payload, headers[c]), n, KIND_TO_TYPE[kind], group_id=str(rnd),
                                ttl=max(60.0, self.round_timeout)) for c, n in wave]
                ids = list(self.grid.push_messages(msgs))
                for (c, n), mid in zip(wave, ids):
                    if mid is None:
                        out[c] = (None, f"FlowerError: the message to SuperNode {n} could not be pushed")
                    else:
                        busy[mid] = (c, n)
            if not busy:
                for c in queue:
                    out[c] = (None, "NodeUnavailable: no SuperNode left to serve it")
                break
            got = self._pull(busy, out, deadline)
            if time.monotonic() >= deadline:
                if busy:  # what arrived while a pull waited for a dead node's objects
                    self._pull(busy, out, time.monotonic() + 1.0)
                for c, n in busy.values():
                    self.dead.add(n)
                    out[c] = (None, f"TimeoutError: no reply within the round's {self.round_timeout:.0f} s "
                                    f"(SuperNode {n})")
                for c in queue:
                    out[c] = (None, f"TimeoutError: the round's {self.round_timeout:.0f} s ran out before a "
                                    "SuperNode was free")
                break
            if not got:
                time.sleep(self.poll)
        return out
