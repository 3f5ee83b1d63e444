"""Inference FLOPs of a model (dense, and scaled by each weight's share of nonzeros):
what `fedasr info` reports and the compaction benchmark compares."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedasr.model.transducer import Transducer


def _lstm_flops(model: Transducer, tokens: int) -> int:
    lstm = model.predictor.lstm
    total = 0
    for layer in range(lstm.num_layers):
        inp = lstm.input_size if layer == 0 else lstm.hidden_size
        total += 2 * 4 * lstm.hidden_size * (inp + lstm.hidden_size) * tokens
    return total


def weight_density(model: Transducer) -> dict[str, float]:
    """Share of nonzero weights of each module that has a weight."""
    out = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            out[name] = float((w != 0).float().mean())
    return out


@torch.no_grad()
def count_flops(model: Transducer, seconds: float = 10.0, tokens: int = 30) -> dict:
    """Inference FLOPs for one utterance: the encoder on ``seconds`` of audio, the predictor
    on ``tokens`` tokens and the joiner at T' + U lattice points (greedy decoding).

    Counted by torch.utils.flop_counter (matmuls and convolutions); the attention score
    products are not counted by it on CPU, the LSTM is added analytically. "nonzero"
    scales every weight's matmul/convolution by its share of nonzero weights.
    """
    model.eval()
    frames = int(seconds * 100)
    feats = torch.zeros(1, frames, model.cfg.num_features)
    density = weight_density(model)

    def measure(fn, prefix: str) -> tuple[int, float]:
        """FlopCounterMode names modules after the class of the outermost module called
        (``ConformerEncoder.layers.0...``); ``prefix`` maps that root back to its path."""
        with FlopCounterMode(display=False) as fc:
            fn()
        counts = fc.get_flop_counts()
        dense = sum(counts.get("Global", {}).values())
        sparse = float(dense)
        for key, ops in counts.items():
            if key == "Global" or "." not in key:
                continue
            mod = prefix + key.split(".", 1)[1]
            if mod in density:
                sparse -= sum(ops.values()) * (1 - density[mod])
        return dense, sparse

    enc_out = {}

    def run_encoder():
        enc_out["enc"], enc_out["lens"] = model.encoder(feats, torch.tensor([frames]))

    enc_dense, enc_sparse = measure(run_encoder, "encoder.")
    t_out = int(enc_out["lens"][0])
    enc_p = torch.zeros(1, model.cfg.d_model)
    pred_p = torch.zeros(1, model.predictor.output_dim)
    j_dense, j_sparse = measure(lambda: model.joiner(enc_p[:, None], pred_p[:, None]), "joiner.")
    points = t_out + tokens
    if hasattr(model.predictor, "lstm"):
        # the LSTM has no `.weight` (flop_counter misses it): counted analytically, scaled by
        # the density of its weight matrices
        lstm_w = [p for n, p in model.predictor.lstm.named_parameters() if n.startswith("weight")]
        lstm_density = sum(int((w != 0).sum()) for w in lstm_w) / sum(w.numel() for w in lstm_w)
        p_dense = _lstm_flops(model, tokens)
        p_sparse = p_dense * lstm_density
    else:  # stateless: one step per token, measured
        step = torch.zeros(1, 1, dtype=torch.long)
        p_dense, p_sparse = measure(lambda: model.predictor(step), "predictor.")
        p_dense, p_sparse = p_dense * tokens, p_sparse * tokens
    dense = enc_dense + j_dense * points + p_dense
    nonzero = enc_sparse + j_sparse * points + p_sparse
    return {"seconds": seconds, "tokens": tokens, "flops": int(dense), "flops_nonzero": int(nonzero),
            "encoder_flops": int(enc_dense), "encoder_flops_nonzero": int(enc_sparse)}
