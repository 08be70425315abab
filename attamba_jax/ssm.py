"""The chunk-reset Mamba-2 SSMs that produce Attamba's keys and values.

Per SSM (stream) s — Attamba runs two, one for K and one for V, with separate weights:

    [z | x | B | C | dt] = u @ W_in[s]                 widths I, I, G·N, G·N, Hs
    x, B, C = silu(causal_depthwise_conv(x, B, C))      restarts at every chunk start
    y = SSD(x, dt=softplus(dt [+ dt_bias]), A=-exp(A_log), B, C, D)   restarts likewise
    out[s] = W_out[s](RMSNorm(y * silu(z)))             I -> dim

State and conv history restart at the start of every chunk of the layer's grid, so
the output at a boundary summarises exactly the chunk that ends there.

The S streams are independent SSMs computed side by side: one ``in_proj`` matmul whose
columns are stream-major, one conv over S·(I+2GN) channels, one SSD call over S·Hs heads
and S·G groups (head s·Hs+h reads group s·G + h//(Hs/G), i.e. its own stream's B and C),
one grouped RMSNorm over S·G groups and one batched ``out_proj``. That is the same math
as S separate modules in a fraction of the kernel launches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attamba_jax.config import ModelConfig
from attamba_jax.layers import Dense, RMSNorm, truncated_normal
from attamba_jax.sharding import call_op
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.ssd import IMPLEMENTATIONS, ssd
from pallas_kernels.ssd.reference import ssd_sequential
from pallas_kernels.ssm_step import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from pallas_kernels.ssm_step import StepSizes, history_slot, ssm_step

# The decode step's implementation for each ``ssm_implementation``: the fused one-token kernel where
# the SSD runs the GPU kernel (or is left to auto), XLA otherwise.
_STEP_IMPLEMENTATION = {"auto": "auto", "pallas_gpu": "pallas_gpu", "pallas_gpu_interpret": "pallas_gpu_interpret"}


class SSMState(NamedTuple):
    """What the chunk-reset SSMs carry between decode steps (SPEC §5), streams stacked."""

    scan: jax.Array  # [B, S·Hs, P, N] float32: the scan state of the current chunk
    # [B, conv_width, S·(I+2GN)]: a ring of the current chunk's raw conv inputs, its token at
    # position q in slot q % conv_width (``pallas_kernels.ssm_step.history_slot``), zero before it
    conv: jax.Array


def chunk_causal_conv(x: jax.Array, weight: jax.Array, position_in_chunk: jax.Array) -> jax.Array:
    """Depthwise causal conv whose taps never reach into an earlier chunk.

    out[t] = sum_j weight[:, W-1-j] * x[t-j] over lags j <= position_in_chunk[t].

    Args:
      x: [B, T, C]; weight: [C, W] (last tap = current token);
      position_in_chunk: [T] or [B, T] ints (0 at each chunk start).
    """
    width = weight.shape[1]
    pos = position_in_chunk[..., None] if position_in_chunk.ndim == 2 else position_in_chunk[None, :, None]
    out = x * weight[:, width - 1]
    for lag in range(1, width):
        shifted = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, : x.shape[1]]
        out = out + jnp.where(pos >= lag, shifted, 0) * weight[:, width - 1 - lag]
    return out


def _ssd_of_documents(x, dt, A, B, C, D, document_start, **kw):
    """``ssd`` with the packed layout as a positional array (``call_op`` shards it by batch rows)."""
    return ssd(x, dt, A, B, C, D, document_start=document_start, **kw)


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


class StackedMamba2(nnx.Module):
    """``streams`` independent chunk-reset Mamba-2 SSMs of one input, side by side: ``dim -> [streams, dim]``.

    Attamba's attention holds one of two streams: the K SSM and the V SSM.
    """

    def __init__(self, cfg: ModelConfig, *, streams: int = 1, rngs: nnx.Rngs):
        d, inner = cfg.dim, cfg.ssm_inner_dim
        self.streams = streams
        self.inner, self.state, self.heads, self.groups = inner, cfg.ssm_state_dim, cfg.ssm_heads, cfg.ssm_groups
        dtype = jnp.dtype(cfg.dtype)
        conv_ch = inner + 2 * self.groups * self.state
        width = 2 * inner + 2 * self.groups * self.state + self.heads
        heads = streams * self.heads
        self.in_proj = Dense(d, streams * width, std=d**-0.5, axes=("embed", "ssm_inner"), dtype=dtype, rngs=rngs)
        self.conv_weight = nnx.Param(
            truncated_normal(rngs.params(), (streams * conv_ch, cfg.ssm_conv_width), 0.5),
            logical_axes=("ssm_inner", None),
        )
        a = jax.random.uniform(rngs.params(), (heads,), jnp.float32, cfg.ssm_a_init_min, cfg.ssm_a_init_max)
        self.A_log = nnx.Param(jnp.log(a), logical_axes=("ssm_heads",))
        self.D = nnx.Param(jnp.ones((heads,), jnp.float32), logical_axes=("ssm_heads",))
        if cfg.ssm_dt_bias:
            # Mamba-2's dt initialisation: log-uniform in [1e-3, 0.1], floored at 1e-4.
            u = jax.random.uniform(rngs.params(), (heads,), jnp.float32)
            dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
            self.dt_bias = nnx.Param(_inverse_softplus(dt), logical_axes=("ssm_heads",))
        else:
            self.dt_bias = None
        # Grouped over S·G groups of I/G channels: each stream's groups are normalised alone.
        self.norm = RMSNorm(streams * inner, eps=cfg.norm_eps, axis_name="ssm_inner", groups=streams * self.groups)
        self.out_proj = nnx.Param(
            truncated_normal(rngs.params(), (streams, inner, d), inner**-0.5), logical_axes=(None, "ssm_inner", "embed")
        )
        self.dtype = dtype
        self.implementation = cfg.ssm_implementation

    def __call__(
        self, u: jax.Array, grid: ChunkGrid, document_start: jax.Array | None = None, *, rows: str = "batch"
    ) -> jax.Array:
        """u: [B, T, dim] -> [B, T, streams, dim], restarting at every chunk start of ``grid`` (and,
        in a packed row, at each document's first token and then on that document's grid:
        ``document_start`` [B, T], see ``pallas_kernels.documents``). ``rows``: the logical axis of
        the rows under a mesh (``context_rows`` for context shards)."""
        return self._forward(u, grid, document_start, rows)[0]

    def _forward(self, u: jax.Array, grid: ChunkGrid, document_start: jax.Array | None = None, rows: str = "batch"):
        """The parallel forward; also returns the intermediates that prefill reads its state from."""
        t = u.shape[1]
        z, xbc, dt = self._in_projection(u)
        pos = np.arange(t)
        if document_start is None:
            position = jnp.asarray(grid.position_in_chunk(pos))
        else:
            position = pos - grid.chunk_start_in_document(jnp.asarray(pos, jnp.int32), document_start)
        x, B, C = self._conv(xbc, position)
        # Under a mesh a named kernel runs per device on its rows.
        rows = (rows, None, None, None)
        args, axes = (x, dt, self._A(), B, C, self.D[...]), (rows, rows[:3], None, rows, rows, None)
        op = ssd
        if document_start is not None:
            args, axes, op = args + (document_start,), axes + (rows[:2],), _ssd_of_documents
        y = call_op(op, IMPLEMENTATIONS, self.implementation, args, axes, rows, grid=grid)
        return self._gated_output(y, z), (xbc, x, dt, B, C)

    # --- the pieces shared by the parallel forward, prefill and decode ------------------

    def _in_projection(self, u: jax.Array):
        """u [B, T, dim] -> z [B, T, S·I], xbc [B, T, S·(I+2GN)] (pre-conv), dt [B, T, S·Hs] (f32, softplus)."""
        b, t, _ = u.shape
        inner, gn = self.inner, self.groups * self.state
        zxbcdt = self.in_proj(u).reshape(b, t, self.streams, -1)  # [B, T, S, 2I + 2GN + Hs]
        z, xbc, dt = jnp.split(zxbcdt, [inner, 2 * inner + 2 * gn], axis=-1)
        dt = dt.reshape(b, t, -1).astype(jnp.float32)
        if self.dt_bias is not None:
            dt = dt + self.dt_bias[...]
        return z.reshape(b, t, -1), xbc.reshape(b, t, -1), jax.nn.softplus(dt)

    def _conv(self, xbc: jax.Array, position: jax.Array):
        """Chunk-causal conv + silu, split into the SSD inputs x [B,T,S·Hs,P], B and C [B,T,S·G,N]."""
        b, t, _ = xbc.shape
        inner, gn = self.inner, self.groups * self.state
        xbc = jax.nn.silu(chunk_causal_conv(xbc, self.conv_weight[...].astype(xbc.dtype), position))
        x, B, C = jnp.split(xbc.reshape(b, t, self.streams, -1), [inner, inner + gn], axis=-1)
        return (
            x.reshape(b, t, self.streams * self.heads, inner // self.heads),
            B.reshape(b, t, self.streams * self.groups, self.state),
            C.reshape(b, t, self.streams * self.groups, self.state),
        )

    def _A(self) -> jax.Array:
        return -jnp.exp(self.A_log[...])

    def _gated_output(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """y [B, T, S·Hs, P], z [B, T, S·I] -> out_proj[s](RMSNorm(y * silu(z))[s]) [B, T, S, dim]."""
        b, t = z.shape[:2]
        return self._out_projection(self.norm(y.reshape(b, t, -1) * jax.nn.silu(z)).reshape(b, t, self.streams, -1))

    def _out_projection(self, gated: jax.Array) -> jax.Array:
        """[..., S, I] -> [..., S, dim]: each stream's own out_proj."""
        return jnp.einsum("...si,sid->...sd", gated.astype(self.dtype), self.out_proj[...].astype(self.dtype))

    # --- inference -----------------------------------------------------------------------

    def prefill(self, u: jax.Array, grid: ChunkGrid, lengths: jax.Array) -> tuple[jax.Array, SSMState]:
        """The parallel forward, plus each row's state after its last token.

        Args:
          u: [B, T, dim]; row i holds ``lengths[i]`` (>= 1) real tokens at positions 0..L_i-1.

        Returns:
          out [B, T, S, dim] (equal to ``__call__``) and the state after token L_i - 1: the
          scan state and conv history of that token's chunk.
        """
        b, t, _ = u.shape
        out, (xbc, x, dt, B, C) = self._forward(u, grid)

        # The state after token `last` depends only on its own chunk, which starts at
        # `start` and is at most K tokens long: rerun the recurrence over those tokens.
        last = lengths.astype(jnp.int32) - 1  # [B]
        start = grid.chunk_start(last)  # [B]
        rows = jnp.arange(b)[:, None]
        span = grid.token_chunk
        idx = last[:, None] - (span - 1) + jnp.arange(span)  # [B, K]
        take = lambda a: a[rows, jnp.clip(idx, 0, t - 1)]
        in_chunk = idx >= start[:, None]  # [B, K]
        dt_chunk = jnp.where(in_chunk[..., None], take(dt), 0.0)  # dt = 0: no decay, no input
        _, scan = ssd_sequential(
            take(x), dt_chunk, self._A(), take(B), take(C), self.D[...], reset=jnp.zeros((b, span), bool)
        )
        # Conv history ring: slot j holds the chunk's latest token whose position in it is j mod
        # the width (zero where the chunk has no such token yet).
        width = self.conv_weight.shape[1]
        q = (last - start)[:, None]  # the last token's position in its chunk
        q = q - history_slot(q - jnp.arange(width), width)  # [B, width]: slot j's position in the chunk
        conv = jnp.where((q >= 0)[..., None], xbc[rows, jnp.clip(start[:, None] + q, 0, t - 1)], 0)
        return out, SSMState(scan=scan, conv=conv.astype(xbc.dtype))

    def step(
        self, zxbcdt: jax.Array, grid: ChunkGrid, positions: jax.Array, state: SSMState, *, offset: int = 0
    ) -> tuple[jax.Array, SSMState]:
        """One token per row from its in-projection ``in_proj(u)`` [B, S·(2I + 2GN + Hs)], held by
        ``zxbcdt`` from column ``offset`` on, at ``positions`` [B] -> out [B, 1, S, dim], new state.
        The caller projects (it may do so together with another projection of u, whose output
        columns come first: the step reads the in-projection where it lies).

        A token that starts a chunk (t = 0 or t-1 a boundary) starts from the zero state. Between
        the two projections the step is one op, ``pallas_kernels.ssm_step``: one fused kernel on a
        GPU (where the SSD runs its GPU kernel or ``auto``), its XLA path otherwise.
        """
        sizes = StepSizes(
            self.streams, self.heads, self.inner // self.heads, self.state, self.groups, eps=self.norm.eps
        )
        dt_bias = None if self.dt_bias is None else self.dt_bias[...]
        args = (
            zxbcdt,
            state.conv,
            state.scan,
            self.conv_weight[...],
            self.A_log[...],
            self.D[...],
            dt_bias,
            self.norm.weight[...],
            grid.position_in_chunk(positions),
        )
        rows = ("batch", None, None, None)
        axes = (rows[:2], rows[:3], rows, None, None, None, None, None, rows[:1])
        implementation = _STEP_IMPLEMENTATION.get(self.implementation, "xla")
        gated, scan, conv = call_op(
            ssm_step,
            STEP_IMPLEMENTATIONS,
            implementation,
            args,
            axes,
            (rows[:3], rows, rows[:3]),
            sizes=sizes,
            offset=offset,
        )
        # (projected as [B, S, I]: XLA's step runs that faster than a [B, 1, S, I] operand)
        return self._out_projection(gated)[:, None], SSMState(scan=scan, conv=conv)
