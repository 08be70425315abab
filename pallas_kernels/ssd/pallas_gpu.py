"""Chunk-reset SSD as a Pallas kernel for GPUs (Triton lowering), forward and backward.

Each program owns one block of ``S`` consecutive tokens of one batch row (or a few
consecutive blocks: ``GpuPass.tiles``) and the heads of one B/C group (C·Bᵀ is
computed once per group). Blocks are placed so that no chunk of the grid straddles two:
block ``m`` covers positions ``[m*S - o, (m+1)*S - o)`` (o the grid offset, S = the
largest multiple of K that fits the power-of-two tile L; S = L for the usual
power-of-two K). Chunks are then independent problems inside the block and, per head,
the whole block is one masked [L, L] matmul in SSD "quadratic" form:

    y_i = sum_j M_ij (C_i · B_j) exp(cum_i - cum_j) dt_j x_j + D x_i,
    M_ij = [i, j in one chunk and j <= i],   cum_i = sum_{k in chunk, k <= i} dt_k A.

This reads the [B, T, ...] arrays in place (no ``ChunkLayout`` copy): each input
byte is read once and each output byte written once, which is what makes the op
memory bound instead of copy bound. Exponentials and the within-chunk cumsum are
taken in float32; the two matmuls run on tensor cores in the input dtype (bf16) or
in exact float32 for float32 inputs.

The first block starts at ``-o``; instead of loading from a negative position it
loads ``[0, L)`` and writes only ``[0, S - o)`` (the chunk cut there belongs to
block 1, which loads it whole). The same write range masks the backward pass.

The backward writes the gradients of x, dt, B and C, plus two per-token float32 rows
(d loss / d(dt·A) and dy·x summed over P) that the caller sums into dA and dD, so no
program reduces over its whole block.

Packed documents (``document_start``, every document starting at a multiple of K:
``pallas_kernels.documents``). Each tile also loads its [L] int32 document starts, once
for all its heads, and its mask becomes M_ij = [r_i <= j <= i], r_i =
``ChunkGrid.chunk_start_in_document``: [r_i, i] lies inside i's chunk of the row, so the
blocks stay as they are. cum is the masked row sum of dt·A, so it now sums [r_i, i] only:
each of a chunk's (at most two) documents gets its own cumsum, and the weights, the
matmuls and the backward (which reads the same mask) see exact zeros where another
document is. A document's outputs are therefore a function of its own inputs alone, bit
for bit. The extra work per tile is that load and O(L) integer ops: the [L, L] mask costs
what the chunk mask does. Without documents the kernels are the code they were before
(no extra input, load or op).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import poison as poisoned
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.common import dot, index, iota, matmul_precision, next_pow2, pad_last, triton_params
from pallas_kernels.ssd.block_sizes import GpuBlocks, default_gpu_blocks


class _Geometry:
    """Static sizes and per-program token positions of one kernel launch."""

    def __init__(self, t: int, grid: ChunkGrid, block_len: int):
        self.t, self.grid = t, grid
        self.block = block_len  # L: the tile, a power of two >= K
        self.stride = (block_len // grid.token_chunk) * grid.token_chunk  # S: tokens each program owns
        self.num_blocks = grid.num_blocks(t, self.stride)

    def positions(self, m):
        """-> (start of the loaded window, [L] token positions, [L] bool loaded, [L] bool written)."""
        lo = self.grid.block_start(m, self.stride)
        start = jnp.maximum(lo, 0)
        pos = start + iota(self.block)
        loaded = pos < self.t
        written = loaded & (pos < lo + self.stride)
        return start, pos, loaded, written

    def chunk_mask(self, pos):
        """[L, L] bool: key j is in query i's chunk and not after it."""
        cid = self.grid.chunk_id(pos)
        same = cid[:, None] == cid[None, :]
        return same & (pos[None, :] <= pos[:, None])

    def document_mask(self, pos, document_start):
        """``chunk_mask`` of a packed row: key j is in query i's chunk of i's document and not after
        it, ``r_i <= j <= i`` (r = ``chunk_start_in_document``; [r_i, i] lies in i's chunk of the row)."""
        restart = self.grid.chunk_start_in_document(pos, document_start)
        return (pos[None, :] >= restart[:, None]) & (pos[None, :] <= pos[:, None])

    def mask(self, pos, loaded, rows, ds_ref):
        """The tile's [L, L] mask: ``chunk_mask``, or with a [T] ``document_start`` ref (one int32
        load per tile) ``document_mask``."""
        if ds_ref is None:
            return self.chunk_mask(pos)
        return self.document_mask(pos, plgpu.load(ds_ref.at[rows], mask=loaded, other=0))


