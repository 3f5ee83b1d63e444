"""`fedasr train --engine flower`: start (or reach) a Flower federation, submit the run,
follow it, and stop everything that was started — also on Ctrl-C or error.

One machine: a SuperLink and one SuperNode (:mod:`fedasr.fl.flower.node`: warm client
worker, no 3 s poll) per concurrent client slot (``devices``: slot i trains on the i-th
device, round robin, seeing only that GPU), on loopback (``--insecure``), free ports, an isolated ``FLWR_HOME`` under ``RUN_DIR/flower/``
(logs there too), telemetry and update checks off. With ``superlink=HOST:PORT`` nothing
is started: the run is submitted to that SuperLink (TLS with ``root_certificates``).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedasr.errors import FedasrError, OptionError
from fedasr.rundir import RunDir

APP_DIR = Path(__file__).parent / "app"
CONNECTION = "fedasr"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text(errors="replace")
                kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (Flower starts helpers in new sessions, so a process
    group does not reach them all)."""
    kids, out, stack = _children(), [pid], [pid]
    while stack:
        for c in kids.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _die_with_parent() -> None:
    """In a started child: SIGTERM it when this process dies, however it dies (Linux).
    Flower's own helpers watch their parent and follow."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def become_subreaper() -> None:
    """Orphaned grandchildren (Flower's helpers) are re-parented to this process, so that
    they can be found and stopped (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def flower_env(home: Path, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FedasrError(f"--engine flower: {name} not found (install the flower extra: pip install 'fedasr[flower]')")
    return str(path)


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int


def slot_env(device: str) -> dict[str, str]:
    """The environment of a SuperNode slot that trains on ``device``: ``cuda:N`` sees only
    GPU N (``CUDA_VISIBLE_DEVICES=N``) and its worker trains on ``cuda`` (that GPU);
    ``cuda``: the GPUs as they are; ``cpu``: no GPU at all."""
    from fedasr.fl.flower.worker import DEVICE_ENV

    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "", DEVICE_ENV: "cpu"}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1], DEVICE_ENV: "cuda"}
    if device == "cuda":
        return {DEVICE_ENV: "cuda"}
    raise OptionError(f"--devices: unknown device {device!r} (cpu, cuda, cuda:N)")


