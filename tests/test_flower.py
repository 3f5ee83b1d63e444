"""The Flower engine on loopback: the same weights as the embedded engine, a SuperNode
killed mid-round, the whole federation killed and resumed, nothing left running."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, run_cli, sets

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
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_flower_engine_gives_the_embedded_weights(federation, tmp_path):
    one = {"OMP_NUM_THREADS": "1"}  # Flower's clients get one thread each (2 slots on 2 cores)
    emb = run_cli("train", "--federation", federation, "--out", tmp_path / "emb", *sets(*RUN), env=one)
    assert emb.returncode == 0, emb.stderr
    flw = run_cli("train", "--engine", "flower", "--federation", federation, "--out", tmp_path / "flw", "--slots", "2",
                  *sets(*RUN), env=one)
    assert flw.returncode == 0, flw.stderr + flw.stdout
    a, b = final_state(tmp_path / "emb"), final_state(tmp_path / "flw")
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert diff <= 1e-5 and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical: same order, same bytes
    ra, rb = rows(tmp_path / "emb"), rows(tmp_path / "flw")
    assert [r["bytes_down"] for r in ra] == [r["bytes_down"] for r in rb]  # the same messages were sent
    assert all(abs(x["bytes_up"] - y["bytes_up"]) < 16 for x, y in zip(ra, rb))  # up to the clients' time digits
    cfg = (tmp_path / "flw" / "config.yaml").read_text()
    assert "engine: flower" in cfg and (tmp_path / "flw" / "checkpoints" / "round_0003.pt").is_file()
    # the run directory works with the other commands unchanged
    ev = run_cli("eval", "--run", tmp_path / "flw", "--split", "test-clean")
    assert ev.returncode == 0 and "test-clean" in json.loads((tmp_path / "flw" / "results.json").read_text())
    assert flower_processes(tmp_path / "flw") == []


@pytest.mark.e2e
def test_killed_supernode_is_dropped_and_a_killed_federation_resumes(federation, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "fedasr.cli", "train", "--engine", "flower", "--federation", str(federation),
            "--out", str(run), "--slots", "2", "--round-timeout", "20", *sets(*RUN, "fl.min_clients=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDASR_TEST_KILL_SUPERNODE_AFTER_ROUND": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 540
    while (not (run / "metrics.jsonl").exists() or len(rows(run)) < 2) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1]
    # round 2 went on without the client of the killed SuperNode, with the reason
    r2 = rows(run)[1]
    assert len(r2["dropped"]) == 1 and "TimeoutError" in r2["dropped"][0]["reason"]
    assert len(r2["clients"]) - len(r2["dropped"]) == 1
    # now the whole federation goes down (as Ctrl-C would take it): everything it started stops
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
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
    t = T.FlowerTransport(Grid(), ["a", "b", "c"], wait_nodes=0.5)
    assert t.clients == ["a", "b"] and t.owner == {11: "a", 12: "b"}
    Grid.nodes = {11: "a", 13: "x"}
    with pytest.raises(Exception, match="client-id 'x' is not a client"):
        T.FlowerTransport(Grid(), ["a", "b", "c"], wait_nodes=0.5)
