"""Flower's SuperNode with fedasr's pinned patches (:mod:`fedasr.fl.flower.patches`: no
3 s idle poll, faster object pulls): ``python -m fedasr.fl.flower.supernode
[flower-supernode options]``; started by :mod:`fedasr.fl.flower.node`."""

from __future__ import annotations

import sys

from fedasr.errors import FedasrError


def main(argv: list[str] | None = None) -> None:
    from fedasr.fl.flower.patches import patch_supernode

    try:
        patch_supernode()
    except FedasrError as e:
        print(f"fedasr error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()
