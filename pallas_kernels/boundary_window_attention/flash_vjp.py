"""The differentiation rule both attention kernels share, FlashAttention style: the forward
saves its inputs, its output and the log-sum-exp; the backward recomputes the scores from them."""

from __future__ import annotations

import functools

import jax


def flash_vjp(forward, backward):
    """A differentiable ``attention(st, q, k, v, documents, interpret) -> o``.

    Args:
      forward: ``(st, q, k, v, documents, interpret) -> (o, lse)``.
      backward: ``(st, q, k, v, documents, o, lse, do, interpret) -> (dq, dk, dv)``.
      ``st`` (hashable) and ``interpret`` are static; ``documents`` (the [B, T] int32 document
      starts, or None) is not differentiated.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
    def attention(st, q, k, v, documents, interpret):
        return forward(st, q, k, v, documents, interpret)[0]

    def attention_fwd(st, q, k, v, documents, interpret):
        o, lse = forward(st, q, k, v, documents, interpret)
        return o, (q, k, v, documents, o, lse)

    def attention_bwd(st, interpret, res, do):
        return (*backward(st, *res, do, interpret), None)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
