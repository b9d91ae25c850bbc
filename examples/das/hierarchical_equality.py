"""Distributed alignment search on hierarchical equality, offline, on a CPU in under a minute a seed.

The task of Geiger et al. (arXiv:2303.02536, section 4) and pyvene's DAS tutorial:
four random vectors W, X, Y, Z (4 wide each, concatenated to 16 inputs), label
``(W == X) == (Y == Z)``. A 3-layer ReLU MLP, 16 wide, learns it. The question
DAS asks: is the intermediate variable ``W == X`` held in an 8-dim linear
subspace of the first hidden layer (and ``Y == Z`` in the other 8)?

An interchange intervention swaps that subspace from a *source* input into a
*base* input; if the alignment is right, the model then answers
``(W_s == X_s) == (Y_b == Z_b)``, the causal model's answer under the same
swap. Interchange-intervention accuracy (IIA) on held-out pairs measures it.
Compared: a trained rotation (DAS), an untrained one, and the best localist
alignment: ``W == X`` on 8 raw neurons and ``Y == Z`` on the other 8, the best of
all C(16, 8) = 12870 choices (picked on training pairs, scored on held-out ones).

Where the recipe comes from: the data and the MLP's training follow the paper's
code (github atticusg/InterchangeInterventions, commit f34a4b8 "ICML23":
``utils.randvec``, ``utils.get_factual_task_from_pool``, ``trainer.LIMTrainer``,
``distributed_iit_hierarchical.ipynb``); the rotation's training follows pyvene's
``tutorials/advanced_tutorials/DAS_Main_Introduction.ipynb``.

    python examples/das/hierarchical_equality.py --seed 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from nnsight_toolbox import BatchedNNsight, RotatedSpace

WIDTH = 4  # each of W, X, Y, Z
HIDDEN = 16


def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` inputs ``(n, 16)``, fresh vectors for every example; their two equalities ``W == X``, ``Y == Z``.

    As the paper's code (``utils.randvec``, ``get_factual_task_from_pool``): each vector
    uniform in [-0.5, 0.5], a pair equal or not half the time, the two pairs independent.
    """
    a, b, c, d = torch.rand(4, n, WIDTH, generator=generator) - 0.5
    wx, yz = (torch.rand(2, n, generator=generator) < 0.5).unbind(0)
    x = torch.where(wx[:, None], a, b)
    z = torch.where(yz[:, None], c, d)
    return torch.cat([a, x, c, z], dim=1), wx, yz


def label(wx: torch.Tensor, yz: torch.Tensor) -> torch.Tensor:
    return (wx == yz).long()


def make_mlp() -> torch.nn.Sequential:
    layers = []
    for _ in range(3):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(HIDDEN, 2))


