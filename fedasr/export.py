"""A model -> ONNX encoder, decoder (predictor) and joiner, in the layout of
icefall/sherpa-onnx transducer exports, plus ``tokens.txt`` and ``config.json``
(:func:`export_model`; `fedasr export` reads the checkpoint: :mod:`fedasr.commands.export`).

- ``encoder.onnx``: ``x`` (N, T, 80) float32 log-mel fbank (Kaldi-compatible: 25 ms / 10 ms,
  povey window, no dither, no edge snipping, 20 Hz .. Nyquist - 400 Hz, samples in [-1, 1]:
  lhotse ``Fbank`` as `fedasr shard` computes it, and kaldi-native-fbank as sherpa-onnx
  computes it from the waveform agree to < 1e-3) and ``x_lens`` (N,) int64 ->
  ``encoder_out`` (N, T', J) and ``encoder_out_lens`` (N,). The federation's global
  mean/variance normalisation and the joiner's encoder projection are inside. T >= 7
  frames; frames beyond a sequence's length are padding (any value).
- ``decoder.onnx``: stateless predictor: ``y`` (N, context) int64, the last ``context``
  tokens -> ``decoder_out`` (N, J); ids < 0 (sherpa-onnx's start-of-sequence padding) are
  the blank, which is what the predictor sees before the start in training. LSTM
  predictor: ``y`` (N, 1), ``h``/``c`` (layers, N, H) -> ``decoder_out``, ``next_h``,
  ``next_c`` (zeros are the start state, fed the blank).
- ``joiner.onnx``: ``encoder_out`` (N, J), ``decoder_out`` (N, J) -> ``logit`` (N, V).

The models carry the metadata sherpa-onnx reads (:data:`SHERPA_METADATA`): a stateless
export loads unchanged in ``sherpa_onnx.OfflineRecognizer.from_transducer`` (sherpa-onnx's
offline transducer runs only stateless decoders; blank id 0). With ``int8`` the three are
also written dynamically quantised (onnxruntime, int8 MatMul weights) as
``encoder.int8.onnx``, ``decoder.int8.onnx``, ``joiner.int8.onnx``, icefall's convention.

Batch and time axes are dynamic. :class:`OnnxTransducer` decodes with onnxruntime (greedy,
as `fedasr eval` does).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedasr.data.features import FBANK_OPTIONS as FEATURES
from fedasr.errors import FedasrError, OptionError
from fedasr.fsutil import atomic_dir

OPSET = 17
NAMES = ("encoder", "decoder", "joiner")

# What sherpa-onnx reads from a transducer export (sherpa-onnx/csrc/offline-transducer-model.cc:
# the decoder's vocab_size and context_size; offline-recognizer-impl.cc: the encoder's
# model_type picks the transducer recogniser when none is given on the command line).
SHERPA_METADATA = {"encoder": ("model_type", "version", "model_author", "comment"),
                   "decoder": ("vocab_size", "context_size"), "joiner": ("joiner_dim",)}


class _Encoder(nn.Module):
    def __init__(self, model, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x, x_lens):
        enc, lens = self.model.encoder((x - self.mean) / self.std, x_lens, trim=False)
        return self.model.joiner.project_encoder(enc), lens


class _StatelessDecoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, y):  # the context is the whole input: no state
        p = self.model.predictor
        # sherpa-onnx pads the start of the context with -1: before the start the predictor sees blanks
        y = torch.where(y < 0, torch.full_like(y, p.blank_id), y)
        out, _ = p(y[:, p.context - 1:], (y[:, : p.context - 1],))
        return self.model.joiner.project_predictor(out[:, -1])


class _LstmDecoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, y, h, c):
        out, (h2, c2) = self.model.predictor(y, (h, c))
        return self.model.joiner.project_predictor(out[:, -1]), h2, c2


class _Joiner(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, encoder_out, decoder_out):
        return self.model.joiner.joint(encoder_out, decoder_out)


def _add_metadata(path: Path, meta: dict) -> None:
    import onnx

    m = onnx.load(str(path))
    old = {p.key: p.value for p in m.metadata_props}
    del m.metadata_props[:]
    for k, v in {**old, **{k: str(v) for k, v in meta.items()}}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


# Dynamic int8 quantisation schemes (activations are always uint8, quantised per call):
# - u8s8: int8 weights (icefall's and onnxruntime's default). On x86-64 CPUs without VNNI
#   (AVX2, plain AVX-512) onnxruntime's U8S8 kernel adds pairs of u8 x s8 products into int16
#   (vpmaddubsw), which saturates: 2 x 255 x 128 > 32767.
# - u8s8-7bit: int8 weights in [-64, 63] (reduce_range): a pair sums to at most 2 x 255 x 64
#   = 32640, so no CPU saturates; one bit of weight precision is lost everywhere.
# - u8u8: uint8 weights: onnxruntime's U8U8 kernels widen to int16 before multiplying, so
#   nothing saturates, and the weights keep 8 bits.
INT8_SCHEMES = {"u8u8": {"weight_type": "QUInt8"}, "u8s8-7bit": {"weight_type": "QInt8", "reduce_range": True},
                "u8s8": {"weight_type": "QInt8"}}
INT8_DEFAULT = "u8u8"


def _quantize_int8(src: Path, dst: Path, scheme: str = INT8_DEFAULT) -> None:
    """Dynamic int8 quantisation of the MatMul weights (icefall's ``*.int8.onnx`` convention:
    MatMul only; the joiner's Gemms stay float) with the ``scheme`` of :data:`INT8_SCHEMES`;
    the model's metadata is kept, and the scheme recorded in it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scheme not in INT8_SCHEMES:
        raise OptionError(f"--int8-scheme: unknown {scheme!r} ({', '.join(INT8_SCHEMES)})")
    opts = dict(INT8_SCHEMES[scheme])
    opts["weight_type"] = getattr(QuantType, opts["weight_type"])
    root = logging.getLogger()  # onnxruntime's quantizer advises pre-processing on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], **opts)
    finally:
        root.setLevel(level)
    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    _add_metadata(dst, {**meta, "int8_scheme": scheme})


def export_model(model, tokenizer, cmvn, out: str | Path, source: str = "", int8: bool = False,
                 extra: dict | None = None, int8_scheme: str = INT8_DEFAULT) -> dict:
    """Write the three ONNX models (and with ``int8`` their quantised copies, quantised with
    ``int8_scheme``), tokens.txt and config.json to ``out`` (atomically); ``extra``: further
    entries of config.json."""
    import onnx  # noqa: F401 - the export extra; fail early with a clear message below

    model = model.eval()
    cfg = model.cfg
    stateless = cfg.predictor == "stateless"
    mean = torch.tensor(cmvn.mean, dtype=torch.float32)
    std = torch.tensor(cmvn.std, dtype=torch.float32)
    x = torch.randn(2, 120, cfg.num_features)
    x_lens = torch.tensor([120, 97])
    with atomic_dir(out, overwrite=True) as tmp, torch.no_grad():
        torch.onnx.export(_Encoder(model, mean, std), (x, x_lens), str(tmp / "encoder.onnx"), dynamo=False,
                          input_names=["x", "x_lens"], output_names=["encoder_out", "encoder_out_lens"],
                          dynamic_axes={"x": {0: "N", 1: "T"}, "x_lens": {0: "N"}, "encoder_out": {0: "N", 1: "T_out"},
                                        "encoder_out_lens": {0: "N"}}, opset_version=OPSET)
        if stateless:
            y = torch.full((2, cfg.pred_context), model.blank_id, dtype=torch.long)
            torch.onnx.export(_StatelessDecoder(model), (y,), str(tmp / "decoder.onnx"), dynamo=False,
                              input_names=["y"], output_names=["decoder_out"],
                              dynamic_axes={"y": {0: "N"}, "decoder_out": {0: "N"}}, opset_version=OPSET)
        else:
            lstm = model.predictor.lstm
            h = torch.zeros(lstm.num_layers, 2, lstm.hidden_size)
            y = torch.full((2, 1), model.blank_id, dtype=torch.long)
            torch.onnx.export(_LstmDecoder(model), (y, h, h.clone()), str(tmp / "decoder.onnx"), dynamo=False,
                              input_names=["y", "h", "c"], output_names=["decoder_out", "next_h", "next_c"],
                              dynamic_axes={"y": {0: "N"}, "h": {1: "N"}, "c": {1: "N"}, "decoder_out": {0: "N"},
                                            "next_h": {1: "N"}, "next_c": {1: "N"}}, opset_version=OPSET)
        j = model.joiner.enc_proj.out_features
        torch.onnx.export(_Joiner(model), (torch.randn(2, j), torch.randn(2, j)), str(tmp / "joiner.onnx"),
                          dynamo=False, input_names=["encoder_out", "decoder_out"], output_names=["logit"],
                          dynamic_axes={"encoder_out": {0: "N"}, "decoder_out": {0: "N"}, "logit": {0: "N"}},
                          opset_version=OPSET)
        j_dim = model.joiner.enc_proj.out_features
        sherpa = stateless and model.blank_id == 0
        comment = (f"fedasr Conformer-Transducer, {cfg.num_layers} layers, d_model {cfg.d_model}; "
                   f"stateless predictor (context {cfg.pred_context})" if stateless else "LSTM predictor")
        onnx_meta = {
            "encoder": {"model_type": "conformer", "version": "1", "model_author": "fedasr", "comment": comment,
                        "subsampling_factor": 4, "feature_dim": cfg.num_features,
                        "normalisation": "global mean/std inside the encoder"},
            "decoder": {"vocab_size": cfg.vocab_size, "context_size": cfg.pred_context if stateless else 1,
                        "predictor": cfg.predictor, "blank_id": model.blank_id},
            "joiner": {"joiner_dim": j_dim},
        }
        for name in NAMES:
            _add_metadata(tmp / f"{name}.onnx", onnx_meta[name])
            if int8:
                _quantize_int8(tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx", int8_scheme)
        sp = tokenizer.sp
        (tmp / "tokens.txt").write_text("".join(f"{sp.id_to_piece(i)} {i}\n" for i in range(sp.get_piece_size())))
        meta = {"source": source, "model_config": cfg.to_dict(), "blank_id": model.blank_id,
                "predictor": cfg.predictor, "context_size": cfg.pred_context if stateless else 1,
                "lstm": None if stateless else {"layers": model.predictor.lstm.num_layers,
                                                "hidden": model.predictor.lstm.hidden_size},
                "features": {"type": "Kaldi-compatible log-mel fbank (lhotse Fbank = kaldi-native-fbank)",
                             **FEATURES, "normalisation": "global mean/std, inside encoder.onnx"},
                "sherpa_onnx": sherpa, "int8": int8, "int8_scheme": int8_scheme if int8 else None,
                "parameters": model.num_parameters(), "opset": OPSET,
                # the decoding `fedasr eval` reports by default is the one this export runs
                "decoding": {"sherpa_onnx": "greedy_search", "max_symbols_per_frame": 1,
                             "fedasr_eval": "fedasr eval --max-symbols-per-frame 1 (the default)"},
                **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return meta


class OnnxTransducer:
    """An exported model in onnxruntime, with greedy decoding (as `fedasr eval`)."""

    def __init__(self, directory: str | Path, threads: int = 1, int8: bool = False):
        import onnxruntime as ort

        d = Path(directory)
        self.meta = json.loads((d / "config.json").read_text())
        suffix = ".int8.onnx" if int8 else ".onnx"
        if int8 and not self.meta.get("int8"):
            raise FedasrError(f"{d}: no int8 models (export with --int8)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        load = lambda name: ort.InferenceSession(str(d / name), opts, providers=["CPUExecutionProvider"])  # noqa: E731
        self.encoder, self.decoder, self.joiner = (load(n + suffix) for n in NAMES)
        self.blank = int(self.meta["blank_id"])
        self.context = int(self.meta["context_size"])
        self.tokens = {int(i): p for p, i in (line.rsplit(" ", 1) for line in
                                               (d / "tokens.txt").read_text().splitlines())}

    def encode(self, feats: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.run(None, {"x": feats.astype(np.float32), "x_lens": lens.astype(np.int64)})

    def _decoder_start(self):
        if self.meta["lstm"] is None:
            ctx = [self.blank] * self.context
            return ctx, self.decoder.run(None, {"y": np.array([ctx], dtype=np.int64)})[0]
        lay, hid = self.meta["lstm"]["layers"], self.meta["lstm"]["hidden"]
        h = np.zeros((lay, 1, hid), np.float32)
        out, h, c = self.decoder.run(None, {"y": np.array([[self.blank]], np.int64), "h": h, "c": h.copy()})
        return (h, c), out

    def _decoder_step(self, state, token: int):
        if self.meta["lstm"] is None:
            ctx = state[1:] + [token]
            return ctx, self.decoder.run(None, {"y": np.array([ctx], dtype=np.int64)})[0]
        h, c = state
        out, h, c = self.decoder.run(None, {"y": np.array([[token]], np.int64), "h": h, "c": c})
        return (h, c), out

    def greedy(self, enc: np.ndarray, max_symbols_per_frame: int = 1, chunk: int = 32) -> list[int]:
        """Greedy search over one utterance's encoder output (T', J), as `fedasr eval`.

        The joiner runs on up to ``chunk`` frames at once with the current predictor output:
        the frames before the first non-blank argmax emit nothing, and the predictor output
        changes only at an emission, after which the search goes on from the same frame.
        This is the frame-by-frame search, with one joiner call per emission or per
        ``chunk`` blank frames instead of one (or more) per frame."""
        hyp: list[int] = []
        state, dec = self._decoder_start()
        t, n, used = 0, enc.shape[0], 0  # used: symbols emitted at frame t so far
        while t < n:
            if used == max_symbols_per_frame:
                t, used = t + 1, 0
                continue
            block = enc[t:t + chunk]
            toks = self.joiner.run(None, {"encoder_out": block,
                                          "decoder_out": np.repeat(dec, len(block), axis=0)})[0].argmax(-1)
            emit = np.flatnonzero(toks != self.blank)
            if emit.size == 0:
                t, used = t + len(block), 0
                continue
            if emit[0] > 0:
                t, used = t + int(emit[0]), 0
            tok = int(toks[emit[0]])
            hyp.append(tok)
            state, dec = self._decoder_step(state, tok)
            used += 1
        return hyp

    def decode(self, feats: np.ndarray) -> list[int]:
        """One utterance's raw fbank (T, 80) -> token ids."""
        enc, lens = self.encode(feats[None], np.array([feats.shape[0]]))
        return self.greedy(enc[0, : int(lens[0])])

