"""Which axis of a module's output holds the batch, established once per model by a scan.

Row scoping (`rows`) narrows a module's output to an invoke's rows. Most
modules are batch-first, ``(B, T, H)``; a few are time-first, ``(T, B, H)``
(FSMT's encoder and decoder layers). When ``T == B`` the two have the same
shape, so the running pass alone cannot tell them apart. So when an
intervention is built, one scan of its model (fake tensors: no weights are
read) runs a batch whose size and sequence lengths all differ (2 rows; 3
encoder tokens and 5 decoder tokens), and each module's output axis of size 2
is recorded:

- `BATCH_FIRST` (``0``): the batch is dim 0;
- `TIME_FIRST` (``1``): dim 0 is the sequence and dim 1 the batch;
- `OTHER`: neither (a flattened ``(B*T, H)`` layer, a routed expert, a pooled
  head): run time decides from the pass's lengths, as before (`rows.row_span`);
- ``None``: unknown, where the scan could not run; run time then refuses the
  one shape it cannot read, a ``(n, n, ...)`` output on scoped rows.

The scan runs once per model (cached on the Hugging Face model), and
the answer travels with the intervention (`ModuleIntervention.batch_axis`),
so a remote server uses the client's scan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .dims import first_tensor, scan_inputs

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

BATCH_FIRST = 0
TIME_FIRST = 1
OTHER = "other"

#: The scan's batch size and sequence lengths: all different, and no product equal to another.
SCAN_ROWS, SCAN_TOKENS, SCAN_DECODER_TOKENS = 2, 3, 5

#: The attribute, on the Hugging Face model, that caches its scan: it lives and dies with the model.
SCANNED = "_nnsight_toolbox_batch_axes"


def batch_axis(envoy: "Envoy") -> Any:
    """``envoy``'s output batch axis: `BATCH_FIRST`, `TIME_FIRST`, `OTHER`, or ``None`` if it could not be established.

    Examples:
        >>> batch_axis(model.transformer.h[0])   # GPT-2's layers are batch-first
        0
    """
    root = envoy.root
    hf_model = root._module
    axes = hf_model.__dict__.get(SCANNED)
    if axes is None:
        axes = scan_axes(root)
        if axes:  # an empty answer (a scan inside a trace) is asked again next time
            hf_model.__dict__[SCANNED] = axes
    return axes.get(envoy.path)


def axis_of(tensor: Any, rows: int = SCAN_ROWS) -> Any:
    """The batch axis of one scanned tensor of ``rows`` rows.

    Examples:
        >>> axis_of(torch.zeros(2, 3, 8)), axis_of(torch.zeros(3, 2, 8)), axis_of(torch.zeros(6, 8))
        (0, 1, 'other')
    """
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return OTHER
    if tensor.shape[0] == rows:
        return BATCH_FIRST
    if tensor.dim() >= 3 and tensor.shape[1] == rows and tensor.shape[0] in (SCAN_TOKENS, SCAN_DECODER_TOKENS):
        return TIME_FIRST
    return OTHER


def scan_axes(root: "Envoy") -> dict[str, Any]:
    """Every module's output batch axis, from one nnsight scan of ``root``'s model; empty if the scan cannot run."""
    if root.interleaver.interleaving:
        return {}
    inputs = scan_inputs(root._module, SCAN_ROWS, SCAN_TOKENS, SCAN_DECODER_TOKENS)
    if inputs is None:
        return {}
    paths = [envoy.path for envoy in root.modules() if envoy is not root]
    if hasattr(type(root), "scan"):  # nnsight's language-model wrappers
        try:
            with root.scan(**inputs) as tracer:
                cache = tracer.cache(modules=paths)
            return {path: axis_of(first_tensor(cache[path].output)) for path in paths if path in cache}
        except Exception:  # third-party code under fake tensors (a routed MoE): try a real run
            pass
    return _real_run_axes(root, inputs)


def _real_run_axes(root: "Envoy", inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`scan_axes` by one real forward under ``no_grad``, with plain torch hooks; empty if it cannot run (weights on meta)."""
    hf_model = root._module
    parameters = list(hf_model.parameters())
    if any(p.is_meta for p in parameters):
        return {}
    device = parameters[0].device if parameters else torch.device("cpu")
    prefix = root.path
    seen: dict[str, Any] = {}

    def hook_for(path: str):
        def hook(module, args, output):
            seen.setdefault(path, axis_of(first_tensor(output)))

        return hook

    handles = [module.register_forward_hook(hook_for(f"{prefix}.{name}")) for name, module in hf_model.named_modules() if name]
    try:
        with torch.no_grad():
            hf_model(**{key: value.to(device) for key, value in inputs.items()})
    except Exception:
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return seen
