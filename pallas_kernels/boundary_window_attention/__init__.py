"""Boundary + window attention: each query sees the chunk-boundary keys before its window plus its last W+1 tokens."""

from pallas_kernels.boundary_window_attention.api import (
    IMPLEMENTATIONS,
    ROW_IMPLEMENTATIONS,
    AttentionImplementation,
    boundary_window_attention,
    boundary_window_attention_of_rows,
)

__all__ = [
    "IMPLEMENTATIONS",
    "ROW_IMPLEMENTATIONS",
    "AttentionImplementation",
    "boundary_window_attention",
    "boundary_window_attention_of_rows",
]
