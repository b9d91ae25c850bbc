"""nnsight-toolbox: trainable interventions for nnsight 0.8.

Importing the package registers it with nnsight for remote execution
(``nnsight.register``), so a `LORA` used in ``model.trace(..., remote=True)``
ships its code with the request and runs on an NDIF server that does not have
this package installed.

Examples:
    `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

    >>> from nnsight_toolbox import LORA
    >>> lora = LORA(model.transformer.h[0].mlp, r=8)
"""

import sys

import nnsight

from ._version import __version__
from .artifacts import export_peft, import_peft
from . import optim
from .batched import BatchedNNsight
from .optim import (
    LORA,
    BoundlessRotatedSpace,
    DiReFT,
    DoRA,
    InterventionSet,
    LoraSet,
    LoReFT,
    ModuleCopy,
    ModuleIntervention,
    Optimization,
    PromptPositions,
    RotatedSpace,
    SigmoidMaskRotatedSpace,
    SoftPrompt,
    SteeringVector,
)

#: The interventions and collections (`optim`'s names), then the model wrapper and PEFT's interop.
__all__ = [*optim.__all__, "BatchedNNsight", "export_peft", "import_peft", "__version__"]


def _readable_signatures() -> None:
    """``help(LORA)`` shows ``module: Envoy``, not the string ``'Envoy'`` (see `_signatures`)."""
    from nnsight.intervention.envoy import Envoy

    from . import _signatures
    from .optim.targets import Layers, Targets

    from .optim.kinds import KINDS

    classes = [*KINDS.values(), ModuleIntervention, LoraSet, InterventionSet, Optimization]  # every kind, by being defined
    names = {"Envoy": Envoy, "Targets": Targets, "Layers": Layers, **{cls.__name__: cls for cls in classes}}
    _signatures.resolve([*classes, export_peft, import_peft], names)


_readable_signatures()

# Ship this package by value (its source travels with each remote request):
# NDIF servers do not install it. Registering the top-level package covers
# every submodule (cloudpickle matches registered names by prefix).
nnsight.register(sys.modules[__name__])
