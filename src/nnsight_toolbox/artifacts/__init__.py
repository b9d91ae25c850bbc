"""Adapters as artifacts: save and load, PEFT export and import, merging.

- `native`: this package's own format (safetensors + a JSON sidecar), for any target.
- `peft_format`: PEFT's LoRA format, for Linear, Conv1D and Embedding targets.
- `merging`: folding an adapter into its layer's weight and back out.

Examples:
    >>> lora.save("adapters/c_fc")
    >>> lora = LORA.load("adapters/c_fc", model.transformer.h[0].mlp.c_fc)
    >>> export_peft(lora, "peft-adapter")
    >>> loras = import_peft(model, "peft-adapter")
"""

from .peft_format import export_peft, import_peft

__all__ = ["export_peft", "import_peft"]
