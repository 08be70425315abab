"""Boundary + window attention: each query sees the chunk-boundary keys before its window plus its last W+1 tokens."""

from pallas_kernels.boundary_window_attention.api import (
    IMPLEMENTATIONS,
    AttentionImplementation,
    boundary_window_attention,
)

__all__ = ["IMPLEMENTATIONS", "AttentionImplementation", "boundary_window_attention"]
