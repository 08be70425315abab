"""The optimizer: AdamW with linear warmup, cosine decay, optional global-norm clipping.

    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    opt_state = tx.init(params)

Weight decay applies to matrices and embeddings only (``decay_mask``); the SSM's decay
rates, skip gains and time-step biases, every bias and every norm's gain are left alone.
The optimizer state mirrors ``params`` leaf for leaf (two float32 moments per parameter),
so it takes the parameters' shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from attamba_jax.config import OptimConfig

# Parameters that weight decay must not pull towards zero: the SSM's decay rates, skip
# gains and time-step biases, any bias, and every norm's gain.
_NO_DECAY_NAMES = frozenset({"A_log", "D", "dt_bias", "bias"})


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params) -> Any:
    """A pytree of bools like ``params``: True where weight decay applies."""

    def decays(path, _):
        names = _path_names(path)
        names = [n for n in names if n != "value"]  # nnx.Param's own field
        return not (names[-1] in _NO_DECAY_NAMES or any(n.endswith("norm") for n in names[:-1]))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr over warmup_steps, then cosine to lr * min_lr_ratio at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=total_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    parts = [] if cfg.grad_clip is None else [optax.clip_by_global_norm(cfg.grad_clip)]
    parts.append(
        optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    return optax.chain(*parts), schedule
