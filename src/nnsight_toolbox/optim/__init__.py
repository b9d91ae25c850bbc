"""Trainable interventions: `Optimization`, the `LORA` adapter and `LoraSet`.

Examples:
    >>> from nnsight_toolbox.optim import LORA, LoraSet, Optimization
"""

from .adapter_set import LoraSet
from .dora import DoRA
from .lora import LORA
from .module_copy import ModuleCopy
from .optimization import Optimization

__all__ = ["DoRA", "LORA", "LoraSet", "ModuleCopy", "Optimization"]
