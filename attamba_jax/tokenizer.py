"""Tokenizers: byte-level (the default, no files) and SentencePiece.

Both give ``encode(text) -> int32 ids`` without BOS/EOS (the data pipeline adds them per
document), ``decode(ids) -> text``, ``bos_id``, ``eos_id``, ``vocab_size`` and an
``identity`` string that pre-tokenized ``.bin`` files record, so a corpus tokenized with
one tokenizer is never read with another.

    tok = load_tokenizer("byte")                     # ids 0-255 = bytes, 256 = BOS, 257 = EOS
    tok = load_tokenizer("tok/gutenberg.model")      # a SentencePiece model, e.g. LLaMA-2's

Training a SentencePiece model on a corpus (text files, one sentence per line):

    python -m attamba_jax.tokenizer --out .data/gutenberg --vocab-size 32000 '.data/books/*.txt'
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import pathlib
from collections.abc import Sequence

import numpy as np


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message says why."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; BOS = 256, EOS = 257; 258 ids in all."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257
    identity = "byte"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model``; BOS and EOS are the model's own ids and must both exist."""

    def __init__(self, path: str | pathlib.Path):
        import sentencepiece as spm

        path = pathlib.Path(path)
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer: SentencePiece model {path} does not exist (data.tokenizer is 'byte' or a .model path)"
            )
        data = path.read_bytes()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise TokenizerError(f"tokenizer: {path} is not a SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer: {path} defines no {'BOS' if self.bos_id < 0 else 'EOS'} piece; documents are "
                "packed as BOS ... EOS, so the model needs both (train one with bos_id/eos_id set)"
            )
        # The content hash, not the path: the same model copied elsewhere is the same tokenizer.
        self.identity = f"sentencepiece:{hashlib.sha256(data).hexdigest()[:16]}"

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids)])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or the path of a SentencePiece ``.model``."""
    if spec == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)


def check_fits(tokenizer: Tokenizer, model_vocab_size: int):
    """Every id the tokenizer can produce must index the model's embedding."""
    if tokenizer.vocab_size > model_vocab_size:
        raise TokenizerError(
            f"tokenizer {tokenizer.identity} has {tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_vocab_size}; set model.vocab_size={tokenizer.vocab_size} (or larger)"
        )


def train_sentencepiece(
    files: Sequence[str | pathlib.Path],
    out_prefix: str | pathlib.Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    max_sentences: int = 2_000_000,
    threads: int = 4,
) -> pathlib.Path:
    """Train a SentencePiece model on text files (one sentence per line); returns the .model path.

    Ids: 0 = <unk>, 1 = BOS, 2 = EOS (the LLaMA layout), no padding id. Like LLaMA's model:
    no normalization and whitespace kept as it is, digits split, and characters outside the
    pieces (newlines among them: training reads one line at a time) fall back to bytes, so
    ``decode(encode(text)) == text``.
    """
    import sentencepiece as spm

    files = [str(f) for f in files]
    if not files:
        raise TokenizerError("train_sentencepiece: no input files")
    out_prefix = pathlib.Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=files,
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=2,
    )
    return out_prefix.with_suffix(".model")


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer on text files.")
    parser.add_argument("inputs", nargs="+", help="text files or globs (one sentence per line)")
    parser.add_argument("--out", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    parser.add_argument("--max-sentences", type=int, default=2_000_000, help="lines sampled for training")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    files = sorted({f for pattern in args.inputs for f in (glob.glob(pattern) or [pattern])})
    missing = [f for f in files if not pathlib.Path(f).is_file()]
    if missing:
        parser.error(f"no such file: {missing[0]}")
    path = train_sentencepiece(
        files,
        args.out,
        args.vocab_size,
        model_type=args.model_type,
        max_sentences=args.max_sentences,
        threads=args.threads,
    )
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path}: {tok.vocab_size} pieces, BOS={tok.bos_id}, EOS={tok.eos_id}, identity {tok.identity}")


if __name__ == "__main__":
    main()