def _decay(mask, a):
    """exp(cum_i - cum_j) on the chunk mask, 0 elsewhere.  a: [L] = dt * A."""
    cum = jnp.sum(jnp.where(mask, a[None, :], 0.0), axis=1)  # [L], resets at chunk starts
    seg = jnp.where(mask, cum[:, None] - cum[None, :], -jnp.inf)
    return jnp.exp(seg)  # [L, L]


def _weights(cb, mask, dt, a):
    """A head's [L, L] weights w_ij = (C_i · B_j) decay_ij dt_j, from cb = C·Bᵀ and a = its A."""
    return cb * _decay(mask, dt * a) * dt[None, :]


def _each_tile(tiles: int, body) -> None:
    """Runs ``body(m)`` on this program's ``tiles`` consecutive tiles (those past the row's
    last tile load and store nothing)."""
    first = pl.program_id(1) * tiles
    if tiles == 1:
        body(first)
        return

    def step(k, carry):
        body(first + k)
        return carry

    jax.lax.fori_loop(0, tiles, step, 0)


def _document_ref(refs, documents: bool):
    """-> (the [T] ``document_start`` ref, the others): with documents it comes first."""
    return (refs[0], refs[1:]) if documents else (None, refs)


def _fwd_kernel(*refs, geo: _Geometry, heads, ahead, precision, tiles, documents):
    ds_ref, refs = _document_ref(refs, documents)
    kw = dict(geo=geo, heads=heads, ahead=ahead, precision=precision)
    _each_tile(tiles, lambda m: _fwd_tile(m, ds_ref, *refs, **kw))


def _head_groups(heads: int, ahead: int):
    """The heads in runs of ``ahead``: a program loads one run's inputs before computing any of
    them, so that several heads' loads are in flight at once (a store between two loads would
    order them: the compiler cannot tell the refs apart)."""
    return [range(h, min(heads, h + ahead)) for h in range(0, heads, ahead)]


def _load_head(dt_ref, x_ref, rows, loaded, h):
    """Head h's dt [L] (float32) and x [L, P] on one tile, zero past the row's end (h: a static
    int or a traced int32 scalar)."""
    h = index(h) if isinstance(h, int) else h
    dt = plgpu.load(dt_ref.at[rows, h], mask=loaded, other=0.0).astype(jnp.float32)
    return dt, plgpu.load(x_ref.at[rows, h, :], mask=loaded[:, None], other=0.0)


def _fwd_tile(m, ds_ref, x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, y_ref, *, geo: _Geometry, heads, ahead, precision):
    """Tile m of one group's heads. Refs: x, y [T, Hg, P]; dt [T, Hg]; A, D [Hg]; B, C [T, N];
    ``document_start`` [T] or None (batch row and group squeezed)."""
    start, pos, loaded, written = geo.positions(m)
    rows = pl.ds(start, geo.block)
    mask = geo.mask(pos, loaded, rows, ds_ref)
    bg = plgpu.load(b_ref.at[rows, :], mask=loaded[:, None], other=0.0)  # [L, N]
    cg = plgpu.load(c_ref.at[rows, :], mask=loaded[:, None], other=0.0)
    cb = dot(cg, bg, precision, trans_b=True)  # [L, L] f32
    for run in _head_groups(heads, ahead):
        inputs = [_load_head(dt_ref, x_ref, rows, loaded, h) for h in run]
        for h, (dt, x) in zip(run, inputs):
            y = _head_forward(cb, mask, dt, a_ref[h], d_ref[h], x, precision)
            plgpu.store(y_ref.at[rows, index(h), :], y.astype(y_ref.dtype), mask=written[:, None])


def _head_forward(cb, mask, dt, a, d, x, precision):
    """One head's output on one tile, float32 [L, P].

    cb: [L, L] f32 C·Bᵀ of the head's group; mask: ``chunk_mask``; dt: [L] f32 (after
    softplus); a, d: the head's A and D; x: [L, P] in the matmul dtype.
    """
    w = _weights(cb, mask, dt, a)
    return dot(w.astype(x.dtype), x, precision) + d * x.astype(jnp.float32)


