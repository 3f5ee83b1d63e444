"""Checkpoints: one self-contained file per save, written atomically, read with
``torch.load(weights_only=True)``.

Content (plain tensors, dicts, lists, strings and numbers only)::

    format, version       "fedasr-checkpoint", 1
    model                 state dict of the Transducer
    model_config          ModelConfig.to_dict()
    tokenizer             {"proto": uint8 tensor (the SentencePiece model), "sha256", "vocab_size"}
    masks                 {param name: bool tensor}   (empty when nothing is pruned)
    config                the resolved run config (dict)
    state                 training state for --resume (step/round, optimizer, RNG...)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from fedasr.data.tokenizer import Tokenizer
from fedasr.errors import FedasrError
from fedasr.fsutil import atomic_path
from fedasr.model.transducer import ModelConfig, Transducer

FORMAT = "fedasr-checkpoint"
VERSION = 1


def tokenizer_entry(tok: Tokenizer) -> dict:
    return {
        "proto": torch.frombuffer(bytearray(tok.proto), dtype=torch.uint8).clone(),
        "sha256": hashlib.sha256(tok.proto).hexdigest(),
        "vocab_size": tok.vocab_size,
    }


def save_checkpoint(path: str | Path, model: Transducer, tokenizer: Tokenizer, *,
                    masks: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                    state: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
    """``weights``: the state dict to save [default: the model's own]."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in (weights if weights is not None else model.state_dict()).items()},
        "model_config": model.cfg.to_dict(),
        "tokenizer": tokenizer_entry(tokenizer),
        "masks": {k: v.detach().cpu().bool() for k, v in (masks or {}).items()},
        "config": config or {},
        "state": state or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FedasrError(f"{path}: checkpoint does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FedasrError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise FedasrError(f"{path}: not a fedasr checkpoint")
    if ckpt.get("version") != VERSION:
        raise FedasrError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def checkpoint_tokenizer(ckpt: dict, path: str | Path = "<checkpoint>") -> Tokenizer:
    return Tokenizer(bytes(ckpt["tokenizer"]["proto"].numpy().tobytes()), f"{path} (tokenizer)")


def build_model(ckpt: dict, path: str | Path = "<checkpoint>", expect_vocab: int | None = None) -> Transducer:
    """Instantiate the checkpoint's architecture and load its weights.

    A mismatch between the stored config and the weights (another architecture), or
    with ``expect_vocab`` (another tokenizer), is a one-line error naming the file.
    """
    try:
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    except FedasrError as e:
        raise FedasrError(f"{path}: {e}") from None
    if expect_vocab is not None and cfg.vocab_size != expect_vocab:
        raise FedasrError(
            f"{path}: model vocabulary has {cfg.vocab_size} tokens but the tokenizer has {expect_vocab}")
    model = Transducer(cfg)
    load_weights(model, ckpt["model"], path)
    return model


def load_weights(model: Transducer, state: dict[str, torch.Tensor], path: str | Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise FedasrError(f"{path}: weights do not fit the model architecture ({what}, "
                          f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise FedasrError(f"{path}: weights do not fit the model architecture "
                              f"({k}: {tuple(v.shape)} vs {tuple(own[k].shape)})")
    model.load_state_dict(state)


def load_checkpoint(path: str | Path) -> tuple[Transducer, Tokenizer, dict]:
    ckpt = read_checkpoint(path)
    tok = checkpoint_tokenizer(ckpt, path)
    model = build_model(ckpt, path, expect_vocab=tok.vocab_size)
    return model, tok, ckpt
