"""Chunk-reset Mamba-2 (SSD) scan core."""

from pallas_kernels.ssd.api import IMPLEMENTATIONS, ssd

__all__ = ["IMPLEMENTATIONS", "ssd"]
