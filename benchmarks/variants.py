"""The variants a benchmark times: the same LoRA (or none) computed different ways.

Every variant exposes the three measured operations on the same inputs:

- ``train_step(ids)``: forward, cross-entropy on next-token labels, backward,
  AdamW step (variants without trainable tensors have none);
- ``forward(ids)``: an inference forward under ``torch.no_grad()``;
- ``generate(prompt, n)``: greedy generation of exactly ``n`` new tokens.

Model instances. PEFT replaces the targeted modules in place and nnsight
installs a controller as every module's ``forward``, so each would tax a model
the others run on. Hence three copies with identical weights: a raw one for
``hooks`` and ``base`` (hooks are installed only while ``hooks`` runs), one
PEFT wraps, and one nnsight wraps for ``toolbox``, ``nnsight`` and
``nnsight-base``. ``peft-in-nnsight`` is a fourth: nnsight wrapping a model
whose targeted modules PEFT's layers have replaced (nnsight's ``peft=``). The
adapters of every variant start from the same tensors.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["AdapterInit", "Variant", "RawVariant", "HooksVariant", "PeftVariant", "TracedVariant", "ToolboxVariant", "PlainNnsightVariant", "PeftInNnsightVariant", "Models", "build_models", "build_variants", "adapter_init", "VARIANT_ORDER"]

#: Column order in reports: the package first, then the alternatives a user weighs
#: it against (PEFT inside nnsight, then raw PEFT), then the references.
VARIANT_ORDER = ("toolbox", "toolbox-merged", "peft-in-nnsight", "peft", "hooks", "nnsight", "nnsight-base", "base")


@dataclass
class AdapterInit:
    """The starting ``WA`` (in, r) and ``WB`` (r, out) of every adapter, by Hugging Face path."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def paths(self) -> list[str]:
        return list(self.weights)


@dataclass
class Models:
    """The copies of one random-weight model the variants run on."""

    raw: torch.nn.Module  # hooks and base; PEFT wraps a copy of it
    nnsight: Any  # LanguageModel around another copy
    pad_token_id: int


class Variant(abc.ABC):
    """One way of computing the model (with or without the adapters)."""

    name = "variant"
    trains = True

    def train_step(self, ids: torch.Tensor) -> None:
        raise TypeError(f"`{self.name}` has nothing to train.")

    @abc.abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``ids`` under ``torch.no_grad()``."""

    @abc.abstractmethod
    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        """Greedy generation of exactly ``n`` new tokens after ``prompt``."""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Set-up around each timed call, outside the timer (e.g. installing hooks)."""
        yield

    def parameters(self) -> list[torch.nn.Parameter]:
        return []


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token, in float32."""
    # (B, T-1, V) against (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class Trainer:
    """The shared optimisation half of a training step."""

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def generate_kwargs(prompt: torch.Tensor, n: int, pad_token_id: int) -> dict[str, Any]:
    """Greedy, exactly ``n`` new tokens (``min_new_tokens`` keeps EOS from ending it early)."""
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)


class RawVariant(Variant):
    """A plain transformers model: ``base``, and the model under ``hooks`` and ``peft``."""

    def __init__(self, name: str, model: torch.nn.Module, pad_token_id: int, parameters: list | None = None) -> None:
        self.name = name
        self.model = model
        self.pad_token_id = pad_token_id
        self.trains = bool(parameters)
        self.trainer = Trainer(parameters) if parameters else None
        self._parameters = parameters or []

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._parameters

    def train_step(self, ids: torch.Tensor) -> None:
        if self.trainer is None:
            Variant.train_step(self, ids)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        self.trainer.step(next_token_loss(logits, ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        mask = torch.ones_like(prompt)
        return self.model.generate(input_ids=prompt, attention_mask=mask, **generate_kwargs(prompt, n, self.pad_token_id))


class HooksVariant(RawVariant):
    """Plain torch forward hooks adding ``x @ A @ B`` on the raw model: the lower
    bound on what adding the delta costs."""

    def __init__(self, model: torch.nn.Module, init: AdapterInit, pad_token_id: int) -> None:
        self.params = {path: [torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())] for path, (a, b) in init.weights.items()}
        RawVariant.__init__(self, "hooks", model, pad_token_id, [p for pair in self.params.values() for p in pair])
        self.handles: list[Any] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for path, (A, B) in self.params.items():
            self.handles.append(self.model.get_submodule(path).register_forward_hook(delta_hook(A, B)))
        try:
            yield
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()


def delta_hook(A: torch.Tensor, B: torch.Tensor) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # (B, T, in) @ (in, r) @ (r, out), summed in the adapter's dtype and cast back, as PEFT does
        return (output + args[0].to(A.dtype) @ A @ B).to(output.dtype)

    return hook


class PeftVariant(RawVariant):
    """PEFT's LoRA (``get_peft_model``) with the same starting weights, scale 1."""

    def __init__(self, source: torch.nn.Module, init: AdapterInit, r: int, pad_token_id: int) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=r, lora_alpha=r, target_modules=init.paths, lora_dropout=0.0)  # scale = alpha / r = 1
        model = get_peft_model(copy.deepcopy(source), config)
        with torch.no_grad():
            for path, (a, b) in init.weights.items():
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A["default"].weight.copy_(a.T)  # lora_A.weight is (r, in) = WA.T
                layer.lora_B["default"].weight.copy_(b.T)  # lora_B.weight is (out, r) = WB.T
        parameters = [p for p in model.parameters() if p.requires_grad]
        RawVariant.__init__(self, "peft", model, pad_token_id, parameters)


