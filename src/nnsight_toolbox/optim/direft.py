"""`DiReFT`: pyreft's ``DireftIntervention``, ``h + R^T (W h + b)``.

Like `LoReFT` (see `nnsight_toolbox.optim.loreft` for ``R``, its
orthonormality and the pyreft keys) but without projecting ``h`` out of the
subspace first: the edit is added along ``R``'s rows, like a LoRA whose
up-projection has orthonormal columns (ReFT paper, Appendix C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loreft import ReftBase
from .module_intervention import add_in_dtype

__all__ = ["DiReFT"]


class DiReFT(ReftBase):
    """pyreft's ``DireftIntervention`` on a module's output: ``h + alpha * R^T (W dropout(h) + b)``.

    Same arguments, keys and orthonormal ``R`` as `LoReFT`.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import DiReFT
        >>> reft = DiReFT(model.transformer.h[1], r=4)
        >>> with model.generate("Hello", max_new_tokens=3) as tracer:
        ...     reft(positions=slice(-1, None))     # last prompt token and every generated one
        ...     ids = tracer.result.save()
    """

    def intervene(self, output: torch.Tensor, x: object, alpha: float) -> torch.Tensor:
        """``output + alpha * R^T (W d(h) + b)`` in the intervention's dtype, cast back.

        Examples:
            >>> from nnsight_toolbox import DiReFT
            >>> reft = DiReFT(model.transformer.h[1], r=4)
            >>> reft.intervene(torch.randn(1, 3, 32), None, 1.0).shape
            torch.Size([1, 3, 32])
        """
        usual = self._usual_parts(output)
        if usual is not None:  # `output` in the intervention's dtype, no dropout
            Rt, W, b = usual
            delta = F.linear(output, W, b) @ Rt.T
            return output + delta if alpha == 1.0 else output + delta * alpha
        h, dh, Rt = self._parts(output)
        delta = self._source(dh) @ Rt.T  # (B, T, r) @ (r, d)
        return add_in_dtype(output, delta, alpha)
