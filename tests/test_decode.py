"""Tests for transducer greedy and modified beam search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from fedasr.model.decode import beam_search, beam_search_nbest, greedy_search
from fedasr.model.transducer import ModelConfig, Transducer


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only contend


def make_model(seed: int = 3, blank_bias: float = 1.0, **overrides) -> Transducer:
    """A random model whose joint distribution is peaked enough to make decoding non-trivial."""
    model = tiny_model(seed, **{"num_layers": 1, **overrides}).eval()
    with torch.no_grad():
        model.joiner.output.weight.mul_(3.0)
        model.joiner.output.bias[model.blank_id] += blank_bias
    return model


def make_enc(lens, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = max(lens) if lens else 0
    enc = torch.randn(len(lens), t, d, generator=g)
    return enc, torch.tensor(lens, dtype=torch.long)


@pytest.fixture(scope="module", params=["lstm", "stateless"])
def model(request):
    return make_model(predictor=request.param, pred_context=3)


@pytest.fixture(scope="module")
def data():
    return make_enc([15, 12, 6, 1])


# --------------------------------------------------------------------------- references


@torch.no_grad()
def joint_logprobs(model, enc_b: torch.Tensor, seq) -> torch.Tensor:
    """log P(symbol | frame t, label prefix seq[:u]) as (T, U+1, V), float64."""
    pred = model.predictor.forward_with_sos(torch.tensor([list(seq)], dtype=torch.long))
    return F.log_softmax(model.joiner(enc_b[None], pred)[0], dim=-1).double()


def modified_lattice_logprob(model, enc_b: torch.Tensor, seq) -> float:
    """log P(seq) summed over all alignments of the one-symbol-per-frame topology."""
    seq = list(seq)
    t_len, u_len = enc_b.size(0), len(seq)
    if u_len > t_len:
        return -math.inf
    lp = joint_logprobs(model, enc_b, seq)
    blank = lp[:, :, model.blank_id]  # (T, U+1)
    tok = lp[:, torch.arange(u_len), torch.tensor(seq, dtype=torch.long)] if u_len else lp.new_zeros(t_len, 0)
    alpha = torch.full((u_len + 1,), -math.inf, dtype=torch.float64)
    alpha[0] = 0.0
    for t in range(t_len):
        stay = alpha + blank[t]
        move = torch.cat([alpha.new_full((1,), -math.inf), alpha[:-1] + tok[t]])
        alpha = torch.logaddexp(stay, move)
    return float(alpha[u_len])


@torch.no_grad()
def naive_greedy(model, enc_b: torch.Tensor, max_symbols: int):
    """Unbatched greedy search that recomputes the predictor from scratch every step."""
    hyp, score = [], 0.0
    for t in range(enc_b.size(0)):
        for _ in range(max_symbols):
            pred = model.predictor.forward_with_sos(torch.tensor([hyp], dtype=torch.long))[:, -1]
            logits = model.joiner.joint(model.joiner.project_encoder(enc_b[t : t + 1]), model.joiner.project_predictor(pred))
            logp = F.log_softmax(logits, dim=-1)[0]
            v = int(logp.argmax())
            score += float(logp[v])
            if v == model.blank_id:
                break
            hyp.append(v)
    return hyp, score


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("max_symbols", [1, 2, 3])
def test_greedy_matches_naive_reference(model, data, max_symbols):
    enc, lens = data
    hyps, scores = greedy_search(model, enc, lens, max_symbols_per_frame=max_symbols, return_scores=True)
    assert any(hyps) and not all(len(h) == int(n) * max_symbols for h, n in zip(hyps, lens))
    for b in range(enc.size(0)):
        ref_hyp, ref_score = naive_greedy(model, enc[b, : int(lens[b])], max_symbols)
        assert hyps[b] == ref_hyp
        assert scores[b] == pytest.approx(ref_score, abs=1e-4)


def test_greedy_batched_equals_single(model, data):
    enc, lens = data
    batched = greedy_search(model, enc, lens, max_symbols_per_frame=3)
    for b in range(enc.size(0)):
        n = int(lens[b])
        assert greedy_search(model, enc[b : b + 1, :n], lens[b : b + 1], max_symbols_per_frame=3) == [batched[b]]


@pytest.mark.parametrize("max_symbols", [1, 2, 4])
def test_greedy_respects_max_symbols_per_frame(data, max_symbols):
    never_blank = make_model(blank_bias=-1e4)
    enc, lens = data
    hyps = greedy_search(never_blank, enc, lens, max_symbols_per_frame=max_symbols)
    assert [len(h) for h in hyps] == [int(n) * max_symbols for n in lens]
    always_blank = make_model(blank_bias=1e4)
    assert greedy_search(always_blank, enc, lens) == [[] for _ in lens.tolist()]


def test_default_greedy_is_the_deployed_one_symbol_per_frame(data):
    """sherpa-onnx's greedy search emits at most one symbol a frame: so does fedasr's default
    (it was 3, so `fedasr eval` reported a WER the deployed model did not reach)."""
    never_blank = make_model(blank_bias=-1e4)
    enc, lens = data
    assert [len(h) for h in greedy_search(never_blank, enc, lens)] == lens.tolist()


def test_evaluate_reports_its_decoding_and_the_unrestricted_one_beside(federation):
    """``evaluate`` scores the deployed decoding and, asked to, greedy search with up to 3
    symbols a frame from the same encoder output, beside it where the two differ."""
    from fedasr.data.federation import Federation
    from fedasr.evaluate import decode_cuts, evaluate, score

    fed = Federation(federation)
    cuts = fed.split_cuts("dev").subset(first=6)
    model = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=1).eval()
    with torch.no_grad():
        model.joiner.output.bias[model.blank_id] -= 1e4  # never blank: every frame wants 3 symbols
    res, decoded = evaluate(model, cuts, fed.tokenizer, fed.cmvn, unrestricted=3)
    assert res["decoding"] == "greedy search, 1 symbol per frame"
    assert res["unrestricted"]["decoding"] == "greedy search, up to 3 symbols per frame"
    three, _ = decode_cuts(model, cuts, fed.tokenizer, fed.cmvn, max_symbols_per_frame=3)
    assert [d.hyp_unrestricted for d in decoded] == [d.hyp for d in three]
    assert res["unrestricted"]["wer"] == score([d.ref for d in three], [d.hyp for d in three])["wer"]
    assert res["unrestricted"]["wer"] != res["wer"]
    # where both decodings agree nothing is reported beside; beam search has no unrestricted variant
    silent = tiny_model(preset="tiny", vocab_size=fed.tokenizer.vocab_size, num_layers=1).eval()
    with torch.no_grad():
        silent.joiner.output.bias[silent.blank_id] += 1e4
    assert "unrestricted" not in evaluate(silent, cuts, fed.tokenizer, fed.cmvn, unrestricted=3)[0]
    res_beam, _ = evaluate(model, cuts, fed.tokenizer, fed.cmvn, beam=2, unrestricted=3)
    assert "unrestricted" not in res_beam and res_beam["decoding"].startswith("modified beam search, beam 2")


# --------------------------------------------------------------------------- beam


def test_beam_one_equals_greedy_one_symbol(model, data):
    enc, lens = data
    g_hyps, g_scores = greedy_search(model, enc, lens, max_symbols_per_frame=1, return_scores=True)
    b_hyps, b_scores = beam_search(model, enc, lens, beam=1, return_scores=True)
    assert b_hyps == g_hyps
    assert b_scores == pytest.approx(g_scores, abs=1e-4)


def test_beam_beats_greedy(model, data):
    """Beam search finds hypotheses at least as probable as greedy's path.

    Modified beam search ranks hypotheses by the log-added probability of the
    alignments it kept, so that is the quantity compared with greedy's single-path
    score (itself checked against an unbatched reference above). Each beam score is
    also checked against an independent bound: it can never exceed the sequence's
    probability summed over its full alignment lattice.
    """
    enc, lens = data
    g_hyps, g_scores = greedy_search(model, enc, lens, max_symbols_per_frame=1, return_scores=True)
    for beam in (2, 4):
        nbest = beam_search_nbest(model, enc, lens, beam=beam)
        if beam == 4:
            assert [n[0][0] for n in nbest] != g_hyps, "test data should make beam search differ from greedy"
        for b in range(enc.size(0)):
            enc_b = enc[b, : int(lens[b])]
            assert nbest[b][0][1] >= g_scores[b] - 1e-6
            for seq, score in nbest[b]:
                assert score <= modified_lattice_logprob(model, enc_b, seq) + 1e-6
            # greedy's path is one alignment of its sequence
            assert modified_lattice_logprob(model, enc_b, g_hyps[b]) >= g_scores[b] - 1e-6


def test_exhaustive_beam_is_exact():
    """With a beam larger than the number of prefixes nothing is pruned: scores are exact."""
    model = make_model(vocab_size=3, blank_bias=0.0)
    enc, lens = make_enc([4], seed=2)
    nbest = beam_search_nbest(model, enc, lens, beam=64)[0]
    seqs = [tuple(s) for s, _ in nbest]
    assert len(seqs) == len(set(seqs)) == 1 + 2 + 4 + 8 + 16  # all sequences over 2 tokens, length <= 4
    for seq, score in nbest:
        assert score == pytest.approx(modified_lattice_logprob(model, enc[0], seq), abs=1e-5)
    # every frame emits exactly one symbol, so the hypotheses' probabilities sum to 1
    assert torch.logsumexp(torch.tensor([s for _, s in nbest], dtype=torch.float64), 0) == pytest.approx(0.0, abs=1e-5)
    scores = [s for _, s in nbest]
    assert scores == sorted(scores, reverse=True)
    # exact search: the best hypothesis is the most probable sequence, so it beats greedy's
    g_hyp = greedy_search(model, enc, lens, max_symbols_per_frame=1)[0]
    assert scores[0] >= modified_lattice_logprob(model, enc[0], g_hyp) - 1e-6
    assert beam_search(model, enc, lens, beam=64) == [list(seqs[0])]


def test_nbest_shape_and_order(model, data):
    enc, lens = data
    nbest = beam_search_nbest(model, enc, lens, beam=3)
    assert len(nbest) == enc.size(0)
    for n, t in zip(nbest, lens.tolist()):
        assert 1 <= len(n) <= 3
        scores = [s for _, s in n]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(s) for s, _ in n}) == len(n)
        assert all(len(s) <= t and model.blank_id not in s for s, _ in n)


def test_beam_batched_equals_single(model, data):
    """Alone or in a batch: the same hypothesis, and the same score up to float32 rounding
    (the batch's hypotheses go through the joiner and predictor together, matrix products
    of another size, whose float32 sums may round differently)."""
    enc, lens = data
    hyps, scores = beam_search(model, enc, lens, beam=3, return_scores=True)
    for b in range(enc.size(0)):
        n = int(lens[b])
        h, s = beam_search(model, enc[b : b + 1, :n], lens[b : b + 1], beam=3, return_scores=True)
        assert h == [hyps[b]]
        assert s[0] == pytest.approx(scores[b], abs=1e-5)


# --------------------------------------------------------------------------- edge cases


def test_empty_and_short_inputs(model):
    enc, _ = make_enc([5, 5])
    zero = torch.tensor([0, 0])
    assert greedy_search(model, enc, zero) == [[], []]
    assert beam_search(model, enc, zero, beam=3, return_scores=True) == ([[], []], [0.0, 0.0])
    empty = torch.zeros(2, 0, 16)
    assert greedy_search(model, empty, zero, return_scores=True) == ([[], []], [0.0, 0.0])
    assert beam_search(model, empty, zero) == [[], []]
    nobatch = torch.zeros(0, 0, 16)
    assert greedy_search(model, nobatch, torch.zeros(0, dtype=torch.long)) == []
    assert beam_search(model, nobatch, torch.zeros(0, dtype=torch.long)) == []
    one, one_len = make_enc([1, 0])
    assert len(greedy_search(model, one, one_len, max_symbols_per_frame=2)[0]) <= 2
    assert len(beam_search(model, one, one_len)[0]) <= 1
    # end to end from audio features too short for the front end
    with torch.no_grad():
        enc2, lens2 = model.encode(torch.randn(2, 6, 20), torch.tensor([6, 2]))
    assert greedy_search(model, enc2, lens2) == [[], []]
    assert beam_search(model, enc2, lens2) == [[], []]


def test_bad_arguments(model, data):
    enc, lens = data
    with pytest.raises(ValueError):
        greedy_search(model, enc, lens, max_symbols_per_frame=0)
    with pytest.raises(ValueError):
        beam_search(model, enc, lens, beam=0)
    with pytest.raises(ValueError):
        greedy_search(model, enc, lens + 1)
    with pytest.raises(ValueError):
        beam_search(model, enc, lens[:2])
