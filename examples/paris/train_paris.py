"""Train a rank-10 LoRA so that a prompt of ten `_` tokens is completed with " Paris".

The classic nnsight LoRA demo, on nnsight 0.8 with `nnsight_toolbox`:

1. put a `LORA` on one MLP block,
2. train it inside `model.trace(...)` with a torch optimizer,
3. generate in one batch, one invoke with the adapter and one without.

By default it builds a tiny GPT-2 with random weights, so it runs offline in
seconds. `--model` takes a real checkpoint (a hub name or a local folder).

    python examples/paris/train_paris.py
    python examples/paris/train_paris.py --model openai-community/gpt2 --module transformer.h.0.mlp
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from nnsight import TransformersModel
from tqdm.auto import tqdm

from nnsight_toolbox import LORA
from nnsight_toolbox.testing import load_tiny_model

ANSWER = " Paris"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint name or folder (default: a tiny offline GPT-2)")
    parser.add_argument("--module", default="transformer.h.0.mlp", help="path of the module to adapt")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_model(name: str | None) -> TransformersModel:
    if name is None:  # a tiny GPT-2 built from a config, saved to a temporary folder, and loaded from it
        return load_tiny_model("gpt2", hidden=64, layers=2, initializer_range=0.1)
    return TransformersModel(name, task="text-generation", dispatch=True)


def underscore_prompt(tokenizer) -> str:
    """Ten `_` tokens: "_ _ _ ..." on GPT-2's BPE, "__________" on a byte-level tokenizer."""
    for prompt in (" ".join(["_"] * 10), "_" * 10):
        if len(tokenizer(prompt).input_ids) == 10:
            return prompt
    return "_" * 10


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    model = load_model(args.model)
    model.requires_grad_(False)  # only the adapter trains
    prompt = underscore_prompt(model.tokenizer)

    # Teacher forcing on every token of the answer: feed prompt + answer[:-1],
    # predict each answer token from the position before it.
    prompt_ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    answer_ids = model.tokenizer(ANSWER, add_special_tokens=False, return_tensors="pt").input_ids
    inputs = torch.cat([prompt_ids, answer_ids[:, :-1]], dim=1)
    positions = slice(prompt_ids.shape[1] - 1, inputs.shape[1])

    lora = LORA(model.get(args.module), r=args.rank)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=args.lr)

    progress = tqdm(range(args.steps), desc="training")
    for _ in progress:
        with model.trace(inputs):
            lora()
            logits = model.lm_head.output.save()
        loss = F.cross_entropy(logits[0, positions], answer_ids[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")

    new_tokens = answer_ids.shape[1]
    with model.generate(max_new_tokens=new_tokens, do_sample=False) as tracer:
        with tracer.invoke(prompt):
            lora()
        with tracer.invoke(prompt):
            pass
        with tracer.invoke():
            ids = tracer.result.save()

    completions = model.tokenizer.batch_decode(ids[:, -new_tokens:])
    print(f"prompt:       {prompt!r}")
    print(f"with LoRA:    {completions[0]!r}")
    print(f"without LoRA: {completions[1]!r}")


if __name__ == "__main__":
    main()
