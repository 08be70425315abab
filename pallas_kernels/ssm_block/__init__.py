"""The Mamba-2 block core between its two projections: chunk-local conv, SSD, gate and norm."""

from pallas_kernels.ssm_block.api import IMPLEMENTATIONS, ssm_block
from pallas_kernels.ssm_block.reference import SsmDims

__all__ = ["IMPLEMENTATIONS", "SsmDims", "ssm_block"]
