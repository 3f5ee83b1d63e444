"""The Flower ClientApp: hands each message to fedasr's client side.

A SuperNode's node config may name ``client-id`` (it then serves that client only) and
``federation-dir`` (its copy of the federation; default: the run's). The run config
(``fedasr train`` passes it with ``flwr run``) carries the resolved run config as JSON.

Run by fedasr's executor (:mod:`fedasr.fl.flower.executor`, what ``fedasr supernode``
and ``fedasr train --engine flower`` start), the ClientApp is thin — it does not import
torch — and passes the message's bytes to the SuperNode's warm client worker, which keeps
the model and the clients' data loaded between messages; a worker that dies fails that
message with the reason. Run by Flower's own SuperExec (a plain ``flower-supernode``, a
fresh process per message) it does the work in its own process, cold.
"""

from __future__ import annotations

import json
import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedasr.fl.flower import channel
from fedasr.fl.flower.wire import pack, unpack

app = ClientApp()
_WORKERS: dict = {}  # in-process fallback: per process


def _federation(context: Context) -> str:
    return str(context.node_config.get("federation-dir") or context.run_config["federation"])


def _worker(context: Context):
    key = (context.run_config["config"], _federation(context))
    if key not in _WORKERS:
        import torch

        from fedasr.fl.client import ClientWorker

        if "OMP_NUM_THREADS" in os.environ:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        _WORKERS.clear()
        _WORKERS[key] = ClientWorker.for_run(json.loads(context.run_config["config"]), _federation(context),
                                             device=os.environ.get("FEDASR_DEVICE") or None)
    return _WORKERS[key]


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"hello": ConfigRecord({"client-id": str(context.node_config.get("client-id", ""))})}),
                   reply_to=msg)


def _handle(msg: Message, context: Context) -> Message:
    payload, header = unpack(msg.content)
    ch = channel.CURRENT
    if ch is not None:
        key = json.dumps({"config": context.run_config["config"], "federation": _federation(context)}).encode()
        reply = ch.request(key, header or b"", payload)
    else:
        reply = _worker(context).handle(header, payload)
    return Message(pack(reply), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context)


@app.query("phase")
def phase(msg: Message, context: Context) -> Message:
    return _handle(msg, context)
