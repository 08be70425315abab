"""The decode cache: its size is SPEC §5's, and prefill + decode reproduce the training forward.

Decode equals forward: a random model runs the full parallel forward over [B, T] tokens;
the same tokens are then fed as prompts of several lengths (prefill) followed by one
token per step (decode_step, teacher forced). The logits at every position must agree,
and the cache after n decode steps must equal the cache a prefill of n more tokens builds.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.cache import cache_bytes, formula_bytes, init_cache
from attamba_jax.config import ModelConfig, load_config
from attamba_jax.generate import decode_step, prefill
from attamba_jax.model import apply_model, init_model

# Tests compile many small graphs; LLVM's optimisations cost more time than they save here.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SMALL = dict(vocab_size=64, dim=32, n_heads=4, multiple_of=16, ssm_state_dim=8, ssm_hidden_dim=48, ssm_heads=4)


def _attamba(**kw) -> ModelConfig:
    return ModelConfig(arch="attamba", **{**SMALL, **kw})


def _transformer(**kw) -> ModelConfig:
    base = {k: v for k, v in SMALL.items() if not k.startswith("ssm_")}
    return ModelConfig(arch="transformer", **{**base, **kw})


# (config, test-time token_chunk, prompt lengths): several K, W, non-zero layer offsets, GQA.
CASES = {
    # offsets 0,1,2; GQA 4 query heads on 2 kv heads
    "k4_w3_gqa": (_attamba(token_chunk=4, window=3, n_layers=3, n_kv_heads=2, head_dim=16), None, [1, 4, 6, 11]),
    # offsets 0,1 = K-1: layer 1's chunk [1, K-1-o] is empty; W = 0 (window = the query alone)
    "k2_w0": (_attamba(token_chunk=2, window=0, n_layers=2), None, [1, 2, 3, 8]),
    # offsets 0,4; two B/C groups, dt bias
    "k8_w5_groups": (
        _attamba(token_chunk=8, window=5, n_layers=2, ssm_groups=2, ssm_dt_bias=True),
        None,
        [2, 8, 9, 12],
    ),
    # the same through the GPU kernels in the interpreter: the SSD's and the decode step's (ssm_step)
    "k8_w5_groups_kernels": (
        _attamba(
            token_chunk=8,
            window=5,
            n_layers=2,
            ssm_groups=2,
            ssm_dt_bias=True,
            ssm_implementation="pallas_gpu_interpret",
        ),
        None,
        [2, 8, 9, 12],
    ),
    # every token is a boundary; window larger than some prompts
    "k1_w2": (_attamba(token_chunk=1, window=2, n_layers=1), None, [1, 3, 5, 10]),
    # trained with K=4, run at K'=6 (offsets 0,3 at K')
    "k4_run_at_k6": (_attamba(token_chunk=4, window=3, n_layers=2), 6, [1, 5, 6, 12]),
    # the pseudo_chunk ablation: causal attention over all keys, chunked SSM
    "pseudo_chunk": (_attamba(token_chunk=4, window=2, n_layers=2, pseudo_chunk=True), None, [1, 4, 7, 10]),
    "transformer_gqa": (_transformer(n_layers=2, n_kv_heads=2), None, [1, 4, 7, 11]),
    "transformer_window3": (_transformer(n_layers=2, sliding_window=3), None, [1, 3, 6, 12]),
}
T = 16  # tokens per row in the full forward


def _assert_close(actual, expected, rtol=1e-4):
    """Relative to the largest reference magnitude (f32: <= 1e-4)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if expected.size == 0:
        assert actual.shape == expected.shape
        return
    scale = max(float(np.max(np.abs(expected))), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@functools.cache
def _decoded(name):
    """A random model's forward over [B, T] tokens; the same tokens prefilled at several prompt
    lengths and then decoded one token per step (teacher forced); and a prefill of n more tokens."""
    cfg, token_chunk, lengths = CASES[name]
    graphdef, params = init_model(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (len(lengths), T), 0, cfg.vocab_size)
    lengths = jnp.asarray(lengths, jnp.int32)
    full = _jit(functools.partial(apply_model, graphdef, token_chunk=token_chunk))(params, tokens)
    do_prefill = _jit(functools.partial(prefill, graphdef, max_len=2 * T, token_chunk=token_chunk))
    steps = T - int(lengths.min())

    @_jit
    def teacher_forced_decode(params, cache):
        def body(cache, _):
            pos = cache.positions
            tok = tokens[jnp.arange(tokens.shape[0]), jnp.minimum(pos, T - 1)]
            logits, cache = decode_step(graphdef, params, tok, cache)
            return cache, (logits, pos, cache)

        return jax.lax.scan(body, cache, None, length=steps)[1]

    prompt_logits, cache = do_prefill(params, tokens, lengths)
    logits, positions, caches = teacher_forced_decode(params, cache)
    n = T - int(lengths.max())
    _, longer = do_prefill(params, tokens, lengths + n)
    return lengths, full, prompt_logits, logits, positions, caches, n, longer


@pytest.mark.parametrize("name", list(CASES))
def test_decode_equals_forward(name):
    # Given a model's parallel forward, and the same tokens prefilled then decoded one at a time
    lengths, full, prompt_logits, logits, positions, _, _, _ = _decoded(name)
    # Then every position's logits equal the parallel forward's.
    for row, n in enumerate(np.asarray(lengths)):
        _assert_close(prompt_logits[row, :n], full[row, :n])
        pos = np.asarray(positions[:, row])
        decoded = pos < T
        assert decoded.sum() == T - n
        _assert_close(logits[decoded, row], full[row, pos[decoded]])


@pytest.mark.parametrize("name", list(CASES))
def test_decode_builds_the_cache_a_longer_prefill_builds(name):
    # Given n decode steps after a prefill, and a prefill of n more tokens
    lengths, _, _, _, _, caches, n, longer = _decoded(name)
    assert n >= 1
    after_n = jax.tree.map(lambda x: x[n - 1], caches)
    # Then the two caches are the same
    np.testing.assert_array_equal(after_n.positions, lengths + n)
    chex.assert_trees_all_equal_shapes_and_dtypes(after_n.layers, longer.layers)
    for got, want in zip(jax.tree.leaves(after_n.layers), jax.tree.leaves(longer.layers)):
        _assert_close(got, want)


def test_decode_with_bfloat16_tracks_the_forward():
    # bf16 keeps ~3 significant digits; decode and forward round differently, by about as much
    # as the bf16 forward differs from the f32 one (~1% of the largest logit).
    cfg = dataclasses.replace(CASES["k4_w3_gqa"][0], n_layers=2, dtype="bfloat16")
    graphdef, params = init_model(cfg, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 10), 0, cfg.vocab_size)
    full = _jit(functools.partial(apply_model, graphdef))(params, tokens).astype(jnp.float32)
    _, cache = _jit(functools.partial(prefill, graphdef, max_len=10))(params, tokens, jnp.array([3, 5]))
    assert cache.layers[0].kv.k.dtype == jnp.bfloat16 and cache.layers[0].ssm.scan.dtype == jnp.float32
    step = _jit(functools.partial(decode_step, graphdef))
    scale = float(jnp.max(jnp.abs(full)))
    for _ in range(3):
        pos = np.asarray(cache.positions)
        logits, cache = step(params, tokens[jnp.arange(2), cache.positions], cache)
        np.testing.assert_allclose(logits.astype(jnp.float32), full[jnp.arange(2), pos], atol=0.03 * scale)


