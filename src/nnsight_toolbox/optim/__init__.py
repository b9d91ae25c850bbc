"""Trainable interventions: the base `ModuleIntervention`, its kinds (the DAS swaps `RotatedSpace`, `BoundlessRotatedSpace`, `SigmoidMaskRotatedSpace` too), and the collections `InterventionSet` and `LoraSet`.

Examples:
    >>> from nnsight_toolbox.optim import LORA, LoraSet, ModuleIntervention, SteeringVector, LoReFT
"""

from .adapter_set import LoraSet
from .das import BoundlessRotatedSpace, RotatedSpace, SigmoidMaskRotatedSpace
from .direft import DiReFT
from .dora import DoRA
from .intervention_set import InterventionSet
from .lora import LORA
from .loreft import LoReFT
from .module_copy import ModuleCopy
from .module_intervention import ModuleIntervention
from .optimization import Optimization
from .positions import PromptPositions
from .soft_prompt import SoftPrompt
from .steering import SteeringVector

__all__ = [
    "PromptPositions",
    "LORA",
    "LoraSet",
    "DoRA",
    "ModuleCopy",
    "Optimization",
    "ModuleIntervention",
    "SteeringVector",
    "SoftPrompt",
    "LoReFT",
    "DiReFT",
    "InterventionSet",
    "RotatedSpace",
    "BoundlessRotatedSpace",
    "SigmoidMaskRotatedSpace",
]
