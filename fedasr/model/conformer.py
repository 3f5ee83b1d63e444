"""Conformer encoder.

The layer math follows the Conformer paper (Gulati et al., 2020) in the form used by
``torchaudio.models.Conformer``: macaron feed-forward halves around multi-head
self-attention and a convolution module, followed by a final LayerNorm. Positional
information is added once, after the subsampling front end, so every
:class:`ConformerLayer` computes exactly what a torchaudio ``ConformerLayer`` computes
(given the same weights; torchaudio's convolution module has no biases, ours does).

Differences from torchaudio that matter for variable-length batches:

* padded frames are zeroed before the depthwise convolution, so padding never leaks
  into valid frames (an utterance's output is the same alone or padded in a batch);
* in training mode the convolution module's BatchNorm computes its batch statistics
  (and updates its running statistics) over valid frames only;
* ``conv_norm="layernorm"`` replaces that BatchNorm with a LayerNorm over the channels of
  each frame (:class:`ChannelLayerNorm`: no batch statistics, nothing that depends on
  which speakers are in a batch).

Parameter names are part of the public interface: pruning masks, group tables and
checkpoints key on them. See :mod:`fedasr.model.groups`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Conv2dSubsampling",
    "SinusoidalPositionalEncoding",
    "FeedForward",
    "SelfAttention",
    "MaskedBatchNorm1d",
    "ChannelLayerNorm",
    "ConvModule",
    "ConformerLayer",
    "ConformerEncoder",
    "lengths_to_mask",
]


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean mask ``(B, max_len)``, True on valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class Conv2dSubsampling(nn.Module):
    """Two stride-2 3x3 convolutions (4x time reduction) and a linear projection.

    Input ``(B, T, F)``; output ``(B, T', d_model)`` with
    ``T' = output_lengths(T)``. Inputs shorter than 7 frames are right-padded so the
    convolutions run; their output length is 0.
    """

    MIN_FRAMES = 7

    def __init__(self, num_features: int = 80, channels: int = 64, d_model: int = 144) -> None:
        super().__init__()
        if num_features < 7:
            raise ValueError(f"num_features must be >= 7 for Conv2dSubsampling, got {num_features}")
        self.num_features = num_features
        self.channels = channels
        self.conv1 = nn.Conv2d(1, channels, kernel_size=3, stride=2)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=2)
        self.out_features = self._reduce(self._reduce(num_features))
        self.linear = nn.Linear(channels * self.out_features, d_model)

    @staticmethod
    def _reduce(n):
        # kernel 3, stride 2, no padding: floor((n - 3) / 2) + 1 == floor((n - 1) / 2)
        return (n - 1) // 2

    @staticmethod
    def output_lengths(lengths):
        """Exact number of output frames for ``lengths`` input frames (int or tensor)."""
        if isinstance(lengths, torch.Tensor):
            out = torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")
            return out.clamp(min=0)
        return max(0, (((lengths - 1) // 2) - 1) // 2)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if feats.size(1) < self.MIN_FRAMES:
            feats = F.pad(feats, (0, 0, 0, self.MIN_FRAMES - feats.size(1)))
        x = feats.unsqueeze(1)  # (B, 1, T, F)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (B, C, T', F')
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)
        return self.linear(x), self.output_lengths(lengths)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal encoding of Vaswani et al. (no learned parameters)."""

    def __init__(self, d_model: int, max_len: int = 2000) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("pe", self._table(max_len), persistent=False)

    def _table(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / self.d_model))
        pe = torch.zeros(length, self.d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : self.d_model // 2]
        return pe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.size(1)
        if t > self.pe.size(0):
            self.pe = self._table(max(t, 2 * self.pe.size(0))).to(self.pe.device)
        return x + self.pe[:t].to(dtype=x.dtype)[None]


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d, ffn) -> SiLU -> Dropout -> Linear(ffn, d) -> Dropout."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.silu(self.linear1(self.norm(x))))
        return self.dropout(self.linear2(x))


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a key-padding mask.

    Head ``h`` uses rows ``h*d_head:(h+1)*d_head`` of ``q_proj``/``k_proj``/``v_proj``
    and the same columns of ``out_proj``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, d_head: Optional[int] = None) -> None:
        super().__init__()
        if d_head is None:  # the usual layout: the heads split d_model
            if d_model % num_heads != 0:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
            d_head = d_model // num_heads
        self.num_heads = num_heads
        self.d_head = d_head  # fixed per head: a compacted layer keeps fewer heads of the same size
        inner = num_heads * d_head
        self.norm = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.out_proj = nn.Linear(inner, d_model)
        self.attn_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, T, d); ``mask`` (B, T) bool, True on valid frames (None: all valid)."""
        b, t, _ = x.shape
        h = self.norm(x)

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(h).view(b, t, self.num_heads, self.d_head).transpose(1, 2)

        q, k, v = split(self.q_proj), split(self.k_proj), split(self.v_proj)
        attn_mask = None
        if mask is not None:
            # A query of an utterance with no valid frame would see no key at all (NaN);
            # let it see the first frame. Its outputs are padding and never used.
            key_mask = mask.clone()
            key_mask[:, 0] = True
            attn_mask = key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.d_head)
        return self.dropout(self.out_proj(out))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over ``(B, C, T)`` whose training statistics skip padded frames.

    In training mode with a mask, the batch statistics are sums over the valid frames
    (mean, biased variance for the normalisation; the running statistics get the unbiased
    variance, as the stock BatchNorm's), in float32 at least; padded outputs are zero. The
    number of valid frames stays a device tensor: nothing waits for the device (a boolean
    gather of the valid frames would). In eval mode (or without a mask) it is the stock
    module. State-dict keys are those of ``BatchNorm1d``.
    """

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # type: ignore[override]
        if mask is None or not self.training:
            return super().forward(x)
        valid = mask[:, None, :]  # (B, 1, T)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        xf = xf.masked_fill(~valid, 0.0)
        n = valid.sum().to(xf.dtype)  # valid frames
        mean = xf.sum(dim=(0, 2)) / n
        centered = (xf - mean[None, :, None]).masked_fill(~valid, 0.0)
        var = centered.square().sum(dim=(0, 2)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - f).add_(f * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - f).add_(f * unbiased.to(self.running_var.dtype))
        out = centered * torch.rsqrt(var + self.eps)[None, :, None]
        if self.affine:
            out = out * self.weight[None, :, None] + self.bias[None, :, None]
        return out.masked_fill(~valid, 0.0)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each frame of a ``(B, C, T)`` input, with statistics
    taken over ``total >= C`` channels of which the missing ``total - C`` are zero.

    In the full model ``C == total`` and it is ``nn.LayerNorm(C)`` on each frame. In a
    compacted model (conv channels removed because every slice of them was zero, so their
    pre-norm activation was exactly 0) ``total`` stays the full channel count and the
    removed channels still count as zeros: mean Σx/N and variance (Σ(x-μ)² + (N-C)μ²)/N,
    so compaction changes no output. State-dict keys ``weight``, ``bias`` (C,).
    """

    def __init__(self, channels: int, total: Optional[int] = None, eps: float = 1e-5) -> None:
        super().__init__()
        self.total = total or channels
        if self.total < channels:
            raise ValueError(f"ChannelLayerNorm: total {self.total} < channels {channels}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, C, T); ``mask`` is accepted for BatchNorm's signature (per-frame
        statistics need none)."""
        n, missing = float(self.total), self.total - x.size(1)
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()  # statistics in float32 at least
        mean = x.sum(1, keepdim=True) / n
        var = ((x - mean).square().sum(1, keepdim=True) + missing * mean.square()) / n
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


