"""The loss: token NLL and its fused backward, and the head and loss in slices of the length."""

import collections
import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attamba_jax.config import ModelConfig, TrainConfig
from attamba_jax.loss import cross_entropy, sliced_nll_sum
from attamba_jax.model import REMAT, init_model
from attamba_jax.train_step import nll_sum
from tests.helpers import assert_close


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_value_and_gradient_match_optax(dtype):
    # Given logits in float32 or bfloat16, integer targets and per-token weights (some zero)
    ks = jax.random.split(jax.random.key(3), 3)
    logits = (3 * jax.random.normal(ks[0], (2, 6, 11))).astype(dtype)
    targets = jax.random.randint(ks[1], (2, 6), 0, 11)
    weights = (jax.random.uniform(ks[2], (2, 6)) > 0.3).astype(jnp.float32)

    def plain(lg):
        nll = optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), targets)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    # When the loss and its gradient go through the fused backward
    loss, grad = jax.value_and_grad(lambda lg: cross_entropy(lg, targets, weights)[0])(logits)
    ref_loss, ref_grad = jax.value_and_grad(plain)(logits)
    # Then they equal automatic differentiation of the plain formula, in the logits' dtype
    assert grad.dtype == logits.dtype
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    tol = 1e-6 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(
        np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32), rtol=tol, atol=tol * 1e-2
    )


def test_cross_entropy_matches_optax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
    loss, total = cross_entropy(logits, targets)
    assert total == 10
    np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), rtol=1e-6)


def _plain_nll_sum(h, head, targets, weights):
    logits = jnp.einsum("btd,dv->btv", h, head.astype(h.dtype))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(nll * weights)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length, slice_length", [(12, 4), (13, 4), (7, 16), (9, 1)])
def test_the_sliced_head_and_loss_equal_the_whole_forward_and_gradient(dtype, length, slice_length):
    # Given hidden states, a head, targets and weights (some zero) on fresh random values, for lengths
    # that do and do not divide into slices
    ks = jax.random.split(jax.random.key(length * 31 + slice_length), 4)
    h = jax.random.normal(ks[0], (3, length, 8)).astype(dtype)
    head = 0.5 * jax.random.normal(ks[1], (8, 37))
    targets = jax.random.randint(ks[2], (3, length), 0, 37)
    weights = (jax.random.uniform(ks[3], (3, length)) > 0.25).astype(jnp.float32)

    # When the loss is computed a slice at a time, and whole
    sliced = lambda h, w: sliced_nll_sum(h, w, targets, weights, slice_length=slice_length)[0]
    (value, total), grads = jax.value_and_grad(
        lambda h, w: sliced_nll_sum(h, w, targets, weights, slice_length=slice_length), argnums=(0, 1), has_aux=True
    )(h, head)
    ref, ref_grads = jax.value_and_grad(lambda h, w: _plain_nll_sum(h, w, targets, weights), argnums=(0, 1))(h, head)

    # Then the value, the weight total and both gradients agree (in h's dtype for dh)
    assert total == jnp.sum(weights)
    rel = 1e-5 if dtype == "float32" else 2e-2
    assert_close(value, ref, rel)
    assert grads[0].dtype == h.dtype and grads[1].dtype == head.dtype
    assert_close(grads[0], ref_grads[0], rel)
    assert_close(grads[1], ref_grads[1], rel)
    assert jnp.isfinite(jax.grad(sliced)(h, head)).all()


def test_a_slice_length_below_one_is_refused():
    with pytest.raises(ValueError, match="slice_length must be >= 1"):
        sliced_nll_sum(
            jnp.zeros((1, 4, 2)), jnp.zeros((2, 3)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)), slice_length=0
        )


MODEL = ModelConfig(
    vocab_size=61, dim=32, n_layers=2, n_heads=4, multiple_of=16, ssm_hidden_dim=48, ssm_heads=2,
    ssm_state_dim=4, token_chunk=4, window=3,
)  # fmt: skip


