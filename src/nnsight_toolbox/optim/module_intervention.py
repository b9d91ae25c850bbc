"""`ModuleIntervention`: what every intervention on one module's output shares.

pyvene's lesson (see STYLE.md): an intervention is a small formula, and one
framework decides where it applies. The framework is
`nnsight_toolbox.optim.activation` (rows, passes, ``steps=``, ``positions=``,
generation, clean-up); this base holds the rest that is not a formula: the
module, its output width, the dtype and dropout, the call inside a trace, and
save/load. A subclass (`SteeringVector`, `SoftPrompt`, `LoReFT`, `DiReFT`)
creates its parameters and implements ``intervene(output, x, alpha)``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .activation import Steps
from .dims import infer_dims
from .lora import _home_device as lora_home_device
from .optimization import Optimization
from .positions import Positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["ModuleIntervention"]

#: The dtypes an intervention may compute in (those torch trains and multiplies in).
INTERVENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ModuleIntervention(Optimization):
    """Base of the interventions that rewrite one module's output (its first element, for a tuple).

    Subclasses call `ModuleIntervention.__init__`, create their parameters in
    ``self.dtype`` on ``self._device_hint``, and implement `intervene`. They
    record the constructor's keyword arguments in `config` so `save`/`load`
    can rebuild them.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> steer = SteeringVector(model.transformer.h[0])   # a ModuleIntervention
        >>> steer.path, steer.output_dim
        ('model.transformer.h.0', 32)
    """

    reads_input = False
    """The formulas here read only the output, so any first input (ids, a mask, a tuple) is fine.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector.reads_input
        False
    """

    module: Envoy
    """The nnsight Envoy of the module whose output is changed.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0]).module.path
        'model.transformer.h.0'
    """

    dropout: float
    """Dropout probability on the intervention's input, applied in training mode only.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0], dropout=0.1).dropout
        0.1
    """

    dtype: torch.dtype
    """The dtype of the parameters and of the arithmetic; the result is cast to the output's dtype.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0]).dtype
        torch.float32
    """

    output_dim: int
    """Width of the module's output (of its first element, for a tuple output).

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector(model.transformer.h[0]).output_dim
        32
    """

    def __init__(self, module: Envoy, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """Check and store what every subclass shares; see the subclass for the arguments."""
        _check_envoy(module, type(self).__name__)
        _check_dropout(dropout)
        _check_dtype(dtype)
        if output_dim is not None and (isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1):
            raise ValueError(f"`output_dim` must be a positive int, got {output_dim!r}.")
        Optimization.__init__(self)
        self.module = module
        self.dropout = float(dropout)
        self.dtype = dtype
        self.output_dim = output_dim if output_dim is not None else infer_dims(module).output_dim
        self._device_hint = _home_device(module)

    @property
    def path(self) -> str:
        """The module path the intervention acts on.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).path
            'model.transformer.h.0'
        """
        return self.module.path

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments (besides ``module``), as JSON values: what `save` records.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).config()
            {'dropout': 0.0, 'dtype': 'float32', 'output_dim': 32}
        """
        return {"dropout": self.dropout, "dtype": str(self.dtype).removeprefix("torch."), "output_dim": self.output_dim}

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """Switch the intervention on for the running trace, from this call onward.

        As `LORA.forward`: every forward pass of the run (each generated token
        too), the rows of the invoke it is called in, and only the tokens
        ``positions=`` picks (counted over each row's real tokens; ``-1`` is the
        last prompt token, generated tokens continue the count).

        Args:
            alpha: Scale of the intervention; 0 switches it off for this invoke.
            steps: Restrict it to some forward passes (0 is the prefill).
            positions: Restrict it to some tokens of each row; ``None``: every token.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> steer = SteeringVector(model.transformer.h[0])
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     steer(alpha=4.0, positions=slice(-1, None))
            ...     ids = tracer.result.save()
        """
        self._activate(alpha, steps, positions, f"{type(self).__name__.lower()}()")

    def _width_error(self, output: torch.Tensor) -> ValueError:
        """The refusal for an output whose width is not the one the intervention was built for.

        Each subclass's `intervene` compares ``output.shape[-1]`` with `output_dim`
        itself: a helper call per forward pass costs about as much as the check.
        """
        return ValueError(
            f"`{type(self).__name__}` on `{self.path}` was built for outputs of width "
            f"{self.output_dim}, but the module returned shape {tuple(output.shape)}. Was it "
            f"built for another module? Build a new one on this module."
        )

    def _dropped(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` with dropout applied in training mode only (the intervention's input)."""
        if self.dropout and self.training:
            return F.dropout(value, self.dropout, training=True)
        return value

    # -- artifacts: the work lives in `nnsight_toolbox.artifacts.native_intervention` --

    def save(self, directory: str | os.PathLike) -> None:
        """Save to ``directory``: ``intervention.safetensors`` plus an ``intervention.json`` sidecar naming the type.

        The tensors are `state_dict()`'s; the directory is replaced as a whole,
        as `LORA.save` does. Load it back with ``load`` on the same class.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> steer = SteeringVector(model.transformer.h[0])
            >>> steer.save("steer")
            >>> import os
            >>> sorted(os.listdir("steer"))
            ['intervention.json', 'intervention.safetensors']
        """
        from ..artifacts.native_intervention import save_intervention

        save_intervention(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, module: Envoy) -> "ModuleIntervention":
        """A new intervention on ``module`` with what ``directory`` holds, every file checked first.

        The saved type must be this class (``SteeringVector.load`` refuses a saved
        `LoReFT`), and the module's output width the saved one.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).save("steer")
            >>> SteeringVector.load("steer", model.transformer.h[1]).path
            'model.transformer.h.1'
        """
        from ..artifacts.native_intervention import load_intervention

        return load_intervention(directory, module, cls)

    def extra_repr(self) -> str:
        return ", ".join([self.path, *(f"{k}={v}" for k, v in self.config().items())])


def add_in_dtype(output: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``output + alpha * delta``, summed in ``delta``'s dtype and cast back to ``output``'s.

    This runs on every forward pass of every module an intervention is on, so
    the usual case (one dtype) is the add alone: a ``.to`` that changes nothing
    still costs a dispatch, about as much as the add on a small tensor.
    """
    if alpha != 1.0:
        delta = delta * alpha
    if output.dtype == delta.dtype:
        return output + delta
    return (output.to(delta.dtype) + delta).to(output.dtype)


def own_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """``module.<name>``, a parameter or buffer, read from its table without ``nn.Module.__getattr__``.

    ``self.v`` on a module misses the instance and class dictionaries before
    torch's ``__getattr__`` finds it, a few microseconds a lookup, and an
    intervention reads its tensors on every forward pass. A parametrized
    tensor (``torch.nn.utils.parametrize``) is not in the tables and is computed
    by the usual lookup.

    Examples:
        >>> layer = torch.nn.Linear(2, 3)
        >>> own_tensor(layer, "weight") is layer.weight
        True
    """
    value = module._parameters.get(name)
    if value is None:
        value = module._buffers.get(name)
    return value if value is not None else getattr(module, name)


def _check_envoy(module: Any, who: str) -> None:
    from nnsight.intervention.envoy import Envoy

    if not isinstance(module, Envoy):
        raise TypeError(
            f"`{who}` needs the nnsight Envoy of a module, such as `model.transformer.h[0]`, "
            f"but got {type(module).__name__}. Wrap the model with nnsight "
            f"(`TransformersModel(...)`) and pass the module through it."
        )


def _check_dropout(dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be a probability in [0, 1), got {dropout!r}.")


def _check_dtype(dtype: Any) -> None:
    if not isinstance(dtype, torch.dtype) or dtype not in INTERVENTION_DTYPES:
        raise TypeError(
            f"`dtype` must be `torch.float32`, `torch.bfloat16`, `torch.float16` or "
            f"`torch.float64`, got {dtype!r}. Keep float32 (the default) for a low-precision model: "
            f"the intervention computes in its own dtype and casts back to the output's."
        )


def _home_device(module: Envoy) -> torch.device:
    return lora_home_device(module)
