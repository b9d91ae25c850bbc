"""Steering vectors read from contrastive pairs, not trained: `SteeringVector.from_contrast`.

Most steering in the field is read off a model, not learned by gradient:

    positive prompts ─┐                       ┌─ "mean":       mean_i (p_i - n_i)          (CAA, steering-vectors)
                      ├─ module output at ────┤─ "pca":        1st uncentred PC of ±(p_i - n_i)  (steering-vectors)
    negative prompts ─┘  `positions` (N, H)   ├─ "pca_diff":   1st centred PC of p_i - n_i       (repeng)
                                              └─ "pca_center": 1st centred PC of p_i - m_i, n_i - m_i,
                                                               m_i = (p_i + n_i) / 2             (repeng)

CAA is Rimsky et al. (arXiv 2312.06681): the mean difference of a layer's
activations at the answer token over A/B pairs, added with a multiplier at
every token after the prompt. The PCA forms are representation engineering
(Zou et al., arXiv 2310.01405) as the steering-vectors and repeng libraries
compute them; the two libraries sign their components by different rules,
kept apart here (see `aggregate_contrast`).

`read_contrast` does the reading: it tokenizes each prompt as
``model.trace(prompt)`` would, pads a batch on the tokenizer's side, and reads
every module in one forward pass per batch (one empty invoke per module, so
the modules may come in any order). A row's reading equals the one from its
prompt run alone, unpadded: the attention mask goes in with the ids, and
nnsight derives left-padded rows' position ids from it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from nnsight.intervention.envoy import Envoy

    from .intervention_set import InterventionSet
    from .steering import SteeringVector

__all__ = ["METHODS", "read_contrast", "aggregate_contrast", "from_contrast"]

Method = Literal["mean", "pca", "pca_diff", "pca_center"]

METHODS: tuple[str, ...] = ("mean", "pca", "pca_diff", "pca_center")
"""The aggregations `aggregate_contrast` knows, in the order of the module docstring.

Examples:
    >>> from nnsight_toolbox.optim.contrast import METHODS
    >>> METHODS
    ('mean', 'pca', 'pca_diff', 'pca_center')
