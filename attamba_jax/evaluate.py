"""Score text files with a trained model: token perplexity, word perplexity, bits per byte.

    python -m attamba_jax.evaluate --workdir runs/tiny --text a.txt [b.txt ...] [--token-chunk 8]

Each file is one document, ``[BOS] + tokens``, and every token of it is scored exactly once
with a sliding window of the model's context T (``data.seq_len``): the first window scores
its T tokens, each next window moves on by ``--stride`` tokens (default T/2) and scores only
the tokens it adds, so each of those sees at least T - stride tokens of context. Nothing is
cut off: a 100k-token document is scored over all its 100k tokens.

  token perplexity  exp(total NLL / tokens scored)
  word perplexity   exp(total NLL / whitespace-separated words of the text)
  bits per byte     total NLL / (ln 2 * UTF-8 bytes of the text)

The three share one total NLL, so they describe the same predictions at different units
(the latter two compare across tokenizers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attamba_jax.checkpointing import CheckpointError, restore_workdir
from attamba_jax.config import Config, ConfigError
from attamba_jax.data import DataError, decode_text
from attamba_jax.loss import cross_entropy
from attamba_jax.model import apply_model
from attamba_jax.tokenizer import Tokenizer, TokenizerError, check_fits, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Window:
    """Inputs ``tokens[start:stop]``; the targets at absolute positions ``score_from+1 .. stop`` count."""

    start: int
    stop: int
    score_from: int


def sliding_windows(num_targets: int, context: int, stride: int) -> list[Window]:
    """Windows over ``num_targets + 1`` tokens (BOS first) that score targets 1..num_targets once each."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    windows, scored, start = [], 0, 0
    while scored < num_targets:
        stop = min(start + context, num_targets)
        windows.append(Window(start, stop, scored))
        scored, start = stop, start + stride
    return windows


@dataclasses.dataclass
class Score:
    nll: float  # nats, summed over every scored token
    tokens: int
    words: int
    bytes: int

    def __add__(self, other: Score) -> Score:
        return Score(
            self.nll + other.nll, self.tokens + other.tokens, self.words + other.words, self.bytes + other.bytes
        )

    def report(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "words": self.words,
            "bytes": self.bytes,
            "nll": self.nll,
            "token_perplexity": math.exp(self.nll / max(self.tokens, 1)),
            "word_perplexity": math.exp(self.nll / max(self.words, 1)),
            "bits_per_byte": self.nll / (math.log(2) * max(self.bytes, 1)),
        }


class Scorer:
    """A model's parameters and a jitted NLL of fixed-shape [batch, T] windows."""

    def __init__(
        self, cfg: Config, params, graphdef, tokenizer: Tokenizer, *, batch_size: int, token_chunk: int | None = None
    ):
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.context = cfg.data.seq_len
        self.params = params

        @jax.jit
        def nll_sums(params, inputs, targets, weights):
            logits = apply_model(graphdef, params, inputs, token_chunk=token_chunk)
            mean, total = cross_entropy(logits, targets, weights)
            return mean * jnp.maximum(total, 1.0)

        self._nll_sums = nll_sums

    def score_tokens(self, tokens: np.ndarray, stride: int) -> tuple[float, int]:
        """(total NLL, tokens scored) of ``tokens`` = [BOS, t1, ..., tn]: every t_i once."""
        n, t, b = len(tokens) - 1, self.context, self.batch_size
        rows = []
        for w in sliding_windows(n, t, stride):
            inputs, targets, weights = np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.float32)
            length = w.stop - w.start
            inputs[:length] = tokens[w.start : w.stop]
            targets[:length] = tokens[w.start + 1 : w.stop + 1]
            weights[w.score_from - w.start : length] = 1.0
            rows.append((inputs, targets, weights))
        total = 0.0
        for i in range(0, len(rows), b):
            chunk = rows[i : i + b]
            chunk += [(np.zeros(t, np.int32), np.zeros(t, np.int32), np.zeros(t, np.float32))] * (b - len(chunk))
            inputs, targets, weights = (np.stack(x) for x in zip(*chunk))
            total += float(self._nll_sums(self.params, inputs, targets, weights))
        return total, n

    def score_text(self, text: str, stride: int) -> Score:
        ids = self.tokenizer.encode(text)
        if ids.size and int(ids.max()) >= self.cfg.model.vocab_size:
            raise TokenizerError(
                f"token id {int(ids.max())} is outside the model's vocabulary ({self.cfg.model.vocab_size})"
            )
        if ids.size == 0:
            raise ValueError("the text is empty: there is nothing to score")
        tokens = np.concatenate([[self.tokenizer.bos_id], ids]).astype(np.int32)
        nll, n = self.score_tokens(tokens, stride)
        return Score(nll, n, len(text.split()), len(text.encode("utf-8")))


def load_scorer(
    workdir: str | pathlib.Path, *, step: int | None = None, batch_size: int = 8, token_chunk: int | None = None
) -> tuple[Scorer, int]:
    """A Scorer with the parameters of ``workdir``'s checkpoint ``step`` (default: the latest)."""
    cfg, graphdef, params, step = restore_workdir(workdir, step)
    if token_chunk is not None and cfg.model.arch != "attamba":
        raise ConfigError("--token-chunk applies to arch=attamba only")
    if token_chunk is not None and token_chunk < 1:
        raise ConfigError(f"--token-chunk must be >= 1, got {token_chunk}")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_fits(tokenizer, cfg.model.vocab_size)
    return Scorer(cfg, params, graphdef, tokenizer, batch_size=batch_size, token_chunk=token_chunk), step


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training workdir (config.yaml + checkpoints/)")
    parser.add_argument("--text", nargs="+", required=True, help="UTF-8 text files, one document each")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--stride", type=int, default=None, help="tokens a window moves on (default: data.seq_len // 2)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument(
        "--token-chunk", type=int, default=None, help="(attamba) chunk length K at test time (default: the trained K)"
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        scorer, step = load_scorer(
            args.workdir, step=args.step, batch_size=args.batch_size, token_chunk=args.token_chunk
        )
        stride = args.stride or max(1, scorer.context // 2)
        results, total = {}, Score(0.0, 0, 0, 0)
        for path in args.text:
            p = pathlib.Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"--text {path}: no such file")
            text = decode_text(p.read_bytes(), f"--text {path}")
            if not text:
                raise ValueError(f"--text {path} is empty: there is nothing to score")
            score = scorer.score_text(text, stride)
            results[path], total = score.report(), total + score
    except (ConfigError, CheckpointError, TokenizerError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["total"] = total.report()
    print(
        f"checkpoint step {step}, context {scorer.context}, stride {stride}"
        + (f", token_chunk {args.token_chunk}" if args.token_chunk else "")
    )
    print(f"{'file':<40} {'tokens':>10} {'words':>9} {'token ppl':>10} {'word ppl':>10} {'bits/byte':>9}")
    for name, r in results.items():
        print(
            f"{name[-40:]:<40} {r['tokens']:>10,} {r['words']:>9,} {r['token_perplexity']:>10.4g} {r['word_perplexity']:>10.4g} {r['bits_per_byte']:>9.4f}"
        )
    out = {
        "step": step,
        "context": scorer.context,
        "stride": stride,
        "token_chunk": args.token_chunk,
        "results": results,
    }
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
