import pytest

from fedasr.data.tokenizer import BLANK_ID, Tokenizer, train_tokenizer
from fedasr.errors import FedasrError

TEXTS = [
    "SET AN ALARM FOR SEVEN THIRTY PM", "TURN OFF THE KITCHEN LIGHTS", "CALL FOUR FIVE ONE TWO",
    "REMIND ME ON MARCH THIRD AT NINE", "PLAY THE NEXT SONG", "WHAT IS THE WEATHER IN PARIS",
    "SET THE THERMOSTAT TO TWENTY TWO DEGREES", "TURN ON THE BEDROOM LIGHTS",
] * 3


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_round_trip_and_blank(kind, tmp_path):
    tok = train_tokenizer(TEXTS, 40, kind)
    assert tok.vocab_size == 40
    for t in TEXTS + ["SET THE KITCHEN ALARM"]:
        ids = tok.encode(t)
        assert BLANK_ID not in ids and all(0 < i < 40 for i in ids)
        assert tok.decode(ids) == t
    tok.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.encode("TURN OFF THE LIGHTS") == tok.encode("TURN OFF THE LIGHTS")
    # blanks in a decoded id sequence are ignored
    assert tok.decode([BLANK_ID] + tok.encode("PLAY") + [BLANK_ID]) == "PLAY"


def test_deterministic():
    assert train_tokenizer(TEXTS, 40).proto == train_tokenizer(TEXTS, 40).proto


def test_vocab_too_large_names_option():
    with pytest.raises(FedasrError, match=r"--vocab-size: 5000 is larger .*at most \d+"):
        train_tokenizer(TEXTS, 5000)


def test_foreign_model_rejected(tmp_path):
    import io

    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=30,
                                   minloglevel=2)
    (tmp_path / "x.model").write_bytes(buf.getvalue())
    with pytest.raises(FedasrError, match="reserve id 0 for the blank"):
        Tokenizer.load(tmp_path / "x.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(FedasrError, match="junk.model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_automatic_size_is_the_largest_the_texts_allow():
    auto = train_tokenizer(TEXTS, None)
    with pytest.raises(FedasrError, match=rf"at most {auto.vocab_size} for unigram"):
        train_tokenizer(TEXTS, auto.vocab_size + 1)
    assert auto.vocab_size < 256 and train_tokenizer(TEXTS, auto.vocab_size).proto == auto.proto
