"""The SSMs' input side over a sequence: split the in-projection, chunk-causal conv + SiLU, softplus."""

from pallas_kernels.ssm_conv.api import IMPLEMENTATIONS, SsmConvImplementation, ssm_conv
from pallas_kernels.ssm_conv.reference import chunk_causal_conv

__all__ = ["IMPLEMENTATIONS", "SsmConvImplementation", "chunk_causal_conv", "ssm_conv"]