CONV_NORMS = ("batchnorm", "layernorm")


class ConvModule(nn.Module):
    """Conformer convolution module.

    LayerNorm -> pointwise1 (d -> 2c) -> GLU -> depthwise (k, 'same') -> BatchNorm ->
    SiLU -> pointwise2 (c -> d) -> Dropout, with c = d inner channels (fewer in a compacted
    model). Channel ``i`` after the GLU is ``pointwise1`` output ``i`` gated by output ``i + c``.
    ``norm="layernorm"``: a :class:`ChannelLayerNorm` (``layer_norm.*``) instead of the
    BatchNorm (``batch_norm.*``).
    """

    def __init__(self, d_model: int, kernel_size: int, dropout: float = 0.0, channels: Optional[int] = None,
                 norm: str = "batchnorm") -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv_kernel must be odd for 'same' padding, got {kernel_size}")
        if norm not in CONV_NORMS:
            raise ValueError(f"conv_norm must be one of {', '.join(CONV_NORMS)}, got {norm!r}")
        c = channels or d_model  # inner channels (d_model unless compacted)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise1 = nn.Conv1d(d_model, 2 * c, 1)
        self.depthwise = nn.Conv1d(c, c, kernel_size, padding=(kernel_size - 1) // 2, groups=c)
        if norm == "batchnorm":
            self.batch_norm = MaskedBatchNorm1d(c)
        else:
            self.layer_norm = ChannelLayerNorm(c, total=d_model)
        self.pointwise2 = nn.Conv1d(c, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, T, d); ``mask`` (B, T) bool, True on valid frames."""
        h = self.norm(x).transpose(1, 2)  # (B, d, T)
        h = F.glu(self.pointwise1(h), dim=1)
        if mask is not None:
            h = h.masked_fill(~mask[:, None, :], 0.0)
        h = self.depthwise(h)
        h = F.silu(self.channel_norm(h, mask))
        h = self.pointwise2(h)
        return self.dropout(h.transpose(1, 2))

    @property
    def channel_norm(self) -> nn.Module:
        """The normalisation after the depthwise convolution (BatchNorm or LayerNorm)."""
        return self.batch_norm if hasattr(self, "batch_norm") else self.layer_norm


class ConformerLayer(nn.Module):
    """x += ff1/2; x += attn; x += conv; x += ff2/2; x = final_norm(x).

    ``widths`` (a compacted layer): ``ff1``/``ff2`` hidden units, ``attn`` heads (of the
    full model's head size ``d_head``), ``conv`` inner channels."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, conv_kernel: int, dropout: float = 0.0,
                 widths: Optional[dict] = None, conv_norm: str = "batchnorm") -> None:
        super().__init__()
        w = widths or {}
        d_head = d_model // num_heads
        self.ff1 = FeedForward(d_model, w.get("ff1", ffn_dim), dropout)
        self.attn = SelfAttention(d_model, w.get("attn", num_heads), dropout, d_head=d_head)
        self.conv = ConvModule(d_model, conv_kernel, dropout, channels=w.get("conv"), norm=conv_norm)
        self.ff2 = FeedForward(d_model, w.get("ff2", ffn_dim), dropout)
        self.final_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, mask)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.final_norm(x)


