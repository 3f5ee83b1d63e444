"""Structured pruning groups, read off a :class:`~fedasr.model.transducer.Transducer`.

A *family* is a set of interchangeable units inside one block (the hidden units of a
feed-forward module, the heads of a self-attention module, ...). Unit ``i`` of a family
owns, for every member ``m``, the slice ``model_tensor(m.param).index_select(m.dim,
m.index[i])``. Zeroing every slice a unit owns disconnects the unit: nothing it owns
then influences the model's output, and no other parameter is left dead by it.

Members name parameters *and* buffers (BatchNorm running statistics), by their
``state_dict`` key.

Families and what unit ``i`` owns:

``ffn_unit`` (``encoder.layers.L.ff1.units`` / ``ff2.units``)
    ``linear1.weight`` row i, ``linear1.bias`` i, ``linear2.weight`` column i.
``attention_head`` (``encoder.layers.L.attn.heads``)
    rows ``i*dh:(i+1)*dh`` of ``q_proj``/``k_proj``/``v_proj`` weights and biases,
    the same columns of ``out_proj.weight``.
``conv_channel`` (``encoder.layers.L.conv.channels``)
    ``pointwise1`` weight rows/bias at i and i+d (the GLU value/gate pair),
    ``depthwise`` weight/bias i, ``batch_norm`` weight/bias/running_mean/running_var i
    (``conv_norm: layernorm``: ``layer_norm`` weight/bias i),
    ``pointwise2.weight`` column i.
``predictor_unit`` (stateless predictor: ``predictor.units``)
    ``embedding.weight`` column i, ``conv.weight`` channel i (depthwise), ``conv.bias`` i,
    ``joiner.pred_proj.weight`` column i.
``predictor_unit`` (LSTM predictor: ``predictor.lstm.lK.units``)
    rows ``{i, H+i, 2H+i, 3H+i}`` (input/forget/cell/output gates) of
    ``weight_ih_lK``, ``weight_hh_lK``, ``bias_ih_lK``, ``bias_hh_lK``; column i of
    ``weight_hh_lK`` (the recurrent input from unit i); column i of the consumer,
    ``weight_ih_l(K+1)`` or ``joiner.pred_proj.weight`` for the last layer (and
    ``simple_lm_proj.weight`` when the model has the simple-loss heads).
``joiner_unit`` (``joiner.units``)
    ``enc_proj`` weight row/bias i, ``pred_proj`` weight row/bias i,
    ``joiner.output.weight`` column i.

Overlap: units of one family own disjoint elements, with one unavoidable exception:
in ``weight_hh_lK`` element ``(gate row of unit i, column j)`` belongs to unit i (its
row) and unit j (its column). Both must be zero for either unit to be disconnected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

__all__ = ["GroupMember", "GroupFamily", "group_families", "KINDS", "RESIDUAL_READERS"]

# The weights whose inputs (columns) are the encoder's residual stream (d_model features, each
# read through a LayerNorm): the feed-forward modules' first linear, the attention's q/k/v
# projections, the conv module's first pointwise conv, and the joiner's encoder projection
# (the encoder output). Pruning the same input features in all of them is a narrower residual
# stream (``coherent_column``).
RESIDUAL_READERS = re.compile(r"^(encoder\.layers\.\d+\.(ff1\.linear1|ff2\.linear1|attn\.[qkv]_proj|conv\.pointwise1)"
                              r"|joiner\.enc_proj)\.weight$")

KINDS = ("ffn_unit", "attention_head", "conv_channel", "predictor_unit", "joiner_unit")


@dataclass
class GroupMember:
    param: str  # state_dict key of a parameter or buffer
    dim: int
    index: torch.Tensor  # LongTensor (num_units, k)


@dataclass
class GroupFamily:
    name: str
    kind: str
    num_units: int
    members: List[GroupMember] = field(default_factory=list)


def _rows(n: int, k: int = 1) -> torch.Tensor:
    """Unit i owns the contiguous block ``[i*k, (i+1)*k)``."""
    return torch.arange(n * k, dtype=torch.long).view(n, k)


def _strided(n: int, copies: int) -> torch.Tensor:
    """Unit i owns ``{i, n+i, 2n+i, ...}`` (``copies`` entries)."""
    return torch.arange(n, dtype=torch.long)[:, None] + n * torch.arange(copies, dtype=torch.long)[None, :]


def _ffn_family(prefix: str, ff: nn.Module) -> GroupFamily:
    n = ff.linear1.out_features
    idx = _rows(n)
    members = [
        GroupMember(f"{prefix}.linear1.weight", 0, idx),
        GroupMember(f"{prefix}.linear1.bias", 0, idx),
        GroupMember(f"{prefix}.linear2.weight", 1, idx),
    ]
    return GroupFamily(f"{prefix}.units", "ffn_unit", n, members)


def _attention_family(prefix: str, attn: nn.Module) -> GroupFamily:
    h, dh = attn.num_heads, attn.d_head
    idx = _rows(h, dh)
    members = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        members.append(GroupMember(f"{prefix}.{proj}.weight", 0, idx))
        members.append(GroupMember(f"{prefix}.{proj}.bias", 0, idx))
    members.append(GroupMember(f"{prefix}.out_proj.weight", 1, idx))
    return GroupFamily(f"{prefix}.heads", "attention_head", h, members)


def _conv_family(prefix: str, conv: nn.Module) -> GroupFamily:
    d = conv.depthwise.out_channels
    idx = _rows(d)
    glu = _strided(d, 2)
    members = [
        GroupMember(f"{prefix}.pointwise1.weight", 0, glu),
        GroupMember(f"{prefix}.pointwise1.bias", 0, glu),
        GroupMember(f"{prefix}.depthwise.weight", 0, idx),
        GroupMember(f"{prefix}.depthwise.bias", 0, idx),
    ]
    if hasattr(conv, "batch_norm"):
        for name in ("weight", "bias", "running_mean", "running_var"):
            members.append(GroupMember(f"{prefix}.batch_norm.{name}", 0, idx))
    else:  # conv_norm: layernorm (its statistics count removed channels as zeros: compaction is exact)
        for name in ("weight", "bias"):
            members.append(GroupMember(f"{prefix}.layer_norm.{name}", 0, idx))
    members.append(GroupMember(f"{prefix}.pointwise2.weight", 1, idx))
    return GroupFamily(f"{prefix}.channels", "conv_channel", d, members)


def _predictor_families(model: nn.Module) -> List[GroupFamily]:
    if not hasattr(model.predictor, "lstm"):  # stateless: a unit is one embedding channel
        d = model.predictor.output_dim
        idx = _rows(d)
        members = [
            GroupMember("predictor.embedding.weight", 1, idx),
            GroupMember("predictor.conv.weight", 0, idx),
            GroupMember("predictor.conv.bias", 0, idx),
            GroupMember("joiner.pred_proj.weight", 1, idx),
        ]
        if getattr(model.cfg, "simple_head", False):
            members.append(GroupMember("simple_lm_proj.weight", 1, idx))
        return [GroupFamily("predictor.units", "predictor_unit", d, members)]
    lstm: nn.LSTM = model.predictor.lstm
    if getattr(lstm, "proj_size", 0):
        raise NotImplementedError("group table does not support LSTM projections")
    h = lstm.hidden_size
    gates = _strided(h, 4)
    idx = _rows(h)
    fams = []
    for k in range(lstm.num_layers):
        p = "predictor.lstm"
        members = [
            GroupMember(f"{p}.weight_ih_l{k}", 0, gates),
            GroupMember(f"{p}.weight_hh_l{k}", 0, gates),
        ]
        if lstm.bias:
            members += [GroupMember(f"{p}.bias_ih_l{k}", 0, gates), GroupMember(f"{p}.bias_hh_l{k}", 0, gates)]
        members.append(GroupMember(f"{p}.weight_hh_l{k}", 1, idx))
        if k + 1 < lstm.num_layers:
            members.append(GroupMember(f"{p}.weight_ih_l{k + 1}", 1, idx))
        else:  # the last layer feeds the joiner (and the simple loss's lm head)
            members.append(GroupMember("joiner.pred_proj.weight", 1, idx))
            if getattr(model.cfg, "simple_head", False):
                members.append(GroupMember("simple_lm_proj.weight", 1, idx))
        fams.append(GroupFamily(f"{p}.l{k}.units", "predictor_unit", h, members))
    return fams


def _joiner_family(model: nn.Module) -> GroupFamily:
    j = model.joiner.enc_proj.out_features
    idx = _rows(j)
    members = [
        GroupMember("joiner.enc_proj.weight", 0, idx),
        GroupMember("joiner.enc_proj.bias", 0, idx),
        GroupMember("joiner.pred_proj.weight", 0, idx),
        GroupMember("joiner.pred_proj.bias", 0, idx),
        GroupMember("joiner.output.weight", 1, idx),
    ]
    return GroupFamily("joiner.units", "joiner_unit", j, members)


def group_families(model: nn.Module) -> List[GroupFamily]:
    """All pruning families of a Transducer, in a stable order.

    Per encoder layer: ``ff1.units``, ``attn.heads``, ``conv.channels``, ``ff2.units``;
    then one ``predictor.lstm.lK.units`` per LSTM layer, then ``joiner.units``.
    Every member names an existing ``state_dict`` key (checked here).
    """
    fams: List[GroupFamily] = []
    for i, layer in enumerate(model.encoder.layers):
        pre = f"encoder.layers.{i}"
        fams.append(_ffn_family(f"{pre}.ff1", layer.ff1))
        fams.append(_attention_family(f"{pre}.attn", layer.attn))
        fams.append(_conv_family(f"{pre}.conv", layer.conv))
        fams.append(_ffn_family(f"{pre}.ff2", layer.ff2))
    fams.extend(_predictor_families(model))
    fams.append(_joiner_family(model))

    state = model.state_dict(keep_vars=True)
    for fam in fams:
        for m in fam.members:
            if m.param not in state:
                raise KeyError(f"group table: {fam.name} names {m.param!r}, which the model lacks")
            size = state[m.param].shape[m.dim]
            if m.index.shape[0] != fam.num_units or int(m.index.max()) >= size:
                raise AssertionError(f"group table: bad index for {m.param} in {fam.name}")
    return fams
