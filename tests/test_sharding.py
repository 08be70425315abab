"""Meshes: a train step on any (data, fsdp, context, tensor) mesh equals the one-device step, fsdp keeps
the state sharded in the compiled step, generation on a mesh equals one device's, checkpoints restore
onto another mesh, and mesh config errors say what is wrong. CPU, 8 virtual devices (conftest.py)."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attamba_jax.config import ConfigError, load_config
from attamba_jax.generate import generate
from attamba_jax.model import make_forward
from attamba_jax.optimizer import make_optimizer
from attamba_jax.sharding import make_mesh, use_mesh
from attamba_jax.train_step import init_train_state, jit_train_step, mesh_from_config, train_batch_sharding
from attamba_jax.trainer import Trainer
from tests.helpers import assert_close, cpu_devices, packed_layout, value_and_grads, with_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
# heads, mlp, vocab and ssm_inner all divide by 2 (tensor); embed (32) divides by 8 (fsdp).
MODEL = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.multiple_of=32",
    "model.ssm_hidden_dim=48",
    "model.ssm_heads=2",
    "model.ssm_state_dim=8",
    "model.token_chunk=4",
    "model.window=4",
]
BATCH, LENGTH = 8, 48  # at context 2: pieces of 12, the halo K + the query block


def _cfg(*extra):
    return load_config(
        TINY,
        with_overrides(
            MODEL + [f"data.seq_len={LENGTH}", f"data.batch_size={BATCH}", "optim.warmup_steps=1", "train.steps=10"],
            *extra,
        ),
    )


def _batches(cfg, n):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, size=(n, 1, BATCH, LENGTH + 1), dtype=np.int32)
    return [
        {"inputs": t[..., :-1], "targets": t[..., 1:], "weights": np.ones((1, BATCH, LENGTH), np.float32)}
        for t in tokens
    ]


def _train(cfg, mesh, batches):
    """Losses of the given steps and the final parameters, on ``mesh``."""
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    graphdef, state, shardings = init_train_state(cfg, mesh, tx)
    batch_sharding = train_batch_sharding(mesh, BATCH)
    step = jit_train_step(graphdef, tx, schedule, shardings, batch_sharding)
    losses = []
    with use_mesh(mesh):
        for b in batches:
            arrays = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in b.items()}
            state, metrics = step(state, arrays)
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state, step, arrays


@pytest.fixture(scope="module")
def one_device_run():
    cfg = _cfg()
    batches = _batches(cfg, 2)
    losses, params, *_ = _train(cfg, make_mesh({"data": 1}, cpu_devices(1)), batches)
    return cfg, batches, losses, params


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (2, 2, 1, 2), (1, 8, 1, 1), (2, 1, 2, 2)])
def test_train_step_on_a_mesh_equals_one_device(one_device_run, shape):
    # Given the losses and parameters after two steps on one device
    cfg, batches, ref_losses, ref_params = one_device_run
    # When the same two steps run on a (data, fsdp, context, tensor) mesh of 8 devices
    mesh = make_mesh(dict(zip(("data", "fsdp", "context", "tensor"), shape)), cpu_devices(8))
    losses, params, *_ = _train(cfg, mesh, batches)
    # Then losses and updated parameters agree to float32 rounding
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_close(params, ref_params, rel=1e-4)


def test_train_step_with_the_kernels_on_a_mesh_equals_one_device(one_device_run):
    # The Pallas kernels (in the interpreter), named explicitly, run per device inside the
    # sharded train step; two steps equal the one-device run on the XLA paths.
    cfg, batches, ref_losses, ref_params = one_device_run
    cfg = _cfg("model.ssm_implementation=pallas_gpu_interpret", "model.attention_implementation=pallas_gpu_interpret")
    losses, params, *_ = _train(cfg, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, cpu_devices(8)), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_close(params, ref_params, rel=1e-4)


def test_compiled_step_keeps_fsdp_state_sharded(one_device_run):
    cfg, batches, *_ = one_device_run
    mesh = make_mesh({"data": 2, "fsdp": 4}, cpu_devices(8))
    _, _, state, step, arrays = _train(cfg, mesh, batches[:1])
    with use_mesh(mesh):
        compiled = step.lower(state, arrays).compile()
    out_state, _ = compiled.output_shardings
    head = out_state["params"]["head"]["kernel"]  # [embed=32, vocab=258]
    head = jax.tree.leaves(head)[0]
    # The compiled step's outputs: the embed dimension split 4 ways over fsdp, not replicated
    assert head.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2), head
    assert head.shard_shape((32, 258)) == (8, 258)
    # and so are the AdamW moments and the arrays the step really returned
    sharded = [s for s in jax.tree.leaves(out_state["opt_state"]) if not s.is_fully_replicated]
    assert len(sharded) == 2 * len([s for s in jax.tree.leaves(out_state["params"]) if not s.is_fully_replicated]) > 0
    returned = jax.tree.leaves(state["params"]["head"]["kernel"])[0]
    assert returned.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)
    assert {s.data.shape for s in returned.addressable_shards} == {(8, 258)}
    # the parameters are gathered for use inside the step, not kept whole between steps
    assert "all-gather" in compiled.as_text()


def test_model_activations_carry_logical_shardings():
    cfg = _cfg()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, cpu_devices(8))
    tx, _ = make_optimizer(cfg.optim, 10)
    graphdef, state, _ = init_train_state(cfg, mesh, tx)
    tokens = jax.device_put(np.zeros((BATCH, LENGTH), np.int32), NamedSharding(mesh, P(("data", "fsdp"))))
    with use_mesh(mesh):
        logits = make_forward(graphdef)(state["params"], tokens)
    # logits: batch over data x fsdp, vocab (258) over tensor
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3), (
        logits.sharding
    )
    # without a mesh the constraints are no-ops: the same numbers
    plain = make_forward(graphdef)(jax.device_get(state["params"]), np.zeros((BATCH, LENGTH), np.int32))
    assert_close(logits, plain, rel=1e-5)


@pytest.mark.parametrize(
    "shape",
    [{"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 4}],
    ids=["tensor_splits_the_projections", "fsdp_only"],
)
def test_generation_on_a_mesh_equals_one_device(shape):
    # Given parameters laid out on a mesh (tensor: the query and SSM projections' columns split,
    # so a decode step projects them apart; fsdp alone: one matmul of both),
    cfg = _cfg()
    mesh = make_mesh(shape, cpu_devices(8))
    tx, _ = make_optimizer(cfg.optim, 10)
    graphdef, state, _ = init_train_state(cfg, mesh, tx)
    prompts = [[1, 2, 3], [5], [7, 8, 9, 10, 11]]
    # when prompts are continued greedily under the mesh and on one device,
    with use_mesh(mesh):
        meshed = generate(graphdef, state["params"], prompts, max_new_tokens=6)
    plain = generate(graphdef, jax.device_get(state["params"]), prompts, max_new_tokens=6)
    # then the tokens are the same.
    np.testing.assert_array_equal(meshed.tokens, plain.tokens)


# --- checkpoints across meshes ----------------------------------------------------------------


def _corpus(root: pathlib.Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(12):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=150)))
    return str(root / "*.txt")


def _trainer_cfg(corpus, steps, mesh):
    extra = {
        "data.train": f"[{corpus}]",
        "data.heldout_fraction": 0.0,
        "data.threads": 0,
        "data.prefetch": 1,
        "train.steps": steps,
        "train.log_every": 1,
        "train.checkpoint_every": 2,
        "train.keep_last": 5,
        "mesh.data": mesh[0],
        "mesh.fsdp": mesh[1],
        "mesh.tensor": mesh[2],
    }
    return _cfg(*[f"{k}={v}" for k, v in extra.items()])


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    # Given a run on 4 devices, fsdp, to step 3 (checkpoints at steps 2 and 3)
    saved = tmp_path / "fsdp4"
    devices = cpu_devices(8)
    Trainer(_trainer_cfg(corpus, 3, (1, 4, 1)), saved, progress=False, devices=devices[:4]).run()
    expected = _losses(saved)[3]
    # When its step-2 checkpoint continues to step 3 on 1 device, and on 8 as data x fsdp
    for name in ("one", "dp_fsdp"):
        shutil.copytree(saved, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "3")
    one = Trainer(_trainer_cfg(corpus, 3, (1, 1, 1)), tmp_path / "one", progress=False, devices=devices[:1])
    assert one.start_step == 2 and one.state["params"]["head"]["kernel"][...].sharding.num_devices == 1
    one.run()
    wide = Trainer(_trainer_cfg(corpus, 3, (2, 4, 1)), tmp_path / "dp_fsdp", progress=False, devices=devices)
    kernel = wide.state["params"]["head"]["kernel"][...]
    assert wide.start_step == 2 and kernel.sharding.is_equivalent_to(NamedSharding(wide.mesh, P("fsdp", None)), 2)
    wide.run()
    # Then the next loss is the one the 4-device run computed
    assert _losses(tmp_path / "one")[3] == pytest.approx(expected, rel=1e-5)
    assert _losses(tmp_path / "dp_fsdp")[3] == pytest.approx(expected, rel=1e-5)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("mesh.data=3", r"needs 3 devices, but 8 are present"),
        ("mesh.fsdp=3", r"8 devices do not divide by 3"),
    ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        mesh_from_config(_cfg(override).mesh, cpu_devices(8))


@pytest.mark.parametrize(
    "override, message",
    [
        ("mesh.pipeline=2", r"unknown config key mesh\.pipeline"),
        ("mesh.tensor=0", r"mesh\.tensor must be >= 1 or -1"),
        ("mesh.fsdp=-1", r"at most one of mesh\.data/fsdp/context/tensor may be -1"),
    ],
)
def test_bad_mesh_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(override)


def test_an_unknown_mesh_axis_is_named():
    with pytest.raises(ValueError, match=r"unknown mesh axis 'expert'"):
        make_mesh({"expert": 2})


def test_a_microbatch_the_data_axes_do_not_divide_is_refused():
    with pytest.raises(ConfigError, match=r"microbatch must be a multiple of mesh.data x mesh.fsdp = 2 x 4 = 8"):
        train_batch_sharding(make_mesh({"data": 2, "fsdp": 4}, cpu_devices(8)), 4)


def test_distributed_start_reads_the_environment():
    from train import distributed_args

    assert distributed_args(False, {}) is None  # one process
    assert distributed_args(True, {}) == {}  # jax's cluster auto-detection
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed_args(False, env) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID set without JAX_COORDINATOR_ADDRESS"):
        distributed_args(False, {"JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        distributed_args(False, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"})


@pytest.mark.parametrize("devices, kernel_runs", [(2, False), (1, True)])
def test_auto_takes_the_xla_paths_under_a_multi_device_mesh(devices, kernel_runs):
    # Until the sharded kernels are measured on GPUs, `auto` under a mesh of several devices
    # picks the paths XLA partitions: the op sees a partitioned call, which the kernels refuse.
    from attamba_jax.sharding import call_op
    from pallas_kernels.ssd import IMPLEMENTATIONS

    seen = []
    fake_op = lambda *args, implementation, partitioned=False: seen.append((implementation, partitioned))
    with use_mesh(make_mesh({"data": devices}, devices=cpu_devices(devices))):
        call_op(fake_op, IMPLEMENTATIONS, "auto", (), (), None)
    assert seen == [("auto", not kernel_runs)]


def _out_and_grads(fn, args):
    """fn(*args) and its gradients in every argument against a fixed random cotangent."""
    out = jax.eval_shape(fn, *args)
    return value_and_grads(fn, args, jax.random.normal(jax.random.key(9), out.shape))


@pytest.mark.parametrize(
    "kernel, shape, documents",
    [
        ("pallas_gpu_interpret", (4, 2, 1), False),
        ("pallas_tpu_interpret", (2, 2, 2), False),
        ("pallas_gpu_interpret", (2, 2, 2), True),
    ],
    ids=["gpu", "tpu", "gpu-packed-documents"],
)
def test_ssd_kernels_run_per_device_under_a_mesh(kernel, shape, documents):
    # Given a named kernel under a multi-device mesh, each device runs it on its batch rows
    # (shard_map; a packed layout split with the rows) and the result and every gradient equal
    # the one-device reference.
    from attamba_jax.sharding import call_op
    from attamba_jax.ssm import _ssd_of_documents
    from pallas_kernels.chunk_grid import ChunkGrid
    from pallas_kernels.ssd import IMPLEMENTATIONS, ssd
    from pallas_kernels.ssd.reference import random_inputs

    args, _ = random_inputs(jax.random.key(0), b=8, t=48, h=4, p=16, g=2, n=16)
    grid = ChunkGrid(8, 3)
    starts = jnp.asarray(packed_layout(2, 8, 48, 8, 8)[0]) if documents else None
    expected = _out_and_grads(lambda *a: ssd(*a, grid=grid, document_start=starts, implementation="sequential"), args)
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), cpu_devices(8))
    rows = ("batch", None, None, None)
    axes = (rows, rows[:3], None, rows, rows, None)
    if documents:
        sharded = lambda *a: call_op(
            _ssd_of_documents, IMPLEMENTATIONS, kernel, a + (starts,), axes + (rows[:2],), rows, grid=grid
        )
    else:
        sharded = lambda *a: call_op(ssd, IMPLEMENTATIONS, kernel, a, axes, rows, grid=grid)
    with use_mesh(mesh):
        actual = _out_and_grads(sharded, args)
        jaxpr = str(jax.make_jaxpr(sharded)(*args))
    assert "shard_map" in jaxpr and "('data', 'fsdp')" in jaxpr  # split over the batch axes
    assert_close(actual, expected, 1e-4)


@pytest.mark.parametrize(
    "kernel, shape, kv_heads, documents",
    [
        ("pallas_gpu_interpret", (2, 2, 2), 2, False),
        ("pallas_tpu_interpret", (2, 1, 4), 2, False),
        ("pallas_gpu_interpret", (1, 4, 2), 1, False),
        ("pallas_tpu_interpret", (2, 2, 2), 2, True),
    ],
    ids=["gpu-heads-split", "tpu-heads-replicated", "gpu-one-kv-head", "tpu-packed-documents"],
)
def test_attention_kernels_run_per_device_under_a_mesh(kernel, shape, kv_heads, documents):
    # Batch rows split over (data, fsdp); heads over tensor only where the kv heads divide,
    # so that every query head stays with its kv head; a packed layout split with the rows.
    # Equal to the dense reference.
    from attamba_jax.attention import _boundary_window
    from pallas_kernels.boundary_window_attention import boundary_window_attention
    from pallas_kernels.chunk_grid import ChunkGrid

    b, t, h, d = 4, 40, 4, 16
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in ks[1:])
    grid = ChunkGrid(4, 1)
    starts = jnp.asarray(packed_layout(3, b, t, 4, 4)[0]) if documents else None
    expected = _out_and_grads(
        lambda *a: boundary_window_attention(*a, grid=grid, window=4, document_start=starts, implementation="dense"),
        (q, k, v),
    )
    sharded = lambda *a: _boundary_window(*a, grid, 4, kernel, starts)
    with use_mesh(make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), cpu_devices(8))):
        actual = _out_and_grads(sharded, (q, k, v))
        jaxpr = str(jax.make_jaxpr(sharded)(q, k, v))
    heads_split = "None, 'tensor', None)" in jaxpr  # a [B, T, heads, D] spec with heads over tensor
    assert "shard_map" in jaxpr and heads_split == (kv_heads % shape[2] == 0 and shape[2] > 1)
    assert_close(actual, expected, 1e-4)
