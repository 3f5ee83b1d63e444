"""The Flower ServerApp: fedasr's run (server side, checkpoints after every round,
metrics.jsonl) with the Flower transport. Started by the SuperLink for `flwr run`; the run
config names the run directory, the federation and the resolved run config."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedasr.config import parse_config
    from fedasr.data.federation import Federation
    from fedasr.errors import FedasrError
    from fedasr.fl.flower.patches import patch_grid
    from fedasr.fl.flower.transport import FlowerTransport
    from fedasr.fl.runner import Runner

    rc = context.run_config
    run_dir = Path(rc["run-dir"])
    try:
        patch_grid()  # replies' objects: retried after 0.05 s, not 1 s (checked against flwr's source)
        transport = FlowerTransport(grid, float(rc.get("round-timeout", 900.0)), log=lambda s: print(s, flush=True))
        if rc.get("resume"):
            device = json.loads(rc["config"]).get("device") if rc.get("config") else None  # (fedasr train --device)
            runner = Runner.resume(run_dir, federation=rc["federation"] or None, engine="flower", transport=transport,
                                   device=device)
        else:
            cfg = parse_config(json.loads(rc["config"]))
            runner = Runner(run_dir, Federation(rc["federation"]), cfg, engine="flower", transport=transport)
            runner.start(overwrite=True, init_from=rc.get("init-from") or None)
        runner.run_rounds()
    except FedasrError as e:  # one line, for `fedasr train` to show
        print(f"fedasr error: {e}", file=sys.stderr, flush=True)
        raise RuntimeError(f"fedasr: {e}") from None
    except Exception:
        traceback.print_exc()
        raise
