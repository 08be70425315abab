"""The train step: one jitted, sharded function of the train state and a batch.

    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    mesh = mesh_from_config(cfg.mesh)
    graphdef, state, shardings = init_train_state(cfg, mesh, tx)
    step = jit_train_step(graphdef, tx, schedule, shardings, train_batch_sharding(mesh, microbatch))
    with use_mesh(mesh):
        state, metrics = step(state, batch)     # batch arrays [microbatches, b, T]

The model is split once into its graph and its parameters; the step is a pure function of
``state = {"params", "opt_state", "step"}`` (donated, so the update happens in place) and of
a batch. Parameters and optimizer moments stay float32; ``model.dtype`` sets the compute
dtype. Devices form the (data, fsdp, tensor) mesh of the ``mesh`` config section: the batch
is split over data x fsdp, parameters and optimizer moments are placed by the logical-axis
rules of ``sharding`` (split over fsdp and tensor where the sizes divide), and the step is
one ``jax.jit`` with those in/out shardings, so gradient all-reduces, reduce-scatters and
parameter all-gathers are XLA's.

A step's loss is (sum of token NLL) / (number of counted tokens) over the whole global
batch, however it is cut into microbatches (``optim.grad_accum``), so accumulation changes
memory, not the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attamba_jax.config import Config, ConfigError, MeshConfig
from attamba_jax.context_parallel import in_context_order
from attamba_jax.loss import cross_entropy, sliced_nll_sum
from attamba_jax.model import init_model
from attamba_jax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, tree_shardings, use_mesh


def batch_keys(cfg: Config) -> tuple[str, ...]:
    """The batch arrays a step reads: the model's segment_ids only with ``data.document_masking``."""
    return ("inputs", "targets", "weights") + (("segment_ids",) if cfg.data.document_masking else ())


def nll_sum(graphdef, params, batch, *, remat: str = "none", loss_slice: int | None = None):
    """(sum of weighted token NLL, sum of weights) of one [b, T] batch, in float32; the rows are
    packed documents kept apart when the batch holds ``segment_ids``.

    ``remat``: what the backward recomputes of each block (``model.REMAT``). ``loss_slice``:
    positions per slice of the head and loss (``loss.sliced_nll_sum``); None = all at once.
    """
    model = nnx.merge(graphdef, params)
    h, order = model.features_in_context_order(batch["inputs"], segment_ids=batch.get("segment_ids"), remat=remat)
    targets, weights = batch["targets"], batch["weights"]
    if order is not None:  # the states in the context axis's order: the targets follow them
        targets, weights = (in_context_order(a, order) for a in (targets, weights))
    if loss_slice is not None:
        return sliced_nll_sum(h, model.head.kernel[...], targets, weights, slice_length=loss_slice)
    mean, total = cross_entropy(model.head(h), targets, weights)
    return mean * jnp.maximum(total, 1.0), total


def all_finite(tree) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite: one bool scalar (XLA fuses the
    reductions into the ops that produce the arrays)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    param_shardings=None,
    *,
    remat: str = "none",
    loss_slice: int | None = None,
):
    """``(state, batch) -> (state, metrics)``; batch arrays are [microbatches, b, T]. Metrics:
    ``loss``, ``grad_norm`` (of the gradient the update used), ``lr``, and ``state_finite`` (1
    when every updated parameter and optimizer value is finite, else 0).

    ``param_shardings``: keep the accumulated gradients sharded like the parameters (under
    fsdp XLA then reduce-scatters them instead of all-reducing full copies). ``remat``,
    ``loss_slice``: as in ``nll_sum`` (``train.remat``, ``train.loss_slice``).
    """

    def shard_like_params(tree):
        return tree if param_shardings is None else jax.lax.with_sharding_constraint(tree, param_shardings)

    def step_fn(state, batch):
        params = state["params"]
        grad_fn = jax.value_and_grad(
            lambda p, mb: nll_sum(graphdef, p, mb, remat=remat, loss_slice=loss_slice), has_aux=True
        )

        def micro(carry, mb):
            grads, nll, weight = carry
            (mb_nll, mb_weight), mb_grads = grad_fn(params, mb)
            return (shard_like_params(jax.tree.map(jnp.add, grads, mb_grads)), nll + mb_nll, weight + mb_weight), None

        zeros = shard_like_params(jax.tree.map(jnp.zeros_like, params))
        (grads, nll, weight), _ = jax.lax.scan(micro, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {
            "loss": nll / denom,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            # The updated state itself: an update can overflow though the loss and gradient were finite.
            "state_finite": all_finite((new_state["params"], new_state["opt_state"])).astype(jnp.float32),
        }
        return new_state, metrics

    return step_fn


def mesh_from_config(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of ``cfg`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    try:
        return make_mesh(cfg.shape(), devices)
    except ValueError as e:
        raise ConfigError(f"mesh config {cfg.shape()} does not fit the {len(devices)} devices: {e}") from None


def init_train_state(cfg: Config, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation):
    """(graphdef, state, shardings): the initial train state placed on ``mesh`` by the logical rules.

    ``state = {"params", "opt_state", "step"}``; ``shardings`` has the same structure. Optimizer
    moments are placed like their parameters (they carry the same ``logical_axes``); step
    counts are replicated.
    """
    graphdef, params = init_model(cfg.model, seed=cfg.seed)
    replicated = NamedSharding(mesh, P())
    with use_mesh(mesh):
        param_shardings = tree_shardings(params, mesh)
        params = jax.device_put(params, param_shardings)
        opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = {"params": params, "opt_state": opt_state, "step": jax.device_put(jnp.int32(0), replicated)}
    return graphdef, state, {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}


def jit_train_step(graphdef, tx, schedule, shardings, batch_sharding: NamedSharding, **options):
    """The train step jitted with the state's and the batch's shardings in and out, state donated;
    ``options``: ``remat``, ``loss_slice`` of ``make_train_step``.

    Call it inside ``use_mesh(mesh)`` so that the model's activation constraints apply.
    """
    replicated = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        make_train_step(graphdef, tx, schedule, param_shardings=shardings["params"], **options),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def train_batch_sharding(mesh: jax.sharding.Mesh, microbatch: int) -> NamedSharding:
    """[microbatches, b, T] batches: rows split over data x fsdp, which must divide ``microbatch``."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if microbatch % n:
        raise ConfigError(
            f"data.batch_size / optim.grad_accum = {microbatch} sequences per microbatch must be a multiple of "
            f"mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {n}"
        )
    return NamedSharding(mesh, logical_to_spec((None, "batch", "length"), (1, microbatch, 1), mesh, DEFAULT_RULES))


def make_eval_step(graphdef, *, loss_slice: int | None = None):
    """``(params, batch) -> (sum of weighted token NLL, sum of weights)`` of a [b, T] batch."""

    def eval_fn(params, batch):
        return nll_sum(graphdef, params, batch, loss_slice=loss_slice)

    return eval_fn
