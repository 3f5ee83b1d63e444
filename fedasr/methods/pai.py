"""Pruning at initialisation: SNIP (Lee et al., ICLR 2019, "SNIP: Single-shot Network Pruning
based on Connection Sensitivity") and SynFlow (Tanaka et al., NeurIPS 2020, "Pruning neural
networks without any data by iteratively conserving synaptic flow") as pruning methods.

The server scores every prunable weight once, before round 1, on the model it starts from
(initial, or the seed of ``--init-from``), keeps the ``round((1 - s) N)`` best over all
prunable tensors together (one global ranking, as both papers do), and the federation then
trains with that mask fixed. A pruned ``--init-from`` checkpoint keeps its own masks.

- ``snip``: score |w ⊙ g| with g the gradient of the RNN-T loss summed over ``batches`` of
  the server's own data (the federation's ``--server-split``), on the dense model in
  evaluation mode (BatchNorm uses its running statistics, no dropout).
- ``synflow``: data-free, on a linearised float64 copy of the model (:func:`linearised`):
  every parameter by its absolute value, every normalisation (LayerNorm, BatchNorm) reduced
  to its affine part, ReLU/SiLU/tanh replaced by the identity, GLU by the sum of its halves,
  attention by uniform weights over the keys. All-ones features (1 x 64 frames) go through
  the encoder and a fixed target (4 tokens of id 1, or 2 when 1 is the blank) through the
  predictor; each branch's projection into the joiner is divided by its own total (a
  constant), and R is the sum of the joint logits; the score is |w ⊙ ∂R/∂w|. Over
  ``iterations`` rounds the kept share follows the exponential schedule d^(k/K); each round
  rescores with the mask so far applied and keeps the best ``round(d^(k/K) N)`` of the
  weights still alive.

Where this departs from the papers: SynFlow's conservation of synaptic flow holds for
networks of positively homogeneous layers; applied literally to the Conformer-Transducer
(only weights by absolute value) it collapses the encoder — LayerNorm renormalises the flow
away and the joiner's tanh saturates, so at 70% sparsity the encoder's feed-forward layers
kept 0.0% of their weights on the ci model. The linearisation above restores the
conservation (every encoder tensor then carries about the same flow), and the branch
normalisation keeps the shallow predictor from being pruned away by the deep encoder's far
larger flow (10^30 x on the ci model; docs/methods.md has the numbers). What it cannot give is flow to the attention's
queries and keys: with the all-ones input every frame is the same, so the attention weights
do not matter and q_proj/k_proj score 0 — they keep only their floor unless
``max_layer_sparsity`` reserves more. LSTM cells are left as they are (their gates
saturate: an LSTM predictor gets less flow than the stateless one). Both methods keep at
least one weight of every prunable tensor (its best; ``max_layer_sparsity`` below 1
reserves ``ceil((1 - max) size)``), so neither removes a tensor entirely (SNIP's pure
global ranking could). SNIP scores the RNN-T loss alone (no auxiliary CTC or simple loss):
the prunable tensors all lie on its path.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fedasr.errors import FedasrError
from fedasr.methods.base import MethodUpdate, PruningMethod, RoundContext, register, require_server_batches
from fedasr.prune.allocation import keep_top
from fedasr.prune.masks import Masks, apply_masks

SYNFLOW_FRAMES = 64
SYNFLOW_TOKENS = 4


def needs_target(pruning, prefix: str) -> None:
    if pruning.target_sparsity <= 0:
        raise FedasrError(f"{prefix}: needs pruning.target_sparsity > 0")


@dataclass
class PruneAtInitConfig:
    # no prunable tensor is pruned beyond this (1.0: the papers' pure global ranking; a
    # tensor still keeps its best weight)
    max_layer_sparsity: float = 1.0

    def validate(self, prefix: str) -> None:
        p = f"{prefix}." if prefix else ""
        if not 0 < self.max_layer_sparsity <= 1:
            raise FedasrError(f"{p}max_layer_sparsity: must be in (0, 1]")

    def check_common(self, pruning, prefix: str) -> None:
        needs_target(pruning, prefix)
        if pruning.target_sparsity > self.max_layer_sparsity:
            raise FedasrError(f"{prefix}.max_layer_sparsity: {self.max_layer_sparsity} is below "
                              f"pruning.target_sparsity {pruning.target_sparsity}")


@dataclass
class SnipConfig(PruneAtInitConfig):
    """SNIP (Lee et al., ICLR 2019): pruning at initialisation by |w·g| on the server's data,
    the mask fixed for the run."""

    batches: int = 4  # server batches the gradient is summed over

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.batches < 1:
            raise FedasrError(f"{prefix}{'.' if prefix else ''}batches: must be at least 1")


@dataclass
class SynFlowConfig(PruneAtInitConfig):
    """SynFlow (Tanaka et al., NeurIPS 2020): data-free pruning at initialisation by iterative
    synaptic flow on a linearised model, the mask fixed for the run."""

    iterations: int = 100  # scoring rounds of the exponential schedule (the paper's 100)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.iterations < 1:
            raise FedasrError(f"{prefix}{'.' if prefix else ''}iterations: must be at least 1")


def rnnt_loss(model: nn.Module, batch) -> torch.Tensor:
    """The RNN-T loss of ``batch`` (no auxiliary loss): what the server's data is scored on."""
    from fedasr.trainer import transducer_loss

    return transducer_loss(model, batch)[0]


