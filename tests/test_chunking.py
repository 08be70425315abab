"""Chunk boundaries and the attention mask, against the spec's worked example."""

import jax.numpy as jnp
import numpy as np
import pytest

from attamba_jax.chunking import ChunkGrid, attention_mask, keys_per_query, layer_offset

# SPEC §4: T=12, K=4, W=2, N_L=4 (so o_l = l); "t=<row> <keys>".
LAYER0 = """
t=0 100000000000
t=1 110000000000
t=2 111000000000
t=3 111100000000
t=4 101110000000
t=5 100111000000
t=6 100111100000
t=7 100101110000
t=8 100100111000
t=9 100100011100
t=10 100100011110
t=11 100100010111
"""
LAYER1 = """
t=0 100000000000
t=1 110000000000
t=2 111000000000
t=3 111100000000
t=4 101110000000
t=5 101111000000
t=6 101011100000
t=7 101001110000
t=8 101000111000
t=9 101000111100
t=10 101000101110
t=11 101000100111
"""


def _rows(text):
    return np.array([[c == "1" for c in line.split()[1]] for line in text.strip().splitlines()])


def _brute_force_mask(T, boundaries, W):
    m = np.zeros((T, T), bool)
    for t in range(T):
        for s in range(T):
            m[t, s] = (s < t and s in boundaries) or (max(0, t - W) <= s <= t)
    return m


def test_worked_example_offsets_and_boundaries():
    # Given the worked example's sizes, when we take each layer's grid,
    # then the offsets are 0..3 and the boundaries are the spec's, on the fixed grid
    # (no overwrite of the last boundary with T-1).
    offsets = [layer_offset(l, 4, 4) for l in range(4)]
    assert offsets == [0, 1, 2, 3]
    got = [ChunkGrid.for_layer(l, 4, 4).boundaries(12).tolist() for l in range(4)]
    assert got == [[0, 3, 7, 11], [0, 2, 6, 10], [0, 1, 5, 9], [0, 4, 8]]


@pytest.mark.parametrize("layer, rows", [(0, LAYER0), (1, LAYER1)])
def test_worked_example_mask_printed_layers(layer, rows):
    mask = attention_mask(12, ChunkGrid.for_layer(layer, 4, 4), window=2)
    np.testing.assert_array_equal(mask, _rows(rows))


def test_worked_example_mask_layers_2_3():
    # The spec prints boundary sets for layers 2 and 3 with the T-1 overwrite
    # ({0,1,5,11}, {0,4,11}); on the fixed grid they are {0,1,5,9} and {0,4,8}. The
    # masks agree everywhere except layer 3's query 11, which sees boundary 8
    # (8 < 11 - W) on the fixed grid and would not see it under the overwrite.
    for layer, fixed, overwritten in [(2, {0, 1, 5, 9}, {0, 1, 5, 11}), (3, {0, 4, 8}, {0, 4, 11})]:
        mask = attention_mask(12, ChunkGrid.for_layer(layer, 4, 4), window=2)
        np.testing.assert_array_equal(mask, _brute_force_mask(12, fixed, 2))
        diff = np.argwhere(mask != _brute_force_mask(12, overwritten, 2)).tolist()
        assert diff == ([] if layer == 2 else [[11, 8]])


def test_layer_offsets_with_eight_layers():
    assert [layer_offset(l, 4, 8) for l in range(8)] == [0] * 8
    assert [layer_offset(l, 8, 8) for l in range(8)] == list(range(8))
    assert [layer_offset(l, 16, 8) for l in range(8)] == list(range(0, 16, 2))


@pytest.mark.parametrize("K, W, mean, last", [(4, 8, 135.5, 263), (8, 8, 72.5, 136), (16, 16, 48.4, 80), (4, 32, 153.1, 281)])
def test_keys_per_query_table(K, W, mean, last):
    n = keys_per_query(1024, ChunkGrid.for_layer(0, K, 8), W)
    assert round(float(n.mean()), 1) == mean and n[-1] == last


@pytest.mark.parametrize("K, o, T, W", [(4, 0, 37, 3), (8, 5, 50, 8), (1, 0, 9, 0), (16, 15, 70, 20), (5, 2, 33, 1)])
def test_grid_predicates_agree(K, o, T, W):
    grid = ChunkGrid(K, o)
    pos = np.arange(T)
    b = grid.boundaries(T)
    # boundaries: exactly where is_boundary holds
    np.testing.assert_array_equal(np.flatnonzero(grid.is_boundary(pos)), b)
    # chunk ids change exactly at chunk starts; position_in_chunk restarts there
    cid = grid.chunk_id(pos)
    starts = grid.is_chunk_start(pos)
    np.testing.assert_array_equal(starts[1:], cid[1:] != cid[:-1])
    pic = grid.position_in_chunk(pos)
    np.testing.assert_array_equal(pic == 0, starts)
    np.testing.assert_array_equal(pic[1:][~starts[1:]], pic[:-1][~starts[1:]] + 1)
    # every chunk ends on a boundary and has at most K tokens
    assert all(np.sum(cid == c) <= K for c in np.unique(cid))
    np.testing.assert_array_equal(starts[1:], grid.is_boundary(pos[:-1]))
    # jnp (traced decoder positions) gives the same
    np.testing.assert_array_equal(np.asarray(grid.position_in_chunk(jnp.arange(T))), pic)
    np.testing.assert_array_equal(np.asarray(grid.chunk_id(jnp.arange(T))), cid)
    # keys per query = row sums of the mask; no row empty
    mask = attention_mask(T, grid, W)
    np.testing.assert_array_equal(keys_per_query(T, grid, W), mask.sum(1))
    np.testing.assert_array_equal(mask, _brute_force_mask(T, set(b.tolist()), W))
    assert grid.num_boundaries(T) <= grid.max_boundaries(T)


@pytest.mark.parametrize("K, o, T", [(4, 2, 13), (4, 3, 9), (1, 0, 5), (8, 7, 3), (8, 0, 1), (16, 6, 100)])
def test_chunk_layout_places_each_chunk_in_one_slot_row(K, o, T):
    grid = ChunkGrid(K, o)
    layout = grid.chunk_layout(T)
    x = jnp.arange(1, T + 1)[None, :, None]
    chunks = layout.to_chunks(x)  # [1, C, K, 1]
    assert chunks.shape == (1, layout.num_chunks, K, 1)
    np.testing.assert_array_equal(layout.from_chunks(chunks), x)
    # each slot row holds one whole grid chunk, its tokens contiguous and in order
    cid = grid.chunk_id(np.arange(T))
    rows = np.asarray(chunks[0, :, :, 0])
    seen = []
    for r in rows:
        real = r[r > 0] - 1
        if real.size:
            assert len(set(cid[real].tolist())) == 1
            np.testing.assert_array_equal(real, np.arange(real[0], real[0] + real.size))
            assert real.size == np.sum(cid == cid[real[0]])
            seen.extend(real.tolist())
    assert seen == list(range(T))


def test_bad_grid_is_a_clear_error():
    with pytest.raises(ValueError, match="token_chunk must be >= 1"):
        ChunkGrid(0)
    with pytest.raises(ValueError, match="offset must be in"):
        ChunkGrid(4, 4)
