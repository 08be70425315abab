"""Context parallelism: the length split over the mesh's ``context`` axis gives the one-device
loss and gradients, and a train step moves only halos and boundary keys (the transformer: all
keys and values). CPU, 8 virtual devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attamba_jax.config import ModelConfig
from attamba_jax.context_parallel import ContextRows, context_order
from attamba_jax.model import init_model
from attamba_jax.sharding import make_mesh, tree_shardings, use_mesh
from attamba_jax.train_step import make_train_step, nll_sum
from benchmarks.hlo_collectives import collective_bytes
from pallas_kernels import documents
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility
from tests.helpers import assert_close, cpu_devices

# Two layers: grid offsets 0 and 2 at K = 4; a window longer than K.
MODEL = ModelConfig(
    vocab_size=61, dim=32, n_layers=2, n_heads=4, multiple_of=16, ssm_hidden_dim=48, ssm_heads=2,
    ssm_state_dim=4, token_chunk=4, window=6,
)  # fmt: skip


def _batch(seed: int, length: int, packed: bool, rows: int = 2):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, MODEL.vocab_size, (rows, length + 1))
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "weights": jnp.asarray(rng.random((rows, length)) > 0.1, jnp.float32),
    }
    if packed:  # documents at multiples of K, of random lengths, crossing the shard edges
        seg = np.zeros((rows, length), np.int32)
        for r in range(rows):
            cuts = np.sort(rng.choice(np.arange(1, length // 4), size=4, replace=False)) * 4
            seg[r] = np.searchsorted(cuts, np.arange(length), side="right") + 1
        batch["segment_ids"] = jnp.asarray(seg)
    return batch


def _loss_and_grads(cfg, batch, mesh=None, **options):
    graphdef, params = init_model(cfg, seed=3)
    fn = jax.jit(jax.value_and_grad(lambda p: nll_sum(graphdef, p, batch, **options)[0]))
    if mesh is None:
        return fn(params)
    with use_mesh(mesh):
        return fn(jax.device_put(params, tree_shardings(params, mesh)))


@pytest.mark.parametrize(
    "mesh_shape, length, packed, change",
    [
        ({"context": 2, "data": 2, "tensor": 2}, 200, True, {}),  # 200 = 12.5 x (2 shards x K): padded
        ({"context": 4, "fsdp": 2}, 256, True, {}),
        ({"context": 8}, 203, True, {"loss": {"loss_slice": 7, "remat": "block"}}),  # the loss in context order
        ({"context": 4, "data": 2}, 192, False, {"n_heads": 8, "n_kv_heads": 4, "head_dim": 8}),  # GQA
        ({"context": 2, "tensor": 4}, 96, True, {"window": 13, "token_chunk": 8}),
        ({"context": 4, "data": 2}, 160, True, {"pseudo_chunk": True}),
        # both kernels on each device's pieces (the attention's with the boundary and document keys given)
        (
            {"context": 2, "data": 2, "tensor": 2},
            48,
            True,
            {"ssm_implementation": "pallas_gpu_interpret", "attention_implementation": "pallas_gpu_interpret"},
        ),
        # the transformer's plain form: every shard gathers all keys and values
        ({"context": 4, "data": 2}, 96, True, {"arch": "transformer"}),
        ({"context": 2, "tensor": 2, "fsdp": 2}, 64, False, {"arch": "transformer", "sliding_window": 5}),
    ],
)
def test_loss_and_gradients_with_the_length_split_over_context_equal_one_device(mesh_shape, length, packed, change):
    # Given a model and a batch of fresh random tokens (packed documents crossing shard edges where packed)
    change = dict(change)
    options = change.pop("loss", {})
    cfg = dataclasses.replace(MODEL, **change)
    batch = _batch(len(mesh_shape) * 7 + length, length, packed)
    # When the loss and its gradient are taken on one device and with the length split over the context axis
    ref, ref_grads = _loss_and_grads(cfg, batch)
    value, grads = _loss_and_grads(cfg, batch, make_mesh(mesh_shape, cpu_devices(8)), **options)
    # Then they agree to float32 rounding
    assert_close(value, ref, 1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, r, 1e-4)


def test_pieces_shorter_than_their_halo_are_refused_naming_the_sizes():
    with pytest.raises(
        ValueError, match=r"context pieces of 8 positions \(128 / 2 x 8 devices\) are shorter than the 12"
    ):
        ContextRows.plan(128, 8, ChunkGrid(4, 1), window=4)


@pytest.mark.parametrize("shards", [2, 4, 8])
def test_the_context_order_gives_every_device_the_same_causal_attention_work(shards):
    # Given rows of 8192 positions at K = 8, window 8, in 2c pieces with device i holding pieces i
    # and 2c-1-i
    length, grid = 8192, ChunkGrid(8, 3)
    order = context_order(length, shards)
    assert sorted(order) == list(range(length))
    keys = Visibility(grid, 8).keys_per_query(length)  # what a query's attention costs
    # When each device's queries' keys are added up
    per_device = keys[order].reshape(shards, -1).sum(axis=1)
    contiguous = keys.reshape(shards, -1).sum(axis=1)
    # Then they agree within 1% (contiguous slices: the last device has about 2c-1 times the first's)
    assert per_device.max() / per_device.mean() < 1.01, per_device
    assert contiguous.max() / contiguous.mean() > 1.5 - 0.5 / shards


@pytest.mark.parametrize("slices", [2, 4, 8])
def test_document_starts_computed_slice_by_slice_equal_the_whole_row(slices):
    rng = np.random.default_rng(slices)
    seg = np.cumsum(rng.random((3, 64)) < 0.1, axis=1) + 1
    seg[rng.random((3, 64)) < 0.1] = 0  # padding continues the document before it
    seg[1, 16:40] = 5  # a document across several slices
    whole = documents.from_segment_ids(jnp.asarray(seg))
    np.testing.assert_array_equal(documents.from_segment_ids(jnp.asarray(seg), slices=slices), whole)


def _step_collective_bytes(cfg, batch, shards: int) -> int:
    """Bytes the collectives of one compiled train step deliver to a device, the length split over
    ``shards`` context devices, less the all-reduce of the (replicated) parameter gradients."""
    graphdef, params = init_model(cfg, seed=0)
    tx = optax.adamw(1e-3)
    mesh = make_mesh({"context": shards}, cpu_devices(8))
    with use_mesh(mesh):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
        state = jax.device_put(state, tree_shardings(state, mesh))
        step = jax.jit(make_train_step(graphdef, tx, lambda count: 1e-3))
        hlo = step.lower(state, jax.tree.map(lambda a: a[None], batch)).compile().as_text()
    return sum(collective_bytes(hlo).values()) - sum(4 * x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("packed", [False, True])
def test_a_train_step_moves_the_boundary_keys_and_the_halos_only_over_the_context_axis(packed):
    # Given a one-layer model at K = 8, rows of 4096 tokens split over 8 context shards
    cfg = dataclasses.replace(MODEL, n_layers=1, token_chunk=8, window=8)
    b, length, shards = 2, 4096, 8
    batch = _batch(0, length, packed, rows=b)
    # When the bytes the collectives of a whole train step deliver to a device are added up
    moved = _step_collective_bytes(cfg, batch, shards)
    # Then they are the boundary keys and values of the whole rows plus each shard's halo, within
    # 10%, once forward and once backward (their gradients)
    kv_width = cfg.resolved_kv_heads * cfg.resolved_head_dim
    halo = ContextRows.plan(length, shards, ChunkGrid(8), cfg.window).halo
    boundaries = b * -(-length // 8) * 2 * kv_width * 4
    halos = 2 * b * halo * cfg.dim * 4  # two pieces per device
    assert abs(moved / (2 * (boundaries + halos)) - 1) < 0.1, (moved, boundaries, halos)
    # ... about 1/K of what the transformer's plain context parallelism moves: all keys and values
    transformer = _step_collective_bytes(dataclasses.replace(cfg, arch="transformer"), batch, shards)
    full = 2 * b * length * 2 * kv_width * 4
    assert transformer >= 0.9 * full, (transformer, full)
    print(
        f"a train step moves {moved} bytes per device over the context axis, the transformer's {transformer}: "
        f"{moved / transformer:.4f} (1/K = 0.125); {moved / full:.4f} of all keys and values"
    )
    assert moved / transformer < 0.15
