"""nnsight-toolbox: trainable interventions for nnsight 0.8.

Examples:
    >>> from nnsight_toolbox import LORA
    >>> lora = LORA(model.transformer.h[0].mlp, r=8)
"""

from .optim import LORA, LoraSet, Optimization

__version__ = "0.1.0"

__all__ = ["LORA", "LoraSet", "Optimization", "__version__"]