def _head_dx(cb, mask, dt, a, d, dy, precision):
    """d/dx of ``_head_forward`` for ``dy`` [L, P] (matmul dtype; zero on rows this program does
    not own): dx [L, P] f32 = wᵀ·dy + D·dy."""
    w = _weights(cb, mask, dt, a)
    return dot(w.astype(dy.dtype), dy, precision, trans_a=True) + d * dy.astype(jnp.float32)


def _head_grads(cb, mask, dt, a, x, dy, precision):
    """The rest of ``_head_forward``'s backward: (ddt [L] f32, dlog [L] f32: d/d(dt·A) per token,
    dskip [L] f32: dy·x summed over P, dcb [L, L] f32: this head's share of d(C·Bᵀ)).

    With w_ij = cb_ij · decay_ij · dt_j and dw = dy·xᵀ, every [L, L] gradient is a factor of
    e = dw · decay: d/dcb = e·dt_j, d/d(log decay) = e·cb·dt_j, the direct d/ddt_j = Σ_i e·cb.
    The decay is recomputed here rather than kept from ``_head_dx``: the body is register
    bound (``BENCHMARKS.md``), and an exp per [L, L] element is cheaper than the spills.
    """
    f32 = jnp.float32
    decay = _decay(mask, dt * a)
    dskip = jnp.sum(dy.astype(f32) * x.astype(f32), axis=1)  # [L]
    e = dot(dy, x, precision, trans_b=True) * decay  # [L, L]: (dy_i · x_j) decay_ij
    dcb = e * dt[None, :]
    ec = e * cb
    col = jnp.sum(ec, axis=0)  # [L]: the direct d/ddt_j
    # d/d(log decay_ij) = ec_ij dt_j; its row sums minus its column sums give d/d(cum)
    dcum = jnp.sum(ec * dt[None, :], axis=1) - col * dt  # [L]
    dlog = jnp.sum(jnp.where(mask, dcum[:, None], 0.0), axis=0)  # d/d(dt_k A) [L]
    return col + dlog * a, dlog, dskip, dcb


def _bwd_kernel(*refs, geo: _Geometry, heads, ahead, precision, tiles, documents):
    ds_ref, refs = _document_ref(refs, documents)
    kw = dict(geo=geo, heads=heads, ahead=ahead, precision=precision)
    _each_tile(tiles, lambda m: _bwd_tile(m, ds_ref, *refs, **kw))


def _bwd_tile(
    m,
    ds_ref,
    x_ref,
    dt_ref,
    a_ref,
    b_ref,
    c_ref,
    d_ref,
    dy_ref,
    dx_ref,
    ddt_ref,
    db_ref,
    dc_ref,
    dlog_ref,
    dskip_ref,
    *,
    geo: _Geometry,
    heads,
    ahead,
    precision,
):
    """Recomputes the forward weights of one group's heads and backpropagates through them.

    Refs as in the forward; dx like x, ddt like dt, dB/dC like B/C; ``dlog`` [T, Hg] (f32): the
    gradient of each token's log-decay dt·A, and ``dskip`` [T, Hg] (f32): dy·x summed over P.
    dA = sum dlog·dt and dD = sum dskip are left to the caller: per-token rows keep the
    kernel free of block-wide reductions.
    """
    start, pos, loaded, written = geo.positions(m)
    rows = pl.ds(start, geo.block)
    mask = geo.mask(pos, loaded, rows, ds_ref)
    bg = plgpu.load(b_ref.at[rows, :], mask=loaded[:, None], other=0.0)
    cg = plgpu.load(c_ref.at[rows, :], mask=loaded[:, None], other=0.0)
    cb = dot(cg, bg, precision, trans_b=True)  # [L, L]

    def run(first, count, dcb):
        """Heads first .. first+count-1 (``first`` may be traced): their loads, then their gradients."""
        heads_of_run = [first] + [first + i for i in range(1, count)]
        inputs = [
            (
                *_load_head(dt_ref, x_ref, rows, loaded, h),
                # Rows another program writes must not send gradient: their chunk is cut here.
                plgpu.load(dy_ref.at[rows, h, :], mask=written[:, None], other=0.0),
            )
            for h in heads_of_run
        ]
        for h, (dt, x, dy) in zip(heads_of_run, inputs):
            dx = _head_dx(cb, mask, dt, a_ref[h], d_ref[h], dy, precision)
            plgpu.store(dx_ref.at[rows, h, :], dx.astype(dx_ref.dtype), mask=written[:, None])
            ddt, dlog, dskip, dcb_h = _head_grads(cb, mask, dt, a_ref[h], x, dy, precision)
            plgpu.store(dskip_ref.at[rows, h], dskip, mask=written)
            plgpu.store(dlog_ref.at[rows, h], dlog, mask=written)
            plgpu.store(ddt_ref.at[rows, h], ddt.astype(ddt_ref.dtype), mask=written)
            dcb = dcb + dcb_h
        return dcb

    # The runs of heads as a loop, not unrolled: unrolled, the compiler holds several heads'
    # temporaries at once and the body spills (255 registers, against 158 as a loop; BENCHMARKS.md).
    # The order of the ops above is the one timed: one that took the decay after dy·xᵀ and added
    # dcb before the stores compiled to other code and ran no faster than the unrolled body.
    runs, rest = divmod(heads, ahead)
    dcb = jax.lax.fori_loop(0, runs, lambda r, dcb: run(r * ahead if ahead > 1 else r, ahead, dcb), jnp.zeros_like(cb))
    if rest:
        dcb = run(index(runs * ahead), rest, dcb)
    # B and C again (from L2): held across the loop they would take registers it needs.
    bg = plgpu.load(b_ref.at[rows, :], mask=loaded[:, None], other=0.0)
    cg = plgpu.load(c_ref.at[rows, :], mask=loaded[:, None], other=0.0)
    dc = dot(dcb.astype(bg.dtype), bg, precision)  # [L, N]
    db = dot(dcb.astype(cg.dtype), cg, precision, trans_a=True)
    plgpu.store(dc_ref.at[rows, :], dc.astype(dc_ref.dtype), mask=written[:, None])
    plgpu.store(db_ref.at[rows, :], db.astype(db_ref.dtype), mask=written[:, None])


