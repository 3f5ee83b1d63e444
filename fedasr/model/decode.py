"""Transducer decoding: batched greedy search and modified beam search.

Both take encoder output ``enc`` (B, T, d_model) and lengths ``enc_lens`` (B,) as
returned by :meth:`Transducer.encode`, and run under ``torch.no_grad()`` in the model's
current mode (call ``model.eval()`` first: dropout in the predictor would otherwise be
active). Hypotheses are lists of token ids without blanks.

Scores are natural-log probabilities summed along the decoding path (log-added over
merged paths in beam search), accumulated in float64.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["greedy_search", "beam_search", "beam_search_nbest"]


def _check_inputs(enc: torch.Tensor, enc_lens: torch.Tensor) -> torch.Tensor:
    if enc.dim() != 3:
        raise ValueError(f"enc must be (B, T, D), got shape {tuple(enc.shape)}")
    enc_lens = torch.as_tensor(enc_lens, device=enc.device).long().view(-1)
    if enc_lens.numel() != enc.size(0):
        raise ValueError(f"enc_lens has {enc_lens.numel()} entries for a batch of {enc.size(0)}")
    if enc_lens.numel() and (int(enc_lens.max()) > enc.size(1) or int(enc_lens.min()) < 0):
        raise ValueError(f"enc_lens must lie in [0, {enc.size(1)}], got {enc_lens.tolist()}")
    return enc_lens


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@torch.no_grad()
def greedy_search(
    model,
    enc: torch.Tensor,
    enc_lens: torch.Tensor,
    max_symbols_per_frame: int = 1,
    return_scores: bool = False,
) -> Union[List[List[int]], Tuple[List[List[int]], List[float]]]:
    """Batched greedy decoding.

    At each frame the argmax symbol is taken; a non-blank symbol is appended, the
    predictor advances (only for the utterances that emitted) and the same frame is
    tried again, up to ``max_symbols_per_frame`` symbols per frame (default 1: sherpa-onnx's
    greedy and modified beam searches emit at most one symbol a frame, so what fedasr
    reports is what a deployment gets).

    With ``return_scores`` also returns each path's summed log-probability of the
    chosen symbols (blanks included). With ``max_symbols_per_frame=1`` this is the
    path score of the one-symbol-per-frame topology used by :func:`beam_search`.
    """
    if max_symbols_per_frame < 1:
        raise ValueError(f"max_symbols_per_frame must be >= 1, got {max_symbols_per_frame}")
    enc_lens = _check_inputs(enc, enc_lens)
    batch = enc.size(0)
    hyps: List[List[int]] = [[] for _ in range(batch)]
    scores = torch.zeros(batch, dtype=torch.float64, device=enc.device)
    t_max = int(enc_lens.max()) if batch else 0
    if t_max > 0:
        blank = model.blank_id
        joiner, predictor = model.joiner, model.predictor
        enc_p = joiner.project_encoder(enc[:, :t_max])
        out, state = predictor(torch.full((batch, 1), blank, dtype=torch.long, device=enc.device))
        pred_p = joiner.project_predictor(out[:, 0])
        for t in range(t_max):
            active = enc_lens > t
            for _ in range(max_symbols_per_frame):
                logp = F.log_softmax(joiner.joint(enc_p[:, t], pred_p), dim=-1)
                best_lp, tok = logp.max(dim=-1)
                scores += torch.where(active, best_lp.double(), torch.zeros_like(scores))
                emit = active & (tok != blank)
                if not bool(emit.any()):
                    break
                rows = emit.nonzero().view(-1)
                for b, v in zip(rows.tolist(), tok[rows].tolist()):
                    hyps[b].append(v)
                o, new_state = predictor(tok[rows].unsqueeze(1), predictor.select_state(state, rows))
                predictor.update_state(state, rows, new_state)
                pred_p[rows] = joiner.project_predictor(o[:, 0])
                active = emit
    if return_scores:
        return hyps, scores.tolist()
    return hyps


@torch.no_grad()
def beam_search_nbest(
    model, enc: torch.Tensor, enc_lens: torch.Tensor, beam: int = 4
) -> List[List[Tuple[List[int], float]]]:
    """Modified beam search; per utterance the final beam as ``(tokens, score)``, best first.

    Topology: every frame emits exactly one symbol, blank or a token (at most one
    token per frame). Per frame each hypothesis is extended by blank and by tokens;
    extensions with equal label sequences are merged by log-add, and the ``beam``
    best are kept. The candidate set is exact: it holds every blank extension, each
    hypothesis's ``beam`` best token extensions, and every token extension that merges
    with a blank extension, so the kept set is the true top ``beam`` after merging.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    enc_lens = _check_inputs(enc, enc_lens)
    results = []
    for b in range(enc.size(0)):
        n = int(enc_lens[b])
        results.append(_beam_one(model, enc[b, :n], beam))
    return results


