"""An honest FLOP count per trained token, and the device peak that MFU divides by.

Training FLOPs per token = 6 · (matmul parameters) + 3 · (attention-core forward FLOPs):

  * every parameter except the embedding table takes part in one multiply-add per token
    forward (2 FLOPs) and two backward (4 FLOPs); the embedding is a gather, not a matmul;
  * the attention core (q·kᵀ and p·v) costs 4 · H · hd FLOPs per visible key forward, three
    times that with the backward. The keys a query sees are counted from the model's real
    mask: for Attamba, its layer's boundaries before the window plus the W+1 window keys
    (``Visibility.keys_per_query``), not a full causal T/2; for the transformer, causal or its
    sliding window. So Attamba is credited only with the attention it needs.

Left out, as in the usual 6N + attention count: the SSD scan's within-chunk products (for the
paper's model about K·(N + I) forward FLOPs per token per SSM, under 0.1% of the total), norms,
softmax and other elementwise work.
"""

from __future__ import annotations

import numpy as np

from attamba_jax.config import ModelConfig
from pallas_kernels.chunk_grid import ChunkGrid
from pallas_kernels.visibility import Visibility


def mean_keys_per_query(cfg: ModelConfig, seq_len: int, layer: int) -> float:
    """Keys a query of a length-``seq_len`` sequence attends to in ``layer``, averaged over positions."""
    if cfg.arch == "attamba" and not cfg.pseudo_chunk:
        visibility = Visibility(ChunkGrid.for_layer(layer, cfg.token_chunk, cfg.n_layers), cfg.window)
    else:
        visibility = Visibility(None, cfg.sliding_window if cfg.arch == "transformer" else None)
    return float(np.mean(visibility.keys_per_query(seq_len)))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of the attention core (q·kᵀ and p·v) per token, summed over layers."""
    width = cfg.n_heads * cfg.resolved_head_dim
    return sum(4.0 * width * mean_keys_per_query(cfg, seq_len, layer) for layer in range(cfg.n_layers))


def train_flops_per_token(cfg: ModelConfig, num_params: int, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token (see the module docstring)."""
    matmul_params = num_params - cfg.vocab_size * cfg.dim  # the embedding table is gathered
    return 6.0 * matmul_params + 3.0 * attention_flops_per_token(cfg, seq_len)


# Dense bfloat16 peak TFLOP/s per device, from the vendors' data sheets, matched against
# ``jax.Device.device_kind`` (lower-cased) in this order.
_PEAK_BF16_TFLOPS = (
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),
    ("a100", 312.0),
    ("a6000", 154.8),
    ("l4", 121.0),
    ("tpu v6", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)


def peak_flops_per_device(device_kind: str, compute_dtype: str, configured_tflops: float | None) -> float | None:
    """FLOP/s of one device: ``train.peak_tflops`` when set, else the data-sheet bf16 peak of a
    known accelerator running bfloat16; None (no MFU) otherwise, e.g. on a CPU."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if compute_dtype != "bfloat16":
        return None
    kind = device_kind.lower()
    for name, tflops in _PEAK_BF16_TFLOPS:
        if name in kind:
            return tflops * 1e12
    return None