def _specs(x, B):
    """BlockSpecs (x, dt, [H] vectors, B/C) of the grid (batch row b, block m, group g): program
    (b, m, g) sees group g's heads and B, C of batch row b whole, and indexes the tokens itself."""
    _, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    x_spec = pl.BlockSpec((None, t, hg, p), lambda i, m, k: (i, 0, k, 0))
    dt_spec = pl.BlockSpec((None, t, hg), lambda i, m, k: (i, 0, k))
    vec = pl.BlockSpec((hg,), lambda i, m, k: (k,))
    bc_spec = pl.BlockSpec((None, t, None, n), lambda i, m, k: (i, 0, k, 0))
    return x_spec, dt_spec, vec, bc_spec


def _document_inputs(document_start):
    """The launch's leading input and its spec with documents (batch row b's [T] starts), else none."""
    if document_start is None:
        return [], []
    spec = pl.BlockSpec((None, document_start.shape[1]), lambda i, m, k: (i, 0))
    return [document_start], [spec]


def _prepare(x, B, C):
    """Pads P and N to power-of-two tile sizes >= 16 (no-op for the paper's 32, 32)."""
    p, n = x.shape[-1], B.shape[-1]
    p2, n2 = max(16, next_pow2(p)), max(16, next_pow2(n))
    return pad_last(x, p2), pad_last(B, n2), pad_last(C, n2)


def _forward(x, dt, A, B, C, D, document_start, grid, blocks: GpuBlocks, interpret, poison=False):
    """-> y [B, T, H, P]; ``poison``: the output starts as NaN (``pallas_kernels.poison``)."""
    b_, t, h, p = x.shape
    xp, Bp, Cp = _prepare(x, B, C)
    geo = _Geometry(t, grid, blocks.block_len)
    g = B.shape[2]
    x_spec, dt_spec, vec, bc_spec = _specs(xp, Bp)
    ds_in, ds_spec = _document_inputs(document_start)
    kernel = functools.partial(
        _fwd_kernel,
        geo=geo,
        heads=h // g,
        ahead=blocks.fwd.heads_ahead,
        precision=matmul_precision(xp.dtype),
        tiles=blocks.fwd.tiles,
        documents=document_start is not None,
    )
    y = poisoned.pallas_call(
        kernel,
        poison=poison,
        out_shape=jax.ShapeDtypeStruct(xp.shape, x.dtype),
        grid=(b_, pl.cdiv(geo.num_blocks, blocks.fwd.tiles), g),
        in_specs=[*ds_spec, x_spec, dt_spec, vec, bc_spec, bc_spec, vec],
        out_specs=x_spec,
        compiler_params=triton_params(blocks.fwd.num_warps, blocks.fwd.num_stages),
        interpret=interpret,
        name="ssd_fwd",
    )(*ds_in, xp, dt, A.astype(jnp.float32), Bp, Cp, D.astype(jnp.float32))
    return y[..., :p]


