"""The Flower engine on loopback: the same weights as the embedded engine, a SuperNode
killed mid-round, the whole federation killed and resumed, nothing left running."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, sets
from faults import fault_env

pytest.importorskip("flwr")

RUN = FAST + ["fl.rounds=3", "eval.every=0", "fl.aggregation=fedadam"]


def flower_processes(run_dir: Path) -> list[int]:
    """Processes started for this run: Flower's have FLWR_HOME under the run directory."""
    marker = f"FLWR_HOME={run_dir.resolve()}/flower/home".encode()
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if marker in Path(f"/proc/{d}/environ").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return found


def final_state(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest, weights_only=True)["model"]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"  # (written whole, then renamed)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.e2e
def test_flower_engine_gives_the_embedded_weights(federation, tmp_path):
    # Flower's clients get one thread each (2 slots on 2 cores); a reply's wall-clock fields read
    # 0.0 (tests/faults.py), so that replies of the same update have the same length
    one = {"OMP_NUM_THREADS": "1", **fault_env("fixed-clock")}
    emb = run_cli("train", "--federation", federation, "--out", tmp_path / "emb", *sets(*RUN), env=one)
    assert emb.returncode == 0, emb.stderr
    flw = run_cli("train", "--engine", "flower", "--federation", federation, "--out", tmp_path / "flw", "--slots", "2",
                  *sets(*RUN), env=one)
    assert flw.returncode == 0, flw.stderr + flw.stdout
    a, b = final_state(tmp_path / "emb"), final_state(tmp_path / "flw")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical: same order, same bytes
    ra, rb = rows(tmp_path / "emb"), rows(tmp_path / "flw")
    assert len(ra) == len(rb) == 3 and all(r["client_times"] == [0.0, 0.0] for r in ra + rb)  # the fixed clock
    # the same messages were sent, both ways
    assert [(r["bytes_down"], r["bytes_up"]) for r in ra] == [(r["bytes_down"], r["bytes_up"]) for r in rb]
    cfg = (tmp_path / "flw" / "config.yaml").read_text()
    assert "engine: flower" in cfg and (tmp_path / "flw" / "checkpoints" / "round_0003.pt").is_file()
    # the run directory works with the other commands unchanged
    ev = run_cli("eval", "--run", tmp_path / "flw", "--split", "test-clean")
    assert ev.returncode == 0 and "test-clean" in json.loads((tmp_path / "flw" / "results.json").read_text())
    assert flower_processes(tmp_path / "flw") == []


