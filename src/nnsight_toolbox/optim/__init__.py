"""Trainable interventions: `Optimization` and the `LORA` adapter.

Examples:
    >>> from nnsight_toolbox.optim import LORA, Optimization
"""

from .lora import LORA
from .optimization import Optimization

__all__ = ["LORA", "Optimization"]
