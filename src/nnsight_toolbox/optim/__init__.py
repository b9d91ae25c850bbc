"""Trainable interventions: `Optimization`, `LORA`, `LoraSet`, `SteeringVector`, `SoftPrompt`, `LoReFT`, `DiReFT` and `InterventionSet`.

Examples:
    >>> from nnsight_toolbox.optim import LORA, LoraSet, Optimization, SteeringVector, LoReFT
"""

from .adapter_set import LoraSet
from .direft import DiReFT
from .intervention_set import InterventionSet
from .lora import LORA
from .loreft import LoReFT
from .optimization import Optimization
from .soft_prompt import SoftPrompt
from .steering import SteeringVector

__all__ = ["LORA", "LoraSet", "Optimization", "SteeringVector", "SoftPrompt", "LoReFT", "DiReFT", "InterventionSet"]
