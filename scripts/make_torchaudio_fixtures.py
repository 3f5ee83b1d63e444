"""torchaudio's RNN-T loss and Conformer layers on the inputs of fedasr's torchaudio
cross-checks, kept as fixtures: the tests compare fedasr against them without torchaudio
(tests/test_loss.py::test_matches_torchaudio_fixture, tests/test_model.py::
test_layer_matches_torchaudio_conformer_fixture), where the live comparisons skip.

torchaudio 2.11 (its last release) does not load with fedasr's torch, so the fixtures are
made in a separate environment with a matching pair (CPU is enough; the CUDA wheels work):

    python3 -m venv /tmp/ta-venv
    /tmp/ta-venv/bin/pip install torch==2.9.1 torchaudio==2.9.1 numpy pytest
    PYTHONPATH=$PWD /tmp/ta-venv/bin/python scripts/make_torchaudio_fixtures.py   # from the repo root

The inputs, the weights and the copy into torchaudio are the tests' own (``ta_inputs`` of
tests/test_loss.py; ``torchaudio_conformer_run`` of tests/test_model.py), imported from there. It writes ``tests/fixtures/torchaudio_rnnt.pt``
and ``tests/fixtures/torchaudio_conformer.pt`` (``torch.save`` of plain tensors, strings
and dicts; the tests load them with ``weights_only=True``), about 290 KB together:

- RNN-T: per case ``(T, blank)`` of test_matches_torchaudio, the inputs' sha256 (the test
  regenerates the inputs and checks it), torchaudio's losses
  for each reduction and its gradient for ``reduction="sum"`` at the lattice points that
  exist (``t < T_b``, ``u <= U_b``; this script checks that torchaudio's gradient is zero
  elsewhere, that ``"none"`` has the same gradient and ``"mean"`` that divided by B, bit for
  bit), so the files stay small.
- Conformer: the weights of fedasr's two layers as copied (their conv biases zeroed:
  torchaudio's have none), the input and torchaudio's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

FIXTURES = REPO / "tests" / "fixtures"


def make_rnnt() -> dict:
    """torchaudio's losses and gradients on the inputs of test_loss.py::test_matches_torchaudio."""
    import torchaudio
    from test_loss import REDUCTIONS, TA_CASES, _loss_and_grad, _pad_mask, inputs_sha256, ta_inputs

    out = {"torch": str(torch.__version__), "torchaudio": str(torchaudio.__version__), "cases": {}}
    for T, blank in TA_CASES:
        logits, targets, t_lens, u_lens = ta_inputs(T, blank)
        losses, grads = {}, {}
        for reduction in REDUCTIONS:
            losses[reduction], grads[reduction] = _loss_and_grad(
                torchaudio.functional.rnnt_loss, logits, targets.int(), t_lens.int(), u_lens.int(), blank=blank,
                reduction=reduction)
        on = _pad_mask(logits.shape, t_lens, u_lens)
        g = grads["sum"]
        assert bool((g[~on] == 0).all()), "torchaudio's gradient is not zero off the lattice"
        assert torch.equal(grads["none"], g) and torch.equal(grads["mean"], g / logits.shape[0])
        out["cases"][f"T{T}_blank{blank}"] = {"inputs_sha256": inputs_sha256(logits, targets, t_lens, u_lens),
                                              "loss": losses, "grad_sum_on_lattice": g[on].clone()}
    return out


def make_conformer() -> dict:
    """torchaudio's Conformer with fedasr's weights copied in, as test_model.py::
    test_layer_matches_torchaudio_conformer runs it."""
    import torchaudio
    import torchaudio.models as ta_models
    from test_model import torchaudio_conformer_run

    model, x, lengths, expected = torchaudio_conformer_run(ta_models)
    layers = {k: v.clone() for k, v in model.encoder.layers.state_dict().items()}
    return {"torch": str(torch.__version__), "torchaudio": str(torchaudio.__version__), "layers": layers, "x": x,
            "lengths": lengths, "expected": expected}


def main() -> None:
    FIXTURES.mkdir(exist_ok=True)
    for name, make in (("torchaudio_rnnt.pt", make_rnnt), ("torchaudio_conformer.pt", make_conformer)):
        path = FIXTURES / name
        tmp = path.with_suffix(".tmp")
        torch.save(make(), tmp)
        tmp.replace(path)
        print(f"{path.relative_to(REPO)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
