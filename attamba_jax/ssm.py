"""The chunk-reset Mamba-2 SSMs that produce Attamba's keys and values.

Per SSM (stream) s — Attamba runs two, one for K and one for V, with separate weights:

    [z | x | B | C | dt] = u @ W_in[s]                 widths I, I, G·N, G·N, Hs
    x, B, C = silu(causal_depthwise_conv(x, B, C))      restarts at every chunk start
    y = SSD(x, dt=softplus(dt [+ dt_bias]), A=-exp(A_log), B, C, D)   restarts likewise
    out[s] = W_out[s](RMSNorm(y * silu(z)))             I -> dim

State and conv history restart at the start of every chunk of the layer's grid, so
the output at a boundary summarises exactly the chunk that ends there.

The S streams are independent SSMs computed side by side: one ``in_proj`` matmul whose
columns are stream-major, one ``ssm_conv`` op (the split, the conv over S·(I+2GN) channels,
SiLU and softplus), one SSD call over S·Hs heads and S·G groups (head s·Hs+h reads group
s·G + h//(Hs/G), i.e. its own stream's B and C), one ``gated_norm`` op over S·G groups and one
batched ``out_proj``. That is the same math as S separate modules in a fraction of the kernel
launches. The two ops around the SSD each have a GPU kernel (``pallas_kernels``), which runs
where ``ssm_implementation`` names the GPU kernel (see ``_SEQUENCE_AROUND_SSD``).
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
from pallas_kernels.gated_norm import IMPLEMENTATIONS as NORM_IMPLEMENTATIONS
from pallas_kernels.gated_norm import gated_norm
from pallas_kernels.ssd import IMPLEMENTATIONS, ssd
from pallas_kernels.ssd.reference import ssd_sequential
from pallas_kernels.ssm_conv import IMPLEMENTATIONS as CONV_IMPLEMENTATIONS
from pallas_kernels.ssm_conv import ssm_conv
from pallas_kernels.ssm_sizes import SsmSizes
from pallas_kernels.ssm_step import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from pallas_kernels.ssm_step import history_slot, ssm_step

# The implementation of the ops around the SSD for each ``ssm_implementation``: their GPU kernels
# where the SSD runs its own, XLA otherwise. The decode step's kernel is measured faster than its
# XLA path (BENCHMARKS.md), so ``auto`` takes it on a GPU; the training forward's (``ssm_conv``,
# ``gated_norm``) run only where the GPU kernel is named, until a GPU run measures them against
# XLA's fusions (``benchmarks/bench_train_step.py --models attamba,attamba-kernels,transformer``).
_STEP_AROUND_SSD = {"auto": "auto", "pallas_gpu": "pallas_gpu", "pallas_gpu_interpret": "pallas_gpu_interpret"}
_SEQUENCE_AROUND_SSD = {"pallas_gpu": "pallas_gpu", "pallas_gpu_interpret": "pallas_gpu_interpret"}


class SSMState(NamedTuple):
    """What the chunk-reset SSMs carry between decode steps (SPEC §5), streams stacked."""

    scan: jax.Array  # [B, S·Hs, P, N] float32: the scan state of the current chunk
    # [B, conv_width, S·(I+2GN)]: a ring of the current chunk's raw conv inputs, its token at
    # position q in slot q % conv_width (``pallas_kernels.ssm_step.history_slot``), zero before it
    conv: jax.Array


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
        """The parallel forward; also returns the in-projection and the SSD's inputs (prefill reads
        its state from them)."""
        b, t, _ = u.shape
        zxbcdt = self.in_proj(u)  # [B, T, S·(2I + 2GN + Hs)]
        pos = np.arange(t)
        if document_start is None:
            position, position_axes = jnp.asarray(grid.position_in_chunk(pos)), None
        else:
            position = pos - grid.chunk_start_in_document(jnp.asarray(pos, jnp.int32), document_start)
            position_axes = (rows, None)
        # Under a mesh a named kernel runs per device on its rows.
        rows = (rows, None, None, None)
        # no bias as a zero bias: call_op shards every argument, so each must be an array
        dt_bias = jnp.zeros(self.D.shape, jnp.float32) if self.dt_bias is None else self.dt_bias[...]
        z, x, B, C, dt = call_op(
            ssm_conv,
            CONV_IMPLEMENTATIONS,
            self._sequence_ops,
            (zxbcdt, self.conv_weight[...], dt_bias, position),
            (rows[:3], None, None, position_axes),
            (rows[:3], rows, rows, rows, rows[:3]),
            sizes=self._sizes,
        )
        args, axes = (x, dt, self._A(), B, C, self.D[...]), (rows, rows[:3], None, rows, rows, None)
        op = ssd
        if document_start is not None:
            args, axes, op = args + (document_start,), axes + (rows[:2],), _ssd_of_documents
        y = call_op(op, IMPLEMENTATIONS, self.implementation, args, axes, rows, grid=grid)
        gated = call_op(
            gated_norm,
            NORM_IMPLEMENTATIONS,
            self._sequence_ops,
            (y.reshape(b, t, -1), z, self.norm.weight[...]),
            (rows[:3], rows[:3], None),
            rows[:3],
            groups=self.norm.groups,
            eps=self.norm.eps,
        )
        return self._out_projection(gated.reshape(b, t, self.streams, -1)), (zxbcdt, x, dt, B, C)

    @property
    def _sizes(self) -> SsmSizes:
        return SsmSizes(self.streams, self.heads, self.inner // self.heads, self.state, self.groups, eps=self.norm.eps)

    @property
    def _sequence_ops(self) -> str:
        """The implementation of ``ssm_conv`` and ``gated_norm`` (see ``_SEQUENCE_AROUND_SSD``)."""
        return _SEQUENCE_AROUND_SSD.get(self.implementation, "xla")

    def _A(self) -> jax.Array:
        return -jnp.exp(self.A_log[...])

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
        out, (zxbcdt, x, dt, B, C) = self._forward(u, grid)
        inner = self.inner
        xbc = zxbcdt.reshape(b, t, self.streams, -1)[..., inner : inner + self._sizes.conv_channels].reshape(b, t, -1)

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
        sizes = self._sizes
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
        gated, scan, conv = call_op(
            ssm_step,
            STEP_IMPLEMENTATIONS,
            _STEP_AROUND_SSD.get(self.implementation, "xla"),
            args,
            axes,
            (rows[:3], rows, rows[:3]),
            sizes=sizes,
            offset=offset,
        )
        # (projected as [B, S, I]: XLA's step runs that faster than a [B, 1, S, I] operand)
        return self._out_projection(gated)[:, None], SSMState(scan=scan, conv=conv)
