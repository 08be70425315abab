"""Prefill, decode and sampling: text generation with the compressed KV cache.

    graphdef, params = init_model(cfg.model)
    out = generate(graphdef, params, [[256, 72, 105], [256]], max_new_tokens=32, temperature=0.8, top_p=0.9,
                   stop_tokens=[257])
    out.tokens   # [B, 32] int32, padded with pad_id after each row's end
    out.lengths  # [B] tokens generated per row (a stop token included)

Prompts are left-aligned: row i occupies positions 0..L_i-1 and is padded on the right,
so every row keeps its own true positions (for RoPE and the chunk grid) while decoding.
The prefill is the training forward pass; every later token takes one ``decode_step``,
and the whole decode loop runs on the device under ``jax.lax.while_loop``.

Command line (the workdir's tokenizer; the prompt gets BOS, EOS stops a row):

    python -m attamba_jax.generate --workdir runs/tiny --prompt "def main(" --max-new-tokens 64
    python -m attamba_jax.generate --workdir runs/tiny --prompt "import" --prompt "class" --temperature 0.8 --top-p 0.95
    python -m attamba_jax.generate --config configs/tiny.yaml --prompt "Hello"     # random weights
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attamba_jax.cache import Cache, init_cache

# --- prefill and one decode step (pure functions of the parameters) ---------------------------


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    *,
    max_len: int,
    token_chunk: int | None = None,
) -> tuple[jax.Array, Cache]:
    """Parallel forward over left-aligned prompts and a cache for ``max_len`` tokens per row.

    Args:
      tokens: [B, T] int; lengths: [B] int in 1..T; max_len >= T: prompt plus generated tokens.
      token_chunk: run an Attamba model at a chunk size K' other than its trained K.

    Returns:
      logits [B, T, vocab] and the cache at position lengths[i] for row i.
    """
    model = nnx.merge(graphdef, params)
    if max_len < tokens.shape[1]:
        raise ValueError(f"prefill: max_len ({max_len}) must hold the prompt ({tokens.shape[1]} tokens)")
    cache = init_cache(model.cfg, tokens.shape[0], max_len, token_chunk=token_chunk)
    return model.prefill(tokens, lengths, cache)


def decode_step(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
    """Feed tokens [B] at ``cache.positions``: (logits [B, vocab], the cache one token later)."""
    return nnx.merge(graphdef, params).decode_step(tokens, cache)


def make_prefill(graphdef: nnx.GraphDef, *, max_len: int, token_chunk: int | None = None):
    """A jitted ``(params, tokens, lengths) -> (logits, cache)``."""
    return jax.jit(functools.partial(prefill, graphdef, max_len=max_len, token_chunk=token_chunk))


def make_decode_step(graphdef: nnx.GraphDef):
    """A jitted ``(params, tokens, cache) -> (logits, cache)`` that updates the cache in place."""
    return jax.jit(functools.partial(decode_step, graphdef), donate_argnums=(2,))


# --- sampling ------------------------------------------------------------------------------------


class Sampling(NamedTuple):
    """How the next token is drawn; the fields are traced, so changing them never recompiles.

    temperature: 0 = greedy (argmax; top_k and top_p then do nothing).
    top_k: keep the k most likely tokens; 0 = all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p; 1 = all.
    """

    temperature: jax.Array | float = 0.0
    top_k: jax.Array | int = 0
    top_p: jax.Array | float = 1.0


def check_sampling(temperature: float, top_k: int, top_p: float) -> Sampling:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return Sampling(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def check_request(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, token_chunk: int | None
) -> Sampling:
    """``generate``'s arguments checked (before any model is loaded, in the CLI); the Sampling."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if token_chunk is not None and token_chunk < 1:
        raise ValueError(f"token_chunk must be >= 1, got {token_chunk}")
    return check_sampling(temperature, top_k, top_p)


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, V] -> token ids [B] int32 (top-k, then top-p, on logits / temperature)."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [B, V] descending
    # top-k: the k-th largest logit is the smallest one kept.
    k = jnp.asarray(sampling.top_k, jnp.int32)
    k = jnp.where((k > 0) & (k < vocab), k, vocab)
    ordered = jnp.where(jnp.arange(vocab) < k, ordered, -jnp.inf)
    # top-p over what top-k kept: keep each token whose better-ranked tokens hold < top_p.
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum((before < sampling.top_p) & (jnp.arange(vocab) < k), axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)  # [B, 1]
    drawn = jax.random.categorical(key, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


# --- generation ------------------------------------------------------------------------------------


class Generated(NamedTuple):
    tokens: np.ndarray  # [B, max_new_tokens] int32, pad_id after each row's end
    lengths: np.ndarray  # [B] tokens generated per row, a final stop token included


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_len", "token_chunk"))
def _generate(
    params, tokens, lengths, key, sampling, stop_mask, pad_id, *, graphdef, max_new_tokens, max_len, token_chunk
):
    b = tokens.shape[0]
    logits, cache = prefill(graphdef, params, tokens, lengths, max_len=max_len, token_chunk=token_chunk)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]

    key, sub = jax.random.split(key)
    tok = sample(last, sub, sampling)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    state = (jnp.int32(1), tok, stop_mask[tok], jnp.ones((b,), jnp.int32), out, cache, key)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, count, out, cache, key = state
        logits, cache = decode_step(graphdef, params, tok, cache)
        key, sub = jax.random.split(key)
        tok = sample(logits, sub, sampling)  # finished rows keep decoding; their tokens are dropped
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, pad_id, tok)[:, None], (0, i))
        count = count + (~done).astype(jnp.int32)
        return i + 1, tok, done | stop_mask[tok], count, out, cache, key

    _, _, _, count, out, _, _ = jax.lax.while_loop(cond, body, state)
    return out, count


