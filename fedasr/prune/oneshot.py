"""`fedasr prune` (one-shot pruning of a checkpoint, the centralized-pruning baseline) and
`fedasr info` (per-layer sparsity, sizes and FLOPs of a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedasr.checkpoint import load_checkpoint, save_checkpoint
from fedasr.config import DEFAULT_PRUNABLE, PruningSection
from fedasr.data.batching import AsrDataset
from fedasr.data.federation import Federation
from fedasr.errors import FedasrError
from fedasr.fl import comm
from fedasr.model.transducer import Transducer
from fedasr.prune.masks import apply_masks, prunable_names, sparsity_report
from fedasr.prune.pruner import ClientPruning, FederatedPruning
from fedasr.trainer import transducer_loss


def gradient_report(model: Transducer, names: list[str], fed: Federation, batches: int, seed: int) -> dict:
    """Mean |gradient| of ``names`` over ``batches`` training batches of the federation."""
    from lhotse import CutSet

    cuts = CutSet.from_cuts(c for n in fed.client_ids for c in fed.client_cuts(n))
    ds = AsrDataset(cuts, fed.tokenizer, fed.cmvn, cache=False)
    acc = ClientPruning({}, names)
    # eval mode: BatchNorm normalises with (and does not update) the checkpoint's running
    # statistics, and no dropout; gradients flow all the same
    model.eval()
    torch.manual_seed(seed)
    for i, batch in enumerate(ds.batches(40.0, seed=seed)):
        if i >= batches:
            break
        model.zero_grad(set_to_none=True)
        loss, _ = transducer_loss(model, batch, 0.0)
        loss.backward()
        acc.after_backward(model)
    model.zero_grad(set_to_none=True)
    return acc.report()


def prune_checkpoint(path: str | Path, out: str | Path, *, sparsity: float, pattern: str, importance: str,
                     allocation: str, norm: str = "l2", federation: str | Path | None = None,
                     batches: int = 8, seed: int = 0, max_layer_sparsity: float = 0.95) -> dict:
    model, tok, ckpt = load_checkpoint(path)
    cfg = PruningSection(method="federated_pruning", pattern=pattern, importance=importance, norm=norm,
                         target_sparsity=sparsity, allocation=allocation, refine=False,
                         max_layer_sparsity=max(max_layer_sparsity, sparsity))
    cfg.validate("")
    run_cfg = ckpt.get("config") or {}
    include = run_cfg.get("pruning", {}).get("include", list(DEFAULT_PRUNABLE))
    cfg.include = include
    pruner = FederatedPruning(cfg, model, total_rounds=1, seed=seed)
    if importance == "gradient":
        if federation is None:
            raise FedasrError("--importance gradient: needs --federation to compute gradients on training data")
        fed = Federation(federation)
        if fed.tokenizer.proto != tok.proto:
            raise FedasrError(f"{path}: the checkpoint's tokenizer differs from {fed.root}/tokenizer.model")
        pruner.reports = gradient_report(model, pruner.names, fed, batches, seed)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    masks = pruner.compute(1, weights, dict(ckpt["masks"]))
    apply_masks(model, masks)
    config = dict(run_cfg)
    config["pruned_from"] = str(path)
    config["oneshot_pruning"] = {"sparsity": sparsity, "pattern": pattern, "importance": importance,
                                 "allocation": allocation, "norm": norm, "seed": seed}
    save_checkpoint(out, model, tok, masks=masks, config=config)
    return sparsity_report(model.state_dict(), pruner.names)


def _lstm_flops(model: Transducer, tokens: int) -> int:
    lstm = model.predictor.lstm
    total = 0
    for layer in range(lstm.num_layers):
        inp = lstm.input_size if layer == 0 else lstm.hidden_size
        total += 2 * 4 * lstm.hidden_size * (inp + lstm.hidden_size) * tokens
    return total


def _density(model: Transducer) -> dict[str, float]:
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
    density = _density(model)

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
    include = (ckpt.get("config") or {}).get("pruning", {}).get("include", list(DEFAULT_PRUNABLE))
    names = prunable_names(model, include)
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
        "dense_bytes": len(comm.encode(params)),
        "sparse_bytes": len(comm.encode(params, masks)),
        **count_flops(model, seconds),
        "layers": layers,
    }
