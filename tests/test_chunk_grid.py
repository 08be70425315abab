"""The chunk grid: offsets, boundaries, chunks and the closed forms kernels use, against the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.chunk_grid import ChunkGrid, layer_offset

GRIDS = [(4, 0), (8, 5), (1, 0), (16, 15), (5, 2), (2, 1), (8, 7), (3, 1)]


def test_worked_example_offsets():
    # SPEC §4: K = 4 over 4 layers gives offsets 0..3
    assert [layer_offset(layer, 4, 4) for layer in range(4)] == [0, 1, 2, 3]


def test_worked_example_boundaries_on_the_fixed_grid():
    # The spec's boundaries, on the fixed grid (no overwrite of the last boundary with T-1)
    got = [ChunkGrid.for_layer(layer, 4, 4).boundaries(12).tolist() for layer in range(4)]
    assert got == [[0, 3, 7, 11], [0, 2, 6, 10], [0, 1, 5, 9], [0, 4, 8]]


@pytest.mark.parametrize("k, offsets", [(4, [0] * 8), (8, list(range(8))), (16, list(range(0, 16, 2)))])
def test_layer_offsets_with_eight_layers(k, offsets):
    assert [layer_offset(layer, k, 8) for layer in range(8)] == offsets


@pytest.mark.parametrize("k, o", GRIDS)
def test_boundaries_are_where_chunks_end(k, o):
    grid, pos = ChunkGrid(k, o), np.arange(60)
    np.testing.assert_array_equal(np.flatnonzero(grid.is_boundary(pos)), grid.boundaries(60))


@pytest.mark.parametrize("k, o", GRIDS)
def test_chunk_ids_change_exactly_at_chunk_starts(k, o):
    grid, pos = ChunkGrid(k, o), np.arange(60)
    cid, starts = grid.chunk_id(pos), grid.is_chunk_start(pos)
    np.testing.assert_array_equal(starts[1:], cid[1:] != cid[:-1])
    np.testing.assert_array_equal(starts[1:], grid.is_boundary(pos[:-1]))


@pytest.mark.parametrize("k, o", GRIDS)
def test_position_in_chunk_counts_from_the_chunk_start(k, o):
    grid, pos = ChunkGrid(k, o), np.arange(60)
    pic, starts = grid.position_in_chunk(pos), grid.is_chunk_start(pos)
    np.testing.assert_array_equal(pic == 0, starts)
    np.testing.assert_array_equal(pic[1:][~starts[1:]], pic[:-1][~starts[1:]] + 1)
    np.testing.assert_array_equal(grid.chunk_start(pos), pos - pic)


@pytest.mark.parametrize("k, o", GRIDS)
def test_no_chunk_is_longer_than_k(k, o):
    cid = ChunkGrid(k, o).chunk_id(np.arange(60))
    assert max(np.sum(cid == c) for c in np.unique(cid)) <= k


@pytest.mark.parametrize("k, o", GRIDS)
def test_jnp_positions_give_the_numpy_results(k, o):
    # Decoder positions and kernel bodies are traced: the same rules under jit
    grid, pos = ChunkGrid(k, o), np.arange(-3, 60)
    for rule in ("chunk_id", "count_before"):
        np.testing.assert_array_equal(jax.jit(getattr(grid, rule))(jnp.asarray(pos)), getattr(grid, rule)(pos))
    for rule in ("chunk_start", "position_in_chunk", "is_chunk_start", "is_boundary"):
        np.testing.assert_array_equal(jax.jit(getattr(grid, rule))(jnp.arange(60)), getattr(grid, rule)(pos[3:]))


@pytest.mark.parametrize("k, o", GRIDS)
def test_count_before_counts_the_boundaries(k, o):
    grid, x = ChunkGrid(k, o), np.arange(-20, 200)
    np.testing.assert_array_equal(grid.count_before(x), np.searchsorted(grid.boundaries(200), x, side="left"))


@pytest.mark.parametrize("k, o", GRIDS)
def test_position_is_the_nth_boundary(k, o):
    grid = ChunkGrid(k, o)
    bpos = grid.boundaries(200)
    np.testing.assert_array_equal(grid.position(np.arange(len(bpos))), bpos)


@pytest.mark.parametrize("k, o", GRIDS)
@pytest.mark.parametrize("length", [1, 5, 33, 64])
def test_capacity_holds_every_boundary(k, o, length):
    grid = ChunkGrid(k, o)
    assert grid.num_boundaries(length) <= grid.capacity(length)


@pytest.mark.parametrize("k, o, size", [(4, 0, 16), (8, 5, 16), (6, 2, 24), (16, 15, 16)])
def test_aligned_blocks_hold_whole_chunks(k, o, size):
    # Given blocks of `size` tokens placed by block_start, no chunk straddles two blocks
    grid, t = ChunkGrid(k, o), 70
    block_of = (np.arange(t) - grid.block_start(0, size)) // size
    cid = grid.chunk_id(np.arange(t))
    assert all(len(set(block_of[cid == c])) == 1 for c in np.unique(cid))
    assert block_of.max() == grid.num_blocks(t, size) - 1


def test_chunk_ids_of_front_padding_are_their_own():
    # Kernels pad before token 0: each padded position is a chunk of its own
    cid = ChunkGrid(8, 3).chunk_id(np.arange(-3, 2))
    assert len(set(cid.tolist())) == 5


@pytest.mark.parametrize("k, o, t", [(4, 2, 13), (4, 3, 9), (1, 0, 5), (8, 7, 3), (8, 0, 1), (16, 6, 100)])
def test_chunk_layout_places_each_chunk_in_one_slot_row(k, o, t):
    grid = ChunkGrid(k, o)
    layout = grid.chunk_layout(t)
    x = jnp.arange(1, t + 1)[None, :, None]
    chunks = layout.to_chunks(x)  # [1, C, K, 1]
    assert chunks.shape == (1, layout.num_chunks, k, 1)
    np.testing.assert_array_equal(layout.from_chunks(chunks), x)
    # each slot row holds one whole grid chunk, its tokens contiguous and in order
    cid = grid.chunk_id(np.arange(t))
    seen = []
    for row in np.asarray(chunks[0, :, :, 0]):
        real = row[row > 0] - 1
        if real.size:
            assert len(set(cid[real].tolist())) == 1
            np.testing.assert_array_equal(real, np.arange(real[0], real[0] + real.size))
            assert real.size == np.sum(cid == cid[real[0]])
            seen.extend(real.tolist())
    assert seen == list(range(t))


@pytest.mark.parametrize("args, message", [((0,), "token_chunk must be >= 1"), ((4, 4), "offset must be in")])
def test_bad_grid_is_a_clear_error(args, message):
    with pytest.raises(ValueError, match=message):
        ChunkGrid(*args)


def test_blocks_must_hold_whole_chunks():
    with pytest.raises(ValueError, match="block size 12 is not a multiple of token_chunk=8"):
        ChunkGrid(8).block_start(0, 12)