"""

#: Prompts at most this many batches long read without a progress bar (``progress=None``).
QUIET_BATCHES = 1


def from_contrast(
    cls: type,
    module: "Envoy | Sequence[Envoy]",
    positive: Sequence[str] | Sequence[tuple[str, str]],
    negative: Sequence[str] | None = None,
    *,
    positions: int = -1,
    method: Method = "mean",
    batch_size: int = 32,
    remote: bool = False,
    progress: bool | None = None,
) -> "SteeringVector | InterventionSet":
    """The steering vector(s) ``cls`` on ``module`` read from contrastive pairs; see `SteeringVector.from_contrast`.

    Examples:
        >>> from nnsight_toolbox import SteeringVector
        >>> from nnsight_toolbox.optim.contrast import from_contrast
        >>> vector = from_contrast(SteeringVector, model.transformer.h[0], ["Yes"], ["No"])
        >>> vector.metadata
        {'method': 'mean', 'positions': -1, 'pairs': 1}
    """
    from .intervention_set import InterventionSet

    modules, many = _check_modules(module, f"{cls.__name__}.from_contrast")
    _check_method(method)
    positive, negative = _check_pairs(positive, negative)
    pos, neg = read_contrast(modules, positive, negative, positions=positions, batch_size=batch_size, remote=remote, progress=progress)
    vectors = []
    for envoy, p, n in zip(modules, pos, neg):
        direction = aggregate_contrast(p, n, method)  # (H,)
        # The width is the readings': no `model.scan` to infer it (a fake forward per vector).
        vector = cls(envoy, output_dim=direction.shape[0])  # float32 `v`, on the module's device
        with torch.no_grad():
            vector.v.copy_(direction.to(vector.v.device, vector.v.dtype))
        # Provenance, saved by the unified format (JSON values only).
        vector.metadata = {"method": method, "positions": positions, "pairs": len(positive)}
        vectors.append(vector)
    return InterventionSet(vectors) if many else vectors[0]


def read_contrast(
    modules: "Envoy | Sequence[Envoy]",
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    positions: int = -1,
    batch_size: int = 32,
    remote: bool = False,
    progress: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each module's output at ``positions`` of every positive and negative prompt: per module, ``(N, H)`` twice.

    ``positions`` counts each prompt's own real tokens (``-1`` its last, ``1``
    its second), whatever side the tokenizer pads on. The prompts are read
    ``batch_size`` at a time, positives and negatives in the same batches, in
    one trace (one forward pass) per batch for all the modules at once; the
    batch size changes nothing but speed and memory. A local model reads in
    eval mode (no dropout), its modes restored after. With ``remote`` set, each
    trace runs on the model's NDIF server and brings back only these readings.

    Args:
        modules: One Envoy or a list of them, all of one model; each output must be
            batch-first ``(B, T, H)`` (or a tuple whose first element is).
        positive: The positive prompts, one per pair.
        negative: The negative prompts, as many as ``positive``, in the same order.
        positions: Which real token of each prompt to read; ``-1`` is the last.
        batch_size: Prompts per forward pass.
        remote: Run the traces on NDIF, as a remote ``model.trace`` does.
        progress: Show a progress bar (``tqdm.auto``); ``None``: when there is more than one batch.

    Returns:
        ``(positive_readings, negative_readings)``: lists with one float32 CPU tensor
        ``(N, H)`` per module, in the order of ``modules``.

    Examples:
        >>> from nnsight_toolbox.optim.contrast import read_contrast
        >>> pos, neg = read_contrast([model.transformer.h[0], model.transformer.h[1]], ["Yes", "Sure"], ["No", "Nope"])
        >>> len(pos), pos[0].shape, neg[1].dtype
        (2, torch.Size([2, 32]), torch.float32)
    """
    modules, _ = _check_modules(modules, "read_contrast")
    positive, negative = _check_pairs(positive, negative)
    positions = _check_positions(positions)
    batch_size = _check_batch_size(batch_size)
    model = modules[0].root
    prompts = [*positive, *negative]  # (2N,): rows 0..N-1 positive, N..2N-1 negative
    ids = _token_ids(model, prompts)
    lengths = [len(row) for row in ids]
    _check_long_enough(positions, lengths, len(positive), prompts)
    side = getattr(model.tokenizer, "padding_side", "right")
    pad_id = _pad_id(model.tokenizer)

    starts = range(0, len(prompts), batch_size)
    if progress is None:
        progress = len(starts) > QUIET_BATCHES
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"Reading {len(prompts)} prompts", unit="batch", total=math.ceil(len(prompts) / batch_size))

    per_module: list[list[torch.Tensor]] = [[] for _ in modules]
    with _evaluating(model, remote):
        for start in starts:
            chunk = range(start, min(start + batch_size, len(prompts)))
            input_ids, attention_mask, columns = _pad([ids[i] for i in chunk], positions, side, pad_id)
            for found, reading in zip(per_module, _read_batch(model, modules, input_ids, attention_mask, columns, remote)):
                found.append(reading)
    readings = [torch.cat(found) for found in per_module]  # (2N, H) per module
    n = len(positive)
    return [r[:n] for r in readings], [r[n:] for r in readings]


