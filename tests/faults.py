"""Faults injected from outside the shipped code, for crash/resume tests:

    python tests/faults.py kill-in-round N ARGS...   # `fedasr ARGS...`, SIGKILLed in round N

``kill-in-round N``: the process kills itself (SIGKILL) in round N right after the round's
first client finished training — mid-round, before aggregation and the round's checkpoint.
"""

import os
import signal
import sys


def kill_in_round(n: int) -> None:
    from fedasr.fl import round as fl_round

    exchange = fl_round.LocalTransport.exchange

    def first_client_then_die(self, rnd, kind, clients, payload, headers):
        if rnd != n or kind != fl_round.TRAIN:
            return exchange(self, rnd, kind, clients, payload, headers)
        exchange(self, rnd, kind, clients[:1], payload, headers)
        os.kill(os.getpid(), signal.SIGKILL)

    fl_round.LocalTransport.exchange = first_client_then_die


if __name__ == "__main__":
    fault, arg, *rest = sys.argv[1:]
    if fault != "kill-in-round":
        raise SystemExit(f"unknown fault {fault!r}")
    kill_in_round(int(arg))
    from fedasr.cli import main

    sys.argv = ["fedasr", *rest]
    main()
