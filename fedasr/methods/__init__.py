"""Pruning methods as strategies (see :mod:`fedasr.methods.base`). Each import below is a
method's registration line.

The config parser keeps the methods' blocks (``pruning.NAME: {...}``) as raw mappings;
this layer knows the methods, so it parses and checks them: :func:`method_blocks` (the
pruning section) and :func:`validate` (a whole run config), which every entry point calls
before training starts, and :func:`make_method`, which builds the configured method."""

from __future__ import annotations

import dataclasses

from fedasr.config import COMMON_PRUNING_KEYS
from fedasr.configlib import from_dict
from fedasr.errors import FedasrError
from fedasr.methods.base import PruningMethod, registry  # noqa: F401
from fedasr.methods import federated_pruning  # noqa: F401
from fedasr.methods import fedtiny  # noqa: F401
from fedasr.methods import asp  # noqa: F401
from fedasr.methods import feddst  # noqa: F401
from fedasr.methods import prunefl  # noqa: F401
from fedasr.methods import pai  # noqa: F401  (snip, synflow)


def method_blocks(pruning, prefix: str = "pruning") -> dict:
    """Method name -> its parsed config block (a method's ``Config``), for every block the
    pruning section gives and for the selected method (its defaults when none is given).
    An unknown key or method, or a bad setting, is an error naming the field."""
    methods = registry()
    p = f"{prefix}." if prefix else ""
    configurable = sorted(n for n, m in methods.items() if m.Config is not None)
    blocks = {}
    for k, v in pruning.blocks.items():
        if k not in configurable:
            raise FedasrError(f"{p}{k}: unknown key (known: {', '.join(list(COMMON_PRUNING_KEYS) + configurable)})")
        if not isinstance(v, dict):
            raise FedasrError(f"{p}{k}: expected a mapping of {k}'s settings, got {v!r}")
        blocks[k] = from_dict(methods[k].Config, v, f"{p}{k}")
    if pruning.method not in methods:
        raise FedasrError(f"{p}method: unknown {pruning.method!r} ({', '.join(sorted(methods))})")
    cfg_cls = methods[pruning.method].Config
    if cfg_cls is not None and pruning.method not in blocks:
        blocks[pruning.method] = from_dict(cfg_cls, {}, f"{p}{pruning.method}")
    check = getattr(blocks.get(pruning.method), "check_common", None)
    if check is not None:
        check(pruning, f"{p}{pruning.method}")
    return blocks


def method_config(pruning, prefix: str = "pruning"):
    """The parsed config block of the selected method (None for ``none``), the whole
    pruning section checked."""
    return method_blocks(pruning, prefix).get(pruning.method)


def resolved_pruning(pruning) -> dict:
    """The pruning section as a mapping with every method block in full (the defaults the
    recipe leaves out filled in): what a run's config.yaml records, so that a later change of
    a method's defaults does not change a resumed run."""
    d = pruning.to_dict()
    d.update({name: dataclasses.asdict(block) for name, block in method_blocks(pruning).items()})
    return d


def validate(cfg) -> None:
    """Check what a run config asks of the pruning methods (the method blocks, and the
    settings other sections need from the method); one-line errors naming the field."""
    block = method_config(cfg.pruning)
    registry()[cfg.pruning.method].check_run(cfg)
    if cfg.fl.client_model == "compact":
        why = registry()[cfg.pruning.method].whole_unit_masks(block)
        if why is not None:
            raise FedasrError(f"fl.client_model: compact needs masks that remove whole units, "
                              f"but {why} (use fl.client_model: auto to fall back to masked training)")


def make_method(pruning, model, total_rounds: int, seed: int) -> PruningMethod:
    """The configured method (``pruning.method``), built for ``model``."""
    block = method_config(pruning)  # the whole section checked: an unknown method too
    return registry()[pruning.method](block, pruning, model, total_rounds, seed)