def aggregate_contrast(positive: torch.Tensor, negative: torch.Tensor, method: Method = "mean") -> torch.Tensor:
    """One direction ``(H,)`` from paired readings ``(N, H)``, as the reference libraries compute it.

    - ``"mean"``: ``mean_i (p_i - n_i)``, not rescaled: steering-vectors'
      ``mean_aggregator``, CAA's vector.
    - ``"pca"``: steering-vectors' ``pca_aggregator``: the first principal
      component, *uncentred*, of the differences ``d_i = p_i - n_i`` together
      with their negatives ``-d_i`` (so the data is symmetric about 0), signed
      so that the mean projection of the ``d_i`` is positive.
    - ``"pca_diff"``: repeng 0.4.0's: the first component of a centred PCA of
      the ``d_i``, signed by repeng's vote: flipped when fewer pairs have the
      positive project higher than the negative than the other way round.
    - ``"pca_center"``: repeng 0.4.0's: the same on ``p_i - m_i`` and
      ``n_i - m_i`` (``m_i`` the pair's midpoint), signed by the same vote.

    The PCA forms are unit vectors. The two sign rules differ: the mean
    projection of the differences (steering-vectors) can be positive while
    most pairs vote the other way (repeng), so ``"pca"`` and ``"pca_diff"``
    may point in opposite directions on the same data. Where repeng's vote is a
    tie, the component keeps scikit-learn's sign (its largest entry positive),
    as repeng's does. The arithmetic is float64; the result is float32.

    Raises:
        ValueError: For an unknown ``method``, mismatched shapes, no pairs, or data
            with no direction (every difference zero; ``"pca_diff"`` with differences
            that are all the same, e.g. a single pair).

    Examples:
        >>> from nnsight_toolbox.optim.contrast import aggregate_contrast
        >>> p = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
        >>> n = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> aggregate_contrast(p, n, "mean")
        tensor([1., 1.])
        >>> aggregate_contrast(p, n, "pca").norm()
        tensor(1.)
    """
    _check_method(method)
    if not (isinstance(positive, torch.Tensor) and isinstance(negative, torch.Tensor)) or positive.dim() != 2 or positive.shape != negative.shape:
        raise ValueError(
            f"`aggregate_contrast` takes two tensors of readings of one shape `(pairs, width)`; got "
            f"{_shape(positive)} and {_shape(negative)}."
        )
    if positive.shape[0] == 0:
        raise ValueError("`aggregate_contrast` got no pairs: pass readings of at least one pair.")
    p, n = positive.double(), negative.double()
    diffs = p - n  # (N, H)
    if method == "mean":
        return diffs.mean(0).float()
    if not bool(diffs.any()):
        raise ValueError(
            f"`method={method!r}`: every positive reading equals its negative, so there is no direction to find. "
            f"Check that the pairs differ at the read position (`positions=`)."
        )
    if method == "pca":
        data = torch.cat([diffs, -diffs])  # (2N, H), symmetric about 0: its uncentred PCA is the centred one
        direction = _first_component(data)
        # steering-vectors: the sign of the mean projection of the differences (0 keeps the component as is).
        return (direction if float((diffs @ direction).mean()) >= 0 else -direction).float()
    if method == "pca_diff":
        data = diffs - diffs.mean(0)  # (N, H), centred, as scikit-learn's PCA does
        if not bool(data.abs().gt(1e-12 * diffs.abs().max()).any()):
            raise ValueError(
                f"`method='pca_diff'`: the {diffs.shape[0]} difference(s) are all the same, so their centred PCA has "
                f"no direction (one pair never has one). Add pairs, or use `method='mean'` or `method='pca'`."
            )
    else:  # pca_center
        middle = (p + n) / 2  # (N, H)
        data = torch.stack([p - middle, n - middle], 1).reshape(-1, p.shape[1])  # (2N, H): p_0, n_0, p_1, n_1, ...
        data = data - data.mean(0)  # ~0 already; scikit-learn centres again
    direction = _first_component(data)
    # repeng's vote: in how many pairs does the positive project higher than the negative, and lower?
    higher = diffs @ direction  # (N,) = p_i . v - n_i . v
    if int((higher < 0).sum()) > int((higher > 0).sum()):
        direction = -direction
    return direction.float()


def _first_component(data: torch.Tensor) -> torch.Tensor:
    """The first right singular vector of ``data`` ``(rows, H)``, with its largest-magnitude entry positive.

    That sign is scikit-learn's ``svd_flip(..., u_based_decision=False)``
    convention, which repeng's PCA inherits; the methods then sign it by their own rule.
    """
    _, _, vh = torch.linalg.svd(data, full_matrices=False)  # vh: (min(rows, H), H)
    v = vh[0]
    return v if float(v[v.abs().argmax()]) >= 0 else -v