def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    token_chunk: int | None = None,
    pad_id: int = 0,
    pad_to: int | None = None,
) -> Generated:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      prompts: B token-id lists of different lengths (each >= 1 token, e.g. BOS first).
      temperature, top_k, top_p: see ``Sampling``; temperature 0 is greedy.
      stop_tokens: a row ends after emitting one of these (it is kept in the output).
      seed: the sampling key; the same seed gives the same tokens.
      token_chunk: decode an Attamba model at chunk size K' (the trained K if None).
      pad_id: fills each row after its end.
      pad_to: right-pad the prompts to this many tokens (at least the longest prompt): batches of
        different prompt lengths then share one compiled program. None: the longest prompt.
    """
    sampling = check_request(max_new_tokens, temperature, top_k, top_p, token_chunk)
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if lengths.size == 0 or lengths.min() < 1:
        raise ValueError("generate: every prompt needs at least one token")
    width = int(lengths.max())
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"generate: pad_to={pad_to} is shorter than the longest prompt ({width} tokens)")
        width = pad_to
    tokens = np.zeros((len(prompts), width), np.int32)  # right padding: causal, never seen by the prompt
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    vocab = nnx.merge(graphdef, params).cfg.vocab_size  # a static attribute of the graph
    stop_mask = np.zeros((vocab,), bool)
    for t in stop_tokens:
        if not 0 <= t < vocab:
            raise ValueError(f"stop token {t} is outside the vocabulary [0, {vocab})")
        stop_mask[t] = True
    out, count = _generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jax.random.key(seed),
        sampling,
        jnp.asarray(stop_mask),
        jnp.int32(pad_id),
        graphdef=graphdef,
        max_new_tokens=max_new_tokens,
        max_len=width + max_new_tokens,
        token_chunk=token_chunk,
    )
    return Generated(np.asarray(out), np.asarray(count))


# --- command line -------------------------------------------------------------------------------------


def load_workdir(workdir: str, step: int | None = None):
    """(graphdef, params, config, tokenizer, step) of a training workdir's checkpoint (default: the latest)."""
    from attamba_jax.checkpointing import restore_workdir
    from attamba_jax.tokenizer import load_tokenizer

    cfg, graphdef, params, step = restore_workdir(workdir, step)
    return graphdef, params, cfg, load_tokenizer(cfg.data.tokenizer), step


def main(argv: Sequence[str] | None = None) -> int:
    from attamba_jax.checkpointing import CheckpointError
    from attamba_jax.config import ConfigError, load_config
    from attamba_jax.model import init_model
    from attamba_jax.tokenizer import TokenizerError, check_fits, load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m attamba_jax.generate", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a training workdir (config.yaml + checkpoints/)")
    source.add_argument("--config", help="a config YAML: random weights, to try the decoder without training")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--token-chunk", type=int, default=None, help="(attamba) chunk length K' at test time (default: the trained K)"
    )
    parser.add_argument("override", nargs="*", help="with --config: section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        # The flags first: a bad one is named before any checkpoint is read.
        check_request(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.token_chunk)
        if args.workdir is not None:
            if args.override:
                raise ConfigError("overrides apply to --config only; a workdir's config is the one it was trained with")
            graphdef, params, cfg, tokenizer, step = load_workdir(args.workdir, args.step)
            print(f"checkpoint step {step} of {args.workdir}", file=sys.stderr)
        else:
            cfg = load_config(args.config, args.override)
            graphdef, params = init_model(cfg.model, seed=cfg.seed)
            tokenizer = load_tokenizer(cfg.data.tokenizer)
        check_fits(tokenizer, cfg.model.vocab_size)
        prompts = [[tokenizer.bos_id] + tokenizer.encode(p).tolist() for p in args.prompt]
        out = generate(
            graphdef,
            params,
            prompts,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_tokens=(tokenizer.eos_id,),
            seed=args.seed,
            token_chunk=args.token_chunk,
        )
    except (ConfigError, CheckpointError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    many = len(args.prompt) > 1
    for i, (prompt, tokens, n) in enumerate(zip(args.prompt, out.tokens, out.lengths)):
        ids = [int(t) for t in tokens[:n] if t != tokenizer.eos_id]
        if many:  # samples may hold newlines: each starts on a line of its own
            print(f"--- sample {i + 1} of {len(args.prompt)} ---")
        print(prompt + tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
