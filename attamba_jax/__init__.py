"""attamba-jax: Attamba (arXiv 2411.17685) in JAX and Flax NNX.

The public surface, for notebooks and scripts:

    import attamba_jax as aj

    cfg = aj.load_config("configs/tiny.yaml")               # or aj.restore_workdir("runs/tiny")
    graphdef, params = aj.init_model(cfg.model, seed=0)
    logits = aj.make_forward(graphdef)(params, tokens)      # tokens [B, T] int32 -> [B, T, vocab]
    out = aj.generate(graphdef, params, [[256, 72, 105]], max_new_tokens=32)
    logits, cache = aj.make_prefill(graphdef, max_len=1024)(params, tokens, lengths)
    logits, cache = aj.make_decode_step(graphdef)(params, next_tokens, cache)
    scorer, step = aj.load_scorer("runs/tiny")              # perplexity and bits per byte of texts
    aj.train(cfg, "runs/tiny")                              # the trainer, as ``python train.py`` runs it
"""

import warnings

# ``python -m attamba_jax.generate`` (and evaluate, describe, ...) runs a module that this package
# already imported for its public surface; runpy then warns that it runs it a second time, as
# __main__. Nothing here acts on import, so that is harmless, and the warning is noise for users.
warnings.filterwarnings("ignore", r"'attamba_jax\.\w+' found in sys\.modules", RuntimeWarning, "runpy")

from attamba_jax.checkpointing import Restored, restore_workdir  # noqa: E402
from attamba_jax.config import Config, ConfigError, ModelConfig, load_config, load_saved_config  # noqa: E402
from attamba_jax.evaluate import Scorer, load_scorer  # noqa: E402
from attamba_jax.generate import Generated, decode_step, generate, make_decode_step, make_prefill, prefill  # noqa: E402
from attamba_jax.model import LanguageModel, apply_model, count_params, init_model, make_forward  # noqa: E402
from attamba_jax.trainer import Trainer, train  # noqa: E402

__all__ = [
    "Config",
    "ConfigError",
    "Generated",
    "LanguageModel",
    "ModelConfig",
    "Restored",
    "Scorer",
    "Trainer",
    "apply_model",
    "count_params",
    "decode_step",
    "generate",
    "init_model",
    "load_config",
    "load_saved_config",
    "load_scorer",
    "make_decode_step",
    "make_forward",
    "make_prefill",
    "prefill",
    "restore_workdir",
    "train",
]
