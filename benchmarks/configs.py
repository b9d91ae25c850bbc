"""The benchmark configurations: model, targets, batch sizes and repeat counts.

``cpu`` and the two ``gpu-*`` configurations are the ones the performance bar
is stated for (see README.md in this folder); ``tiny`` is a smoke check that
runs in seconds and proves only that every variant runs; ``cpu-dispatch`` is
``gpu-1b``'s layers and adapters at 64 wide, a CPU preview of generation where
the cost of each module call, not its arithmetic, sets the pace;
``cpu-dispatch-gpt2`` is the same idea on GPT-2 small's modules (16 layers, 64
wide), where the bar against PEFT inside nnsight is stated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BenchConfig", "CONFIGS", "build_config"]


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration.

    Attributes:
        name: The ``--config`` name.
        family: ``"gpt2"`` or ``"llama"``: which transformers config class.
        model: Keyword arguments for that config class (widths, layers, vocabulary).
        dtype: The model's dtype; the adapters stay float32 as PEFT's do.
        device: ``"cpu"`` or ``"cuda"``.
        targets: The adapted modules, PEFT's ``target_modules`` list.
        r: The rank of every adapter.
        train_batch: ``(batch, tokens)`` of the training step and the inference forward.
        prompt_tokens: Length of the batch-1 prompt that generation starts from.
        new_tokens: Tokens each timed ``generate`` produces.
        repeats: Timed repeats of the training step and of generation (the
            median is reported), after ``warmup`` rounds.
        forward_repeats: Timed repeats of the inference forward (``None``: ``repeats``).
        warmup: Untimed runs of every variant before timing.
        token_lengths: New-token counts for the per-token cost check.
        many_targets: Targets of the "many adapters" measure, with ``many_layers``
            choosing layers so that the count comes to 64 where the model allows.
        many_model: Config keyword arguments of the model that measure runs on,
            or ``None`` for the benchmark's own. GPT-2 small has 48 linear
            layers in its blocks; the same widths with 16 layers have 64.
        loop_steps: Length of the steady-state training loop.
        loop_batch: ``(batch, tokens)`` of that loop.
        loop_model: Config keyword arguments of a narrower model for that loop,
            or ``None`` for the benchmark's own. On CPU 500 steps of GPT-2 small
            would take minutes; a model with the same layers and modules but 64
            wide keeps every per-step cost of the trace and the adapters, which
            is what would grow, and makes it a larger share of the step.
        variants: The variants to time; the plain ``nnsight`` column is left
            out on CPU, where it would add minutes.
        token_variants: The variants of the per-token measure.
        threads: torch CPU threads; ``None`` keeps torch's default.
        clock: ``"wall"``, or ``"cpu"`` for the process's CPU time (see `timing`).
    """

    name: str
    family: str
    model: dict[str, Any]
    dtype: torch.dtype
    device: str
    targets: tuple[str, ...]
    r: int
    train_batch: tuple[int, int]
    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup: int = 1
    forward_repeats: int | None = None
    token_lengths: tuple[int, ...] = (16, 64, 256)
    token_repeats: int = 2
    many_targets: tuple[str, ...] = ()
    many_layers: tuple[int, ...] | None = None
    many_repeats: int = 3
    many_model: dict[str, Any] | None = None
    loop_steps: int = 500
    loop_batch: tuple[int, int] = (1, 16)
    loop_model: dict[str, Any] | None = None
    variants: tuple[str, ...] = ("toolbox", "toolbox-merged", "peft-in-nnsight", "peft", "hooks", "nnsight", "nnsight-base", "base")
    token_variants: tuple[str, ...] = ("toolbox", "peft", "base")
    threads: int | None = None
    clock: str = "wall"
    seed: int = 0

    def hf_config(self) -> Any:
        """The transformers config this benchmark builds its random-weight model from."""
        import transformers

        if self.family == "gpt2":
            return transformers.GPT2Config(**self.model)
        if self.family == "llama":
            return transformers.LlamaConfig(**self.model)
        raise ValueError(f"Unknown family {self.family!r}; use 'gpt2' or 'llama'.")


GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
LLAMA_1B = dict(  # Llama-3.2-1B's shape
    hidden_size=2048,
    num_hidden_layers=16,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
LLAMA_8B = dict(  # Llama-3-8B's shape
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
GPT2_BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

#: How the CPU configurations time: a shared CPU needs the repeats, on process CPU time.
CPU_TIMING = dict(
    repeats=9,  # the CPU bar's two measures
    forward_repeats=5,
    warmup=1,
    token_repeats=5,  # 3 left the flatness check at the mercy of one slow call
    many_repeats=5,
    loop_batch=(1, 16),
    token_variants=("toolbox", "peft"),
    clock="cpu",
)

CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(
        name="tiny",
        family="gpt2",
        model=dict(n_embd=64, n_layer=2, n_head=4, vocab_size=257, n_positions=512),
        dtype=torch.float32,
        device="cpu",
        targets=("c_attn",),
        r=4,
        train_batch=(2, 16),
        prompt_tokens=8,
        new_tokens=8,
        repeats=3,
        token_repeats=1,
        many_repeats=1,
        token_lengths=(4, 8, 16),
        many_targets=GPT2_BLOCK_LINEARS,
        loop_steps=30,
        loop_batch=(1, 8),
        clock="cpu",
    ),
    "cpu": BenchConfig(
        name="cpu",
        family="gpt2",
        model=GPT2_SMALL,
        dtype=torch.float32,
        device="cpu",
        targets=("c_attn",),
        r=16,
        train_batch=(8, 64),
        prompt_tokens=16,
        new_tokens=32,
        # GPT-2 small has 48 linear layers in its blocks; 16 layers of its widths have 64.
        many_targets=GPT2_BLOCK_LINEARS,
        many_model=dict(GPT2_SMALL, n_layer=16),
        loop_model=dict(GPT2_SMALL, n_embd=64, n_head=4),
        variants=("toolbox", "toolbox-merged", "peft-in-nnsight", "peft", "hooks", "nnsight-base", "base"),
        **CPU_TIMING,
    ),
    "gpu-1b": BenchConfig(
        name="gpu-1b",
        family="llama",
        model=LLAMA_1B,
        dtype=torch.bfloat16,
        device="cuda",
        targets=("q_proj", "v_proj"),
        r=16,
        train_batch=(8, 512),
        prompt_tokens=32,
        new_tokens=64,
        repeats=10,
        warmup=2,
        token_repeats=3,
        many_targets=LLAMA_ATTENTION,  # 4 x 16 layers = 64
        loop_batch=(8, 512),
    ),
}
# Llama-1B's modules and adapters at 64 wide, on the CPU: batch-1 generation here
# is bound by the Python and dispatch cost of each module call, as batch-1
# generation of the 1B model on a GPU is bound by the CPU launching kernels. A
# preview of the GPU generate bar that runs anywhere, not the bar itself.
CONFIGS["cpu-dispatch"] = dataclasses.replace(
    CONFIGS["gpu-1b"],
    name="cpu-dispatch",
    # A small vocabulary too: the 1B model's lm_head is one kernel on a GPU, but
    # at 128256 x 64 it would be most of the arithmetic here.
    model=dict(LLAMA_1B, hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1, vocab_size=4096),
    dtype=torch.float32,
    device="cpu",
    train_batch=(2, 64),
    variants=BenchConfig.variants,  # every variant: the plain nnsight form is cheap at this width
    **CPU_TIMING,
)
# GPT-2 small's modules and adapters (r=16 on every `c_attn`) at 64 wide and 16
# layers: the second row of issue 16, and the config its bar against PEFT
# inside nnsight is stated for. As in `cpu-dispatch`, batch-1 generation here
# costs what each module call costs in Python and dispatch, and the vocabulary
# is small for the same reason: GPT-2's 50257 x 64 head would be most of the
# arithmetic (and most of a count under callgrind) where on a GPU it is one kernel.
CONFIGS["cpu-dispatch-gpt2"] = dataclasses.replace(
    CONFIGS["cpu"],
    name="cpu-dispatch-gpt2",
    model=dict(GPT2_SMALL, n_embd=64, n_head=4, n_layer=16, vocab_size=4096),
    many_model=None,  # 16 layers of GPT-2's block linears are already 64
    loop_model=None,  # already narrow: the loop trains the benchmark model
    variants=BenchConfig.variants,  # every variant: the plain nnsight form is cheap at this width
)
# The 1B configuration with the 8B shape: the batch of 4 x 512 for training,
# and 16 of its 32 layers give the 64 adapters of the many-adapters measure.
CONFIGS["gpu-8b"] = dataclasses.replace(
    CONFIGS["gpu-1b"],
    name="gpu-8b",
    model=LLAMA_8B,
    train_batch=(4, 512),
    many_layers=tuple(range(16)),  # 4 x 16 of its 32 layers = 64
    loop_batch=(4, 512),
)


def build_config(name: str, **overrides: Any) -> BenchConfig:
    """The named configuration, with fields replaced (``repeats=3``, say)."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown config {name!r}; choose one of {sorted(CONFIGS)}.")
    return dataclasses.replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})