class TracedVariant(Variant):
    """A variant run through nnsight as users write it: ``with model.trace(...)`` /
    ``with model.generate(...)``, with `intervene` inside; the loss is computed
    after the trace from the saved logits."""

    name = "nnsight-base"
    trains = False

    def __init__(self, model: Any, pad_token_id: int, parameters: list | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.trains = bool(parameters)
        self.trainer = Trainer(parameters) if parameters else None

    def intervene(self) -> None:
        """What runs inside the trace before the logits are read; nothing here."""

    def intervene_in_generation(self, tracer: Any, n: int) -> None:
        """What runs inside ``model.generate(...)`` before the result is read."""
        self.intervene()

    def train_step(self, ids: torch.Tensor) -> None:
        if self.trainer is None:
            Variant.train_step(self, ids)
        with self.model.trace(ids):
            self.intervene()
            logits = self.model.lm_head.output.save()
        self.trainer.step(next_token_loss(logits, ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            with self.model.trace(ids):
                self.intervene()
                logits = self.model.lm_head.output.save()
        return logits

    def generate(self, prompt: torch.Tensor, n: int) -> torch.Tensor:
        with self.model.generate(prompt, **generate_kwargs(prompt, n, self.pad_token_id)) as tracer:
            self.intervene_in_generation(tracer, n)
            ids = tracer.result.save()
        return ids


class ToolboxVariant(TracedVariant):
    """This package as users write it: ``adapters()`` inside the trace."""

    name = "toolbox"

    def __init__(self, model: Any, init: AdapterInit, r: int, pad_token_id: int, *, merged: bool = False) -> None:
        from nnsight_toolbox import LORA

        self.adapters = LORA.on(model, init.paths, r=r)  # full paths: each matches itself
        with torch.no_grad():
            for path, (a, b) in init.weights.items():
                self.adapters[path].WA.copy_(a)
                self.adapters[path].WB.copy_(b)
        self.merged = merged
        if merged:
            self.name = "toolbox-merged"
            self.adapters.merge()
        TracedVariant.__init__(self, model, pad_token_id, None if merged else self.adapters.parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.adapters.parameters()

    def intervene(self) -> None:
        if not self.merged:
            self.adapters()


class PlainNnsightVariant(TracedVariant):
    """nnsight's own intervention form, no package: ``m.output = m.output + x @ A @ B``
    on every target in model order, inside ``tracer.iter[:n]`` when generating."""

    name = "nnsight"

    def __init__(self, model: Any, init: AdapterInit, pad_token_id: int) -> None:
        self.envoys = [model.get(path) for path in init.paths]
        self.params = [(torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())) for a, b in init.weights.values()]
        TracedVariant.__init__(self, model, pad_token_id, self.parameters())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.params for p in pair]

    def intervene(self) -> None:
        for envoy, (A, B) in zip(self.envoys, self.params):
            x = envoy.input
            out = envoy.output
            envoy.output = (out + x.to(A.dtype) @ A @ B).to(out.dtype)

    def intervene_in_generation(self, tracer: Any, n: int) -> None:
        for _ in tracer.iter[:n]:  # a plain intervention acts on one step unless looped
            self.intervene()


class PeftInNnsightVariant(TracedVariant):
    """PEFT's LoRA inside nnsight, as an nnsight user loads a PEFT adapter: the same
    adapters written by `export_peft` and attached with nnsight's ``peft=``, so
    PEFT's layers replace the targeted modules of the traced model; traced with
    no intervention."""

    name = "peft-in-nnsight"

    def __init__(self, models: Models, init: AdapterInit, r: int, pad_token_id: int) -> None:
        from nnsight import LanguageModel

        from nnsight_toolbox import LORA, export_peft

        # Written from LORA objects on the nnsight copy (built, never called, so
        # that copy's traces are untouched); `alpha=1.0` is PEFT's scale 1, as in
        # `PeftVariant`. The directory lives as long as the variant.
        exported = LORA.on(models.nnsight, init.paths, r=r)
        with torch.no_grad():
            for path, (a, b) in init.weights.items():
                exported[path].WA.copy_(a)
                exported[path].WB.copy_(b)
        self.directory = tempfile.TemporaryDirectory(prefix="peft-in-nnsight-")
        export_peft(exported, self.directory.name, alpha=1.0)
        del exported
        model = LanguageModel(copy.deepcopy(models.raw), tokenizer=models.nnsight.tokenizer, peft=self.directory.name)
        # `export_peft` writes `inference_mode: true`, so PEFT loads the adapter
        # frozen; a user training it inside nnsight switches it on, as here.
        lora = [p for name, p in model._module.named_parameters() if ".lora_" in name]
        if len(lora) != 2 * len(init.paths):
            raise RuntimeError(f"`peft=` attached {len(lora)} LoRA tensors; expected A and B for each of {len(init.paths)} adapters.")
        for p in lora:
            p.requires_grad_(True)
        self._parameters = lora
        TracedVariant.__init__(self, model, pad_token_id, lora)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._parameters


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def build_models(config: Any) -> Models:
    """A random-weight model (seeded), frozen and in eval mode, and an nnsight-wrapped copy.

    PEFT's variant makes its own copy (`PeftVariant`), the merged one another.
    """
    import transformers
    from nnsight import LanguageModel

    from nnsight_toolbox.testing import byte_level_tokenizer

    torch.manual_seed(config.seed)
    hf_config = config.hf_config()
    with torch.device(config.device):
        raw = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=config.dtype)
    raw.requires_grad_(False)
    raw.eval()  # from_config builds in train mode: dropout would make every run differ
    pad = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, int) else 0
    wrapped = LanguageModel(copy.deepcopy(raw), tokenizer=byte_level_tokenizer())
    return Models(raw=raw, nnsight=wrapped, pad_token_id=pad)