# --- size -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, token_chunk",
    [
        (CASES["k4_w3_gqa"][0], None),
        (CASES["k8_w5_groups"][0], None),
        (CASES["k4_run_at_k6"][0], 6),
        (dataclasses.replace(CASES["k4_w3_gqa"][0], dtype="bfloat16"), None),
        (CASES["pseudo_chunk"][0], None),
        (CASES["transformer_gqa"][0], None),
        (CASES["transformer_window3"][0], None),
    ],
)
@pytest.mark.parametrize("max_len", [1, 37, 64])
def test_cache_bytes_equal_formula(cfg, token_chunk, max_len):
    cache = jax.eval_shape(lambda: init_cache(cfg, 3, max_len, token_chunk=token_chunk))
    leaves = jax.tree.leaves(cache.layers)
    assert sum(x.size * x.dtype.itemsize for x in leaves) == formula_bytes(cfg, 3, max_len, token_chunk=token_chunk)
    assert cache_bytes(cache) == formula_bytes(cfg, 3, max_len, token_chunk=token_chunk)


@pytest.mark.parametrize("max_len", [1024, 32768])
def test_paper_config_matches_spec_numbers(max_len):
    # SPEC §5 for d=512, W=8, Hs·P·N = 8·32·32, conv 3·(256+64), plus the conv ring's slot of 256+64:
    # (n_b+W+1)·1024 + 18,944 values per layer, with n_b = ⌈L/K⌉+1 boundary slots; the transformer
    # keeps 1024 values per token.
    # (counted in float32 values: the paper configs compute in bfloat16)
    attamba = load_config("configs/paper/attamba_k8_w8.yaml", ["model.dtype=float32"]).model
    transformer = load_config("configs/paper/transformer_isoparam.yaml", ["model.dtype=float32"]).model
    n_b = math.ceil(max_len / 8) + 1
    assert formula_bytes(attamba, 1, max_len) == 8 * 4 * ((n_b + 9) * 1024 + 18944)
    assert formula_bytes(transformer, 1, max_len) == 8 * 4 * 1024 * max_len
    assert cache_bytes(jax.eval_shape(lambda: init_cache(attamba, 1, max_len))) == formula_bytes(attamba, 1, max_len)
    if max_len == 32768:
        assert formula_bytes(attamba, 1, max_len) / formula_bytes(transformer, 1, max_len) <= 0.13