def _read_batch(
    model: Any, modules: list, input_ids: torch.Tensor, attention_mask: torch.Tensor, columns: torch.Tensor, remote: bool
) -> list[torch.Tensor]:
    """One forward pass over a padded batch: each module's output at ``columns`` of each row, ``(B, H)`` float32."""
    rows = torch.arange(input_ids.shape[0])
    width = input_ids.shape[1]
    # The mask goes in with the ids: nnsight then derives left-padded rows' position ids from it
    # (`supply_position_ids`), as a prompt run alone would count them. Passing `position_ids` here
    # would switch that off.
    encoding = {"input_ids": input_ids, "attention_mask": attention_mask}
    with torch.no_grad(), model.trace(remote=remote) as tracer:
        with tracer.invoke(encoding):
            pass  # the rows; the reads below each have an invoke of their own
        readings = _saved([None] * len(modules))
        for i, envoy in enumerate(modules):
            # One empty invoke (the whole batch) per module: each waits for its own module, so the
            # list may name modules in any order and still runs the model once.
            with tracer.invoke():
                output = envoy.output
                if isinstance(output, tuple):
                    output = output[0]
                if output.dim() != 3 or output.shape[0] != rows.shape[0] or output.shape[1] != width:
                    raise ValueError(
                        f"`from_contrast` reads batch-first `(batch, tokens, width)` outputs, but `{envoy.path}` "
                        f"returned shape {tuple(output.shape)} for a batch of {rows.shape[0]} prompts of "
                        f"{width} tokens. Read a module whose output is laid out that way (a decoder layer)."
                    )
                readings[i] = output[rows.to(output.device), columns.to(output.device)].detach().float().cpu()  # (B, H)
    return list(readings)


@contextlib.contextmanager
def _evaluating(model: Any, remote: bool) -> Iterator[None]:
    """The local model in eval mode for the reads, its modes restored after.

    A model left in training mode (after training a LoRA on it, say) would
    read through dropout: readings that change from run to run, and with the
    batch. A remote model runs the server's copy, which serves in eval mode.
    """
    module = getattr(model, "_module", None)
    if remote or not isinstance(module, torch.nn.Module) or not any(m.training for m in module.modules()):
        yield
        return
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _saved(value: Any) -> Any:
    import nnsight

    return nnsight.save(value)


