"""How wide a module's input and output are, without running the model for real.

An adapter on a module needs ``input_dim`` (the last dimension of the module's
first input) and ``output_dim`` (the last dimension of its output, or of the
first element of a tuple output).

- Layers with a weight say it directly: `torch.nn.Linear`, GPT-2's ``Conv1D``
  (weight ``(in, out)``, the transpose of Linear's) and `torch.nn.Embedding`
  (whose input is token ids, so ``input_dim`` is the vocabulary size).
- Anything else (an MLP block, a decoder layer, an attention module) is measured
  with an nnsight scan on a few token ids: one forward on fake tensors, which
  loads no weights and so works on a model built on the meta device. Where fake
  tensors cannot run the model (routed experts, kernels without a fake version),
  one real forward with plain torch hooks measures it instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy


class ModuleDims:
    """The widths an adapter on a module needs.

    A plain class rather than a dataclass: this package travels to remote
    servers as source, and a dataclass's generated methods have none, so they
    would travel as bytecode, which another Python version cannot load.

    Attributes:
        input_dim: Last dimension of the module's first input (the vocabulary
            size for an embedding, whose input is token ids).
        output_dim: Last dimension of the module's output.
        takes_ids: Whether the input is integer token ids (an embedding).
    """

    __slots__ = ("input_dim", "output_dim", "takes_ids")

    def __init__(self, input_dim: int, output_dim: int, takes_ids: bool = False) -> None:
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.takes_ids = takes_ids

    def __repr__(self) -> str:
        return f"ModuleDims(input_dim={self.input_dim}, output_dim={self.output_dim}, takes_ids={self.takes_ids})"


def weight_dims(module: torch.nn.Module) -> ModuleDims | None:
    """Widths read off a known layer's weight, or ``None`` for any other module."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return ModuleDims(module.in_features, module.out_features)
    if isinstance(module, Conv1D):  # weight (in, out)
        return ModuleDims(module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, torch.nn.Embedding):
        return ModuleDims(module.num_embeddings, module.embedding_dim, takes_ids=True)
    return None


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor an adapter acts on: ``value`` itself, or the first element of a
    tuple, list or ``ModelOutput``; ``None`` when there is none."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput is an ordered dict
        value = tuple(value.values())
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def scan_dims(envoy: "Envoy", kind: str = "LORA", reads_input: bool = True) -> ModuleDims:
    """Widths measured by running the whole model on a few tokens (see `scan_many_dims`)."""
    return scan_many_dims([envoy], kind, reads_input)[envoy.path]


def scan_many_dims(envoys: "list[Envoy]", kind: str = "LORA", reads_input: bool = True) -> dict[str, ModuleDims]:
    """Widths of several modules of one model, measured by a single run on a few tokens.

    First an nnsight scan (fake tensors: no weights are read, so a model still on
    the meta device works); where fake tensors cannot run the model (a routed MoE
    with data-dependent shapes, a kernel with no fake version) and the weights are
    real, one real forward under ``no_grad`` with plain torch hooks. The inputs fit
    the model: token ids from its config, plus decoder ids for an encoder-decoder.
    ``kind`` is what asks (for the messages); a kind that ``reads_input`` needs a
    tensor as the module's first input.
    """
    root = envoys[0].root
    first = envoys[0]
    if root.interleaver.interleaving:
        raise RuntimeError(
            f"Cannot infer the widths of `{first.path}` ({type(first._module).__name__}) inside "
            f"a running trace: that needs a run of the model of its own. Build the `{kind}` "
            f"before the trace, then call it inside, or pass {_widths_hint(kind, reads_input)}."
        )
    inputs = scan_inputs(root._module)
    if inputs is None:
        raise _cannot_infer(first, "the model has no config with a `vocab_size` to build token inputs from", kind, reads_input)
    paths = [envoy.path for envoy in envoys]
    try:
        with root.scan(**inputs) as tracer:
            cache = tracer.cache(modules=paths, include_inputs=True)
        return {path: dims_from_values(path, cache[path].input, cache[path].output, kind, reads_input) for path in paths}
    except TypeError:
        raise  # a module whose input or output holds no tensor: `dims_from_values` says so
    except Exception as error:  # third-party code under fake tensors: any error can come out
        if _on_meta(root._module):
            raise _cannot_infer(first, f"a scan on fake tensors failed ({_summary(error)}) and the weights are not loaded yet for a real run", kind, reads_input) from error
        scan_error = error
    try:
        return real_run_dims(root, envoys, inputs, kind, reads_input)
    except TypeError:
        raise
    except Exception as error:
        raise _cannot_infer(first, f"a scan on fake tensors failed ({_summary(scan_error)}), and so did a real run on a few tokens ({_summary(error)})", kind, reads_input) from error


def scan_inputs(hf_model: torch.nn.Module, rows: int = 1, tokens: int = 8, decoder_tokens: int = 2) -> dict[str, torch.Tensor] | None:
    """``rows`` x ``tokens`` token ids that fit ``hf_model``, as keyword inputs, or ``None`` without a config to build them from.

    The default, 8 tokens of one row, reaches most routed experts; an encoder-decoder also gets ``decoder_tokens`` decoder ids.
    """
    config = getattr(hf_model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        return None
    ids = (torch.arange(1, 1 + rows * tokens) % vocab).reshape(rows, tokens)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        start = next((t for t in (getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)) if isinstance(t, int)), 0)
        inputs["decoder_input_ids"] = torch.full((rows, decoder_tokens), start)
    return inputs


def real_run_dims(root: "Envoy", envoys: "list[Envoy]", inputs: dict[str, torch.Tensor], kind: str = "LORA", reads_input: bool = True) -> dict[str, ModuleDims]:
    """Widths read by plain torch hooks during one real forward of the model, under ``no_grad``."""
    hf_model = root._module
    device = next((p.device for p in hf_model.parameters()), torch.device("cpu"))
    seen: dict[str, ModuleDims] = {}

    def hook_for(path: str):
        def hook(module, args, kwargs, output):
            if path not in seen:
                seen[path] = dims_from_values(path, args[0] if args else next(iter(kwargs.values()), None), output, kind, reads_input)

        return hook

    handles = [envoy._module.register_forward_hook(hook_for(envoy.path), with_kwargs=True) for envoy in envoys]
    try:
        with torch.no_grad():
            hf_model(**{key: value.to(device) for key, value in inputs.items()})
    finally:
        for handle in handles:
            handle.remove()
    missing = [envoy for envoy in envoys if envoy.path not in seen]
    if missing:
        raise ValueError(f"`{missing[0].path}` did not run in a forward on {inputs['input_ids'].shape[1]} tokens (a routed expert that no token reached, or a module the forward skips)")
    return seen


def _on_meta(hf_model: torch.nn.Module) -> bool:
    return any(p.is_meta for p in hf_model.parameters())


def _summary(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def _widths_hint(kind: str, reads_input: bool) -> str:
    if reads_input:
        return f"`input_dim=` and `output_dim=` yourself, `{kind}(module, ..., input_dim=..., output_dim=...)`: the last dimension of the module's first input and of its output"
    return f"`output_dim=` yourself, `{kind}(module, ..., output_dim=...)`: the last dimension of the module's output"


def _cannot_infer(envoy: "Envoy", why: str, kind: str = "LORA", reads_input: bool = True) -> ValueError:
    widths = "input and output widths" if reads_input else "output width"
    return ValueError(
        f"Cannot infer the {widths} of `{envoy.path}` ({type(envoy._module).__name__}) for a `{kind}`: "
        f"it is not a Linear, Conv1D or Embedding, and {why}. Pass {_widths_hint(kind, reads_input)}."
    )


def dims_from_values(path: str, input: Any, output: Any, kind: str = "LORA", reads_input: bool = True) -> ModuleDims:
    """Widths from a module's first input and its output, with clear errors.

    A kind that does not ``reads_input`` needs only the output: its input width is 0 where the input holds none.
    """
    out = first_tensor(output)
    if out is None:
        raise TypeError(
            f"`{path}` returns a {type(output).__name__} that holds no tensor (a "
            f"tuple's first element must be one), so a `{kind}` has nothing to "
            f"change. Put it on a module whose output is a tensor."
        )
    if not reads_input:
        return ModuleDims(input.shape[-1] if isinstance(input, torch.Tensor) and input.dim() else 0, out.shape[-1])
    if not isinstance(input, torch.Tensor):
        raise TypeError(
            f"`{path}` takes a {type(input).__name__} as its first input, not a "
            f"tensor, so a `{kind}` has nothing to multiply. Put it on a "
            f"module whose first input is a tensor."
        )
    if input.is_floating_point():
        return ModuleDims(input.shape[-1], out.shape[-1])
    raise TypeError(
        f"`{path}` takes integer token ids, not activations. A `{kind}` on token ids "
        f"needs an `nn.Embedding`; put it on the embedding or on a later module."
    )


def infer_dims(envoy: "Envoy", kind: str = "LORA", reads_input: bool = True) -> ModuleDims:
    """The widths for ``envoy``'s module: from its weight when it has a known one,
    otherwise from a scan. ``kind`` names what asks, in the messages."""
    return weight_dims(envoy._module) or scan_dims(envoy, kind, reads_input)


def infer_many_dims(envoys: "list[Envoy]", kind: str = "LORA") -> dict[str, ModuleDims]:
    """`infer_dims` for several modules of one model, with at most one scan."""
    dims = {envoy.path: weight_dims(envoy._module) for envoy in envoys}
    unknown = [envoy for envoy in envoys if dims[envoy.path] is None]
    if unknown:
        dims.update(scan_many_dims(unknown, kind))
    return dims
