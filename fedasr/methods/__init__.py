"""Pruning methods as strategies (see :mod:`fedasr.methods.base`). Each import below is a
method's registration line."""

from fedasr.methods.base import PruningMethod, registry  # noqa: F401
from fedasr.methods import federated_pruning  # noqa: F401
from fedasr.methods import fedtiny  # noqa: F401
from fedasr.methods import asp  # noqa: F401


def make_method(pruning, model, total_rounds: int, seed: int) -> PruningMethod:
    """The configured method (``pruning.method``), built for ``model``."""
    cls = registry()[pruning.method]
    return cls(pruning.block(pruning.method), pruning, model, total_rounds, seed)