class ConformerEncoder(nn.Module):
    """Subsampling -> positional encoding -> dropout -> Conformer layers.

    ``forward(feats (B, T, F), lengths (B,)) -> (out (B, T', d), out_lengths (B,))``
    where ``T' = max(out_lengths)`` (trailing all-padding frames are dropped) and
    padded output frames are zero.
    """

    def __init__(self, num_features: int = 80, d_model: int = 144, num_layers: int = 4, num_heads: int = 4,
                 ffn_dim: int = 576, conv_kernel: int = 15, subsampling_channels: int = 64, dropout: float = 0.0,
                 input_scale: bool = True, layer_widths: Optional[list] = None, conv_norm: str = "batchnorm") -> None:
        super().__init__()
        self.d_model = d_model
        self.subsampling = Conv2dSubsampling(num_features, subsampling_channels, d_model)
        self.pos_enc = SinusoidalPositionalEncoding(d_model)
        self.xscale = math.sqrt(d_model) if input_scale else 1.0
        self.dropout = nn.Dropout(dropout)
        widths = layer_widths or [None] * num_layers
        self.layers = nn.ModuleList(
            ConformerLayer(d_model, num_heads, ffn_dim, conv_kernel, dropout, widths[i], conv_norm)
            for i in range(num_layers)
        )

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor, trim: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """``trim=False`` (ONNX export): no data-dependent Python control flow; the output
        keeps every subsampled frame of the padded input (T' from the input's shape) and the
        masks are always applied; its valid frames equal the trimmed output's."""
        if feats.dim() != 3:
            raise ValueError(f"feats must be (B, T, F), got shape {tuple(feats.shape)}")
        # the lengths stay where they are given: on the host (the CPU copy of a batch) the
        # Python decisions below cost the device nothing; the output lengths are there too
        lengths = lengths.long()
        x, out_lengths = self.subsampling(feats, lengths)
        if trim:
            t_out = int(out_lengths.max()) if out_lengths.numel() else 0
            x = x[:, :t_out]
            if t_out == 0:  # every utterance shorter than 7 frames: nothing to encode
                return x, out_lengths
        # scale the content up before adding positions (x * sqrt(d), as in ESPnet; input_scale):
        # the projection's outputs start near 0.3 std and the encoding would otherwise swamp them
        x = self.dropout(self.pos_enc(x * self.xscale))
        mask = lengths_to_mask(out_lengths.to(x.device, non_blocking=True), x.size(1))
        padded = not trim or bool((out_lengths < x.size(1)).any())
        layer_mask = mask if padded else None  # no padding: skip the masking work
        for layer in self.layers:
            x = layer(x, layer_mask)
        return x.masked_fill(~mask[..., None], 0.0), out_lengths