def _pad(ids: list[torch.Tensor], positions: int, side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, columns)`` for rows of token ids: padded ``(B, T)`` twice, and ``(B,)``.

    ``columns[i]`` is the padded column of row ``i``'s real token ``positions``.
    """
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    columns = torch.empty(len(ids), dtype=torch.long)
    for i, row in enumerate(ids):
        first = width - len(row) if side == "left" else 0  # the row's first real column
        input_ids[i, first : first + len(row)] = row
        attention_mask[i, first : first + len(row)] = 1
        columns[i] = first + (positions if positions >= 0 else len(row) + positions)
    return input_ids, attention_mask, columns


def _token_ids(model: Any, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's token ids ``(L,)``, as ``model.trace(prompt)`` tokenizes it.

    A `TransformersModel` tokenizes text through its pipeline's ``preprocess``,
    with no options (so with the tokenizer's defaults, special tokens
    included); the same call is made here, so a reading is the one a trace of
    the prompt alone gives.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise TypeError(
            f"`from_contrast` reads text prompts, so it needs a model with a tokenizer; "
            f"`{type(model).__name__}` has none. Load it as `TransformersModel(..., task='text-generation')`."
        )
    pipeline = getattr(model, "pipeline", None)
    ids = []
    for prompt in prompts:
        if pipeline is not None:
            row = pipeline.preprocess(prompt)["input_ids"]
        else:
            row = tokenizer(prompt, return_tensors="pt").input_ids
        ids.append(torch.as_tensor(row).reshape(-1).long())
    return ids


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad_id is None else int(pad_id)  # padded columns are masked: any id does


def _check_modules(module: Any, who: str) -> tuple[list, bool]:
    """``(modules, given_as_a_list)``; a `TypeError` for anything but Envoys of one model."""
    from nnsight.intervention.envoy import Envoy

    many = isinstance(module, (list, tuple))
    modules = list(module) if many else [module]
    if many and not modules:
        raise ValueError(f"`{who}` got an empty list of modules; pass at least one, such as `[model.transformer.h[3]]`.")
    for item in modules:
        if not isinstance(item, Envoy):
            raise TypeError(
                f"`{who}` needs nnsight Envoys of modules, such as `model.transformer.h[3]` or a list of them, "
                f"but got {type(item).__name__}. Wrap the model with nnsight (`TransformersModel(...)`) and pass "
                f"its modules."
            )
    roots = {id(item.root) for item in modules}
    if len(roots) > 1:
        raise ValueError(f"`{who}` reads modules of one model in one pass; these are on {len(roots)} models.")
    return modules, many


def _check_method(method: Any) -> None:
    if method not in METHODS:
        raise ValueError(
            f"Unknown `method={method!r}`. `from_contrast` knows {', '.join(repr(m) for m in METHODS)}: "
            f"'mean' (CAA, steering-vectors' `mean_aggregator`), 'pca' (steering-vectors' `pca_aggregator`), "
            f"'pca_diff' and 'pca_center' (repeng's)."
        )


def _check_pairs(positive: Any, negative: Any) -> tuple[list[str], list[str]]:
    """Two lists of strings of one length, from two lists or (``negative=None``) from a list of pairs."""
    if negative is None:
        pairs = _check_list(positive, "positive", "pairs")
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise TypeError(
                    f"With `negative=None`, `positive` must be a list of `(positive, negative)` string pairs; "
                    f"item {i} is {_short(pair)}. Or pass the two lists: `from_contrast(module, positive, negative)`."
                )
        return [p for p, _ in pairs], [n for _, n in pairs]
    positive = _check_list(positive, "positive", "prompts")
    negative = _check_list(negative, "negative", "prompts")
    if len(positive) != len(negative):
        raise ValueError(
            f"The `positive` list has {len(positive)} prompts and the `negative` list {len(negative)}: "
            f"they are pairs, so each positive prompt needs its negative at the same index. Pass lists of one length."
        )
    for name, prompts in (("positive", positive), ("negative", negative)):
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"The `{name}` prompts must be strings; item {i} is {_short(prompt)}.")
    return positive, negative


def _check_list(value: Any, name: str, what: str) -> list:
    if isinstance(value, str):
        raise TypeError(f"`{name}` must be a list of {what}, got one string {_short(value)}. Wrap it in a list: `[{value!r}]`.")
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"`{name}` must be a list of {what}, got {type(value).__name__}.") from None
    if not items:
        raise ValueError(f"The `{name}` list is empty: reading a vector needs at least one pair of prompts.")
    return items


def _check_positions(positions: Any) -> int:
    if isinstance(positions, bool) or not isinstance(positions, int):
        raise TypeError(
            f"`positions` is the one token of each prompt to read, an int counted over its real tokens "
            f"(`-1` the last, `0` the first); got {positions!r}."
        )
    return positions


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` is the number of prompts per forward pass, a positive int; got {batch_size!r}.")
    return batch_size


def _check_long_enough(positions: int, lengths: list[int], n: int, prompts: list[str]) -> None:
    """Every prompt has the real token ``positions`` names; else a `ValueError` naming the first that does not."""
    for i, length in enumerate(lengths):
        if -length <= positions < length:
            continue
        name, index = ("positive", i) if i < n else ("negative", i - n)
        short = sum(1 for k in lengths if not -k <= positions < k)
        raise ValueError(
            f"`positions={positions}` asks for a token that the `{name}` prompt {index} ({_short(prompts[i])}) "
            f"does not have: it has {length} real token(s)"
            + (f", and {short - 1} other prompt(s) are as short" if short > 1 else "")
            + ". `positions` counts each prompt's own tokens (`0` the first, `-1` the last): choose one every "
            f"prompt has, such as `positions=-1`, or lengthen the short prompts."
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

