"""nnsight-toolbox: trainable interventions for nnsight 0.8.

Examples:
    >>> from nnsight_toolbox import LORA
    >>> lora = LORA(model.transformer.h[0].mlp, r=8)
"""

from .artifacts import export_peft, import_peft
from .optim import LORA, Optimization

__version__ = "0.1.0"

__all__ = ["LORA", "Optimization", "export_peft", "import_peft", "__version__"]
