"""`ModuleIntervention`: the one base of every intervention on a module, the package's and yours.

An intervention is a small formula, and one framework decides where it applies
(pyvene's lesson). The framework is `nnsight_toolbox.optim.activation` (rows,
passes, ``steps=``, ``positions=``, generation, clean-up after a run); this base
holds everything else that is not a formula:

- the module and its path, and the checks every kind shares, worded for the kind;
- the call inside a trace, ``kind(alpha, steps=..., positions=...)``;
- ``config()``, the constructor's JSON-able keyword arguments;
- `save` and `load`, in the one file format (`nnsight_toolbox.artifacts.native`),
  and a `load_state_dict` that checks every key and shape before it copies any.

A kind's own file then holds its parameters, its formula (``intervene``) and
what is truly its own. Defining a subclass registers it by class name
(`nnsight_toolbox.optim.kinds`), so save/load, `InterventionSet` and the rest
know it with no list to edit::

    class ChannelScale(ModuleIntervention):            # h * (1 + alpha * s)
        def __init__(self, module, *, dtype=torch.float32, output_dim=None):
            ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=output_dim)
            self.s = torch.nn.Parameter(torch.zeros(self.output_dim, dtype=dtype, device=self._device_hint))

        def intervene(self, output, x, alpha):
            return output * (1 + alpha * self.s)

The docs page "Write your own kind" walks through it.
"""

from __future__ import annotations

import inspect
import json
import os
import types
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

import torch
import torch.nn.functional as F

from .activation import Steps, activate_many, check_alpha, current_mediator, normalize_steps, row_alphas
from .dims import infer_dims
from .kinds import register
from .layout import batch_axis
from .optimization import Optimization, _module_device
from .positions import Positions

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

__all__ = ["ModuleIntervention", "check_envoy", "check_dtype", "INTERVENTION_DTYPES"]

#: The dtypes an intervention may compute in: those torch trains and multiplies in.
#: The float8 dtypes are floating point too, but torch has no matmul for them.
INTERVENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Kind = TypeVar("Kind", bound="ModuleIntervention")


