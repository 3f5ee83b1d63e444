"""`fedasr info`: what a checkpoint holds — per-layer shape, sparsity and nonzeros;
parameter, byte (dense and sparse-encoded) and FLOP totals."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedasr import codec
from fedasr.checkpoint import load_checkpoint
from fedasr.model.transducer import Transducer
from fedasr.prune.masks import configured_prunable_names, sparsity_report


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


def checkpoint_info(path: str | Path, seconds: float = 10.0) -> dict:
    model, tok, ckpt = load_checkpoint(path)
    state = model.state_dict()
    names = configured_prunable_names(model, ckpt.get("config"))
    rep = sparsity_report(state, names)
    params = {n: p.detach() for n, p in model.named_parameters()}
    layers = [{"name": n, "shape": list(p.shape), "numel": p.numel(), "nonzeros": int((p != 0).sum()),
               "sparsity": float((p == 0).float().mean()), "prunable": n in names}
              for n, p in params.items() if p.dim() >= 2]
    masks = dict(ckpt["masks"])
    return {
        "checkpoint": str(path),
        "parameters": sum(p.numel() for p in params.values()),
        "nonzeros": sum(int((p != 0).sum()) for p in params.values()),
        "prunable": rep["prunable"],
        "prunable_fraction": rep["prunable_fraction"],
        "sparsity": rep["sparsity"],
        "masked_tensors": len(masks),
        "dense_bytes": len(codec.encode(params)),
        "sparse_bytes": len(codec.encode(params, masks)),
        **count_flops(model, seconds),
        "layers": layers,
    }
