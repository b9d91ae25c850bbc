"""Tiny models of the families whose layouts break naive row scoping, and a row-aware reference hook.

OPT flattens (B, T, H) to (B*T, H) before ``fc1``/``fc2``; Switch Transformers'
experts see only their routed tokens; T5 has two sequence lengths per pass; BERT
has submodules literally named ``output``. Each is two layers and 32 wide, built
from a config, saved with the byte-level tokenizer and loaded back from disk.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import transformers
from nnsight import TransformersModel
from transformers import AutoTokenizer

from nnsight_toolbox.testing import byte_level_tokenizer

VOCAB = 258  # the byte-level tokenizer's 257 tokens, plus BERT's mask token

COMMON = dict(vocab_size=VOCAB, pad_token_id=256, eos_token_id=256, bos_token_id=256)


def config(family: str):
    """``(config, auto class)`` of a two-layer, 32-wide model of ``family``."""
    if family == "opt":
        return transformers.OPTConfig(hidden_size=32, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128, **COMMON), transformers.AutoModelForCausalLM
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **COMMON), transformers.AutoModelForCausalLM
    if family == "switch":
        return transformers.SwitchTransformersConfig(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64, decoder_start_token_id=256, **COMMON), transformers.AutoModelForSeq2SeqLM
    if family == "t5":
        return transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=256, **COMMON), transformers.AutoModelForSeq2SeqLM
    if family == "bart":
        return transformers.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128, decoder_start_token_id=256, forced_eos_token_id=None, **COMMON), transformers.AutoModelForSeq2SeqLM
    if family == "bert":
        return transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, **COMMON), transformers.AutoModelForMaskedLM
    raise ValueError(family)


FAMILIES = ("opt", "qwen2_moe", "switch", "t5", "bart", "bert")


def save(family: str, folder) -> str:
    cfg, auto = config(family)
    torch.manual_seed(0)
    auto.from_config(cfg).save_pretrained(folder)
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"mask_token": "<mask>"})  # id 257; BERT's fill-mask pipeline needs one
    tokenizer.save_pretrained(folder)
    return str(folder)


def load(family: str, folder: str) -> TransformersModel:
    """The saved model wrapped by nnsight's ``TransformersModel``, loaded from disk.

    Built first and wrapped, because transformers 5 has no text2text pipeline to
    name for an encoder-decoder; the wrapper then warns that its pipeline does not
    support the model, which only matters to ``model.pipe``.
    """
    _, auto = config(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity(transformers.logging.CRITICAL)
        try:
            hf_model = auto.from_pretrained(folder)
            return TransformersModel(hf_model, tokenizer=AutoTokenizer.from_pretrained(folder), task="fill-mask" if family == "bert" else None)
        finally:
            transformers.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def row_hook(module: torch.nn.Module, WA: torch.Tensor, WB: torch.Tensor, batch: int, rows=None):
    """Add ``x @ WA @ WB`` to the output of ``module`` on batch rows ``rows`` (all when ``None``).

    The test knows each module's layout by construction: a 3-D tensor is
    (B, T, H), a 2-D one is OPT's flattened (B*T, H), viewed here as (B, T, H).
    """

    def hook(mod, args, output):
        x = args[0]
        out = output[0] if isinstance(output, tuple) else output
        delta = x.to(WA.dtype) @ WA @ WB
        if rows is not None:
            mask = torch.zeros(batch, dtype=delta.dtype)
            mask[list(rows)] = 1.0
            delta = (delta.reshape(batch, -1, delta.shape[-1]) * mask[:, None, None]).reshape(delta.shape)
        new = (out.to(WA.dtype) + delta).to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def randomize(lora, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lora.WB.copy_(torch.randn(lora.WB.shape, generator=generator) * scale)
