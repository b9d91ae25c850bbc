"""Tiny offline models for tests, examples, notebooks and benchmarks.

No model hub is needed: a model is built from a config with random weights,
paired with a byte-level tokenizer, and saved to a folder, so that
``TransformersModel(folder, task="text-generation")`` goes through the real
loading path. `load_tiny_model` does both in one line.

Examples:
    >>> from nnsight_toolbox.testing import load_tiny_model, save_tiny_model
    >>> model = load_tiny_model("gpt2")                    # a TransformersModel, weights loaded
    >>> path = save_tiny_model("gpt2", "/tmp/tiny-gpt2")   # or just the folder, for your own loading
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["FAMILIES", "byte_level_tokenizer", "tiny_config", "save_tiny_model", "load_tiny_model"]

FAMILIES = ("gpt2", "llama", "qwen2", "gpt_neox")
"""The model families `tiny_config` and `save_tiny_model` know.

Examples:
    >>> "llama" in FAMILIES
    True
"""

EOS = "<|endoftext|>"


def byte_level_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges: one token per byte, plus ``<|endoftext|>``.

    The alphabet is sorted because ``ByteLevel.alphabet()`` returns it in a
    different order on each call, which would change token ids between runs.

    Examples:
        >>> tok = byte_level_tokenizer()
        >>> len(tok(" Paris").input_ids)   # one id per byte
        6
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tokenizer.pad_token = EOS
    return tokenizer


def tiny_config(family: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, vocab_size: int = 257, **overrides: Any) -> Any:
    """A small transformers config of ``family`` (one of `FAMILIES`).

    Examples:
        >>> tiny_config("llama", hidden=64).hidden_size
        64
    """
    import transformers

    eos = vocab_size - 1
    common = dict(vocab_size=vocab_size, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256, **common)
    elif family in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        config = cls(
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=256,
            tie_word_embeddings=False,
            **common,
        )
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            **common,
        )
    else:
        raise ValueError(f"Unknown family {family!r}; choose one of {FAMILIES}.")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_model(family: str, folder: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config: Any) -> str:
    """Build a random-weight model of ``family`` and save it, with its tokenizer, to ``folder``.

    Returns the folder as a string, ready for
    ``TransformersModel(folder, task="text-generation")``.

    Examples:
        >>> path = save_tiny_model("llama", "/tmp/tiny-llama", hidden=64)
        >>> from nnsight import TransformersModel
        >>> model = TransformersModel(path, task="text-generation", dispatch=True)
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config)).to(dtype)
    with _no_progress_bars():  # "Writing model shards"
        model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return str(folder)


def load_tiny_model(
    family: str = "gpt2",
    folder: str | Path | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dispatch: bool = True,
    **config: Any,
) -> Any:
    """A tiny random-weight model of ``family``, saved to ``folder`` and loaded as nnsight's `TransformersModel`.

    The one-line version of `save_tiny_model` followed by
    ``TransformersModel(folder, task="text-generation", tokenizer=..., dispatch=True)``,
    the class nnsight 0.8 recommends (returned as one). With no ``folder``, a fresh temporary one
    is used; ``model.repo_id`` is the folder either way. The same ``seed`` and
    ``config`` give the same weights. transformers' progress bars stay quiet.

    Args:
        family: One of `FAMILIES`.
        folder: Where to save the model; a new temporary folder if omitted.
        seed: Seeds the random weights.
        dtype: The dtype of the weights, e.g. ``torch.bfloat16``.
        dispatch: Load the weights now (the default), or leave the model on the
            meta device until its first trace, as nnsight does without ``dispatch``.
        **config: Overrides for `tiny_config`, e.g. ``hidden=64``.

    Examples:
        >>> model = load_tiny_model("gpt2")
        >>> type(model).__name__
        'TransformersModel'
        >>> with model.trace("Hello"):
        ...     logits = model.lm_head.output.save()
        >>> logits.shape                     # (batch, bytes of "Hello", vocabulary)
        torch.Size([1, 5, 257])
        >>> llama = load_tiny_model("llama", "/tmp/tiny-llama", hidden=64)
        >>> llama.repo_id
        '/tmp/tiny-llama'
    """
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    if folder is None:
        folder = tempfile.mkdtemp(prefix=f"tiny-{family}-")
    path = save_tiny_model(family, folder, seed=seed, dtype=dtype, **config)
    with _no_progress_bars():  # "Loading weights"
        return TransformersModel(path, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(path), dispatch=dispatch)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide transformers' progress bars for the block, and restore the setting after it."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
