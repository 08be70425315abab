"""The whole LM: parameter counts, chunk locality, causality, jit, a tiny overfit."""

import dataclasses
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attamba_jax.config import ModelConfig, load_config
from attamba_jax.loss import cross_entropy
from attamba_jax.model import LanguageModel, apply_model, count_params, init_model, make_forward
from attamba_jax.ssm import StackedMamba2
from pallas_kernels.chunk_grid import ChunkGrid
from tests.helpers import assert_close

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

SMALL = ModelConfig(
    vocab_size=50,
    dim=32,
    n_layers=3,
    n_heads=4,
    multiple_of=16,
    ssm_hidden_dim=48,
    ssm_heads=2,
    ssm_state_dim=4,
    token_chunk=4,
    window=2,
)


def _abstract_params(cfg):
    return count_params(nnx.state(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))), nnx.Param))


@pytest.mark.parametrize(
    "name, expected",
    [("attamba_k8_w8", 62_751_488), ("transformer_isoparam", 60_039_680), ("transformer_isokv8", 52_699_648)],
)
def test_paper_parameter_counts(name, expected):
    cfg = load_config(CONFIGS / "paper" / f"{name}.yaml")
    assert _abstract_params(cfg.model) == expected


def test_ssm_outputs_change_only_inside_the_touched_chunk():
    # Given a chunk-reset SSM, when one input token changes, then outputs change
    # at that token and later tokens of its chunk only.
    cfg = dataclasses.replace(SMALL, token_chunk=5)
    ssm = StackedMamba2(cfg, rngs=nnx.Rngs(1))
    grid = ChunkGrid(5, 2)
    T = 23
    u = jax.random.normal(jax.random.key(2), (1, T, 32))
    cid = grid.chunk_id(np.arange(T))
    for impl in ("sequential", "associative", "chunked"):
        ssm.implementation = impl
        run = nnx.jit(lambda m, x: m(x, grid))
        base = run(ssm, u)
        for t in (0, 1, 2, 3, 9, 22):
            delta = np.asarray(jnp.abs(run(ssm, u.at[:, t].add(1.0)) - base).max(axis=(0, 2, 3)))
            changed = delta > 1e-6
            expect = (cid == cid[t]) & (np.arange(T) >= t)
            np.testing.assert_array_equal(changed, expect, err_msg=f"{impl}, token {t}")


@pytest.mark.parametrize("groups", [1, 2])
def test_stacked_ssm_streams_equal_separate_ssms(groups):
    # Given one StackedMamba2 module of two streams (how Attamba computes its K and V SSMs), when
    # each stream's weights are copied into a single-stream module, then that module's
    # output equals the stream's output, forward and gradient: stacking is only a layout.
    cfg = dataclasses.replace(SMALL, token_chunk=5, ssm_groups=groups, ssm_dt_bias=True)
    fused = StackedMamba2(cfg, streams=2, rngs=nnx.Rngs(1))
    grid = ChunkGrid(5, 3)
    u = jax.random.normal(jax.random.key(2), (2, 21, cfg.dim))
    conv_ch = cfg.ssm_inner_dim + 2 * groups * cfg.ssm_state_dim
    width = conv_ch + cfg.ssm_inner_dim + cfg.ssm_heads
    hs, inner = cfg.ssm_heads, cfg.ssm_inner_dim

    def stream(s):
        single = StackedMamba2(cfg, rngs=nnx.Rngs(7))
        single.in_proj.kernel[...] = fused.in_proj.kernel[:, s * width : (s + 1) * width]
        single.conv_weight[...] = fused.conv_weight[s * conv_ch : (s + 1) * conv_ch]
        for name in ("A_log", "D", "dt_bias"):
            getattr(single, name)[...] = getattr(fused, name)[s * hs : (s + 1) * hs]
        single.norm.weight[...] = jax.random.normal(jax.random.key(s), (inner,))
        fused.norm.weight[...] = fused.norm.weight[...].at[s * inner : (s + 1) * inner].set(single.norm.weight[...])
        single.out_proj[...] = fused.out_proj[s : s + 1]
        return single

    singles = [stream(0), stream(1)]
    loss = lambda m, x: jnp.sum(jnp.sin(m(x, grid)))
    # (the output and the input gradient, compiled: the sequential path runs a step per token)
    run = nnx.jit(lambda m, x: (m(x, grid), jax.grad(lambda y: loss(m, y))(x)))
    for impl in ("sequential", "chunked"):
        for m in (fused, *singles):
            m.implementation = impl
        out, grad = run(fused, u)
        chex.assert_shape(out, (2, 21, 2, cfg.dim))
        alone = [run(single, u) for single in singles]
        for s, (single_out, _) in enumerate(alone):
            assert_close(out[:, :, s], single_out[:, :, 0], 1e-5)
        assert_close(grad, sum(g for _, g in alone), 1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        dataclasses.replace(SMALL, token_chunk=8, n_kv_heads=2, head_dim=16),
        dataclasses.replace(SMALL, pseudo_chunk=True),
        ModelConfig(arch="transformer", vocab_size=50, dim=32, n_layers=2, n_heads=4, head_dim=4, multiple_of=16),
        ModelConfig(
            arch="transformer",
            vocab_size=50,
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            multiple_of=16,
            sliding_window=3,
        ),
    ],
    ids=["attamba", "attamba-gqa", "pseudo-chunk", "isokv-like", "transformer-gqa-swa"],
)
def test_causality(cfg):
    # Changing token t changes no logit before t.
    graphdef, params = init_model(cfg, seed=3)
    forward = make_forward(graphdef)
    tokens = jax.random.randint(jax.random.key(4), (2, 19), 0, cfg.vocab_size)
    base = forward(params, tokens)
    for t in (0, 7, 18):
        other = forward(params, tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size))
        diff = np.asarray(jnp.abs(other - base).max(axis=(0, 2)))
        assert np.all(diff[:t] == 0), f"token {t} leaked backwards"
        assert diff[t] > 0