class ModuleIntervention(Optimization):
    """The base of every intervention on one module: subclass it to write a kind of your own.

    The contract of a subclass:

    - ``__init__`` calls ``ModuleIntervention.__init__(self, module, ...)`` (not
      ``super()``: a class shipped to a remote server is rebuilt from source,
      where zero-argument ``super()`` fails), then creates its parameters in
      ``dtype`` on ``self._device_hint``; ``self.output_dim`` is the module's width.
    - ``intervene(output, x, alpha)`` returns the module's new output from its
      ``output`` (a tuple's first element) and first input ``x``, already narrowed
      to the rows of the invoke. The machinery keeps it at the chosen ``positions=``.
    - ``config()`` returns the constructor's keyword arguments besides
      ``module``, as JSON values, so ``Kind(module, **config())`` rebuilds it:
      that is how `load` rebuilds it. Extend the base's: ``{"k": self.k, **ModuleIntervention.config(self)}``.

    Everything else (the call in a trace, rows, ``steps=``, ``positions=``,
    generation, gradients, `save`/`load`, `InterventionSet`, remote traces)
    then works for the new kind.

    Examples:
        `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

        >>> from nnsight_toolbox import ModuleIntervention
        >>> class ChannelScale(ModuleIntervention):
        ...     def __init__(self, module, *, dtype=torch.float32, output_dim=None):
        ...         ModuleIntervention.__init__(self, module, dtype=dtype, output_dim=output_dim)
        ...         self.s = torch.nn.Parameter(torch.zeros(self.output_dim, dtype=dtype, device=self._device_hint))
        ...     def intervene(self, output, x, alpha):
        ...         return output * (1 + alpha * self.s)
        >>> scale = ChannelScale(model.transformer.h[0])
        >>> with model.trace("Hello"):
        ...     scale(alpha=2.0, positions=-1)
        ...     logits = model.lm_head.output.save()
        >>> scale.save("scale")
        >>> ChannelScale.load("scale", model.transformer.h[1]).path
        'model.transformer.h.1'
    """

    reads_input = False
    """Whether `intervene` reads the module's first input ``x`` (`LORA` does); a kind that does not works on any module.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector.reads_input, LORA.reads_input
        (False, True)
    """

    call_name: str = ""
    """How the docs spell a call of this kind inside a trace (``"steer()"``), for messages; the class name by default.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> SteeringVector.call_name
        'steer()'
    """

    alpha_means: str = "the strength of the intervention"
    """What ``alpha`` scales, for the message that refuses a bad one.

    Examples:
        >>> LORA.alpha_means
        'the scale of the low-rank term'
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

    metadata: dict
    """JSON values saved with the intervention and loaded back, e.g. how it was made.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> steer = SteeringVector(model.transformer.h[0])
        >>> steer.metadata["note"] = "read at layer 0"
        >>> steer.save("steer")
        >>> SteeringVector.load("steer", model.transformer.h[0]).metadata
        {'note': 'read at layer 0'}
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Defining a kind registers it (see `kinds`): nothing else to edit. Not `super()`
        # (see the class docstring); `object.__init_subclass__` takes no arguments.
        object.__init_subclass__()
        if not cls.call_name:
            cls.call_name = f"{cls.__name__}()"
        if "load" not in cls.__dict__:  # `help(Kind)` shows `load` returning this class, not the base
            cls.load = classmethod(_returning(ModuleIntervention.__dict__["load"].__func__, cls))
        register(cls)

    def __init__(self, module: Envoy, *, dropout: float = 0.0, dtype: torch.dtype = torch.float32, output_dim: int | None = None) -> None:
        """Check and store what every kind shares; see the subclass for the arguments."""
        kind = type(self).__name__
        check_envoy(module, kind)
        _check_dropout(dropout, kind)
        check_dtype(dtype, kind)
        if output_dim is not None and (isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1):
            raise ValueError(f"`{kind}`'s `output_dim` must be a positive int, got {output_dim!r}.")
        width = output_dim if output_dim is not None else infer_dims(module, kind=kind, reads_input=type(self).reads_input).output_dim
        self._bind(module)
        self.dropout = float(dropout)
        self.dtype = dtype
        self.output_dim = width

    def _bind(self, module: Envoy) -> None:
        """Start the torch module and hold ``module``: the part of `__init__` every kind needs (``module`` checked by the caller)."""
        Optimization.__init__(self)
        self.module = module
        self.metadata = {}
        self._device_hint = home_device(module)
        # Which axis of the module's output holds the rows, from one scan per model: run
        # time then never guesses it from a shape (see `layout`). Travels with the object.
        self.batch_axis = batch_axis(module)

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
        """The constructor's arguments besides ``module``, as JSON values: what `save` records and `load` rebuilds from.

        By default each argument of the kind's ``__init__`` is read from the
        attribute of the same name (a dtype as its name, ``"float32"``), so a kind
        that stores its arguments needs no `config` of its own.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).config()
            {'dropout': 0.0, 'dtype': 'float32', 'output_dim': 32}
        """
        config = {}
        for name in constructor_arguments(type(self)):
            if name not in self.__dict__ and not hasattr(type(self), name):
                raise TypeError(
                    f"`{type(self).__name__}.config()` reads each argument of `__init__` from the attribute of "
                    f"the same name, but there is no `self.{name}`. Store it in `__init__`, or define `config()` "
                    f"returning the keyword arguments that rebuild the object."
                )
            value = getattr(self, name)
            config[name] = dtype_name(value) if isinstance(value, torch.dtype) else value
        return config

    def forward(self, alpha: float = 1.0, *, steps: Steps = None, positions: Positions = None) -> None:
        """Switch the intervention on for the running trace, from this call onward.

        Every forward pass of the run (each generated token too), the rows of the
        invoke it is called in, and only the tokens ``positions=`` picks (counted
        over each row's real tokens; ``-1`` is the last prompt token, generated
        tokens continue the count). Calling it again in the same invoke updates
        the options and never applies it twice.

        Args:
            alpha: Scale of the intervention; 0 switches it off for this invoke.
                `LORA` and `SteeringVector` also take a 1-D sequence or tensor
                with one value per row of the invoke (a sweep of strengths in one
                batch, at about the cost of one); its length must be the invoke's
                rows (`ValueError` otherwise).
            steps: Restrict it to some forward passes (0 is the prefill).
            positions: Restrict it to some tokens of each row; ``None``: every token.

        Several invokes of one trace, each switching on its own intervention of
        one kind on a module, are applied as one batched computation (see
        `nnsight_toolbox.optim.grouped`): comparing many side by side costs about
        what one does.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> steer = SteeringVector(model.transformer.h[0])
            >>> with model.generate("Hello", max_new_tokens=3) as tracer:
            ...     steer(alpha=4.0, positions=slice(-1, None))
            ...     ids = tracer.result.save()

            One vector at four strengths, one per row of the batch:

            >>> with model.trace(["Hello", "Hello", "Hello", "Hello"]):
            ...     steer(alpha=torch.tensor([0.0, 1.0, 2.0, 4.0]))
            ...     logits = model.lm_head.output.save()
            >>> logits.shape[0]
            4
        """
        self._activate(alpha, steps, positions, self.call_name)

    def _activate(self, alpha: float, steps: Any, positions: Any, what: str) -> None:
        """Check the call in this kind's words, follow the module to its device, and switch on for the running invoke."""
        current_mediator(what, self._outside_trace_hint())
        chosen = self._positions(positions)
        alpha = self._check_alpha(alpha)
        steps = normalize_steps(steps)
        self._follow_module_device()
        # stacklevel 6 names the user's line: activate_many, this, forward, torch's two call frames
        activate_many([(self, self.module, chosen)], alpha, steps, what, stacklevel=6)

    def _outside_trace_hint(self) -> str:
        """What the refusal of a call outside a trace suggests: merging, for a kind that can merge."""
        if callable(getattr(type(self), "merge", None)):
            return f"To change every run without a trace, merge it into the weights instead: `{type(self).__name__.lower()}.merge()`."
        return ""

    def _check_alpha(self, alpha: Any) -> Any:
        """``alpha`` as a float (or one per row, for a kind that takes that: `grouped`), or a refusal that names this kind's call."""
        if isinstance(alpha, (int, float)):
            return check_alpha(alpha, self.call_name, self.alpha_means)
        return row_alphas(alpha, (type(self),), self.call_name, self.alpha_means)

    def _width_error(self, output: torch.Tensor) -> ValueError:
        """The refusal for an output whose width is not the one the intervention was built for.

        Each kind's `intervene` compares ``output.shape[-1]`` with `output_dim`
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

    # -- state: checked before anything is copied -----------------------------------

    def _check_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, expected: Mapping[str, tuple] | None = None, optional: Any = (), also: str = ""
    ) -> None:
        """Refuse ``state_dict`` unless every key and shape fits; changes nothing.

        `load_state_dict` and a collection's call it before any tensor is
        copied. ``expected`` maps each key the load needs to its shape (this
        intervention's own `state_dict()` by default); a kind that also takes a
        reference library's keys (the DAS swaps: pyvene's) passes those, the
        keys it checks itself as ``optional``, and names the other source in
        ``also`` (``"pyvene's matching intervention"``).
        """
        name = type(self).__name__
        if expected is None:
            expected = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        missing = sorted(k for k in expected if k not in state_dict)
        unexpected = sorted(k for k in state_dict if k not in expected and k not in optional)
        if missing or (strict and unexpected):
            raise KeyError(
                f"`{name}.load_state_dict` on `{self.path}` takes the keys {sorted(expected)}; "
                f"missing {missing or 'none'}, unexpected {unexpected or 'none'}. Pass the `state_dict()` "
                f"of a `{name}` built with the same options{', or of ' + also if also else ''}."
            )
        for key, shape in expected.items():
            given = state_dict[key]
            if not isinstance(given, torch.Tensor) or tuple(given.shape) != tuple(shape):
                shown = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
                raise ValueError(
                    f"`{name}.load_state_dict` on `{self.path}`: `{key}` has shape {shown}, "
                    f"but this one needs {tuple(shape)} ({self.extra_repr()}). Build it with the "
                    f"options the weights were trained with."
                )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """torch's `load_state_dict`, after checking every key and shape first: a refused load changes nothing.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> a, b = SteeringVector(model.transformer.h[0]), SteeringVector(model.transformer.h[0])
            >>> _ = b.load_state_dict(a.state_dict())
        """
        self._check_state_dict(state_dict, strict)
        return torch.nn.Module.load_state_dict(self, state_dict, strict, assign)

    # -- the file format: `nnsight_toolbox.artifacts.native` --------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Save to ``directory``: ``interventions.safetensors`` plus an ``interventions.json`` sidecar.

        The sidecar records the kind, the module path, `config`, `metadata`, the
        training mode and the tensors; the tensors are `state_dict()`'s. The
        directory is replaced as a whole: a save interrupted at any point leaves it
        loading as the complete old intervention or the complete new one. Other
        files in it are kept. Load it back with `load`.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).save("steer")
            >>> import os
            >>> sorted(os.listdir("steer"))
            ['interventions.json', 'interventions.safetensors']
        """
        from ..artifacts.native import save_interventions  # here, not at the top: a remote request ships this module, not the format

        save_interventions([self], directory, self.module.path.split(".", 1)[0], f"`{type(self).__name__}.save`")

    @classmethod
    def load(cls: type[Kind], directory: str | os.PathLike, module: Envoy) -> Kind:
        """A new intervention on ``module`` with what ``directory`` holds, every file checked first.

        The saved kind must be this class or a subclass of it (`LORA.load` of a
        saved `DoRA` gives a `DoRA`; `SteeringVector.load` refuses a saved
        `LoReFT`), and ``module`` must have the widths it was saved with; its path
        may differ. Reads JSON and safetensors only, never pickle. Directories
        saved by earlier versions (``lora.json``, ``intervention.json``) load too.

        Examples:
            >>> from nnsight_toolbox import SteeringVector
            >>> SteeringVector(model.transformer.h[0]).save("steer")
            >>> SteeringVector.load("steer", model.transformer.h[1]).path
            'model.transformer.h.1'
        """
        from ..artifacts.native import load_one

        check_envoy(module, f"{cls.__name__}.load")
        return load_one(directory, module, cls)

    @classmethod
    def _build_for_load(cls: type[Kind], module: Envoy, config: dict[str, Any]) -> Kind:
        """A fresh one on ``module`` from a saved `config` (`ModuleCopy` builds one on unloaded weights too)."""
        options = dict(config)
        if "dtype" in options:
            options["dtype"] = dtype_named(options["dtype"])
        return cls(module, **options)

    def extra_repr(self) -> str:
        return ", ".join([self.path, *(f"{k}={v}" for k, v in self.config().items())])


