"""Transducer decoding: batched greedy search and modified beam search.

Both take encoder output ``enc`` (B, T, d_model) and lengths ``enc_lens`` (B,) as
returned by :meth:`Transducer.encode`, and run under ``torch.no_grad()`` in the model's
current mode (call ``model.eval()`` first: dropout in the predictor would otherwise be
active). Hypotheses are lists of token ids without blanks.

Scores are natural-log probabilities summed along the decoding path (log-added over
merged paths in beam search), accumulated in float64.

Both stay on the model's device: every frame is a fixed sequence of tensor operations over
the whole batch (all hypotheses of all utterances at once in beam search), with no value
read back to the host until the end (greedy search on the CPU does check whether any
utterance emitted a symbol, to skip the frame's remaining symbol steps: on the CPU that
costs nothing). The predictor runs on every row and its new state is kept only where a
symbol was emitted.
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["greedy_search", "beam_search", "beam_search_nbest"]


def _check_inputs(enc: torch.Tensor, enc_lens) -> tuple[list[int], torch.Tensor]:
    """The lengths as a host list (read once) and as a long tensor on ``enc``'s device."""
    if enc.dim() != 3:
        raise ValueError(f"enc must be (B, T, D), got shape {tuple(enc.shape)}")
    lens = torch.as_tensor(enc_lens).long().view(-1)
    if lens.numel() != enc.size(0):
        raise ValueError(f"enc_lens has {lens.numel()} entries for a batch of {enc.size(0)}")
    host = lens.tolist()
    if host and (max(host) > enc.size(1) or min(host) < 0):
        raise ValueError(f"enc_lens must lie in [0, {enc.size(1)}], got {host}")
    return host, lens.to(enc.device, non_blocking=True)


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
    lens, lens_dev = _check_inputs(enc, enc_lens)
    batch = enc.size(0)
    scores = torch.zeros(batch, dtype=torch.float64, device=enc.device)
    t_max = max(lens) if batch else 0
    if t_max == 0:
        hyps: List[List[int]] = [[] for _ in range(batch)]
        return (hyps, scores.tolist()) if return_scores else hyps
    blank = model.blank_id
    joiner, predictor = model.joiner, model.predictor
    on_host = enc.device.type == "cpu"  # reading emit.any() is free there: skip idle symbol steps
    enc_p = joiner.project_encoder(enc[:, :t_max])
    out, state = predictor(torch.full((batch, 1), blank, dtype=torch.long, device=enc.device))
    pred_p = joiner.project_predictor(out[:, 0])
    S = max_symbols_per_frame
    emitted = torch.full((t_max, S, batch), -1, dtype=torch.long, device=enc.device)  # token or -1
    for t in range(t_max):
        active = lens_dev > t
        for s in range(S):
            logp = F.log_softmax(joiner.joint(enc_p[:, t], pred_p), dim=-1)
            best_lp, tok = logp.max(dim=-1)
            scores += torch.where(active, best_lp.double(), torch.zeros_like(scores))
            emit = active & (tok != blank)
            if on_host and not bool(emit.any()):
                break
            emitted[t, s] = torch.where(emit, tok, -1)
            o, new_state = predictor(tok.unsqueeze(1), state)
            state = predictor.merge_state(state, emit, new_state)
            pred_p = torch.where(emit[:, None], joiner.project_predictor(o[:, 0]), pred_p)
            active = emit
    flat = emitted.permute(2, 0, 1).reshape(batch, -1).tolist()  # the one read of the device
    hyps = [[v for v in row if v >= 0] for row in flat]
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

    All utterances are searched at once, ``beam`` hypothesis slots each, on the device:
    a token extension (i, v) merges with the blank extension of hypothesis j when i's
    labels are j's without its last one, v (compared exactly, label by label); ties are
    broken as a stable sort of [blank extensions by slot, token extensions by (slot,
    token)] would.
    """
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    lens, lens_dev = _check_inputs(enc, enc_lens)
    B = enc.size(0)
    t_max = max(lens) if B else 0
    if t_max == 0:
        return [[([], 0.0)] for _ in range(B)]
    device = enc.device
    blank = model.blank_id
    joiner, predictor = model.joiner, model.predictor
    K = beam
    k_tok = min(beam, joiner.output.out_features - 1)
    neg_inf = float("-inf")
    enc_p = joiner.project_encoder(enc[:, :t_max])  # (B, T, J)
    out, state = predictor(torch.full((B * K, 1), blank, dtype=torch.long, device=device))
    pred_p = joiner.project_predictor(out[:, 0])  # (B*K, J): every slot starts at the start symbol
    score = torch.full((B, K), neg_inf, dtype=torch.float64, device=device)
    score[:, 0] = 0.0  # one hypothesis (no label) per utterance
    seqs = torch.zeros((B, K, t_max), dtype=torch.long, device=device)  # labels (at most one a frame)
    length = torch.zeros((B, K), dtype=torch.long, device=device)
    slots = torch.arange(K, device=device)
    pos = torch.arange(t_max, device=device)
    rows = (torch.arange(B, device=device) * K).view(B, 1)
    for t in range(t_max):
        logp = F.log_softmax(joiner.joint(enc_p[:, t, None, :], pred_p.view(B, K, -1)), dim=-1).double()  # (B, K, V)
        valid = score > neg_inf
        last = seqs.gather(2, (length - 1).clamp(min=0).unsqueeze(2)).squeeze(2)  # (B, K): j's last label
        # prefix[b, i, j]: hypothesis i's labels are j's without its last one
        agree = (seqs[:, :, None, :] == seqs[:, None, :, :]) | (pos >= length[:, :, None, None])
        prefix = agree.all(3) & (length[:, :, None] + 1 == length[:, None, :]) & valid[:, :, None] & valid[:, None, :]
        # blank extensions, merged with the token extension (i, last_j) that gives the same labels
        via = torch.where(prefix, score[:, :, None] + logp.gather(2, last[:, None, :].expand(B, K, K)), neg_inf)
        blank_ext = torch.logaddexp(score + logp[..., blank], via.amax(1))  # (B, K)
        # each hypothesis's k_tok best token extensions, by token id; those merged above are out
        tok_lp = logp.clone()
        tok_lp[..., blank] = neg_inf
        top = tok_lp.topk(k_tok, dim=-1).indices.sort(dim=-1).values  # (B, K, k_tok)
        tok_ext = score[:, :, None] + logp.gather(2, top)
        merged = ((top[:, :, :, None] == last[:, None, None, :]) & prefix[:, :, None, :]).any(3)
        tok_ext = tok_ext.masked_fill(merged | ~valid[:, :, None], neg_inf)
        cand = torch.cat([blank_ext, tok_ext.flatten(1)], dim=1)  # (B, K + K * k_tok)
        order = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :K]
        is_tok = order >= K
        ti = (order - K).clamp(min=0)
        parent = torch.where(is_tok, ti // k_tok, order)
        token = top.flatten(1).gather(1, ti)
        active = (lens_dev > t).view(B, 1)  # an utterance past its last frame keeps its beam
        score = torch.where(active, cand.gather(1, order), score)
        parent = torch.where(active, parent, slots)
        is_tok = is_tok & active
        # the new slots: their parents' labels (+ the token), predictor state and output
        seqs = seqs.gather(1, parent.unsqueeze(2).expand(B, K, t_max))
        length = length.gather(1, parent)
        seqs = torch.where(is_tok.unsqueeze(2) & (pos == length.unsqueeze(2)), token.unsqueeze(2), seqs)
        length = length + is_tok.long()
        src = (rows + parent).view(-1)
        state = predictor.select_state(state, src)
        pred_p = pred_p[src]
        emit = is_tok.view(-1)
        o, new_state = predictor(torch.where(is_tok, token, blank).view(-1, 1), state)
        state = predictor.merge_state(state, emit, new_state)
        pred_p = torch.where(emit[:, None], joiner.project_predictor(o[:, 0]), pred_p)
    seqs, length, score = seqs.tolist(), length.tolist(), score.tolist()  # the one read of the device
    return [[(seqs[b][k][:length[b][k]], score[b][k]) for k in range(K) if score[b][k] > neg_inf]
            for b in range(B)]


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
