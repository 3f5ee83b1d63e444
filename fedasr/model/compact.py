"""Compaction: removing structured units makes a physically smaller model.

The group table (:mod:`fedasr.model.groups`) says which slices of which tensors form one
unit (an FFN hidden unit, an attention head, a conv-module channel, a predictor unit, a
joiner unit). Given, per family, which units to keep, a :class:`CompactionPlan` gives the
smaller architecture (per-module ``widths`` in the model config) and maps any tensor dict
keyed like the model's state dict (weights, BatchNorm statistics, optimizer moments,
masks) onto it by index selection: surviving values are copied, never re-initialised.
Removing a unit whose every slice is zero changes no output of the model.

:func:`units_pruned_whole` reads those units off unit-pattern masks (``fedasr compact``);
Automatic Structured Pruning decides them itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedasr.errors import FedasrError
from fedasr.model.groups import GroupFamily, group_families
from fedasr.model.transducer import ModelConfig, Transducer


def family_module(fam: GroupFamily) -> str | None:
    """The ``widths`` key of a family (None for one that cannot shrink alone)."""
    name = fam.name
    for suffix, key in ((".ff1.units", ".ff1"), (".ff2.units", ".ff2"), (".attn.heads", ".attn"),
                        (".conv.channels", ".conv")):
        if name.endswith(suffix):
            return name[: -len(suffix)] + key
    if fam.kind == "predictor_unit":
        return "predictor"
    if fam.kind == "joiner_unit":
        return "joiner"
    return None


def compactable(model: Transducer) -> list[GroupFamily]:
    """Families whose units can be removed physically. An LSTM predictor with several layers
    is left out (``nn.LSTM`` needs one hidden size for all its layers)."""
    fams = []
    for fam in group_families(model):
        if fam.kind == "predictor_unit" and hasattr(model.predictor, "lstm") and model.predictor.lstm.num_layers > 1:
            continue
        fams.append(fam)
    return fams


@dataclass
class CompactionPlan:
    """``keep``: family name -> bool (num_units,) for the families that shrink."""

    model: Transducer
    keep: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        fams = {f.name: f for f in compactable(self.model)}
        for name, k in self.keep.items():
            if name not in fams:
                raise FedasrError(f"compaction: no compactable family {name!r}")
            if not bool(k.any()):
                raise FedasrError(f"compaction: {name} would lose all its units")
        widths = dict(self.model.cfg.widths or {})
        for name, k in self.keep.items():
            widths[family_module(fams[name])] = int(k.sum())
        self.config = ModelConfig.from_dict({**self.model.cfg.to_dict(), "widths": widths})
        self._fams = fams

    @property
    def removed(self) -> int:
        return sum(int((~k).sum()) for k in self.keep.values())

    def build(self) -> Transducer:
        """The smaller model with the surviving weights (BatchNorm statistics included)."""
        with torch.random.fork_rng():  # building does not disturb the run's random stream
            small = Transducer(self.config)
        small.load_state_dict(self.apply(self.model.state_dict()))
        return small

    def _index(self) -> dict[tuple[str, int], torch.Tensor]:
        """(state name, dim) -> the old positions, in the new order, along that dim."""
        if hasattr(self, "_ix"):
            return self._ix
        with torch.random.fork_rng():
            new_fams = {f.name: f for f in group_families(Transducer(self.config))}
        ix: dict[tuple[str, int], torch.Tensor] = {}
        for name, keep in self.keep.items():
            old, new = self._fams[name], new_fams[name]
            kept = torch.nonzero(keep).flatten()
            for mo, mn in zip(old.members, new.members):
                key = (mo.param, mo.dim)
                size = max(int(mn.index.max()) + 1, 0)
                pos = ix.get(key)
                if pos is None:
                    pos = torch.full((size,), -1, dtype=torch.long)
                pos[mn.index.reshape(-1)] = mo.index[kept].reshape(-1)
                ix[key] = pos
        for key, pos in ix.items():
            if bool((pos < 0).any()):
                raise AssertionError(f"compaction: {key} has unmapped positions")
        self._ix = ix
        return ix

    def apply(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors keyed like the state dict (any subset, any dtype) -> the smaller shapes."""
        ix = self._index()
        out = {}
        for name, t in tensors.items():
            for (param, dim), pos in ix.items():
                if param == name and t.dim() > dim:
                    t = t.index_select(dim, pos.to(t.device))
            out[name] = t.clone() if t is tensors[name] else t
        return out

    def scatter(self, tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`apply`: each tensor of the smaller shapes written into a
        copy of ``base[name]`` (the full shape) at the positions it was selected from; the
        removed positions keep ``base``'s values. A tensor that does not shrink is copied."""
        ix = self._index()
        out = {}
        for name, t in tensors.items():
            full = base[name]
            dims = [(dim, pos.to(t.device)) for (param, dim), pos in ix.items() if param == name and full.dim() > dim]
            out[name] = _scatter(full, t, dims) if dims else t.clone()
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The smaller shape of every state-dict entry."""
        ix = self._index()
        out = {}
        for name, t in self.model.state_dict().items():
            shape = list(t.shape)
            for (param, dim), pos in ix.items():
                if param == name and t.dim() > dim:
                    shape[dim] = pos.numel()
            out[name] = tuple(shape)
        return out


def _scatter(full: torch.Tensor, small: torch.Tensor, dims: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """``full`` with ``small`` written at ``full[pos_0 along dim_0][pos_1 along dim_1]...``
    (the order :meth:`CompactionPlan.apply` selects in); a new tensor."""
    if not dims:
        return small.to(full.dtype).clone()
    (dim, pos), rest = dims[0], dims[1:]
    part = _scatter(full.index_select(dim, pos), small, rest)
    return full.index_copy(dim, pos, part)


def units_pruned_whole(model: Transducer, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per compactable family, which units to keep: a unit goes when every one of its
    parameter slices is masked (all False). At least one unit stays."""
    params = dict(model.named_parameters())
    keep = {}
    for fam in compactable(model):
        members = [m for m in fam.members if m.param in params]
        if not any(m.param in masks for m in members):
            continue
        alive = torch.zeros(fam.num_units, dtype=torch.bool)
        for m in members:
            mask = masks.get(m.param)
            if mask is None:  # an unmasked member keeps every unit
                alive[:] = True
                break
            moved = mask.movedim(m.dim, 0)  # (D, ...)
            alive |= moved[m.index.reshape(-1)].reshape(fam.num_units, -1).any(1)
        if not bool(alive.any()):
            alive[0] = True
        if not bool(alive.all()):
            keep[fam.name] = alive
    return keep


def whole_unit_plan(model: Transducer, masks: dict[str, torch.Tensor]) -> tuple[CompactionPlan | None, int]:
    """The compaction of the units ``masks`` prune whole (None when none is), and how many
    masked weights lie outside those units (0: the smaller model needs no masks)."""
    keep = units_pruned_whole(model, masks)
    plan = CompactionPlan(model, keep) if keep else None
    left = plan.apply(masks) if plan is not None else masks
    return plan, sum(int((~m).sum()) for m in left.values())


def compact_with_masks(model: Transducer, masks: dict[str, torch.Tensor], allow_partial: bool = False,
                       source: str = "checkpoint") -> tuple[Transducer, dict[str, torch.Tensor], CompactionPlan]:
    """Remove the units the masks prune whole. Masked weights outside them (another pattern
    than ``unit``) are an error naming how many, unless ``allow_partial``: then they stay
    masked in the smaller model."""
    keep = units_pruned_whole(model, masks)
    plan = CompactionPlan(model, keep)
    small = plan.build()
    left = {n: m for n, m in plan.apply(masks).items() if not bool(m.all())}
    leftover = sum(int((~m).sum()) for m in left.values())
    if leftover and not allow_partial:
        total = sum(int((~m).sum()) for m in masks.values())
        raise FedasrError(f"{source}: {leftover:,} of its {total:,} masked weights are not in whole units "
                          f"(masks of another pattern than 'unit'); compaction removes whole units only "
                          f"(--allow-partial compacts those and keeps the other masks)")
    with torch.no_grad():
        params = dict(small.named_parameters())
        for n, m in left.items():
            params[n].mul_(m.to(params[n].dtype))
    return small, left, plan