def _returning(function: Any, cls: type) -> Any:
    """A copy of ``function`` (same code) whose return annotation is ``cls``: what `help` shows for it."""
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__doc__, copy.__qualname__ = function.__kwdefaults__, function.__doc__, f"{cls.__qualname__}.{function.__name__}"
    copy.__module__ = function.__module__
    copy.__annotations__ = {**function.__annotations__, "return": cls}
    return copy


def constructor_arguments(cls: type) -> list[str]:
    """The names of ``cls.__init__``'s arguments after ``self`` and the module, in order (not ``*args``/``**kwargs``).

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> constructor_arguments(SteeringVector)
        ['dropout', 'dtype', 'output_dim']
    """
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


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


def check_envoy(module: Any, who: str) -> None:
    """Refuse anything but the nnsight Envoy of a module a forward can call, naming ``who`` asked.

    Examples:
        >>> check_envoy(torch.nn.Linear(2, 2), "SteeringVector")
        Traceback (most recent call last):
        ...
        TypeError: `SteeringVector` needs the nnsight Envoy of a module, but got a raw `Linear`. ...
    """
    from nnsight.intervention.envoy import Envoy

    if isinstance(module, Envoy):
        inner = module._module
        if isinstance(inner, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            first = next(iter(inner._modules), None)
            example = f" e.g. `{module.path}[{first}]`" if isinstance(inner, torch.nn.ModuleList) and first is not None else ""
            raise TypeError(
                f"`{module.path}` is a {type(inner).__name__}, which the model's forward never calls (it only "
                f"holds modules), so `{who}` there would never act. Put it on one of the modules it holds,{example}."
            )
        return
    if isinstance(module, torch.nn.Module):
        raise TypeError(
            f"`{who}` needs the nnsight Envoy of a module, but got a raw `{type(module).__name__}`. "
            f"Wrap the model with nnsight and pass the module through it: "
            f"`model = TransformersModel(hf_model, task='text-generation', tokenizer=tokenizer)` "
            f"(or `NNsight(torch_model)`), then e.g. `model.transformer.h[0].mlp`."
        )
    raise TypeError(
        f"`{who}` needs the nnsight Envoy of a module, such as `model.transformer.h[0].mlp`, "
        f"but got {type(module).__name__}: {module!r:.80}."
    )


def check_dtype(dtype: Any, who: str) -> None:
    """Refuse a dtype torch cannot train or multiply in, naming ``who`` asked.

    Examples:
        >>> check_dtype(torch.int8, "LORA")
        Traceback (most recent call last):
        ...
        TypeError: `LORA`'s `dtype` must be a floating torch dtype that torch trains and multiplies in: ...
    """
    if not isinstance(dtype, torch.dtype) or dtype not in INTERVENTION_DTYPES:
        raise TypeError(
            f"`{who}`'s `dtype` must be a floating torch dtype that torch trains and multiplies in: "
            f"`torch.float32`, `torch.bfloat16`, `torch.float16` or `torch.float64`, got {dtype!r}. "
            f"For a float8 or quantized model keep it in float32 (the default): it computes in its "
            f"own dtype and casts the result to the output's."
        )


def _check_dropout(dropout: Any, who: str) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`{who}`'s `dropout` must be a probability in [0, 1), got {dropout!r}.")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how `config` and the file format spell a dtype."""
    return str(dtype).removeprefix("torch.")


def dtype_named(name: Any) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``, or a `ValueError`."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` should name a torch dtype such as 'float32', got {name!r}.")
    return dtype


def home_device(module: Envoy) -> torch.device:
    """Where the parameters start: the module's device, or the model's, or the
    CPU for a model still on the meta device (`Optimization._follow_module_device`
    moves them once its weights are real)."""
    device = _module_device(module)
    if device is None or device.type == "meta":
        return torch.device("cpu")
    return device


def check_json(value: Any, what: str) -> None:
    """Refuse a value the file format cannot write as JSON, naming where it came from."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must hold JSON values (str, number, bool, None, lists and dicts of them): {error}.") from None