def _beam_one(model, enc: torch.Tensor, beam: int) -> List[Tuple[List[int], float]]:
    blank = model.blank_id
    joiner, predictor = model.joiner, model.predictor
    if enc.size(0) == 0:
        return [([], 0.0)]
    enc_p = joiner.project_encoder(enc)  # (T, J)
    out, state = predictor(torch.full((1, 1), blank, dtype=torch.long, device=enc.device))
    pred_p = joiner.project_predictor(out[:, 0])  # (N, J)
    seqs: List[Tuple[int, ...]] = [()]
    scores: List[float] = [0.0]
    vocab = joiner.output.out_features
    k_tok = min(beam, vocab - 1)

    for t in range(enc.size(0)):
        logp = F.log_softmax(joiner.joint(enc_p[t : t + 1], pred_p), dim=-1).double()  # (N, V)
        logp_list = logp.tolist()
        # candidate extensions: key -> merged score; how to get its predictor state
        merged: Dict[Tuple[int, ...], float] = {}
        origin: Dict[Tuple[int, ...], Tuple[int, Optional[int]]] = {}
        for i, seq in enumerate(seqs):  # blank: same labels, same predictor state
            merged[seq] = scores[i] + logp_list[i][blank]
            origin[seq] = (i, None)
        tok_lp = logp.clone()
        tok_lp[:, blank] = -math.inf
        top = tok_lp.topk(k_tok, dim=-1).indices.tolist()
        pairs = {(i, v) for i in range(len(seqs)) for v in top[i]}
        index = {seq: i for i, seq in enumerate(seqs)}
        for seq in seqs:  # token extensions that merge with a blank extension
            if seq and seq[:-1] in index:
                pairs.add((index[seq[:-1]], seq[-1]))
        for i, v in sorted(pairs):
            key = seqs[i] + (v,)
            s = scores[i] + logp_list[i][v]
            if key in merged:
                merged[key] = _log_add(merged[key], s)
            else:
                merged[key] = s
                origin[key] = (i, v)
        kept = sorted(merged, key=lambda k: merged[k], reverse=True)[:beam]

        src = [origin[k][0] for k in kept]
        src_t = torch.tensor(src, dtype=torch.long, device=enc.device)
        new_state = tuple(x.clone() for x in predictor.select_state(state, src_t))
        new_p = pred_p[src_t].clone()
        ext = [j for j, k in enumerate(kept) if origin[k][1] is not None]
        if ext:
            ext_t = torch.tensor(ext, dtype=torch.long, device=enc.device)
            toks = torch.tensor([[origin[kept[j]][1]] for j in ext], dtype=torch.long, device=enc.device)
            o, st = predictor(toks, predictor.select_state(new_state, ext_t))
            predictor.update_state(new_state, ext_t, st)
            new_p[ext_t] = joiner.project_predictor(o[:, 0])
        state, pred_p = new_state, new_p
        seqs = kept
        scores = [merged[k] for k in kept]

    return [(list(s), sc) for s, sc in zip(seqs, scores)]


@torch.no_grad()
def beam_search(
    model,
    enc: torch.Tensor,
    enc_lens: torch.Tensor,
    beam: int = 4,
    return_scores: bool = False,
) -> Union[List[List[int]], Tuple[List[List[int]], List[float]]]:
    """Modified beam search (see :func:`beam_search_nbest`); the best hypothesis per utterance.

    With ``return_scores`` also returns the best hypothesis's (merged) log-probability.
    """
    nbest = beam_search_nbest(model, enc, enc_lens, beam=beam)
    hyps = [n[0][0] for n in nbest]
    if return_scores:
        return hyps, [n[0][1] for n in nbest]
    return hyps
