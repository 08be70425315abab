"""One decode step of the chunk-reset Mamba-2 SSMs: conv, SSD state update and gated norm of one token."""

from pallas_kernels.ssm_step.api import IMPLEMENTATIONS, SsmStepImplementation, ssm_step
from pallas_kernels.ssm_step.reference import history_slot

__all__ = ["IMPLEMENTATIONS", "SsmStepImplementation", "history_slot", "ssm_step"]
