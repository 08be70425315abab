"""Print a config's parameters, KV-cache size and attention FLOPs against its matching transformer.

    python -m attamba_jax.describe --config configs/paper/attamba_k8_w8.yaml --context 1024,4096 model.dtype=bfloat16
    python -m attamba_jax.describe --config configs/tiny.yaml --corpus    # + the packing's padding on data.train

The packing line says how documents are packed (``data.document_masking``, ``data.document_align``);
with ``--corpus`` it reads the training sources and counts the padding that alignment adds.

The matching transformer has the same width, depth, heads and vocabulary with full
causal attention (for the paper's Attamba runs: ``transformer_isoparam``). Cache sizes
follow what a decoder must hold (``cache.formula_bytes``); attention FLOPs count the keys
each query really sees (``flops.attention_flops_per_token``), the local window included.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from flax import nnx

from attamba_jax import data
from attamba_jax.cache import formula_bytes
from attamba_jax.config import Config, ConfigError, ModelConfig, load_config
from attamba_jax.flops import attention_flops_per_token
from attamba_jax.model import LanguageModel, count_params
from attamba_jax.tokenizer import TokenizerError, load_tokenizer


def matching_transformer(cfg: ModelConfig) -> ModelConfig:
    """The full-attention transformer of the same size (Attamba-only keys back at their defaults)."""
    if cfg.arch == "transformer":
        return dataclasses.replace(cfg, sliding_window=None)
    defaults = ModelConfig()
    keep = {
        "vocab_size",
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "multiple_of",
        "norm_eps",
        "rope_theta",
        "dtype",
    }
    return dataclasses.replace(
        defaults, arch="transformer", attention_implementation="auto", **{k: getattr(cfg, k) for k in keep}
    )


def parameter_count(cfg: ModelConfig) -> int:
    return count_params(nnx.state(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def describe(cfg: ModelConfig, contexts: list[int]) -> str:
    base = matching_transformer(cfg)
    lines = []
    name = (
        cfg.arch
        if cfg.arch == "transformer"
        else f"attamba K={cfg.token_chunk} W={cfg.window}" + (" (pseudo_chunk)" if cfg.pseudo_chunk else "")
    )
    lines.append(
        f"model: {name}, d={cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}x{cfg.resolved_head_dim} heads "
        f"({cfg.resolved_kv_heads} kv), compute {cfg.dtype}"
    )
    p, pb = parameter_count(cfg), parameter_count(base)
    lines.append(f"parameters: {p:,}   (matching transformer: {pb:,})")
    lines.append("")
    lines.append(
        f"{'context':>8} | {'KV cache B/token':>16} | {'transformer':>12} | {'ratio':>6} | "
        f"{'attn FLOPs/token':>16} | {'transformer':>12} | {'ratio':>6}"
    )
    lines.append("-" * 96)
    for t in contexts:
        kv, kvb = formula_bytes(cfg, 1, t) / t, formula_bytes(base, 1, t) / t
        fl, flb = attention_flops_per_token(cfg, t), attention_flops_per_token(base, t)
        lines.append(
            f"{t:>8} | {kv:>16,.0f} | {kvb:>12,.0f} | {kv / kvb:>6.3f} | {fl:>16,.0f} | {flb:>12,.0f} | {fl / flb:>6.3f}"
        )
    lines.append("")
    lines.append("KV cache: per sequence, all layers, in the compute dtype (SSM scan states in float32), for a decoder")
    lines.append(
        "holding `context` tokens. Attention FLOPs: q·kᵀ and p·v, forward, averaged over a context's positions."
    )
    return "\n".join(lines)


def describe_packing(cfg: Config, corpus: bool = False) -> str:
    """How documents are packed into rows and, with ``corpus``, what the alignment costs on data.train."""
    align = cfg.document_align
    masking = "each document alone (data.document_masking)" if cfg.data.document_masking else "documents see each other"
    line = f"packing: {masking}; documents start at multiples of {align} of a {cfg.data.seq_len}-token row"
    if align > 1:
        line += f" (up to {align - 1} padding tokens after each)"
    if not corpus:
        return line
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    train = data.load_corpus(
        dataclasses.replace(cfg.data, heldout_fraction=0.0, eval=()), tokenizer, cfg.model.vocab_size
    )
    r = data.padding(train.train, tokenizer.bos_id, align)
    return (
        line
        + f"\n  data.train: {r['documents']:,} documents, {r['tokens']:,} tokens (mean {r['mean_document']:,.0f}); "
        + f"padding {r['padding']:,} tokens = {100 * r['padding_share']:.3f}% of the packed stream"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML config, e.g. configs/paper/attamba_k8_w8.yaml")
    parser.add_argument("--context", default="1024,4096,32768", help="comma-separated context lengths (tokens)")
    parser.add_argument("--corpus", action="store_true", help="read data.train and report the padding the packing adds")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        contexts = [int(t) for t in args.context.split(",")]
    except ValueError:
        contexts = []
    if not contexts or any(t < 1 for t in contexts):
        print(f"error: --context must be comma-separated integers >= 1, got {args.context!r}", file=sys.stderr)
        return 2
    print(describe(cfg.model, contexts))
    try:
        print(describe_packing(cfg, args.corpus))
    except (data.DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
