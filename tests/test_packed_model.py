"""Packed documents through the whole model: every document of a packed row gets the logits it
gets alone from position 0, and the gradient of a packed loss is the sum of the documents'."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.config import ModelConfig
from attamba_jax.loss import token_nll
from attamba_jax.model import apply_model, init_model
from tests.helpers import FAST_COMPILE, alone_rows, assert_close, packed_layout, span_weights

BASE = ModelConfig(vocab_size=50, dim=32, n_layers=3, n_heads=4, multiple_of=16, ssm_hidden_dim=48, ssm_heads=2)
ATTAMBA = [  # (name, config, tolerance)
    ("k4_w2_3layers", dataclasses.replace(BASE, token_chunk=4, window=2), 1e-4),
    ("k8_w10_gqa", dataclasses.replace(BASE, n_layers=2, n_kv_heads=2, head_dim=16, token_chunk=8, window=10), 1e-4),
    ("k8_w3_offsets", dataclasses.replace(BASE, n_layers=4, token_chunk=8, window=3), 1e-4),
    ("pseudo_chunk", dataclasses.replace(BASE, n_layers=2, token_chunk=4, window=2, pseudo_chunk=True), 1e-4),
    (
        "references",
        dataclasses.replace(
            BASE, n_layers=2, token_chunk=4, window=3, ssm_implementation="sequential", attention_implementation="dense"
        ),
        1e-4,
    ),
    # bf16 through the references: they compute a document alone and packed in the same order, so
    # only the rule can differ. The fast paths' blocks sit at absolute positions, so their float32
    # sums round differently by where a document lies; each op is held to 1e-2 in bf16 on its own
    # (test_documents, the kernel tests), and over layers those last-bit differences grow.
    (
        "bf16_references",
        dataclasses.replace(
            BASE,
            n_layers=2,
            token_chunk=4,
            window=5,
            dtype="bfloat16",
            ssm_implementation="sequential",
            attention_implementation="dense",
        ),
        1e-2,
    ),
]
TRANSFORMER = [
    ("causal", dataclasses.replace(BASE, arch="transformer", n_layers=2), 1e-4),
    ("sliding_window", dataclasses.replace(BASE, arch="transformer", n_layers=2, sliding_window=6), 1e-4),
]


def _check_packed_equals_alone(cfg: ModelConfig, rel: float, seed: int, length: int = 64, batch: int = 2):
    align = cfg.token_chunk if cfg.arch == "attamba" else 1
    starts, spans = packed_layout(seed, batch, length, align, cfg.window if cfg.arch == "attamba" else 4)
    seg = np.zeros((batch, length), np.int32)
    for j, (row, start, stop) in enumerate(spans):
        seg[row, start:stop] = j + 1  # padding after a document stays 0 and belongs to it
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    tokens_alone, targets_alone = (np.asarray(a).astype(np.int32) for a in alone_rows(spans, [tokens, targets]))
    tokens_alone = np.abs(tokens_alone) % cfg.vocab_size
    targets_alone = np.abs(targets_alone) % cfg.vocab_size
    graphdef, params = init_model(cfg, seed=seed)

    def loss(params, tokens, targets, weights, segment_ids):
        logits = apply_model(graphdef, params, tokens, segment_ids=segment_ids)
        return jnp.sum(token_nll(logits, targets) * weights), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def run(*args):
        return grad.lower(params, *args).compile(FAST_COMPILE)(params, *args)

    (_, logits_p), g_p = run(tokens, targets, span_weights(spans, tokens.shape), jnp.asarray(seg))
    (_, logits_a), g_a = run(tokens_alone, targets_alone, span_weights(spans, tokens_alone.shape), None)
    packed = jnp.concatenate([logits_p[row, start:stop] for row, start, stop in spans])
    alone = jnp.concatenate([logits_a[j, : stop - start] for j, (_, start, stop) in enumerate(spans)])
    assert_close(packed, alone, rel)
    if cfg.dtype == "float32":
        assert_close(g_p, g_a, rel)
    else:
        # bf16 parameter gradients are sums over every token rounded to bf16, in an order that
        # depends on the batch layout (a conv weight's sums 1% apart here): held to 2·rel in norm,
        # leaf by leaf; the logits above are held to rel elementwise.
        for p, a in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_a)):
            assert float(jnp.linalg.norm(p - a)) <= 2 * rel * float(jnp.linalg.norm(a)), p.shape


@pytest.mark.parametrize("name, cfg, rel", ATTAMBA, ids=[a[0] for a in ATTAMBA])
def test_attamba_packed_equals_alone(name, cfg, rel):
    _check_packed_equals_alone(cfg, rel, seed=len(name))


@pytest.mark.parametrize("name, cfg, rel", TRANSFORMER, ids=[a[0] for a in TRANSFORMER])
def test_transformer_packed_equals_alone(name, cfg, rel):
    _check_packed_equals_alone(cfg, rel, seed=len(name))


def test_segment_ids_must_match_tokens():
    graphdef, params = init_model(dataclasses.replace(BASE, n_layers=1), seed=0)
    with pytest.raises(ValueError, match="segment_ids must have the shape of tokens"):
        apply_model(graphdef, params, jnp.zeros((2, 8), jnp.int32), segment_ids=jnp.zeros((2, 7), jnp.int32))


def test_without_segment_ids_a_row_is_one_document():
    # A row with one segment id computes what it computes without segment ids: the same values up
    # to float32 rounding (the document path computes positions per token and masks every block,
    # so XLA fuses and orders the sums differently; it is not the same program)
    cfg = dataclasses.replace(BASE, n_layers=2, token_chunk=4, window=2)
    graphdef, params = init_model(cfg, seed=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 24)), jnp.int32)
    plain = apply_model(graphdef, params, tokens)
    one = apply_model(graphdef, params, tokens, segment_ids=jnp.ones_like(tokens))
    assert_close(one, plain, 1e-5)
