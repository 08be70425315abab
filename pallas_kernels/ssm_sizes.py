"""The static sizes of ``streams`` chunk-reset Mamba-2 SSMs side by side, as the kernels of their
sequence forward (``ssm_conv``, ``gated_norm``) and decode step (``ssm_step``) read them."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SsmSizes:
    """The static sizes of stacked chunk-reset SSMs: ``streams`` SSMs side by side, each
    of ``heads`` heads of ``head_dim`` channels (I = heads · head_dim), a state of ``state`` per
    channel, ``groups`` B/C groups, and the gated norm's ``eps``."""

    streams: int
    heads: int
    head_dim: int
    state: int
    groups: int
    eps: float

    def __post_init__(self):
        for name in ("streams", "heads", "head_dim", "state", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"SsmSizes.{name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.groups:
            raise ValueError(f"SsmSizes: groups ({self.groups}) must divide heads ({self.heads})")

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of one stream's conv: x, B and C."""
        return self.inner + 2 * self.groups * self.state

    @property
    def projection(self) -> int:
        """Width of one stream's in-projection: z, xBC and dt."""
        return self.inner + self.conv_channels + self.heads