def _backward(x, dt, A, B, C, D, document_start, dy, grid, blocks: GpuBlocks, interpret, poison=False):
    b_, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    xp, Bp, Cp = _prepare(x, B, C)
    dyp = pad_last(dy, xp.shape[-1])
    geo = _Geometry(t, grid, blocks.block_len)
    x_spec, dt_spec, vec, bc_spec = _specs(xp, Bp)
    ds_in, ds_spec = _document_inputs(document_start)
    kernel = functools.partial(
        _bwd_kernel,
        geo=geo,
        heads=h // g,
        ahead=blocks.bwd.heads_ahead,
        precision=matmul_precision(xp.dtype),
        tiles=blocks.bwd.tiles,
        documents=document_start is not None,
    )
    f32 = jnp.float32
    out_shape = (
        jax.ShapeDtypeStruct(xp.shape, x.dtype),
        jax.ShapeDtypeStruct(dt.shape, dt.dtype),
        jax.ShapeDtypeStruct(Bp.shape, B.dtype),
        jax.ShapeDtypeStruct(Cp.shape, C.dtype),
        jax.ShapeDtypeStruct(dt.shape, f32),
        jax.ShapeDtypeStruct(dt.shape, f32),
    )
    dx, ddt, dB, dC, dlog, dskip = poisoned.pallas_call(
        kernel,
        poison=poison,
        out_shape=out_shape,
        grid=(b_, pl.cdiv(geo.num_blocks, blocks.bwd.tiles), g),
        in_specs=[*ds_spec, x_spec, dt_spec, vec, bc_spec, bc_spec, vec, x_spec],
        out_specs=(x_spec, dt_spec, bc_spec, bc_spec, dt_spec, dt_spec),
        compiler_params=triton_params(blocks.bwd.num_warps, blocks.bwd.num_stages),
        interpret=interpret,
        name="ssd_bwd",
    )(*ds_in, xp, dt, A.astype(f32), Bp, Cp, D.astype(f32), dyp)
    dA = jnp.sum(dlog * dt.astype(f32), axis=(0, 1)).astype(A.dtype)
    dD = jnp.sum(dskip, axis=(0, 1)).astype(D.dtype)
    return dx[..., :p], ddt, dA, dB[..., :n], dC[..., :n], dD, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ssd(x, dt, A, B, C, D, document_start, grid, blocks, interpret, poison):
    return _forward(x, dt, A, B, C, D, document_start, grid, blocks, interpret, poison)


def _ssd_fwd(x, dt, A, B, C, D, document_start, grid, blocks, interpret, poison):
    y = _forward(x, dt, A, B, C, D, document_start, grid, blocks, interpret, poison)
    return y, (x, dt, A, B, C, D, document_start)


def _ssd_bwd(grid, blocks, interpret, poison, res, dy):
    return _backward(*res, dy, grid, blocks, interpret, poison)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas_gpu(
    x,
    dt,
    A,
    B,
    C,
    D,
    *,
    grid: ChunkGrid,
    document_start=None,
    interpret: bool = False,
    blocks: GpuBlocks | None = None,
    poison: bool = False,
):
    """Fixed-grid SSD on the GPU; same contract as ``xla.ssd_chunked``.

    Args:
      x: [B, T, H, P]; dt: [B, T, H]; A, D: [H]; B, C: [B, T, G, N].
      grid: the layer's chunk grid.
      document_start: [B, T] int, each token's document start in a packed row, every document
        starting at a multiple of K (``pallas_kernels.documents``); None: each row is one document.
      interpret: run the kernel in the Pallas interpreter (CPU).
      blocks: tile and launch settings (default: ``block_sizes.default_gpu_blocks``).
      poison: every kernel output, forward and backward, starts as NaN (checks that each
        element is written; ``pallas_kernels.poison``).

    Returns:
      y: [B, T, H, P] in x.dtype. Differentiable in every array argument.
    """
    blocks = blocks or default_gpu_blocks(grid.token_chunk)
    blocks.check(grid.token_chunk)
    if document_start is not None:
        document_start = jnp.asarray(document_start, jnp.int32)
    return _ssd(x, dt, A, B, C, D, document_start, grid, blocks, interpret, poison)
