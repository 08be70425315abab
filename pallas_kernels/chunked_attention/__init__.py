"""Attamba attention: each query sees the chunk-boundary keys before its window plus the last W+1 tokens."""

from pallas_kernels.chunked_attention.api import IMPLEMENTATIONS, chunked_attention

__all__ = ["IMPLEMENTATIONS", "chunked_attention"]
