"""The differentiation rule both attention kernels share, FlashAttention style: the forward
saves its inputs, its output and the log-sum-exp; the backward recomputes the scores from them."""

from __future__ import annotations

import functools

import jax


def flash_vjp(forward, backward):
    """A differentiable ``attention(st, inputs, layout, interpret) -> o``.

    Args:
      forward: ``(st, inputs, layout, interpret) -> (o, lse)``.
      backward: ``(st, inputs, layout, o, lse, do, interpret) -> gradients of inputs``.
      ``inputs`` is the tuple of differentiated arrays (q, k, v first); ``layout`` (integer arrays:
      the document starts and the like, or None) is not differentiated; ``st`` (hashable) and
      ``interpret`` are static.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
    def attention(st, inputs, layout, interpret):
        return forward(st, inputs, layout, interpret)[0]

    def attention_fwd(st, inputs, layout, interpret):
        o, lse = forward(st, inputs, layout, interpret)
        return o, (inputs, layout, o, lse)

    def attention_bwd(st, interpret, res, do):
        inputs, layout, o, lse = res
        return tuple(backward(st, inputs, layout, o, lse, do, interpret)), None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention
