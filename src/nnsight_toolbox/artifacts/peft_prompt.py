"""PEFT prompt tuning (``PROMPT_TUNING``) read as a `SoftPrompt`.

PEFT prepends ``num_virtual_tokens`` trainable embeddings to ``inputs_embeds``
and ones to the attention mask, so the virtual tokens take positions 0…n-1
and are attended like real tokens. A `SoftPrompt` on the input embedding that
replaces ``n`` placeholder tokens at the start of the prompt computes the same
logits, on every position. Files::

    adapter_config.json         peft_type "PROMPT_TUNING", num_virtual_tokens, token_dim, ...
    adapter_model.safetensors   prompt_embeddings (num_virtual_tokens, token_dim)

``prompt_tuning_init`` (RANDOM, TEXT, SAMPLE_VOCAB) only chose the starting
values, so any is read. Options that change the forward are refused by name:
a task other than ``CAUSAL_LM`` (another head, or an encoder-decoder with two
sets of virtual tokens), ``num_transformer_submodules`` other than 1, and
``modules_to_save`` (PEFT then also trains copies of model modules).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .files import check_finite, read_header, read_json, read_tensors, require_directory, require_file, saved_directory

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from ..optim.soft_prompt import SoftPrompt

__all__ = ["is_prompt_tuning", "import_prompt_tuning"]

CONFIG_FILE, WEIGHTS_FILE, KEY = "adapter_config.json", "adapter_model.safetensors", "prompt_embeddings"


def is_prompt_tuning(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT config whose ``peft_type`` is ``PROMPT_TUNING``."""
    path = saved_directory(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return read_json(path).get("peft_type") == "PROMPT_TUNING"
    except ValueError:
        return False  # the LoRA reader reports a damaged config with its own message


def import_prompt_tuning(model: "Envoy", directory: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> "SoftPrompt":
    """A `SoftPrompt` on ``model``'s input embedding holding a PEFT prompt-tuning adapter's vectors (eval mode).

    Examples:
        >>> import copy
        >>> from peft import PromptTuningConfig, get_peft_model
        >>> peft_model = get_peft_model(copy.deepcopy(model._module), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
        >>> peft_model.save_pretrained("prompt")
        >>> soft = import_prompt_tuning(model, "prompt")
        >>> soft.n, soft.path
        (4, 'model.transformer.wte')
    """
    from ..optim.soft_prompt import SoftPrompt

    hint = "A PEFT prompt-tuning directory holds `adapter_config.json` and `adapter_model.safetensors`."
    directory = require_directory(saved_directory(directory), "a PEFT adapter", hint)
    config_path = require_file(directory / CONFIG_FILE, "the adapter's PEFT config", hint)
    weights_path = require_file(directory / WEIGHTS_FILE, "the adapter's tensors", hint)
    config = read_json(config_path)
    n = _check_config(config, config_path)
    embedding = _input_embedding(model)
    width = embedding._module.weight.shape[1] if isinstance(embedding._module, torch.nn.Embedding) else None
    header = read_header(weights_path)
    if set(header) != {KEY}:
        raise ValueError(f"`{weights_path}` should hold exactly `{KEY}` for prompt tuning, but holds {sorted(header)}.")
    shape = tuple(header[KEY].shape)
    if shape != (n, config.get("token_dim", shape[-1])) or (width is not None and shape[1] != width):
        raise ValueError(
            f"`{weights_path}`: `{KEY}` has shape {shape}, but `{config_path}` says num_virtual_tokens={n}, "
            f"token_dim={config.get('token_dim')!r}, and `{embedding.path}` is {width} wide. "
            f"Import it onto the model it was trained on."
        )
    if not header[KEY].is_floating_point():
        raise ValueError(f"`{weights_path}`: `{KEY}` is {header[KEY].code}, not a floating tensor.")
    vectors = read_tensors(weights_path)[KEY]
    check_finite(vectors, KEY, weights_path)
    soft = SoftPrompt(embedding, n, dtype=dtype, output_dim=shape[1])
    with torch.no_grad():
        soft.embeddings.copy_(vectors.to(dtype))
    return soft.eval()


def _check_config(config: dict[str, Any], path: Path) -> int:
    """``num_virtual_tokens``, once every option that changes PEFT's forward is refused by name."""
    n = config.get("num_virtual_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`{path}`: `num_virtual_tokens` should be a positive int, got {n!r}.")
    refusals = []
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        refusals.append(f"`task_type` {config['task_type']!r} (only `CAUSAL_LM` is the same computation as a soft prompt on a decoder's embedding)")
    if config.get("num_transformer_submodules") not in (None, 1):
        refusals.append(f"`num_transformer_submodules` {config['num_transformer_submodules']!r} (virtual tokens for an encoder and a decoder)")
    if config.get("modules_to_save"):
        refusals.append(f"`modules_to_save` {config['modules_to_save']!r} (PEFT also trains copies of those modules)")
    if refusals:
        raise ValueError(
            f"`{path}`: this PROMPT_TUNING adapter uses " + "; ".join(refusals) + ", which change PEFT's forward "
            f"beyond prepending vectors, so a `SoftPrompt` would not compute what `PeftModel` does. "
            f"Use it with PEFT itself."
        )
    return n


def _input_embedding(model: "Envoy") -> "Envoy":
    """The Envoy of the model's input embedding (``get_input_embeddings()``)."""
    from ..optim.paths import envoy_at

    hf_model = model._module
    embedding = hf_model.get_input_embeddings() if callable(getattr(hf_model, "get_input_embeddings", None)) else None
    name = next((name for name, module in hf_model.named_modules() if module is embedding and name), None)
    if name is None:
        raise ValueError(
            f"`import_peft` of a PROMPT_TUNING adapter needs the model's input embedding "
            f"(`get_input_embeddings()`), which `{type(hf_model).__name__}` does not name."
        )
    return envoy_at(model, name)