def adapter_init(model: Any, targets: Any, r: int, seed: int, layers: Any = None) -> AdapterInit:
    """Starting weights for an adapter on each module ``targets`` picks (PEFT's rule).

    ``WA`` is PEFT's kaiming-uniform; ``WB`` is small and random rather than
    zero, so every variant's delta is real and the agreement check means something.
    """
    from nnsight_toolbox.optim.dims import weight_dims
    from nnsight_toolbox.optim.targets import match_targets

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for path in match_targets(model, list(targets), layers):
        dims = weight_dims(model._module.get_submodule(path))
        bound = dims.input_dim**-0.5
        a = (torch.rand(dims.input_dim, r, generator=generator) * 2 - 1) * bound
        b = torch.randn(r, dims.output_dim, generator=generator) * 0.02
        device = next(model._module.get_submodule(path).parameters()).device
        weights[path] = (a.to(device), b.to(device))
    return AdapterInit(weights)


def build_variants(models: Models, init: AdapterInit, r: int, names: tuple[str, ...]) -> dict[str, Variant]:
    """The variants called ``names`` on ``models``, adapters starting at ``init``, in report order."""
    pad = models.pad_token_id
    build = {
        "toolbox": lambda: ToolboxVariant(models.nnsight, init, r, pad),
        "toolbox-merged": lambda: ToolboxVariant(copy_nnsight_model(models), init, r, pad, merged=True),
        "peft-in-nnsight": lambda: PeftInNnsightVariant(models, init, r, pad),
        "peft": lambda: PeftVariant(models.raw, init, r, pad),
        "hooks": lambda: HooksVariant(models.raw, init, pad),
        "nnsight": lambda: PlainNnsightVariant(models.nnsight, init, pad),
        "nnsight-base": lambda: TracedVariant(models.nnsight, pad),
        "base": lambda: RawVariant("base", models.raw, pad),
    }
    unknown = set(names) - set(build)
    if unknown:
        raise ValueError(f"Unknown variants {sorted(unknown)}; choose from {list(build)}.")
    return {name: build[name]() for name in VARIANT_ORDER if name in names}


def copy_nnsight_model(models: Models) -> Any:
    """A fourth copy, wrapped by nnsight, for the merged variant to change the weights of."""
    from nnsight import LanguageModel

    return LanguageModel(copy.deepcopy(models.raw), tokenizer=models.nnsight.tokenizer)