def train_mlp(net: torch.nn.Module, generator: torch.Generator, examples: int, epochs: int, batch: int = 6400) -> float:
    """The paper's code: Adam, lr 1e-3, no decay, cross-entropy, batches of 6,400 in one fixed order, 10 epochs."""
    x, wx, yz = sample(examples, generator)
    y = label(wx, yz)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, examples, batch):
            loss = torch.nn.functional.cross_entropy(net(x[i : i + batch]), y[i : i + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    x, wx, yz = sample(10_000, generator)
    with torch.no_grad():
        return (net(x).argmax(-1) == label(wx, yz)).float().mean().item()


def counterfactual_pairs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base and source inputs, and the label the causal model gives when the source's ``W == X`` replaces the base's.

    With ``k = 8`` of 16 dimensions this is also the tutorial's and the paper's whole
    "both equality relations" test: there ``W == X`` sits in the first 8 rotated
    dimensions and ``Y == Z`` in the other 8, and each of their three interventions
    (on ``W == X``, on ``Y == Z``, on both) builds a hidden state whose first 8
    dimensions come from one input and the other 8 from another; the causal model
    then answers ``(W == X of the first) == (Y == Z of the second)``, which is this
    swap with the first input as source and the second as base.
    """
    base, _, base_yz = sample(n, generator)
    source, source_wx, _ = sample(n, generator)
    return base, source, label(source_wx, base_yz)


def swapped_logits(model: BatchedNNsight, das: RotatedSpace, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``base`` with the subspace swapped in from ``source``: two invokes of one batch."""
    with model.trace() as tracer:
        with tracer.invoke(source):
            src = das.source()  # the first hidden layer's output (rows, 16) of the source rows
        with tracer.invoke(base):
            das(src)  # row i of the base gets row i of the source's subspace
            logits = model.output.save()
    return logits


def iia(model: BatchedNNsight, das: RotatedSpace, pairs: tuple) -> float:
    base, source, expected = pairs
    with torch.no_grad():
        return (swapped_logits(model, das, base, source).argmax(-1) == expected).float().mean().item()


def train_das(model: BatchedNNsight, das: RotatedSpace, pairs: tuple, epochs: int, generator: torch.Generator, batch: int = 6400) -> None:
    """pyvene's tutorial: Adam, lr 1e-3, constant, batches of 6,400 pairs, the rotation only."""
    base, source, expected = pairs
    optimizer = torch.optim.Adam(das.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(base.shape[0], generator=generator)
        for i in range(0, base.shape[0], batch):
            rows = order[i : i + batch]
            logits = swapped_logits(model, das, base[rows], source[rows])
            loss = torch.nn.functional.cross_entropy(logits, expected[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def best_neuron_swap(net: torch.nn.Sequential, pairs: tuple, k: int) -> tuple[float, tuple[int, ...]]:
    """The IIA of the best swap of ``k`` raw neurons of the first hidden layer, over every choice (plain torch)."""
    base, source, expected = pairs
    with torch.no_grad():
        hb, hs = net[:2](base), net[:2](source)  # (n, 16) after the first ReLU
        best = (-1.0, ())
        subsets = list(itertools.combinations(range(HIDDEN), k))
        for start in range(0, len(subsets), 256):
            chunk = subsets[start : start + 256]
            masks = torch.zeros(len(chunk), HIDDEN, dtype=torch.bool)
            for row, subset in enumerate(chunk):
                masks[row, list(subset)] = True
            h = torch.where(masks[:, None, :], hs[None], hb[None])  # (subsets, n, 16)
            scores = (net[2:](h).argmax(-1) == expected[None]).float().mean(-1)  # (subsets,)
            score, index = scores.max(0)
            if score.item() > best[0]:
                best = (score.item(), chunk[int(index)])
    return best


def permutation_rotation(model: BatchedNNsight, subset: tuple[int, ...], k: int) -> RotatedSpace:
    """A `RotatedSpace` whose first ``k`` rotated coordinates are the raw neurons ``subset``: R is a permutation."""
    order = list(subset) + [i for i in range(HIDDEN) if i not in subset]
    R = torch.eye(HIDDEN)[order]  # rows of R: the basis; R h lists the chosen neurons first
    das = RotatedSpace(model[1], k=k, output_dim=HIDDEN)
    das.load_state_dict({"rotate_layer": R.T.contiguous()})
    return das


def run(seed: int, examples: int = 960_000, mlp_epochs: int = 10, das_pairs: int = 1_280_000, das_epochs: int = 10, k: int = 8) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    net = make_mlp()
    accuracy = train_mlp(net, generator, examples, mlp_epochs)
    net.requires_grad_(False)  # DAS trains the rotation only
    model = BatchedNNsight(net)  # nnsight's NNsight, batching invokes of tensors (source and base)
    train_pairs, test_pairs = counterfactual_pairs(das_pairs, generator), counterfactual_pairs(10_000, generator)

    untrained = RotatedSpace(model[1], k=k, output_dim=HIDDEN)  # the first hidden layer, after its ReLU
    untrained_iia = iia(model, untrained, test_pairs)
    das = RotatedSpace(model[1], k=k, output_dim=HIDDEN)
    das.load_state_dict(untrained.state_dict())  # the same starting rotation, trained
    train_das(model, das, train_pairs, das_epochs, generator)
    das_iia = iia(model, das, test_pairs)

    search = tuple(t[:2_000] for t in train_pairs)
    _, subset = best_neuron_swap(net, search, k)  # chosen on training pairs
    neuron_test_iia = iia(model, permutation_rotation(model, subset, k), test_pairs)  # scored on held-out ones
    return {
        "seed": seed,
        "task_accuracy": round(accuracy, 4),
        "das_iia": round(das_iia, 4),
        "untrained_rotation_iia": round(untrained_iia, 4),
        "best_8_neurons_iia": round(neuron_test_iia, 4),
        "best_8_neurons": list(subset),
        "seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--examples", type=int, default=960_000, help="training examples for the MLP")
    parser.add_argument("--mlp-epochs", type=int, default=10)
    parser.add_argument("--das-pairs", type=int, default=1_280_000, help="counterfactual pairs to train the rotation on")
    parser.add_argument("--das-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the docs' figures: 1)")
    parser.add_argument("--plot", help="write a bar chart of the results of every seed to this .png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seed:
        results.append(run(seed, args.examples, args.mlp_epochs, args.das_pairs, args.das_epochs))
        print(json.dumps(results[-1]), flush=True)
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    """IIA per method, one dot per seed, with the paper's and pyvene's figures marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [("das_iia", "DAS, 8-dim\nrotated subspace"), ("best_8_neurons_iia", "best localist:\n8 + 8 raw neurons"), ("untrained_rotation_iia", "untrained\nrotation")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for x, (key, name) in enumerate(methods):
        values = [r[key] for r in results]
        ax.bar(x, sum(values) / len(values), color="#9ab", width=0.6)
        ax.scatter([x] * len(values), values, color="#234", zorder=3, s=14)
    ax.axhline(1.0, color="#c44", ls="--", lw=1, label="paper (DAS): 1.00")
    ax.axhline(0.97, color="#e90", ls=":", lw=1, label="pyvene tutorial (DAS): 0.97")
    ax.axhline(0.60, color="#6a4", ls="-.", lw=1, label="paper (best localist): 0.60")
    ax.axhline(0.5, color="#888", lw=0.8, label="chance")
    ax.set_xticks(range(len(methods)), [name for _, name in methods])
    ax.set_ylim(0.4, 1.02)
    ax.set_ylabel("interchange-intervention accuracy")
    ax.set_title(f"Hierarchical equality, W == X at the first hidden layer ({len(results)} seeds)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
