"""The language-model loss: token negative log-likelihood, whole or in slices of the length.

    nll = token_nll(logits, targets)                         [..., V] -> [...] float32
    mean, total = cross_entropy(logits, targets, weights)    the weighted token mean
    nll_sum, total = sliced_nll_sum(h, head, targets, weights, slice_length=1024)

``sliced_nll_sum`` applies the LM head itself, one slice of the positions at a time, forward and
backward, so the [B, T, vocab] logits never exist at once: at B·T = 16k tokens and a 32k
vocabulary they are 1 GiB in bfloat16 and 2 GiB more as the float32 softmax of the backward.
It computes what ``cross_entropy(h @ head, ...)`` computes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, in float32.

    logits [..., V] (any float dtype), targets [...] int -> [...] float32. The gradient
    (softmax - onehot) comes back in logits' dtype from one fused elementwise pass: automatic
    differentiation of the same formula scatters into a float32 [..., V] buffer and converts it
    afterwards, which at B·T = 16k tokens and V = 32k moves 3 GB more per step.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    nll, lse = _nll_and_lse(logits, targets)
    return nll, (logits, targets, lse)


def _nll_and_lse(logits, targets):
    f = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(f, axis=-1)
    return lse - jnp.take_along_axis(f, targets[..., None], axis=-1)[..., 0], lse


def _dlogits(logits, targets, lse, g):
    """d nll / d logits times g: (softmax - onehot) * g, in logits' dtype."""
    vocab = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    softmax = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    return ((softmax - (vocab == targets[..., None]).astype(jnp.float32)) * g[..., None]).astype(logits.dtype)


def _token_nll_bwd(res, g):
    logits, targets, lse = res
    return _dlogits(logits, targets, lse, g), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy in float32 (``token_nll``).

    Returns (mean loss over weighted tokens, total weight).
    """
    nll = token_nll(logits, targets)
    weights = jnp.ones_like(nll) if weights is None else weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(total, 1.0), total


# --- the head and the loss in slices of the length -----------------------------------------


def sliced_nll_sum(
    h: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *, slice_length: int
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weights) of the logits ``h @ head``, in float32, computed
    ``slice_length`` positions of every row at a time.

    Args:
      h: [B, T, D], the final hidden states in the compute dtype; head: [D, V] (cast to h's
        dtype, as the model's head is); targets [B, T] int; weights [B, T].
      slice_length: positions per slice; the slices interleave (slice j holds positions
        j, j + n, j + 2n, ... for n = ceil(T / slice_length)), so that under a mesh that splits
        the length every slice is spread over all of its devices.

    The backward recomputes each slice's logits and takes the softmax from the forward's
    log-sum-exp: one more head matmul per token, and memory for one slice's logits.
    """
    if slice_length < 1:
        raise ValueError(f"slice_length must be >= 1, got {slice_length}")
    return _sliced(h, head, targets, weights.astype(jnp.float32), slice_length)


def _to_slices(x: jax.Array, n: int, fill=0) -> jax.Array:
    """[B, T, ...] -> [n, B, ceil(T/n), ...]: slice j holds positions j, j + n, ... (padded with ``fill``)."""
    b, t = x.shape[:2]
    pad = -t % n
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, (t + pad) // n, n, *x.shape[2:]), 2, 0)


def _from_slices(x: jax.Array, t: int) -> jax.Array:
    """Inverse of ``_to_slices`` for the first ``t`` positions."""
    n, b, s = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, s * n, *x.shape[3:])[:, :t]


def _slice_count(t: int, slice_length: int) -> int:
    return -(-t // slice_length)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sliced(h, head, targets, weights, slice_length):
    return _sliced_fwd(h, head, targets, weights, slice_length)[0]


def _logits(h_slice, head):
    return jnp.einsum("bsd,dv->bsv", h_slice, head.astype(h_slice.dtype))


def _sliced_fwd(h, head, targets, weights, slice_length):
    n = _slice_count(h.shape[1], slice_length)
    hs, ts, ws = _to_slices(h, n), _to_slices(targets, n), _to_slices(weights, n)

    def one(total, xs):
        h_slice, t_slice, w_slice = xs
        nll, lse = _nll_and_lse(_logits(h_slice, head), t_slice)
        return total + jnp.sum(nll * w_slice), lse

    nll_sum, lse = jax.lax.scan(one, jnp.float32(0), (hs, ts, ws))
    return (nll_sum, jnp.sum(weights)), (hs, head, ts, ws, lse, h.shape[1])


def _sliced_bwd(slice_length, res, cotangents):
    hs, head, ts, ws, lse, length = res  # the forward's slices, kept rather than cut again
    g = cotangents[0]  # the weight total has no gradient
    w = head.astype(hs.dtype)

    def one(dhead, xs):
        h_slice, t_slice, w_slice, lse_slice = xs
        dlogits = _dlogits(_logits(h_slice, head), t_slice, lse_slice, w_slice * g)
        dh = jnp.einsum("bsv,dv->bsd", dlogits, w)
        dhead = dhead + jnp.einsum("bsd,bsv->dv", h_slice, dlogits, preferred_element_type=jnp.float32)
        return dhead, dh

    dhead, dhs = jax.lax.scan(one, jnp.zeros(head.shape, jnp.float32), (hs, ts, ws, lse))
    return _from_slices(dhs, length), dhead.astype(head.dtype), None, None


_sliced.defvjp(_sliced_fwd, _sliced_bwd)
