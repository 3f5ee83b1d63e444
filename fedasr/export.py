"""`fedasr export`: a checkpoint -> ONNX encoder, decoder (predictor) and joiner, in the
layout of icefall/sherpa-onnx transducer exports, plus ``tokens.txt`` and ``config.json``.

- ``encoder.onnx``: ``x`` (N, T, 80) float32 log-mel fbank (lhotse ``Fbank``, 25 ms / 10 ms,
  no dither) and ``x_lens`` (N,) int64 -> ``encoder_out`` (N, T', J) and ``encoder_out_lens``
  (N,). The federation's global mean/variance normalisation and the joiner's encoder
  projection are inside. T >= 7 frames; frames beyond a sequence's length are padding.
- ``decoder.onnx``: stateless predictor: ``y`` (N, context) int64, the last ``context``
  tokens (blank-padded at the start) -> ``decoder_out`` (N, J); LSTM predictor: ``y`` (N, 1),
  ``h``/``c`` (layers, N, H) -> ``decoder_out``, ``next_h``, ``next_c`` (zeros are the start
  state, fed the blank).
- ``joiner.onnx``: ``encoder_out`` (N, J), ``decoder_out`` (N, J) -> ``logit`` (N, V).

Batch and time axes are dynamic. :class:`OnnxTransducer` decodes with onnxruntime (greedy,
as `fedasr eval` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_dir

OPSET = 17


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


def export_model(model, tokenizer, cmvn, out: str | Path, source: str = "") -> dict:
    """Write the three ONNX models, tokens.txt and config.json to ``out`` (atomically)."""
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
        sp = tokenizer.sp
        (tmp / "tokens.txt").write_text("".join(f"{sp.id_to_piece(i)} {i}\n" for i in range(sp.get_piece_size())))
        meta = {"source": source, "model_config": cfg.to_dict(), "blank_id": model.blank_id,
                "predictor": cfg.predictor, "context_size": cfg.pred_context if stateless else 1,
                "lstm": None if stateless else {"layers": model.predictor.lstm.num_layers,
                                                "hidden": model.predictor.lstm.hidden_size},
                "features": {"type": "lhotse Fbank (kaldi-compatible)", "num_mel_bins": cfg.num_features,
                             "frame_length_ms": 25, "frame_shift_ms": 10, "dither": 0.0,
                             "normalisation": "global mean/std, inside encoder.onnx"},
                "parameters": model.num_parameters(), "opset": OPSET}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return meta


def export_checkpoint(path, out, federation=None) -> dict:
    """`fedasr export CKPT --out DIR`: the normalisation statistics come from the run's
    federation (the checkpoint's config) or ``federation``."""
    from fedasr.checkpoint import load_checkpoint
    from fedasr.data.federation import Federation

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise FedasrError("fedasr export: needs the export extra (pip install 'fedasr[export]': onnx, "
                          "onnxruntime)") from None
    model, tok, ckpt = load_checkpoint(path)
    fed_dir = federation or (ckpt.get("config") or {}).get("federation")
    if fed_dir is None:
        raise FedasrError(f"{path}: the checkpoint names no federation (for the normalisation); pass --federation")
    fed = Federation(fed_dir)
    if fed.tokenizer.proto != tok.proto:
        raise FedasrError(f"{path}: the checkpoint's tokenizer differs from {fed.root}/tokenizer.model")
    return export_model(model, tok, fed.cmvn, out, source=str(path))


class OnnxTransducer:
    """An exported model in onnxruntime, with greedy decoding (as `fedasr eval`)."""

    def __init__(self, directory: str | Path, threads: int = 1):
        import onnxruntime as ort

        d = Path(directory)
        self.meta = json.loads((d / "config.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        load = lambda name: ort.InferenceSession(str(d / name), opts, providers=["CPUExecutionProvider"])  # noqa: E731
        self.encoder, self.decoder, self.joiner = load("encoder.onnx"), load("decoder.onnx"), load("joiner.onnx")
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

    def greedy(self, enc: np.ndarray, max_symbols_per_frame: int = 3) -> list[int]:
        """Greedy search over one utterance's encoder output (T', J)."""
        hyp: list[int] = []
        state, dec = self._decoder_start()
        for t in range(enc.shape[0]):
            for _ in range(max_symbols_per_frame):
                logit = self.joiner.run(None, {"encoder_out": enc[t:t + 1], "decoder_out": dec})[0]
                tok = int(logit[0].argmax())
                if tok == self.blank:
                    break
                hyp.append(tok)
                state, dec = self._decoder_step(state, tok)
        return hyp

    def decode(self, feats: np.ndarray) -> list[int]:
        """One utterance's raw fbank (T, 80) -> token ids."""
        enc, lens = self.encode(feats[None], np.array([feats.shape[0]]))
        return self.greedy(enc[0, : int(lens[0])])