@pytest.mark.parametrize(
    "arch, remat, loss_slice",
    [
        ("attamba", "block", None),
        ("attamba", "block_save_dots", 5),
        ("transformer", "block", 3),
        ("transformer", "none", 8),
    ],
)
def test_remat_and_the_sliced_loss_leave_the_loss_and_gradients_unchanged(arch, remat, loss_slice):
    # Given a model and a packed batch of fresh random tokens (documents of different lengths)
    cfg = MODEL if arch == "attamba" else dataclasses.replace(MODEL, arch="transformer", token_chunk=8, window=8)
    graphdef, params = init_model(cfg, seed=3)
    rng = np.random.default_rng(len(remat) + (loss_slice or 0))
    tokens = rng.integers(0, cfg.vocab_size, (2, 21))
    segment_ids = np.repeat(np.array([[1, 2, 3], [1, 1, 4]]), [8, 8, 5], axis=1)
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "weights": jnp.asarray(rng.random((2, 20)) > 0.2, jnp.float32),
        "segment_ids": jnp.asarray(segment_ids[:, :20]),
    }
    # When the loss and its gradient are taken with remat and the sliced loss, and without
    run = lambda **kw: jax.jit(jax.value_and_grad(lambda p: nll_sum(graphdef, p, batch, **kw), has_aux=True))(params)
    (value, total), grads = run(remat=remat, loss_slice=loss_slice)
    (ref, ref_total), ref_grads = run()
    # Then they agree (f32)
    assert total == ref_total
    assert_close(value, ref, 1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, r, 1e-4)


def test_the_config_offers_exactly_the_remat_policies_the_model_has():
    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["remat"])) == set(REMAT)


def test_an_unknown_remat_is_refused_naming_the_choices():
    graphdef, params = init_model(MODEL, seed=0)
    batch = {k: jnp.zeros((1, 8), jnp.int32) for k in ("inputs", "targets")} | {"weights": jnp.ones((1, 8))}
    with pytest.raises(ValueError, match="remat must be one of"):
        nll_sum(graphdef, params, batch, remat="everything")


def test_the_sliced_loss_never_holds_the_whole_logits():
    # Given 4 x 512 positions and a vocabulary of 8192: float32 logits of 64 MiB
    h, head = jnp.ones((4, 512, 64)), jnp.ones((64, 8192))
    targets, weights = jnp.zeros((4, 512), jnp.int32), jnp.ones((4, 512))
    whole = lambda h, w: cross_entropy(jnp.einsum("btd,dv->btv", h, w), targets, weights)[0]
    sliced = lambda h, w: sliced_nll_sum(h, w, targets, weights, slice_length=64)[0]
    # When the gradients of both are compiled
    temp = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, head).compile().memory_analysis().temp_size_in_bytes
    # Then the sliced one's scratch memory is a small fraction: one slice of logits (8 MiB), not all
    assert temp(sliced) < 20 * 2**20 < 64 * 2**20 < temp(whole)


def _primitives(jaxpr, found: collections.Counter) -> collections.Counter:
    """Every primitive of ``jaxpr`` and of the jaxprs inside it, counted."""
    for eqn in jaxpr.eqns:
        found[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, found)
    return found


@pytest.mark.parametrize("remat", ["none", "block", "block_save_dots"])
def test_remat_recomputes_each_block_in_the_backward(remat):
    graphdef, params = init_model(MODEL, seed=0)
    batch = {k: jnp.zeros((1, 8), jnp.int32) for k in ("inputs", "targets")} | {"weights": jnp.ones((1, 8))}
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: nll_sum(graphdef, p, batch, remat=remat)[0]))(params)
    # one rematerialised forward per block in the backward ("remat2" is jax.checkpoint's primitive)
    assert _primitives(jaxpr.jaxpr, collections.Counter())["remat2"] == (0 if remat == "none" else MODEL.n_layers)
