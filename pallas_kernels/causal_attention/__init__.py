"""Causal (optionally sliding-window) attention: the transformer baseline's, and Attamba's ``pseudo_chunk`` ablation."""

from pallas_kernels.causal_attention.api import IMPLEMENTATIONS, CausalImplementation, causal_attention

__all__ = ["IMPLEMENTATIONS", "CausalImplementation", "causal_attention"]