@pytest.mark.e2e
def test_killed_supernode_is_dropped_and_a_killed_federation_resumes(federation, tmp_path):
    """The faults are placed, not timed (tests/faults.py): the first client worker to get a
    training message of round 2 kills its SuperNode; round 3 never ends (its worker holds),
    so the SIGTERM that takes the whole federation down lands inside it."""
    run, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    args = [sys.executable, "-m", "fedasr.cli", "train", "--engine", "flower", "--federation", str(federation),
            "--out", str(run), "--slots", "2",
            # the dead node is known by Flower's NODE_UNAVAILABLE, not by the round timeout: a
            # generous one, that no client of a loaded machine misses and that nothing waits for
            "--round-timeout", "600", *sets(*RUN, "fl.min_clients=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **fault_env("kill-node-in-round=2", "hold-in-round=3", fault_dir=faults)}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        hang = time.monotonic() + 900  # a hang fails the test instead of blocking the suite
        while len(rows(run)) < 2 and proc.poll() is None and time.monotonic() < hang:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert len(rows(run)) == 2, "no round 2 within 900 s"
        # round 2 went on without the client of the killed SuperNode, with the reason; the other one's update counts
        r2 = rows(run)[1]
        killed = (faults / "killed").read_text()
        assert [d["client"] for d in r2["dropped"]] == [killed] and killed in r2["clients"], r2
        assert re.match(r"FlowerError 5: Error: Node Unavailable", r2["dropped"][0]["reason"]), r2["dropped"]
        assert len(r2["clients"]) == 2 and r2["examples"] > 0 and len(r2["client_times"]) == 1
        # now the whole federation goes down (as Ctrl-C would take it): everything it started stops
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert flower_processes(run) == []
    assert len(rows(run)) == 2 and (run / "checkpoints" / "round_0002.pt").is_file()
    resumed = run_cli("train", "--engine", "flower", "--resume", run, "--slots", "2", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    final = rows(run)
    assert [r["round"] for r in final] == [1, 2, 3] and not final[2]["dropped"]
    assert flower_processes(run) == []


def test_supernodes_for_some_clients_only_narrow_the_sample(monkeypatch):
    """Regression: with SuperNodes for 2 of 3 clients the run waited forever; now the server
    samples among the clients whose SuperNode answered (a fake grid, no processes)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedasr.fl.flower import transport as T

    class Reply:
        def __init__(self, cid, mid):
            self.content = RecordDict({"hello": ConfigRecord({"client-id": cid})})
            self.metadata = type("M", (), {"reply_to_message_id": mid})()

        def has_error(self):
            return False

    class Grid:
        nodes = {11: "a", 12: "b"}

        def get_node_ids(self):
            return list(self.nodes)

        def push_messages(self, msgs):
            self.sent = [(i, m.metadata.dst_node_id) for i, m in enumerate(msgs)]
            return [i for i, _ in self.sent]

        def pull_messages(self, ids):
            return [Reply(self.nodes[n], i) for i, n in self.sent if i in ids]

    class FakeMessage:  # Flower's Message needs a running app's identity
        def __init__(self, content, dst, *a, **k):
            self.metadata = type("M", (), {"dst_node_id": dst})()

    monkeypatch.setattr(T, "Message", FakeMessage)
    t = T.FlowerTransport(Grid(), wait_nodes=0.5)
    assert t.connect(["a", "b", "c"]) == ["a", "b"] and t.owner == {11: "a", 12: "b"}
    Grid.nodes = {11: "a", 13: "x"}
    with pytest.raises(Exception, match="client-id 'x' is not a client"):
        T.FlowerTransport(Grid(), wait_nodes=0.5).connect(["a", "b", "c"])


class _Meta:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _FakeMessage:  # Flower's Message needs a running app's identity
    def __init__(self, content, dst, *a, **k):
        self.content = content
        self.metadata = _Meta(dst_node_id=dst)


class _FakeClock:
    """The transport's ``time``: ``sleep`` advances ``now`` (no waiting, no machine speed)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_dead_slot_holds_up_only_its_own_client(monkeypatch):
    """5 clients on 3 slots, one of which never replies: the two others serve the 4 other
    clients as soon as they are free (no waves waiting for the slowest), the dead one's
    client is dropped at the round's deadline with the reason, and that slot is not used
    again (a fake grid, no processes)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedasr.fl.flower import transport as T

    class Reply:
        def __init__(self, content, mid):
            self.content = content
            self.metadata = _Meta(reply_to_message_id=mid)

        def has_error(self):
            return False

    class Grid:
        def __init__(self):
            self.inbox, self.n, self.served = {}, 0, []

        def get_node_ids(self):
            return [1, 2, 3]

        def push_messages(self, msgs):
            ids = []
            for m in msgs:
                self.n += 1
                self.inbox[str(self.n)] = m
                ids.append(str(self.n))
            return ids

        def pull_messages(self, ids):
            out = []
            for i in ids:
                m = self.inbox.get(i)
                if m is None:
                    continue
                if "hello" in m.content:
                    out.append(Reply(RecordDict({"hello": ConfigRecord({"client-id": ""})}), i))
                elif m.metadata.dst_node_id == 3:  # node 3 died after saying hello
                    continue
                else:
                    self.served.append((m.metadata.dst_node_id, T.unpack(m.content)[1].decode(), clock.now))
                    out.append(Reply(T.pack(b"reply:" + T.unpack(m.content)[1]), i))
                del self.inbox[i]
            return out

    clock = _FakeClock()
    monkeypatch.setattr(T, "Message", _FakeMessage)
    monkeypatch.setattr(T, "time", clock)
    grid = Grid()
    t = T.FlowerTransport(grid, round_timeout=1.0, poll=0.01, wait_nodes=0.5)
    assert t.connect([f"c{i}" for i in range(5)]) is None and sorted(t.owner) == [1, 2, 3]  # three slots
    clients = [f"c{i}" for i in range(5)]
    start = clock.now
    out = t.exchange(1, "train", clients, b"weights", {c: c.encode() for c in clients})
    # the round ends at its deadline (the dead slot's client), not later
    assert start + 1.0 <= clock.now <= start + 1.0 + t.poll + 1e-9, clock.now - start
    lost = [c for c, (r, e) in out.items() if r is None]
    assert len(lost) == 1 and "TimeoutError" in out[lost[0]][1] and "SuperNode 3" in out[lost[0]][1]
    assert all(out[c][0] == b"reply:" + c.encode() for c in clients if c not in lost)
    assert {n for n, _, _ in grid.served} == {1, 2} and t.dead == {3}
    # the live slots served the 4 other clients at once: none waited for the dead slot
    assert sorted(c for _, c, _ in grid.served) == sorted(set(clients) - set(lost))
    assert all(when == start for _, _, when in grid.served)
    # the next round goes to the two live slots only, none is lost
    out = t.exchange(2, "train", clients, b"weights", {c: c.encode() for c in clients})
    assert all(out[c][0] == b"reply:" + c.encode() for c in clients)


def test_poll_patches_apply_to_the_pinned_flwr_and_refuse_other_code(monkeypatch):
    """The SuperNode's 3 s idle sleep and 0.5 s reply wait become the configured polls,
    object pulls retry sooner, and code that is not the pinned flwr's is refused loudly."""
    import time as real_time

    from fedasr.errors import FedasrError
    from fedasr.fl.flower import patches

    sci = patches.patch_supernode(idle=0.01, reply=0.001)
    slept = []
    with monkeypatch.context() as m:
        m.setattr(patches._time, "sleep", slept.append)  # what the real sleep is asked for
        sci.time.sleep(3)
        sci.time.sleep(0.5)
        sci.time.sleep(2)
    assert slept == [0.01, 0.001, 2]  # the loop's two waits shortened, any other sleep as it was
    assert sci.time.time is real_time.time and sci.time.monotonic is real_time.monotonic
    assert getattr(sci.pull_objects, "_fedasr_fast", False) and getattr(sci._push_messages, "_fedasr_trim", False)
    seen = {}

    def pull(ids, fn, *, initial_backoff=1, backoff_cap=10, max_tries_per_object=500):
        seen.update(initial_backoff=initial_backoff, backoff_cap=backoff_cap, tries=max_tries_per_object)

    patches._fast(pull)([], None)
    assert seen == {"initial_backoff": patches.PULL_BACKOFF, "backoff_cap": patches.PULL_BACKOFF_CAP, "tries": None}
    assert getattr(patches.patch_grid().pull_objects, "_fedasr_fast", False)
    patches.patch_runtime()
    with pytest.raises(FedasrError, match=r"start_client_internal\._push_messages is not the code"):
        patches.check_sources(sci, {"_push_messages": "0" * 64})
    with pytest.raises(FedasrError, match="FEDASR_FLOWER_POLL"):
        os.environ["FEDASR_FLOWER_POLL"] = "7"
        try:
            patches.seconds("FEDASR_FLOWER_POLL", 0.1)
        finally:
            del os.environ["FEDASR_FLOWER_POLL"]


DYING_WORKER = """
import os, socket, sys
from fedasr.fl.flower.wire import recv_frames, send_frames
s = socket.socket(fileno=int(sys.argv[-1]))
while True:
    key, header, payload = recv_frames(s, 3)
    if payload == b"die":
        os._exit(9)
    send_frames(s, b"ok", payload[::-1])
"""


def test_a_dead_client_worker_fails_its_message_with_the_reason_and_is_replaced():
    from fedasr.errors import FedasrError
    from fedasr.fl.flower.channel import WorkerChannel

    ch = WorkerChannel([sys.executable, "-c", DYING_WORKER])
    try:
        assert ch.request(b"k", b"h", b"abc") == b"cba"
        first = ch.pid
        assert ch.request(b"k", b"h", b"xyz") == b"zyx" and ch.pid == first  # the same, warm process
        with pytest.raises(FedasrError, match=rf"client worker \(pid {first}\) died \(exit status 9\)"):
            ch.request(b"k", b"h", b"die")
        assert ch.request(b"k", b"h", b"abc") == b"cba" and ch.pid != first and ch.started == 2
        os.kill(ch.pid, signal.SIGKILL)  # dead between messages: the next message simply starts a new one
        assert ch.proc.wait() == -signal.SIGKILL
        assert ch.request(b"k", b"h", b"ab") == b"ba" and ch.started == 3
    finally:
        pid = ch.pid
        ch.close()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_the_real_worker_answers_a_bad_request_with_one_line_and_stays_up():
    from fedasr.errors import FedasrError
    from fedasr.fl.flower.channel import WorkerChannel

    ch = WorkerChannel()
    try:
        with pytest.raises(FedasrError, match="^JSONDecodeError: Expecting value"):
            ch.request(b"not json", b"{}", b"")
        pid = ch.pid
        with pytest.raises(FedasrError, match="^/nonexistent: not a federation directory"):
            ch.request(b'{"config": "{}", "federation": "/nonexistent"}', b"{}", b"")
        assert ch.pid == pid and ch.started == 1
    finally:
        ch.close()


def test_a_warm_client_worker_keeps_the_datasets_of_its_last_clients(monkeypatch):
    """``cache_clients``: a client served again reuses its loaded dataset; beyond the limit
    the least recently served one goes. 0 (embedded): loaded with every message."""
    from types import SimpleNamespace

    from fedasr.fl import client as P

    made = []
    monkeypatch.setattr(P, "make_dataset", lambda cuts, tok, cmvn, cfg: made.append(cuts) or SimpleNamespace(c=cuts))

    def worker(cache):
        w = P.ClientWorker.__new__(P.ClientWorker)
        w.persistent, w.cache_clients, w._cache, w.cfg = False, cache, {}, None
        w.fed = SimpleNamespace(client_cuts=lambda c: c, tokenizer=None, cmvn=None)
        return w

    w = worker(2)
    a = w.dataset("a")
    assert w.dataset("b").c == "b" and w.dataset("a") is a and made == ["a", "b"]
    w.dataset("c")  # evicts b, the least recently served
    assert w.dataset("a") is a and made == ["a", "b", "c"]
    w.dataset("b")
    assert made == ["a", "b", "c", "b"] and list(w._cache) == ["a", "b"]
    made.clear()
    w = worker(0)
    w.dataset("a"), w.dataset("a")
    assert made == ["a", "a"] and not w._cache
