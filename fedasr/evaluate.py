"""Decoding and WER: per split, and per client where clients have their own test data.

WER/CER come from jiwer over the whole split (errors summed over utterances, divided
by reference words/characters), with substitutions, deletions and insertions. References
are normalised with :func:`~fedasr.data.tokenizer.normalize_transcript`, the function
``fedasr shard`` applied to the transcripts the tokenizer and the model were trained on.

The default decoding is the one a sherpa-onnx deployment runs: greedy search with at most
one symbol per frame (``max_symbols_per_frame=1``; modified beam search is one symbol per
frame by its topology). :func:`evaluate` can also score greedy search with up to
``unrestricted`` symbols a frame from the same encoder output, reported beside it
(``result["unrestricted"]``) where the two differ.
Real-time factor = decoding wall time / audio duration (features already computed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jiwer
import torch
from lhotse import CutSet

from fedasr.data.batching import AsrDataset
from fedasr.data.features import GlobalCMVN
from fedasr.data.tokenizer import Tokenizer, normalize_transcript
from fedasr.model.decode import beam_search, greedy_search
from fedasr.model.transducer import Transducer


@dataclass
class Decoded:
    id: str
    speaker: str
    ref: str
    hyp: str
    hyp_unrestricted: str | None = None  # greedy with more symbols a frame, when asked for


def score(refs: list[str], hyps: list[str]) -> dict:
    """WER/CER and error counts; empty references are not allowed (jiwer)."""
    w = jiwer.process_words(refs, hyps)
    c = jiwer.process_characters(refs, hyps)
    words = w.hits + w.substitutions + w.deletions
    return {
        "wer": w.wer,
        "cer": c.cer,
        "substitutions": w.substitutions,
        "deletions": w.deletions,
        "insertions": w.insertions,
        "words": words,
        "utterances": len(refs),
    }


@torch.no_grad()
def decode_cuts(model: Transducer, cuts: CutSet, tokenizer: Tokenizer, cmvn: GlobalCMVN, *,
                beam: int = 1, max_duration: float = 120.0, max_symbols_per_frame: int = 1,
                progress: Callable[[int], None] | None = None, unrestricted: int | None = None
                ) -> tuple[list[Decoded], float]:
    """Decode ``cuts`` (greedy when ``beam`` is 1); returns results in cut order and seconds
    spent (``unrestricted``: greedy also with that many symbols a frame, not timed)."""
    was_training = model.training
    model.eval()
    ds = AsrDataset(cuts, tokenizer, cmvn, spec_augment=None, cache=False)
    out: dict[str, Decoded] = {}
    t0 = time.perf_counter()
    try:
        device = next(model.parameters()).device
        for batch in ds.batches(max_duration, shuffle=False, num_buckets=1):
            # the lengths stay on the host: nothing below waits for the device until the hypotheses
            enc, enc_lens = model.encode(batch.to(device, non_blocking=True).feats, batch.feat_lens)
            if beam <= 1:
                hyps = greedy_search(model, enc, enc_lens, max_symbols_per_frame=max_symbols_per_frame)
            else:
                hyps = beam_search(model, enc, enc_lens, beam=beam)
            t_alt = time.perf_counter()
            alt = [None] * len(hyps)
            if unrestricted is not None:
                alt = [tokenizer.decode(h) for h in
                       greedy_search(model, enc, enc_lens, max_symbols_per_frame=unrestricted)]
            t0 += time.perf_counter() - t_alt  # (not part of the timed decoding)
            for cid, ref, hyp, h_alt in zip(batch.ids, batch.texts, hyps, alt):
                out[cid] = Decoded(cid, "", normalize_transcript(ref), tokenizer.decode(hyp), h_alt)
            if progress:
                progress(len(batch))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    results = []
    for c in cuts:
        d = out[c.id]
        d.speaker = c.supervisions[0].speaker
        results.append(d)
    return results, seconds


def evaluate(model: Transducer, cuts: CutSet, tokenizer: Tokenizer, cmvn: GlobalCMVN, *,
             beam: int = 1, max_duration: float = 120.0, speaker_to_client: dict[str, str] | None = None,
             progress: Callable[[int], None] | None = None, max_symbols_per_frame: int = 1,
             unrestricted: int | None = None) -> tuple[dict, list[Decoded]]:
    """WER/CER of ``cuts`` with the given decoding (``result["decoding"]`` says which);
    ``unrestricted``: with greedy search, also score greedy search with up to that many
    symbols a frame, in ``result["unrestricted"]`` where it differs from the decoding's."""
    alt = unrestricted if beam <= 1 and unrestricted not in (None, max_symbols_per_frame) else None
    decoded, seconds = decode_cuts(model, cuts, tokenizer, cmvn, beam=beam, max_duration=max_duration,
                                   progress=progress, max_symbols_per_frame=max_symbols_per_frame,
                                   unrestricted=alt)
    result = score([d.ref for d in decoded], [d.hyp for d in decoded])
    result["decoding"] = decoding_name(beam, max_symbols_per_frame)
    if alt is not None:
        other = score([d.ref for d in decoded], [d.hyp_unrestricted for d in decoded])
        if other["wer"] != result["wer"] or other["cer"] != result["cer"]:
            result["unrestricted"] = {"decoding": decoding_name(1, alt), "wer": other["wer"], "cer": other["cer"]}
    audio = sum(c.duration for c in cuts)
    result["hours"] = audio / 3600
    result["decode_seconds"] = seconds
    result["rtf"] = seconds / audio if audio else 0.0
    result["beam"] = beam
    if speaker_to_client:
        per_client: dict[str, list[Decoded]] = {}
        for d in decoded:
            client = speaker_to_client.get(d.speaker)
            if client is not None:
                per_client.setdefault(client, []).append(d)
        if per_client:
            result["per_client"] = {
                c: {"wer": score([d.ref for d in ds], [d.hyp for d in ds])["wer"], "utterances": len(ds)}
                for c, ds in sorted(per_client.items())
            }
    return result, decoded


def decoding_name(beam: int, max_symbols_per_frame: int) -> str:
    """How a result was decoded, in words (results.json, export's config.json, tables)."""
    if beam > 1:
        return f"modified beam search, beam {beam} (1 symbol per frame)"
    per = "1 symbol" if max_symbols_per_frame == 1 else f"up to {max_symbols_per_frame} symbols"
    return f"greedy search, {per} per frame"


def speaker_client_map(clients_meta: dict) -> dict[str, str]:
    """Speakers that belong to exactly one client -> that client (from federation.yaml)."""
    owners: dict[str, set[str]] = {}
    for client, meta in clients_meta.items():
        for spk in meta.get("speakers", []):
            owners.setdefault(str(spk), set()).add(client)
    return {spk: next(iter(cs)) for spk, cs in owners.items() if len(cs) == 1}
