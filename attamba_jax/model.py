"""The language models: Attamba and the transformer baseline, on one code path.

    tokens -> embedding -> N_L × [h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h))] -> RMSNorm -> head

Notebook use, without the trainer:

    cfg = load_config("configs/tiny.yaml")
    graphdef, params = init_model(cfg.model, seed=0)
    forward = make_forward(graphdef)          # jitted (params, tokens) -> logits
    logits = forward(params, tokens)          # tokens [B, T] int32 -> [B, T, vocab]
    logits = forward(params, tokens, segment_ids=batch["segment_ids"])   # packed documents, each alone

Packed documents (``segment_ids``: ``pallas_kernels.documents.from_segment_ids``) must start at
multiples of ``token_chunk`` for Attamba's fast paths, as the data pipeline packs them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attamba_jax import context_parallel
from attamba_jax.attention import AttambaAttention, CausalSelfAttention
from attamba_jax.cache import Cache
from attamba_jax.config import ModelConfig
from attamba_jax.layers import Dense, Embedding, RMSNorm
from attamba_jax.sharding import constrain
from pallas_kernels import documents
from pallas_kernels.chunk_grid import ChunkGrid

# What the backward of a block recomputes (``jax.checkpoint`` policies): ``none`` keeps every
# activation; ``block`` keeps each block's input and recomputes the rest of it; ``block_save_dots``
# keeps the matmul outputs as well and recomputes the elementwise ops, norms, SSMs and attention.
REMAT = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_dots": jax.checkpoint_policies.dots_saveable,
}


class FeedForward(nnx.Module):
    """SwiGLU: W2(silu(W1 x) * W3 x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, hidden = cfg.dim, cfg.ffn_hidden_dim
        dtype = jnp.dtype(cfg.dtype)
        self.w1 = Dense(d, hidden, std=d**-0.5, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w3 = Dense(d, hidden, std=d**-0.5, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.w2 = Dense(hidden, d, std=hidden**-0.5, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Block(nnx.Module):
    """h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h)), for Attamba and the transformer alike."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = (
            AttambaAttention(cfg, rngs=rngs) if cfg.arch == "attamba" else CausalSelfAttention(cfg, rngs=rngs)
        )
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg, rngs=rngs)

    def __call__(self, h, positions, grid: ChunkGrid | None, cache=None, *, lengths=None, document_start=None):
        """h [B, T, dim] -> (h, layer cache or None); the three uses of ``attention.AttambaAttention``."""
        out, cache = self.attention(
            self.attn_norm(h), positions, grid, cache, lengths=lengths, document_start=document_start
        )
        h = h + out
        return h + self.ffn(self.ffn_norm(h)), cache


def _block_forward(positions, grid, document_start):
    """``(block, h) -> h``: a block's training forward, for ``nnx.remat``."""
    return lambda block, h: block(h, positions, grid, document_start=document_start)[0]


class LanguageModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.embed = Embedding(cfg.vocab_size, cfg.dim, std=cfg.dim**-0.5, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, layer, rngs=rngs) for layer in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = Dense(cfg.dim, cfg.vocab_size, std=cfg.dim**-0.5, axes=("embed", "vocab"), dtype=dtype, rngs=rngs)

    def grids(self, token_chunk: int | None = None) -> list[ChunkGrid | None]:
        """Each layer's chunk grid (None for the transformer); ``token_chunk`` overrides K at test time."""
        cfg = self.cfg
        if cfg.arch != "attamba":
            return [None] * cfg.n_layers
        k = cfg.token_chunk if token_chunk is None else token_chunk
        return [ChunkGrid.for_layer(layer, k, cfg.n_layers) for layer in range(cfg.n_layers)]

    def _trunk(self, tokens, positions, token_chunk, caches, lengths=None, document_start=None, remat="none"):
        """Embedding, every block, the final norm: (h [B, T, dim], the layers' caches).

        ``remat`` (training forward only, see ``REMAT``): what the backward recomputes of each block.
        """
        # Logical names of the main activations (no-ops unless a mesh is active; see sharding.py).
        h = constrain(self.embed(tokens), ("batch", "length", "embed"))
        out_caches = []
        for block, grid, cache in zip(self.blocks, self.grids(token_chunk), caches):
            if remat == "none":
                h, cache = block(h, positions, grid, cache, lengths=lengths, document_start=document_start)
            else:
                h = nnx.remat(_block_forward(positions, grid, document_start), policy=REMAT[remat])(block, h)
            h = constrain(h, ("batch", "length", "embed"))
            out_caches.append(cache)
        return self.norm(h), tuple(out_caches)

    def _logits(self, h):
        return constrain(self.head(h), ("batch", "length", "vocab"))

    def _run(self, tokens, positions, token_chunk, caches, lengths=None):
        """The trunk and the head: (logits [B, T, vocab], the layers' caches)."""
        h, caches = self._trunk(tokens, positions, token_chunk, caches, lengths)
        return self._logits(h), caches

    def __call__(
        self, tokens: jax.Array, *, segment_ids: jax.Array | None = None, token_chunk: int | None = None
    ) -> jax.Array:
        """tokens: [B, T] int -> logits [B, T, vocab] in the compute dtype.

        ``segment_ids`` [B, T] (the data pipeline's): the rows are packed documents, and every
        document's logits are those it gets alone from position 0. None: each row is one sequence.
        """
        return self._logits(self.features(tokens, segment_ids=segment_ids, token_chunk=token_chunk))

    def features(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        token_chunk: int | None = None,
        remat: str = "none",
    ) -> jax.Array:
        """tokens: [B, T] int -> the final hidden states [B, T, dim], before the head
        (``self.head.kernel``), which ``loss.sliced_nll_sum`` applies a slice at a time.

        ``remat``: what the backward recomputes of each block (``REMAT``); ``segment_ids`` as in
        ``__call__``.
        """
        h, order = self.features_in_context_order(tokens, segment_ids=segment_ids, token_chunk=token_chunk, remat=remat)
        if order is not None:
            h = jnp.take(h, jnp.asarray(np.argsort(order)), axis=1)
        return h[:, : tokens.shape[1]]

    def logits_at(self, tokens: jax.Array, at: jax.Array, *, token_chunk: int | None = None) -> jax.Array:
        """tokens [B, T], at [B, A] int positions -> the logits [B, A, vocab] there only (the
        head applied to A positions per row, not T)."""
        h = jnp.take_along_axis(self.features(tokens, token_chunk=token_chunk), at[..., None], axis=1)
        return self.head(h)

    def features_in_context_order(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        token_chunk: int | None = None,
        remat: str = "none",
    ) -> tuple[jax.Array, np.ndarray | None]:
        """``features`` in the order the devices of the mesh's ``context`` axis hold them, for a
        loss that needs no particular order: (h [B, T', dim], order [T'] or None), h[:, i] the
        state at position order[i]; T' >= T (positions >= T are padding). ``order`` is None where
        the positions are in their order (no context axis, or the transformer): h is then
        ``features``. Attamba under a context axis pads the length to a multiple of 2c·K and runs
        in the balanced context order (``context_parallel``).
        """
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {sorted(REMAT)}, got {remat!r}")
        if segment_ids is not None and segment_ids.shape != tokens.shape:
            raise ValueError(f"segment_ids must have the shape of tokens {tokens.shape}, got {segment_ids.shape}")
        shards = context_parallel.context_shards()
        split = shards > 1 and self.cfg.arch == "attamba"
        order = None
        if split:
            # The length splits into 2c pieces of whole chunks: pad the end (no real token sees it).
            k = self.cfg.token_chunk if token_chunk is None else token_chunk
            pad = context_parallel.padded_length(tokens.shape[1], shards, k) - tokens.shape[1]
            tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
            if segment_ids is not None:
                segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)))  # id 0 continues the last document
            order = context_parallel.context_order(tokens.shape[1], shards)
        starts = None
        positions = jnp.arange(tokens.shape[1])
        if segment_ids is not None:
            starts = documents.from_segment_ids(segment_ids, slices=2 * shards if split else 1)
            # RoPE at positions within the document: relative in exact arithmetic either way, and
            # then the rotations are the document's own, rounding included (bf16).
            positions = positions - starts
        if split:
            tokens, positions = (jnp.take(a, jnp.asarray(order), axis=-1) for a in (tokens, positions))
            starts = None if starts is None else jnp.take(starts, jnp.asarray(order), axis=1)
        caches = [None] * len(self.blocks)
        return self._trunk(tokens, positions, token_chunk, caches, document_start=starts, remat=remat)[0], order

    # --- inference (attamba_jax.cache) -------------------------------------------------------

    def prefill(self, tokens: jax.Array, lengths: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Run the parallel forward over prompts and fill ``cache`` (from ``init_cache``).

        Args:
          tokens: [B, T] int, row i's prompt in positions 0..lengths[i]-1 (the rest is
            padding and never read). lengths: [B] int, each in 1..T.

        Returns:
          logits [B, T, vocab] (row i's next-token logits at lengths[i]-1) and the cache,
          at position lengths[i] for row i.
        """
        lengths = lengths.astype(jnp.int32)
        positions = jnp.arange(tokens.shape[1])
        logits, layers = self._run(tokens, positions, cache.token_chunk, cache.layers, lengths)
        return logits, cache.replace(layers=layers, positions=lengths)

    def decode_step(self, tokens: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Feed one token per row (tokens [B] int) at ``cache.positions``; returns logits [B, vocab]."""
        logits, layers = self._run(tokens[:, None], cache.positions[:, None], cache.token_chunk, cache.layers)
        return logits[:, 0], cache.replace(layers=layers, positions=cache.positions + 1)


# --- functional surface ------------------------------------------------------------------


def init_model(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Build the model and split it once into its (static) graph and its parameters."""
    model = LanguageModel(cfg, rngs=nnx.Rngs(params=seed))
    return nnx.split(model)


def apply_model(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    token_chunk: int | None = None,
) -> jax.Array:
    return nnx.merge(graphdef, params)(tokens, segment_ids=segment_ids, token_chunk=token_chunk)


def make_forward(graphdef: nnx.GraphDef, *, token_chunk: int | None = None):
    """A jitted ``(params, tokens, segment_ids=None) -> logits`` for this graph."""
    return jax.jit(functools.partial(apply_model, graphdef, token_chunk=token_chunk))


def count_params(params: nnx.State) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