def test_jit_equals_eager():
    graphdef, params = init_model(SMALL, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 26), 0, 50)
    eager = apply_model(graphdef, params, tokens)
    assert eager.shape == (2, 26, 50)
    assert_close(make_forward(graphdef)(params, tokens), eager, 1e-5)


def test_the_reference_implementations_give_the_same_model():
    # Given the same parameters, the sequential SSD and the dense attention mask give the default's logits
    graphdef, params = init_model(SMALL, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 26), 0, 50)
    ref_cfg = dataclasses.replace(SMALL, ssm_implementation="sequential", attention_implementation="dense")
    ref_graphdef, _ = init_model(ref_cfg, seed=0)
    assert_close(make_forward(ref_graphdef)(params, tokens), make_forward(graphdef)(params, tokens), 1e-5)


def test_the_gpu_kernels_give_the_same_model_and_gradient():
    # Given the same parameters, every op on its GPU kernel (in the interpreter: the SSD, the
    # attention, and the SSMs' conv and gated norm, which only a named kernel runs) and every op on XLA
    graphdef, params = init_model(SMALL, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 26), 0, 50)
    xla = dataclasses.replace(SMALL, ssm_implementation="chunked", attention_implementation="compressed")
    kernels = dataclasses.replace(
        SMALL, ssm_implementation="pallas_gpu_interpret", attention_implementation="pallas_gpu_interpret"
    )

    def value_and_grad(cfg):
        g, _ = init_model(cfg, seed=0)
        loss = lambda p: cross_entropy(apply_model(g, p, tokens[:, :-1]), tokens[:, 1:])[0]
        return jax.jit(jax.value_and_grad(loss))(params)

    # Then the loss and every parameter's gradient agree (to float32 sums taken in another order)
    (loss, grads), (want_loss, want_grads) = value_and_grad(kernels), value_and_grad(xla)
    assert_close(loss, want_loss, 1e-5)
    assert_close(grads, want_grads, 1e-4)


def test_test_time_token_chunk_changes_the_grid():
    graphdef, params = init_model(SMALL, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (1, 30), 0, 50)
    a = make_forward(graphdef)(params, tokens)
    b = make_forward(graphdef, token_chunk=8)(params, tokens)
    assert a.shape == b.shape and not np.allclose(a, b)
    # the first chunk ([0] and [1, K-1-o]) is identical at any K
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["attamba", "transformer"])
def test_loss_decreases_on_a_tiny_batch(arch):
    cfg = (
        SMALL
        if arch == "attamba"
        else ModelConfig(arch="transformer", vocab_size=50, dim=32, n_layers=2, n_heads=4, multiple_of=16)
    )
    graphdef, params = init_model(cfg, seed=0)
    tokens = jax.random.randint(jax.random.key(9), (4, 17), 0, 50)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = apply_model(graphdef, p, tokens[:, :-1])
            return cross_entropy(logits, tokens[:, 1:])[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_bfloat16_forward_is_close_to_float32():
    graphdef, params = init_model(SMALL, seed=0)
    g16, _ = init_model(dataclasses.replace(SMALL, dtype="bfloat16"), seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 50)
    out = make_forward(g16)(params, tokens)
    assert out.dtype == jnp.bfloat16
    assert_close(out, make_forward(graphdef)(params, tokens), 5e-2)
