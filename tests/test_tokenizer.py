"""Tokenizers: byte-level round trips, SentencePiece load/train, and the vocabulary guard."""

import numpy as np
import pytest
import sentencepiece as spm

from attamba_jax.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    check_fits,
    load_tokenizer,
    train_sentencepiece,
)
from attamba_jax.tokenizer import (
    main as tokenizer_main,
)

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _corpus(path, lines=400, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    return train_sentencepiece([_corpus(root / "corpus.txt")], root / "tok", vocab_size=300, threads=1)


def test_byte_tokenizer_round_trips_unicode_and_reserves_bos_eos():
    tok = load_tokenizer("byte")
    text = "héllo, wörld → 你好 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and ids.size == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.identity) == (258, 256, 257, "byte")
    # BOS/EOS are not bytes: decoding drops them.
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id]])) == text


def test_sentencepiece_train_load_and_round_trip(sp_model):
    tok = load_tokenizer(str(sp_model))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (300, 1, 2)
    text = "the lazy fox  judges\nseven boxing wizards\n\n  "  # newlines and runs of spaces survive
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    # Unseen characters fall back to bytes instead of <unk>.
    assert tok.decode(tok.encode("ünïcode ✓")) == "ünïcode ✓"
    # The identity is the content, not the path.
    copy = sp_model.parent / "copy.model"
    copy.write_bytes(sp_model.read_bytes())
    assert SentencePieceTokenizer(copy).identity == tok.identity


def test_sentencepiece_cli_trains_a_model(tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.txt", seed=1)
    tokenizer_main([str(tmp_path / "*.txt"), "--out", str(tmp_path / "cli"), "--vocab-size", "290", "--threads", "1"])
    assert "290 pieces" in capsys.readouterr().out
    assert SentencePieceTokenizer(tmp_path / "cli.model").vocab_size == 290
    assert corpus.exists()


def test_sentencepiece_errors_name_the_problem(tmp_path, sp_model):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    # A model without a BOS piece cannot frame documents.
    spm.SentencePieceTrainer.train(
        input=str(_corpus(tmp_path / "c.txt")),
        model_prefix=str(tmp_path / "nobos"),
        vocab_size=40,
        bos_id=-1,
        eos_id=1,
        unk_id=0,
        minloglevel=2,
    )
    with pytest.raises(TokenizerError, match="no BOS piece"):
        load_tokenizer(str(tmp_path / "nobos.model"))


def test_tokenizer_larger_than_model_vocab_is_an_error(sp_model):
    check_fits(ByteTokenizer(), 258)
    with pytest.raises(TokenizerError, match="300 ids but model.vocab_size is 258"):
        check_fits(load_tokenizer(str(sp_model)), 258)
