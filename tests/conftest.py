"""Tiny offline models and an independent reference for LoRA.

The reference is a plain torch forward hook on the raw Hugging Face module that
adds ``alpha * input @ WA @ WB`` to the output. It shares no code with the
package: if `LORA` and the hook agree, the package computes what LoRA means.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from nnsight import LanguageModel
from nnsight.intervention.source import Controller
from transformers import AutoTokenizer

from nnsight_toolbox.optim.activation import AdapterController
from nnsight_toolbox.testing import save_tiny_model


def pytest_configure(config):
    # The fixtures below load with `LanguageModel`, on purpose: nnsight 0.8
    # deprecates it but users still write it, and the package must keep working
    # with it. The documentation and its examples use `TransformersModel`; their
    # tests turn nnsight's deprecation warnings into errors with a
    # `pytest.mark.filterwarnings`, which takes precedence over this line.
    config.addinivalue_line("filterwarnings", "ignore:LanguageModel is deprecated:FutureWarning")


#: Per family: an MLP block, a Linear (or Conv1D) inside it that is not square,
#: a decoder layer, and an attention module (whose output is a tuple).
TARGETS = {
    "gpt2": {
        "mlp": "transformer.h.0.mlp",
        "linear": "transformer.h.1.mlp.c_fc",
        "layer": "transformer.h.1",
        "attn": "transformer.h.0.attn",
        "embedding": "transformer.wte",
    },
    "llama": {
        "mlp": "model.layers.0.mlp",
        "linear": "model.layers.1.mlp.up_proj",
        "layer": "model.layers.1",
        "attn": "model.layers.0.self_attn",
        "embedding": "model.embed_tokens",
    },
    "qwen2": {
        "mlp": "model.layers.0.mlp",
        "linear": "model.layers.0.self_attn.v_proj",
        "layer": "model.layers.0",
        "attn": "model.layers.1.self_attn",
        "embedding": "model.embed_tokens",
    },
}


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: save_tiny_model(family, root / family) for family in TARGETS}


def load(path: str, **kwargs) -> LanguageModel:
    return LanguageModel(path, tokenizer=AutoTokenizer.from_pretrained(path), dispatch=True, **kwargs)


#: Every test on the `family` fixture runs on GPT-2 in the quick subset; the other
#: families' runs (the whole-family sweeps) are marked `slow`.
QUICK_FAMILY = "gpt2"


def family_params(families) -> list:
    """``families`` as fixture or parametrize values, all but `QUICK_FAMILY` marked `slow`."""
    return [f if f == QUICK_FAMILY else pytest.param(f, marks=pytest.mark.slow) for f in families]


@pytest.fixture(params=family_params(sorted(TARGETS)))
def family(request) -> str:
    return request.param


@pytest.fixture
def model(model_paths, family) -> LanguageModel:
    return load(model_paths[family])


@pytest.fixture
def gpt2(model_paths) -> LanguageModel:
    return load(model_paths["gpt2"])


def envoy_at(model: LanguageModel, path: str):
    return model.get(path)


def randomize(lora, seed: int = 0, scale: float = 0.5) -> None:
    """Give WB non-zero values so the adapter changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.WB.copy_(torch.randn(lora.WB.shape, generator=generator) * scale)


@contextlib.contextmanager
def reference_hook(model: LanguageModel, path: str, WA: torch.Tensor, WB: torch.Tensor, alpha: float = 1.0, embedding: bool = False):
    """Plain torch forward hook adding ``alpha * input @ WA @ WB`` to the raw module's output."""
    module = model._module.get_submodule(path)

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        if embedding:
            delta = alpha * (WA[x] @ WB)
        else:
            delta = alpha * (x.to(WA.dtype) @ WA @ WB)
        if isinstance(output, tuple):
            return ((output[0].to(WA.dtype) + delta).to(output[0].dtype), *output[1:])
        return (output.to(WA.dtype) + delta).to(output.dtype)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def hf_logits(model: LanguageModel, prompt) -> torch.Tensor:
    """Logits of the raw Hugging Face model, outside any trace."""
    batch = model.tokenizer(prompt, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model._module(**batch).logits


def hf_generate(model: LanguageModel, prompt, max_new_tokens: int) -> torch.Tensor:
    batch = model.tokenizer(prompt, return_tensors="pt", padding=True)
    return model._module.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.tokenizer.eos_token_id)


def assert_row_generated(row: torch.Tensor, alone: torch.Tensor, model: LanguageModel) -> None:
    """A row of a batched generation is what its prompt generates alone: the same tokens,
    then only padding where the lone run stopped at its end-of-sequence token."""
    alone = alone.flatten()
    assert torch.equal(row[: alone.numel()], alone), (row.tolist(), alone.tolist())
    padding = {model.tokenizer.pad_token_id, model.tokenizer.eos_token_id} - {None}
    assert all(token in padding for token in row[alone.numel() :].tolist()), (row.tolist(), alone.tolist())


def randomized(adapters, scale: float = 0.5):
    """Randomize every adapter of a `LoraSet` (a different seed each); returns the set."""
    for seed, lora in enumerate(adapters.values()):
        randomize(lora, seed=seed, scale=scale)
    return adapters


@contextlib.contextmanager
def reference_hooks(model, adapters, alpha: float = 1.0):
    """One plain torch hook per adapter, on the raw modules."""
    with contextlib.ExitStack() as stack:
        for path, lora in adapters.items():
            hf_path = path.split(".", 1)[1]
            stack.enter_context(reference_hook(model, hf_path, lora.WA.detach(), lora.WB.detach(), alpha=alpha))
        yield


@contextlib.contextmanager
def forwards_seen(module: torch.nn.Module):
    """The kind of forward that ran ``module`` at each call: "package", "nnsight" or "raw"."""
    kinds = []

    def pre_hook(mod, args):
        forward = mod.__dict__.get("forward")
        kinds.append("package" if isinstance(forward, AdapterController) else "nnsight" if isinstance(forward, Controller) else "raw")

    handle = module.register_forward_pre_hook(pre_hook)
    try:
        yield kinds
    finally:
        handle.remove()
