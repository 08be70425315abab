"""Chunk-reset Mamba-2 (SSD) scan core."""

from pallas_kernels.ssd.api import IMPLEMENTATIONS, SsdImplementation, ssd

__all__ = ["IMPLEMENTATIONS", "SsdImplementation", "ssd"]
