"""Trainable interventions: `Optimization`, the `LORA` adapter and `LoraSet`.

Examples:
    >>> from nnsight_toolbox.optim import LORA, LoraSet, Optimization
"""

from .adapter_set import LoraSet
from .lora import LORA
from .optimization import Optimization

__all__ = ["LORA", "LoraSet", "Optimization"]
