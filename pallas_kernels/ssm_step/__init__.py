"""One decode step of the chunk-reset Mamba-2 SSMs: conv, SSD state update and gated norm of one token."""

from pallas_kernels.ssm_step.api import IMPLEMENTATIONS, SsmStepImplementation, StepSizes, ssm_step

__all__ = ["IMPLEMENTATIONS", "SsmStepImplementation", "StepSizes", "ssm_step"]
