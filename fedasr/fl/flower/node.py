"""A SuperNode with warm clients: ``fedasr supernode [flower-supernode options]`` (or
``python -m fedasr.fl.flower.node ...``).

Three processes per SuperNode, started and stopped together:

- Flower's SuperNode (``flower-supernode --isolation process``, with the pinned patches of
  :mod:`fedasr.fl.flower.patches`): connects to the SuperLink, pulls messages;
- this process, fedasr's executor in place of Flower's SuperExec: it takes the
  SuperNode's ClientApp tasks over its Runtime API (``--host``/``--port``, loopback) and
  runs each in this process — the same steps as ``flwr-clientapp`` (pull the message and
  context, call the ClientApp of the run's FAB, push the reply and the task's status,
  heartbeats meanwhile) without starting a process per message; no torch here;
- the warm client worker (:mod:`fedasr.fl.flower.worker`): model, tokenizer,
  normalisation and the clients' data, loaded once, fed over a socket pair. If it dies,
  the message it worked on fails with the reason (the server drops that client) and the
  next message starts a new one.

The executor's AcquireTask poll is ``FEDASR_FLOWER_POLL`` seconds (default 0.1). When the
SuperNode exits, so does this process (and the worker with it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from fedasr.errors import FedasrError, OptionError
from fedasr.fl.flower import channel as channel_mod
from fedasr.fl.flower.patches import POLL_ENV, patch_runtime, seconds, trim_heap

def _heartbeat_fn(client):
    """Like flwr's, but a refused heartbeat (the task is gone) does not SIGINT the process."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    req = SendTaskHeartbeatRequest()

    def fn() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(req).success)
        except httpx.HTTPError:
            return False

    return fn


class Executor:
    """Takes a SuperNode's ClientApp tasks and runs them in this process."""

    def __init__(self, runtime_api: str, poll: float, worker: channel_mod.WorkerChannel | None = None):
        self.rc = patch_runtime()  # checks the flwr sources first
        self.runtime_api = runtime_api
        self.poll = poll
        self.apps: dict = {}  # FAB hash -> its ClientApp
        self.worker = worker
        self.tasks = 0

    def _client(self, token: str | None):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        icp = [RuntimeVersionHttpInterceptor(component_name="SuperExec" if token is None else "flwr-clientapp")]
        if token is not None:
            icp.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(server_address=self.runtime_api, insecure=True,
                                                     root_certificates=None, interceptors=icp,
                                                     retry_invoker=make_simple_http_retry_invoker())

    def _app(self, run, fab):
        app = self.apps.get(fab.hash_str)
        if app is None:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            self.apps[fab.hash_str] = app
        return app

    def run_task(self, token: str) -> None:
        """One ClientApp task, as ``flwr-clientapp`` runs it (flwr 1.41's run_clientapp)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender

        client = self._client(token)
        beat = HeartbeatSender(_heartbeat_fn(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            beat.start()
            message, context, run, fab = self.rc.pull_task_input(client)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - the reply carries it, as flwr-clientapp's does
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, f"cannot load the ClientApp: {ex}"
            print(f"fedasr executor: task failed: {reason}", file=sys.stderr, flush=True)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    self.rc.push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001
                print(f"fedasr executor: cannot push the reply: {ex}", file=sys.stderr, flush=True)
            self.rc.push_task_output(client=client, context=context, sub_status=status, details=details)
            if beat.is_running:
                beat.stop()
            client.close()
            self.tasks += 1
            trim_heap()

    def serve(self, alive=lambda: True) -> None:
        """Acquire and run tasks until ``alive()`` is false."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
        from flwr.supercore.constant import TaskType

        client = self._client(None)
        req = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while alive():
                res = client.AcquireTask(req)
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    time.sleep(self.poll)
        finally:
            client.close()


def _runtime_api(argv: list[str]) -> str:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9094)
    ap.add_argument("--isolation", default="process")
    a, _ = ap.parse_known_args(argv)
    if a.isolation != "process":
        raise OptionError(f"--isolation {a.isolation}: fedasr's SuperNode runs its ClientApps itself (process)")
    host = "127.0.0.1" if a.host in ("0.0.0.0", "") else a.host
    return f"{host}:{a.port}"


def _wait_port(address: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    host, port = address.rsplit(":", 1)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise FedasrError(f"the SuperNode exited ({proc.returncode}) before its Runtime API was up")
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise FedasrError(f"the SuperNode's Runtime API ({address}) is not up within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    from fedasr.fl.flower.launch import _die_with_parent

    argv = list(sys.argv[1:] if argv is None else argv)
    node = None
    worker = channel_mod.WorkerChannel()

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        runtime = _runtime_api(argv)
        poll = seconds(POLL_ENV, 0.1)
        executor = Executor(runtime, poll, worker)
        if "--isolation" not in argv:
            argv += ["--isolation", "process"]
        node = subprocess.Popen([sys.executable, "-m", "fedasr.fl.flower.supernode", *argv],
                                stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        worker.start()  # torch and fedasr load while the SuperNode connects
        channel_mod.CURRENT = worker
        _wait_port(runtime, node)
        executor.serve(alive=lambda: node.poll() is None)
        return node.returncode or 0
    except FedasrError as e:
        print(f"fedasr error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if node is not None and node.poll() is None:
            node.terminate()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