def parse_devices(given: list[str] | str | None) -> list[str]:
    """The ``--devices`` values (a list, or one comma-separated text: ``cuda:0,cuda:1``) ->
    ["cuda:0", "cuda:1"], each checked: cpu, cuda or cuda:N."""
    if not given:
        return []
    texts = [given] if isinstance(given, str) else list(given)
    devices = [d.strip() for t in texts for d in t.split(",") if d.strip()]
    for d in devices:
        if not (d in ("cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise OptionError(f"--devices: unknown device {d!r} (cpu, cuda, cuda:N)")
    if not devices:
        raise OptionError(f"--devices: no device in {given!r}")
    return devices


class LocalFederation:
    """A SuperLink and ``slots`` SuperNodes on 127.0.0.1, all stopped by :meth:`stop`;
    ``devices``: slot i trains on ``devices[i % len(devices)]`` (:func:`slot_env`)."""

    def __init__(self, workdir: Path, slots: int, threads: int, federation: str | None = None,
                 devices: list[str] | None = None):
        self.workdir = workdir
        self.home = workdir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.federation = federation
        self.devices = list(devices or [])
        self.env = flower_env(self.home, threads)
        self.procs: list[Started] = []
        self.superlink = ""

    def _spawn(self, name: str, argv: list[str], port: int, ready: str, timeout: float = 120.0,
               env: dict | None = None) -> Started:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            p = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                 cwd=self.workdir,
                                 start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        st = Started(name, p, log, port)
        self.procs.append(st)
        end = time.monotonic() + timeout
        while not re.search(ready, log.read_text(errors="replace")):
            if p.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise FedasrError(f"flower: {name} exited ({p.returncode}): {tail[0][:200]}; log: {log}")
            if time.monotonic() > end:
                raise FedasrError(f"flower: {name} not ready within {timeout:.0f} s; log: {log}")
            time.sleep(0.1)
        return st

    def start(self) -> str:
        port = free_port()
        self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                  "--isolation", "subprocess", "--disable-runtime-dependency-installation"],
                    port, r"Uvicorn running on http://127\.0\.0\.1:%d" % port)
        self.superlink = f"127.0.0.1:{port}"
        for i in range(self.slots):
            p = free_port()
            node_cfg = f"federation-dir={json.dumps(self.federation)}" if self.federation else ""
            # fedasr's SuperNode: Flower's (poll patched) + fedasr's executor + a warm client worker
            argv = [sys.executable, "-m", "fedasr.fl.flower.node", "--insecure", "--superlink", self.superlink,
                    "--host", "127.0.0.1", "--port", str(p)]
            if node_cfg:
                argv += ["--node-config", node_cfg]
            env = slot_env(self.devices[i % len(self.devices)]) if self.devices else None
            self._spawn(f"supernode-{i}", argv, p, r"SuperNode ID: \d+", env=env)
        return self.superlink

    def pids(self) -> list[int]:
        """Everything started: the process trees, and Flower's helpers re-parented to this
        process (its subreaper) after their parent exited — recognised by this federation's
        FLWR_HOME in their environment (nothing else this process runs is touched)."""
        out: set[int] = set()
        for st in self.procs:
            out.update(process_tree(st.popen.pid))
        marker = f"FLWR_HOME={self.home}".encode()
        for p in process_tree(os.getpid())[1:]:
            try:
                if marker in Path(f"/proc/{p}/environ").read_bytes():
                    out.add(p)
            except OSError:
                pass
        return sorted(out)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process tree (SuperNodes first), SIGKILL what is left after
        ``grace`` seconds, and wait for them."""
        for st in reversed(self.procs):
            _signal(process_tree(st.popen.pid), signal.SIGTERM)
        _signal(self.pids(), signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_alive(p) for p in self.pids()):
            time.sleep(0.1)
        _signal([p for p in self.pids() if _alive(p)], signal.SIGKILL)
        for st in self.procs:
            try:
                st.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._reap()

    @staticmethod
    def _reap() -> None:
        """Reap re-parented zombies (we are their subreaper)."""
        for p in _children().get(os.getpid(), []):
            try:
                if not _alive(p):
                    os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                pass


def write_connection(home: Path, superlink: str, insecure: bool, root_certificates: str | None) -> None:
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps(superlink)}"]
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(root_certificates))}")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _flwr(args: list[str], env: dict, timeout: float = 120.0) -> dict:
    try:
        p = subprocess.run([_tool("flwr"), *args, "--format", "json"], capture_output=True, text=True, env=env,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FedasrError(f"flwr {args[0]}: no answer within {timeout:.0f} s (is the SuperLink reachable?)") from None
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError:
        msg = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FedasrError(f"flwr {args[0]}: {msg[0][:200]}") from None


def run_flower(run_dir: Path, federation: Path, config: dict, *, resume: bool = False, init_from: str | None = None,
               superlink: str | None = None, insecure: bool = True, root_certificates: str | None = None,
               slots: int = 2, round_timeout: float = 900.0, devices: list[str] | None = None,
               on_row: Callable[[dict], None] = lambda r: None) -> None:
    """Submit the run to Flower (starting a local federation unless ``superlink``), follow
    its metrics.jsonl (``on_row`` per finished round) until it ends; a failed run is a
    one-line error. Everything started here is stopped before returning."""
    work = Path(run_dir) / "flower"
    work.mkdir(parents=True, exist_ok=True)
    rd = RunDir(Path(run_dir))
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, slots))  # each slot its share of the cores, at most OMP_NUM_THREADS
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = min(threads, int(os.environ["OMP_NUM_THREADS"]))
    local = None if superlink else LocalFederation(work, slots, threads, str(Path(federation).resolve()), devices)
    env = flower_env(work / "home")
    run_id = None
    previous = len(rd.metrics()) if resume else 0

    def on_signal(signum, frame):  # SIGTERM / SIGHUP stop the run like Ctrl-C does
        raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        become_subreaper()
        if local is not None:
            superlink = local.start()
        write_connection(work / "home", superlink, insecure or local is not None, root_certificates)
        run_config = {"run-dir": str(Path(run_dir).resolve()), "federation": str(Path(federation).resolve()),
                      "config": json.dumps(config), "resume": bool(resume),
                      "init-from": str(Path(init_from).resolve()) if init_from else "",
                      "round-timeout": float(round_timeout)}
        (work / "run_config.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
        res = _flwr(["run", str(APP_DIR), CONNECTION, "--run-config", str(work / "run_config.toml")], env)
        if not res.get("success"):
            raise FedasrError(f"flwr run: {res.get('error-message', res)}")
        run_id = str(res["run-id"])
        seen = previous
        last_status = 0.0
        while True:
            rows = rd.metrics()
            for row in rows[seen:]:
                on_row(row)
            seen = max(seen, len(rows))
            if time.monotonic() - last_status > 3.0:
                last_status = time.monotonic()
                st = (_flwr(["ls", CONNECTION, "--run-id", run_id], env).get("runs") or [{}])[0]
                status = st.get("status", "")
                if status.startswith("finished"):
                    for row in rd.metrics()[seen:]:
                        on_row(row)
                    if status != "finished:completed":
                        detail = str(st.get("status-details", "") or status)
                        detail = detail.split("fedasr: ", 1)[-1].splitlines()[0]
                        logs = f"; logs: {work}" if local is not None else ""
                        raise FedasrError(f"flower run {run_id} {status.split(':')[1]}: {detail[:300]}{logs}")
                    return
            time.sleep(0.5)
    except BaseException:
        if run_id is not None and local is None:  # a remote SuperLink: stop the run there too
            try:
                subprocess.run([_tool("flwr"), "stop", run_id, CONNECTION], env=env, capture_output=True, timeout=60)
            except subprocess.TimeoutExpired:
                pass
        raise
    finally:
        for s in old:  # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        try:
            if local is not None:
                local.stop()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
