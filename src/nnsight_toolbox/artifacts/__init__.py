"""Adapters as artifacts: save and load, PEFT export and import, merging.

- `native`: this package's own format (safetensors + a JSON sidecar), for any kind
  on any module, one intervention or a collection; earlier versions' files too.
- `peft_format`: PEFT's LoRA format, for Linear, Conv1D and Embedding targets.
- `merging`: folding an adapter into its layer's weight and back out.

Examples:
    `model` here is `load_tiny_model()`, a 32-wide tiny GPT-2 wrapped in nnsight (`nnsight_toolbox.testing`).

    >>> c_fc = LORA(model.transformer.h[0].mlp.c_fc, r=8)
    >>> c_fc.save("adapters/c_fc")
    >>> c_fc = LORA.load("adapters/c_fc", model.transformer.h[0].mlp.c_fc)
    >>> export_peft(c_fc, "peft-adapter")
    PosixPath('peft-adapter')
    >>> loras = import_peft(model, "peft-adapter")
    >>> c_fc.merge()
    >>> c_fc.unmerge()
"""

from .peft_format import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