def gradient_sums(model: nn.Module, names: list[str], masks: Masks, batches: Iterable, square: bool = False,
                  loss: Callable = rnnt_loss) -> dict[str, torch.Tensor]:
    """Σ over ``batches`` of the gradient of ``loss(model, batch)`` (``square``: of its
    square) at every weight of ``names`` (float64), on a copy of ``model`` with ``masks``
    applied, in evaluation mode; pruned positions get their gradient too. The model is not
    changed."""
    net = copy.deepcopy(model)
    apply_masks(net, masks)
    net.eval()
    params = dict(net.named_parameters())
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            net.zero_grad(set_to_none=True)
            loss(net, batch).backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    g = g.detach().double().cpu()
                    sums[n] += g * g if square else g
            seen += 1
    if not seen:
        raise FedasrError("pruning: the server's data gave no batch to score the weights on")
    return sums


def snip_scores(model: nn.Module, names: list[str], batches: Iterable,
                loss: Callable = rnnt_loss) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |w ⊙ g|, g = Σ over ``batches`` of ∂loss/∂w (float64)."""
    grads = gradient_sums(model, names, {}, batches, loss=loss)
    params = dict(model.named_parameters())
    return {n: (params[n].detach().double() * grads[n]).abs() for n in names}


def transducer_flow(net: nn.Module) -> torch.Tensor:
    """SynFlow's R of a linearised Transducer: all-ones features (1 x ``SYNFLOW_FRAMES``)
    through the encoder and a fixed target (``SYNFLOW_TOKENS`` of one non-blank id) through
    the predictor; each branch's projection into the joiner is divided by its own total (a
    constant), so that the deep encoder and the shallow predictor bring the same flow to the
    joint, and R is the sum of the joint logits (the auxiliary heads are not on the decoding
    path and carry no flow)."""
    token = 1 if net.blank_id != 1 else 2
    feats = torch.ones(1, SYNFLOW_FRAMES, net.cfg.num_features, dtype=torch.float64)
    targets = torch.full((1, SYNFLOW_TOKENS), token, dtype=torch.long)
    enc, _ = net.encode(feats, torch.tensor([SYNFLOW_FRAMES]))
    pred = net.predictor.forward_with_sos(targets)
    enc_p, pred_p = net.joiner.project_encoder(enc), net.joiner.project_predictor(pred)
    # each branch sums to 1 over the (T', U + 1) grid of the joint
    enc_p = enc_p / (enc_p.sum().detach().clamp(min=1e-300) * pred_p.shape[1])
    pred_p = pred_p / (pred_p.sum().detach().clamp(min=1e-300) * enc_p.shape[1])
    return net.joiner.joint(enc_p[:, :, None, :], pred_p[:, None, :, :]).sum()


def _affine(module: nn.Module, args, out) -> torch.Tensor:
    """A normalisation's output reduced to its affine part (a forward hook)."""
    x = args[0]
    # LayerNorm: over the trailing dims; BatchNorm and ChannelLayerNorm: channels on dim 1
    shape = None if isinstance(module, nn.LayerNorm) else (1, -1) + (1,) * (x.dim() - 2)
    if module.weight is not None:
        x = x * (module.weight if shape is None else module.weight.view(shape))
    if module.bias is not None:
        x = x + (module.bias if shape is None else module.bias.view(shape))
    return x


