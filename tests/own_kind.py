"""A kind of intervention written outside the package, as a user writes one in a notebook.

A trainable per-channel scale, ``h * (1 + alpha * s)``. It holds only its
parameter and its formula; everything else comes from `ModuleIntervention`.
"""

from __future__ import annotations

import torch

from nnsight_toolbox import ModuleIntervention


class PerChannelScale(ModuleIntervention):
    """``h * (1 + alpha * s)``, with ``s`` one trainable number per channel, starting at 0."""

    def __init__(self, module, *, dtype=torch.float32, output_dim=None):
        ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=output_dim)
        self.s = torch.nn.Parameter(torch.zeros(self.output_dim, dtype=dtype, device=self._device_hint))

    def intervene(self, output, x, alpha):
        return (output.to(self.s.dtype) * (1 + alpha * self.s)).to(output.dtype)
