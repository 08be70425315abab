"""Which keys a query sees: the spec's worked example, the two parts of the rule, the key counts."""

import numpy as np
import pytest

from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility
from tests.helpers import mask_from_rows

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


def _brute_force_mask(t, boundaries, window):
    m = np.zeros((t, t), bool)
    for q in range(t):
        for s in range(t):
            m[q, s] = (s < q and s in boundaries) or (max(0, q - window) <= s <= q)
    return m


@pytest.mark.parametrize("layer, rows", [(0, LAYER0), (1, LAYER1)])
def test_worked_example_mask_printed_layers(layer, rows):
    mask = Visibility(ChunkGrid.for_layer(layer, 4, 4), 2).dense(12)
    np.testing.assert_array_equal(mask, mask_from_rows(rows))


@pytest.mark.parametrize(
    "layer, fixed, overwritten, differ",
    [
        (2, {0, 1, 5, 9}, {0, 1, 5, 11}, []),
        (3, {0, 4, 8}, {0, 4, 11}, [[11, 8]]),
    ],
)
def test_worked_example_mask_layers_2_3(layer, fixed, overwritten, differ):
    # The spec prints boundary sets for layers 2 and 3 with the T-1 overwrite; on the fixed grid
    # the masks agree everywhere except layer 3's query 11, which sees boundary 8 (8 < 11 - W).
    mask = Visibility(ChunkGrid.for_layer(layer, 4, 4), 2).dense(12)
    np.testing.assert_array_equal(mask, _brute_force_mask(12, fixed, 2))
    assert np.argwhere(mask != _brute_force_mask(12, overwritten, 2)).tolist() == differ


@pytest.mark.parametrize("k, o, t, w", [(4, 0, 37, 3), (8, 5, 50, 8), (1, 0, 9, 0), (16, 15, 70, 20), (5, 2, 33, 1)])
def test_dense_mask_is_the_spec_rule(k, o, t, w):
    grid = ChunkGrid(k, o)
    mask = Visibility(grid, w).dense(t)
    np.testing.assert_array_equal(mask, _brute_force_mask(t, set(grid.boundaries(t).tolist()), w))


@pytest.mark.parametrize("k, o, t, w", [(4, 0, 37, 3), (8, 5, 50, 8), (16, 9, 70, 20), (3, 1, 40, 0)])
def test_the_two_parts_are_disjoint_and_make_the_mask(k, o, t, w):
    # Given the boundary part (boundary n, by index) and the window part (raw keys)
    grid, vis = ChunkGrid(k, o), Visibility(ChunkGrid(k, o), w)
    tq, bpos = np.arange(t)[:, None], grid.boundaries(t)
    boundary_part = vis.boundary_visible(tq, np.arange(len(bpos))[None, :])  # [T, NB]
    window_part = vis.window_visible(tq, np.arange(t)[None, :])  # [T, T]
    # Then no boundary of the boundary part is in the window, and together they are the mask
    assert not (boundary_part & window_part[:, bpos]).any()
    both = window_part.copy()
    both[:, bpos] |= boundary_part
    np.testing.assert_array_equal(both, vis.dense(t))
    # and the boundary part is the first boundaries_seen(t) boundaries
    np.testing.assert_array_equal(boundary_part.sum(1), vis.boundaries_seen(np.arange(t)))
    assert (np.diff(boundary_part.astype(int), axis=1) <= 0).all()


@pytest.mark.parametrize("k, o, w", [(4, 0, 3), (8, 5, 8), (16, 9, 20)])
def test_first_query_seeing_a_boundary(k, o, w):
    vis = Visibility(ChunkGrid(k, o), w)
    seen = vis.boundaries_seen(np.arange(200))
    for n in range(10):
        assert np.flatnonzero(seen > n)[0] == vis.first_query_seeing(n)


@pytest.mark.parametrize(
    "K, W, mean, last", [(4, 8, 135.5, 263), (8, 8, 72.5, 136), (16, 16, 48.4, 80), (4, 32, 153.1, 281)]
)
def test_keys_per_query_table(K, W, mean, last):
    # SPEC §4's table: layer 0 at T = 1024
    n = Visibility(ChunkGrid.for_layer(0, K, 8), W).keys_per_query(1024)
    assert round(float(n.mean()), 1) == mean and n[-1] == last


@pytest.mark.parametrize("grid, window", [(ChunkGrid(4, 1), 3), (ChunkGrid(8, 7), 0), (None, 5), (None, None)])
def test_keys_per_query_are_the_mask_row_sums(grid, window):
    vis = Visibility(grid, window)
    np.testing.assert_array_equal(vis.keys_per_query(45), vis.dense(45).sum(1))


def test_without_a_grid_it_is_causal_or_a_sliding_window():
    t = np.arange(20)[:, None]
    s = np.arange(20)[None, :]
    np.testing.assert_array_equal(Visibility(None, None).dense(20), s <= t)
    np.testing.assert_array_equal(Visibility(None, 4).dense(20), (s <= t) & (s >= t - 4))


@pytest.mark.parametrize(
    "grid, window, message",
    [
        (ChunkGrid(4), -1, "window must be >= 0"),
        (ChunkGrid(4), None, "boundary keys need a window"),
    ],
)
def test_bad_visibility_is_a_clear_error(grid, window, message):
    with pytest.raises(ValueError, match=message):
        Visibility(grid, window)