@contextmanager
def linearised(net: nn.Module):
    """``net``'s forward linearised for SynFlow: every normalisation (LayerNorm, BatchNorm,
    the conv module's ChannelLayerNorm) reduced to its affine part, and the activations
    (ReLU, SiLU, GELU, tanh) replaced by the identity, GLU by the sum of its two halves and
    attention by uniform weights over the keys, so that a positive input flows through
    positive weights without saturating (tanh, gates, softmax) or being renormalised away
    (norms). LSTM cells stay as they are."""
    from fedasr.model.conformer import ChannelLayerNorm

    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, ChannelLayerNorm)
    handles = [m.register_forward_hook(_affine) for m in net.modules() if isinstance(m, norms)]
    identity = (lambda x, *a, **k: x)  # noqa: E731

    def glu(x, dim=-1):
        a, b = x.chunk(2, dim)
        return a + b

    def attention(q, k, v, attn_mask=None, **kw):  # uniform weights over the keys a query sees
        if attn_mask is None:
            return v.mean(-2, keepdim=True).expand(*v.shape[:-2], q.shape[-2], v.shape[-1])
        weights = attn_mask.to(v.dtype).expand(*q.shape[:-1], k.shape[-2])
        return (weights / weights.sum(-1, keepdim=True)) @ v

    # (the functions are swapped process-wide while the flow is computed: the server does
    # nothing else meanwhile)
    patched = [(F, "relu", identity), (F, "silu", identity), (F, "gelu", identity), (F, "tanh", identity),
               (F, "glu", glu), (F, "scaled_dot_product_attention", attention), (torch, "relu", identity),
               (torch, "tanh", identity)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patched]
    try:
        for obj, name, fn in patched:
            setattr(obj, name, fn)
        yield net
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        for h in handles:
            h.remove()


def synflow_scores(model: nn.Module, names: list[str], masks: Masks,
                   flow: Callable = transducer_flow) -> dict[str, torch.Tensor]:
    """|w ⊙ ∂R/∂w| (float64) with R = ``flow(net)`` of the linearised ``model`` (a float64
    copy in evaluation mode, every parameter by its absolute value, :func:`linearised`) with
    ``masks`` applied; the model is not changed."""
    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for t in net.parameters():
            t.abs_()
    apply_masks(net, masks)
    with torch.enable_grad(), linearised(net):
        r = flow(net)
        if not bool(torch.isfinite(r)):
            raise FedasrError("pruning.synflow: the linearised flow R overflows float64 on this model")
        r.backward()
    params = dict(net.named_parameters())
    return {n: (params[n].detach() * params[n].grad).abs() if params[n].grad is not None
            else torch.zeros_like(params[n].detach()) for n in names}


def synflow_masks(model: nn.Module, names: list[str], n_keep: int, iterations: int, max_layer: float = 1.0,
                  flow: Callable = transducer_flow) -> Masks:
    """SynFlow's iterative pruning: over ``iterations`` rounds k the kept count follows
    round(N d^(k/K)) (d = n_keep / N; the last round keeps ``n_keep``), each round rescoring
    with the mask so far and ranking the weights still alive (:func:`keep_top`)."""
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    n_all = sum(sizes[n] for n in names)
    masks: Masks = {}
    for k in range(1, iterations + 1):
        scores = synflow_scores(model, names, masks, flow)
        n_k = n_keep if k == iterations else round(n_all * (n_keep / n_all) ** (k / iterations))
        masks = keep_top(scores, n_k, {n: ~m for n, m in masks.items()}, max_layer)
    return masks


class PruneAtInit(PruningMethod):
    """Scores once on the server (:meth:`scores`), keeps the global best, trains with the
    fixed mask."""

    @classmethod
    def whole_unit_masks(cls, cfg) -> str | None:
        return f"{cls.name}'s masks are unstructured"

    def n_keep(self, model: nn.Module) -> int:
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        return round((1.0 - self.common.target_sparsity) * sum(sizes[n] for n in self.names))

    def init(self, ctx: RoundContext) -> Masks:
        if ctx.masks:  # a pruned --init-from checkpoint: its masks
            return ctx.masks
        return self.prune(ctx)

    def prune(self, ctx: RoundContext) -> Masks:
        raise NotImplementedError

    def update(self, ctx: RoundContext, aggregator) -> MethodUpdate:
        return MethodUpdate(ctx.masks)


@register
class Snip(PruneAtInit):
    name = "snip"
    Config = SnipConfig
    needs_server_data = True

    def prune(self, ctx: RoundContext) -> Masks:
        batches = itertools.islice(require_server_batches(ctx, self.name)(), self.cfg.batches)
        scores = snip_scores(ctx.model, self.names, batches)
        return keep_top(scores, self.n_keep(ctx.model), max_layer=self.cfg.max_layer_sparsity)


@register
class SynFlow(PruneAtInit):
    name = "synflow"
    Config = SynFlowConfig

    def prune(self, ctx: RoundContext) -> Masks:
        return synflow_masks(ctx.model, self.names, self.n_keep(ctx.model), self.cfg.iterations,
                             self.cfg.max_layer_sparsity)
