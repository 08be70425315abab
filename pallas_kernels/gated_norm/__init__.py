"""The gated grouped RMSNorm of the SSMs' outputs: ``RMSNorm_groups(y * silu(z)) * weight``."""

from pallas_kernels.gated_norm.api import IMPLEMENTATIONS, GatedNormImplementation, gated_norm
from pallas_kernels.gated_norm.reference import group_rms_norm

__all__ = ["IMPLEMENTATIONS", "GatedNormImplementation", "gated_norm", "group_rms_norm"]
