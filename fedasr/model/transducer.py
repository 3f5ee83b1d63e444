"""Conformer-Transducer: configuration, predictor, joiner and the full model.

The model computes the RNN-T joint logits (and optional CTC logits); losses are the
trainer's job. Shapes follow torchaudio's ``rnnt_loss`` conventions: for a batch with
encoder lengths ``enc_lens`` and target lengths ``target_lens`` the logits are
``(B, max(enc_lens), max(target_lens) + 1, V)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.model.conformer import CONV_NORMS, ConformerEncoder

__all__ = [
    "ModelConfig",
    "ModelConfigError",
    "PRESETS",
    "Predictor",
    "StatelessPredictor",
    "Joiner",
    "Transducer",
    "TransducerOutput",
]

LSTMState = Tuple[torch.Tensor, torch.Tensor]
PREDICTORS = ("lstm", "stateless")


class ModelConfigError(FedasrError, ValueError):
    """A bad model configuration (unknown key, unknown preset, invalid value)."""


@dataclass
class ModelConfig:
    """The architecture of :class:`Transducer` (its fields are `model.overrides`). Defaults are the ``tiny`` preset."""

    num_features: int = 80  # input features per frame (the federation's 80-dim fbank)
    vocab_size: int = 256  # output tokens, blank included: set from the federation's tokenizer, not overridable
    d_model: int = 144  # the Conformer's width (attention and residual stream)
    num_layers: int = 4  # Conformer layers
    num_heads: int = 4  # attention heads a layer (d_model must divide by it)
    ffn_dim: int = 576  # hidden units of each feed-forward module
    conv_kernel: int = 15  # depthwise convolution kernel of the conv modules (odd)
    subsampling_channels: int = 64  # channels of the 4x convolutional subsampling front end
    dropout: float = 0.1  # dropout in the encoder
    pred_embed_dim: int = 256  # embedding size (the stateless predictor's width)
    pred_hidden: int = 256  # LSTM units
    pred_layers: int = 1  # LSTM layers of the predictor
    joint_dim: int = 256  # the joiner's hidden width
    ctc_head: bool = True  # a CTC output head on the encoder (train.ctc_weight's auxiliary loss)
    blank_id: int = 0  # the blank token's id (the tokenizer's: 0)
    predictor: str = "lstm"  # lstm | stateless (embedding + depthwise conv over pred_context tokens)
    pred_context: int = 2  # stateless: tokens the predictor sees (the current one included)
    input_scale: bool = True  # scale the subsampled features by sqrt(d_model) before adding positions
    simple_head: bool = False  # linear am/lm heads for the auxiliary "simple" transducer loss (k2)
    conv_norm: str = "batchnorm"  # conv module: batchnorm | layernorm (over channels, per frame)
    # A compacted model's per-module widths (None: the uniform sizes above). Keys:
    # "encoder.layers.I.ff1" / ".ff2" (hidden units), ".attn" (heads of d_model/num_heads
    # each), ".conv" (inner channels), "predictor" (LSTM units or stateless width), "joiner".
    widths: Optional[Dict[str, int]] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ModelConfigError(f"model config: {f.name} must be an integer, got {value!r}")
                if f.name != "blank_id" and value < 1:
                    raise ModelConfigError(f"model config: {f.name} must be >= 1, got {value}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ModelConfigError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        for name in ("ctc_head", "input_scale", "simple_head"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.predictor not in PREDICTORS:
            raise ModelConfigError(f"model config: predictor must be one of {', '.join(PREDICTORS)}, "
                                   f"got {self.predictor!r}")
        if self.conv_norm not in CONV_NORMS:
            raise ModelConfigError(f"model config: conv_norm must be one of {', '.join(CONV_NORMS)}, "
                                   f"got {self.conv_norm!r}")
        if self.vocab_size < 2:
            raise ModelConfigError(f"model config: vocab_size must be >= 2, got {self.vocab_size}")
        if not 0 <= self.blank_id < self.vocab_size:
            raise ModelConfigError(f"model config: blank_id {self.blank_id} not in [0, vocab_size={self.vocab_size})")
        if self.d_model % self.num_heads != 0:
            raise ModelConfigError(
                f"model config: d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.conv_kernel % 2 != 1:
            raise ModelConfigError(f"model config: conv_kernel must be odd, got {self.conv_kernel}")
        if self.num_features < 7:
            raise ModelConfigError(f"model config: num_features must be >= 7, got {self.num_features}")
        if self.widths is not None:
            if not isinstance(self.widths, dict):
                raise ModelConfigError(f"model config: widths must be a mapping, got {self.widths!r}")
            valid = {"predictor", "joiner"} | {f"encoder.layers.{i}.{m}" for i in range(self.num_layers)
                                               for m in ("ff1", "ff2", "attn", "conv")}
            for k, v in self.widths.items():
                if k not in valid:
                    raise ModelConfigError(f"model config: widths: unknown module {k!r}")
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ModelConfigError(f"model config: widths.{k} must be a positive integer, got {v!r}")
            if "predictor" in self.widths and self.predictor == "lstm" and self.pred_layers != 1:
                raise ModelConfigError("model config: widths.predictor needs pred_layers: 1")

    def width(self, module: str, default: int) -> int:
        """The width of ``module`` (see ``widths``)."""
        return (self.widths or {}).get(module, default)

    def layer_widths(self) -> list[dict]:
        return [{m: self.widths[f"encoder.layers.{i}.{m}"] for m in ("ff1", "ff2", "attn", "conv")
                 if f"encoder.layers.{i}.{m}" in self.widths} for i in range(self.num_layers)] \
            if self.widths else [None] * self.num_layers

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The named preset (see :data:`PRESETS`) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ModelConfigError(f"unknown model preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        d = dict(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ModelConfigError(f"unknown model config key {key!r}")
        return cls(**d)


#: Presets. Parameter counts (vocab 256, CTC head included): tiny ~2.9M, small ~9.2M,
#: medium ~29M. ``small``/``medium`` follow Conformer-S/M (Gulati et al., 2020).
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(
        d_model=144, num_layers=4, num_heads=4, ffn_dim=576, conv_kernel=15,
        pred_embed_dim=256, pred_hidden=256, pred_layers=1, joint_dim=256,
    ),
    "small": dict(
        d_model=144, num_layers=16, num_heads=4, ffn_dim=576, conv_kernel=31,
        pred_embed_dim=320, pred_hidden=320, pred_layers=1, joint_dim=320,
    ),
    "medium": dict(
        d_model=256, num_layers=16, num_heads=4, ffn_dim=1024, conv_kernel=31,
        pred_embed_dim=640, pred_hidden=640, pred_layers=1, joint_dim=640,
    ),
}


class Predictor(nn.Module):
    """Label predictor: Embedding -> LSTM -> Dropout.

    The blank id doubles as start-of-sequence. LSTM states are ``(h, c)``, each
    ``(pred_layers, B, pred_hidden)``.

    Decoders use the state interface shared with :class:`StatelessPredictor`:
    ``forward(y, state) -> (out, state)`` (``state=None``: the start), ``select_state``
    and ``update_state`` index a state by batch rows, ``merge_state`` picks rows of two.
    """

    def __init__(
        self, vocab_size: int, embed_dim: int, hidden: int, num_layers: int = 1, dropout: float = 0.0, blank_id: int = 0
    ) -> None:
        super().__init__()
        self.blank_id = blank_id
        self.hidden = hidden
        self.output_dim = hidden
        self.num_layers = num_layers
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim, hidden, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, state: Optional[LSTMState] = None) -> Tuple[torch.Tensor, LSTMState]:
        """``y`` (B, U) token ids -> ``(out (B, U, H), state)``."""
        out, state = self.lstm(self.embedding(y), state)
        return self.dropout(out), state

    @staticmethod
    def select_state(state: LSTMState, rows: torch.Tensor) -> LSTMState:
        return state[0][:, rows], state[1][:, rows]

    @staticmethod
    def update_state(state: LSTMState, rows: torch.Tensor, new: LSTMState) -> None:
        state[0][:, rows] = new[0]
        state[1][:, rows] = new[1]

    @staticmethod
    def merge_state(state: LSTMState, take: torch.Tensor, new: LSTMState) -> LSTMState:
        """``new``'s rows where ``take`` (B,) is True, ``state``'s elsewhere."""
        m = take.view(1, -1, 1)
        return torch.where(m, new[0], state[0]), torch.where(m, new[1], state[1])

    def forward_with_sos(self, targets: torch.Tensor) -> torch.Tensor:
        """Prepend blank (start-of-sequence) to ``targets`` (B, U) -> ``(B, U + 1, H)``.

        Negative ids (a common padding value) are read as blank; outputs at padded
        positions are never used by the loss.
        """
        targets = targets.long()
        targets = torch.where(targets < 0, torch.full_like(targets, self.blank_id), targets)
        sos = targets.new_full((targets.size(0), 1), self.blank_id)
        out, _ = self.forward(torch.cat([sos, targets], dim=1))
        return out


class StatelessPredictor(nn.Module):
    """Stateless label predictor (as icefall's ``transducer_stateless`` decoder):
    Embedding -> depthwise Conv1d over the last ``context`` tokens -> ReLU -> Dropout.

    The output at a position depends on that token and the ``context - 1`` before it,
    nothing further back: it cannot build up stock phrases, and a step costs one
    embedding lookup and ``context`` multiply-adds per channel. Before the start of the
    sequence the context holds blanks (the blank id doubles as start-of-sequence), at
    training and at decoding alike. The state is the last ``context - 1`` tokens,
    ``(B, context - 1)``. Channel ``d`` is one unit: embedding column ``d``, conv
    channel ``d`` and the consumer's (joiner ``pred_proj``) column ``d``.
    """

    def __init__(self, vocab_size: int, dim: int, context: int = 2, dropout: float = 0.0, blank_id: int = 0) -> None:
        super().__init__()
        if context < 1:
            raise ModelConfigError(f"model config: pred_context must be >= 1, got {context}")
        self.blank_id = blank_id
        self.context = context
        self.output_dim = dim
        self.embedding = nn.Embedding(vocab_size, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=context, groups=dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, state: Optional[Tuple[torch.Tensor]] = None
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor]]:
        """``y`` (B, U) token ids -> ``(out (B, U, D), state)``."""
        if state is None:
            state = (y.new_full((y.size(0), self.context - 1), self.blank_id),)
        x = torch.cat([state[0], y], dim=1)  # (B, context - 1 + U)
        h = self.conv(self.embedding(x).transpose(1, 2)).transpose(1, 2)  # (B, U, D)
        new_state = (x[:, x.size(1) - (self.context - 1):],)
        return self.dropout(torch.relu(h)), new_state

    @staticmethod
    def select_state(state: Tuple[torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor]:
        return (state[0][rows],)

    @staticmethod
    def update_state(state: Tuple[torch.Tensor], rows: torch.Tensor, new: Tuple[torch.Tensor]) -> None:
        state[0][rows] = new[0]

    @staticmethod
    def merge_state(state: Tuple[torch.Tensor], take: torch.Tensor, new: Tuple[torch.Tensor]) -> Tuple[torch.Tensor]:
        """``new``'s rows where ``take`` (B,) is True, ``state``'s elsewhere."""
        return (torch.where(take.view(-1, 1), new[0], state[0]),)

    forward_with_sos = Predictor.forward_with_sos


class Joiner(nn.Module):
    """Additive joint network: ``output(tanh(enc_proj(enc) + pred_proj(pred)))``."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.output = nn.Linear(joint_dim, vocab_size)

    def project_encoder(self, enc: torch.Tensor) -> torch.Tensor:
        return self.enc_proj(enc)

    def project_predictor(self, pred: torch.Tensor) -> torch.Tensor:
        return self.pred_proj(pred)

    def joint(self, enc_p: torch.Tensor, pred_p: torch.Tensor) -> torch.Tensor:
        """Logits from projected inputs; shapes broadcast, e.g. (B,T,1,J) + (B,1,U+1,J) or (N,J) + (N,J)."""
        return self.output(torch.tanh(enc_p + pred_p))

    def forward(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """``enc`` (B, T, D), ``pred`` (B, U+1, H) -> logits (B, T, U+1, V)."""
        return self.joint(self.project_encoder(enc)[:, :, None, :], self.project_predictor(pred)[:, None, :, :])

    def forward_pruned(self, enc: torch.Tensor, pred: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
        """The joiner in a band of label positions (the pruned RNN-T loss): ``enc`` (B, T, D),
        ``pred`` (B, U+1, H), ``ranges`` (B, T, S) label positions in ``[0, U]`` -> logits
        ``(B, T, S, V)``, ``logits[b, t, s]`` = the full joiner's ``[b, t, ranges[b, t, s]]``.
        The projections run on the (B, T) and (B, U+1) inputs, then the projected predictor
        rows are gathered: nothing of size (B, T, U+1, ·) is built."""
        enc_p, pred_p = self.project_encoder(enc), self.project_predictor(pred)
        B, T, S = ranges.shape
        J = pred_p.size(-1)
        pred_g = pred_p.gather(1, ranges.reshape(B, T * S, 1).expand(B, T * S, J)).view(B, T, S, J)
        return self.joint(enc_p[:, :, None, :], pred_g)


@dataclass
class TransducerOutput:
    logits: Optional[torch.Tensor]  # (B, T', U+1, V), T' = max(enc_lens), U = max(target_lens); None: joint=False
    enc_lens: torch.Tensor  # (B,)
    ctc_logits: Optional[torch.Tensor]  # (B, T', V) unnormalised, or None without a CTC head
    simple_am: Optional[torch.Tensor] = None  # (B, T', V): simple head, encoder side
    simple_lm: Optional[torch.Tensor] = None  # (B, U+1, V): simple head, predictor side
    enc: Optional[torch.Tensor] = None  # (B, T', d_model) encoder output (joint=False only)
    pred: Optional[torch.Tensor] = None  # (B, U+1, H) predictor output (joint=False only)


class Transducer(nn.Module):
    """Conformer encoder + LSTM or stateless predictor + additive joiner (+ optional CTC head)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blank_id = cfg.blank_id
        self.encoder = ConformerEncoder(
            num_features=cfg.num_features, d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
            ffn_dim=cfg.ffn_dim, conv_kernel=cfg.conv_kernel, subsampling_channels=cfg.subsampling_channels,
            dropout=cfg.dropout, input_scale=cfg.input_scale, layer_widths=cfg.layer_widths(),
            conv_norm=cfg.conv_norm)
        if cfg.predictor == "stateless":
            self.predictor = StatelessPredictor(cfg.vocab_size, cfg.width("predictor", cfg.pred_embed_dim),
                                                cfg.pred_context, cfg.dropout, cfg.blank_id)
        else:
            self.predictor = Predictor(
                cfg.vocab_size, cfg.pred_embed_dim, cfg.width("predictor", cfg.pred_hidden), cfg.pred_layers,
                cfg.dropout, cfg.blank_id
            )
        self.joiner = Joiner(cfg.d_model, self.predictor.output_dim, cfg.width("joiner", cfg.joint_dim), cfg.vocab_size)
        self.ctc_head: Optional[nn.Linear] = nn.Linear(cfg.d_model, cfg.vocab_size) if cfg.ctc_head else None
        if cfg.simple_head:  # logits am[t] + lm[u] for the auxiliary simple loss (not used to decode)
            self.simple_am_proj = nn.Linear(cfg.d_model, cfg.vocab_size)
            self.simple_lm_proj = nn.Linear(self.predictor.output_dim, cfg.vocab_size)

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``feats`` (B, T, F) -> ``(enc (B, T', d_model), enc_lens (B,))``, T' = max(enc_lens)."""
        return self.encoder(feats, feat_lens)

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, targets: torch.Tensor, target_lens: torch.Tensor,
        joint: bool = True,
    ) -> TransducerOutput:
        """Joint logits for the RNN-T loss (and CTC logits if the model has a CTC head).

        ``targets`` (B, U_pad) is trimmed to ``U = max(target_lens)`` columns, so
        ``logits`` is ``(B, max(enc_lens), U + 1, V)`` as torchaudio's ``rnnt_loss`` expects.
        ``joint=False``: no joint logits; the output carries the encoder and predictor
        outputs instead (``enc``, ``pred``), for :meth:`Joiner.forward_pruned`.
        """
        enc, enc_lens = self.encode(feats, feat_lens)
        u = int(target_lens.max()) if target_lens.numel() else 0
        if u > targets.size(1):
            raise ValueError(f"max(target_lens)={u} exceeds targets width {targets.size(1)}")
        pred = self.predictor.forward_with_sos(targets[:, :u])
        logits = self.joiner(enc, pred) if joint else None
        ctc_logits = self.ctc_head(enc) if self.ctc_head is not None else None
        out = TransducerOutput(logits=logits, enc_lens=enc_lens, ctc_logits=ctc_logits)
        if not joint:
            out.enc, out.pred = enc, pred
        if self.cfg.simple_head:
            out.simple_am, out.simple_lm = self.simple_am_proj(enc), self.simple_lm_proj(pred)
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def group_table(self):
        """The pruning group table, see :func:`fedasr.model.groups.group_families`."""
        from fedasr.model.groups import group_families

        return group_families(self)
