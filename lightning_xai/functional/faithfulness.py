"""Faithfulness kernels: does the model's prediction depend on the features an attribution ranks first?

Features are the elements of one sample (every pixel of every channel, every embedding coordinate); they are
ranked per sample by the attribution *value* in descending order (signed: features that support the explained
class come first; pass ``attributions.abs()`` to rank by magnitude), ties broken by the lower flat index. A
removed feature is replaced by ``baseline``: a number, or a tensor that broadcasts to the inputs (a per-channel
mean, a blurred copy of every sample, ...).

The model is called as it is (put it in ``eval()`` mode first if it has dropout or batch norm) under
``torch.no_grad()``; it must map ``(N, ...)`` inputs to ``(N, K)`` logits (or ``(N,)`` / ``(N, 1)`` binary
logits). Scores are probabilities of the explained class ``target``.

All perturbed copies of one fraction (or step) go through the model in one forward pass by default; with
``batch_size`` the copies of all fractions are streamed through the model in chunks of that many rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.fairness import as_probabilities

Baseline = float | Tensor

__all__ = [
    "class_probability",
    "comprehensiveness",
    "deletion_auc",
    "deletion_curve",
    "insertion_auc",
    "insertion_curve",
    "sufficiency",
]


def class_probability(model: nn.Module, inputs: Tensor, target: Tensor | None = None) -> Tensor:
    """Probability of ``target`` (or of the predicted class when ``target`` is None) under ``model``.

    ``(N, K)`` outputs go through a softmax; ``(N,)`` or ``(N, 1)`` outputs are binary logits of class 1.

    Args:
        model: maps ``inputs`` to logits.
        inputs: ``(N, ...)`` model inputs.
        target: ``(N,)`` class indices, or None for the predicted class.

    Returns:
        ``(N,)`` probabilities, computed without gradients.

    Examples:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> class_probability(model, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([1, 0]))
        tensor([0.5000, 0.1192])
        >>> class_probability(model, torch.tensor([[1.0, 1.0]]))
        tensor([0.8808])
    """
    with torch.no_grad():
        logits = model(inputs)
    if not isinstance(logits, Tensor):
        raise XAIConfigurationError(
            f"the model returned {type(logits).__name__}, not a tensor of logits; wrap it so that it returns the "
            "(N, K) logits."
        )
    if logits.dim() in (1, 2):
        probs = as_probabilities(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits)
    else:
        raise XAIConfigurationError(
            f"the model returned logits of shape {tuple(logits.shape)} for inputs of shape {tuple(inputs.shape)}; "
            "faithfulness metrics need (N, K) class logits (or (N,) binary logits)."
        )
    if target is None:
        return probs.max(dim=1).values
    target = torch.as_tensor(target, device=probs.device).long().reshape(-1)
    if target.numel() != probs.shape[0]:
        raise XAIConfigurationError(
            f"target has {target.numel()} entries for a batch of {probs.shape[0]}; pass one class index per sample."
        )
    return probs.gather(1, target[:, None])[:, 0]


def _check(inputs: Tensor, attributions: Tensor, target: Tensor) -> None:
    if inputs.shape != attributions.shape:
        raise XAIConfigurationError(
            f"attributions of shape {tuple(attributions.shape)} do not match inputs of shape "
            f"{tuple(inputs.shape)}; faithfulness metrics need one attribution per input element."
        )
    if inputs.dim() < 2 or inputs[0].numel() == 0:
        raise XAIConfigurationError(
            f"inputs of shape {tuple(inputs.shape)} have no features; pass a batch (N, ...) with N first."
        )
    if torch.as_tensor(target).numel() != inputs.shape[0]:
        raise XAIConfigurationError(
            f"target has {torch.as_tensor(target).numel()} entries for inputs of shape {tuple(inputs.shape)}; pass "
            "one class index per sample."
        )


def _ranks(attributions: Tensor) -> Tensor:
    """``(N, F)`` position of every feature in the descending order of its sample (ties: lower index first)."""
    flat = attributions.detach().flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _feature_ranks(attributions: Tensor, feature_dims: Sequence[int] | None) -> tuple[Tensor, int]:
    """``(N, elements)`` rank of each element's feature, and the number of features per sample.

    Without ``feature_dims`` every element is a feature. With them, a feature is one index along those
    dimensions (tokens: ``(1,)`` of ``(N, T, E)``; pixels: ``(2, 3)`` of ``(N, C, H, W)``); its score is the sum
    of its elements' attributions and all its elements share its rank, so they are removed together.
    """
    if feature_dims is None:
        return _ranks(attributions), attributions[0].numel()
    dims = sorted({d % attributions.dim() for d in feature_dims})
    if not dims or 0 in dims:
        raise XAIConfigurationError(f"feature_dims={tuple(feature_dims)} must name non-batch dimensions.")
    summed = [d for d in range(1, attributions.dim()) if d not in dims]
    scores = attributions.detach().sum(dim=summed, keepdim=True) if summed else attributions.detach()
    grouped_ranks = _ranks(scores).view(scores.shape)
    return grouped_ranks.expand_as(attributions).flatten(1), scores[0].numel()


def _top_count(fraction: float, num_features: int) -> int:
    if not 0.0 <= fraction <= 1.0:
        raise XAIConfigurationError(f"fractions must lie in [0, 1], got {fraction}.")
    # round() first so that 0.07 * 100 = 7.000000000000001 counts 7 features, not 8
    return min(num_features, math.ceil(round(fraction * num_features, 9)))


def _perturbed_probabilities(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    ranks: Tensor,
    counts: Sequence[int],
    keep_top: bool,
    baseline: Baseline,
    batch_size: int | None,
) -> Tensor:
    """``(len(counts), N)`` probabilities of ``target`` after perturbing the top ``counts[s]`` features.

    ``keep_top=False`` replaces the top features by the baseline (deletion); ``keep_top=True`` keeps only them.
    """
    n = inputs.shape[0]
    flat = inputs.detach().flatten(1)
    base = torch.broadcast_to(torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device), inputs.shape)
    base = base.flatten(1)
    counts_t = torch.as_tensor(list(counts), device=inputs.device)
    target = torch.as_tensor(target, device=inputs.device).long().reshape(-1)
    total = len(counts) * n
    chunk = n if batch_size is None else int(batch_size)
    if chunk < 1:
        raise XAIConfigurationError(f"batch_size must be a positive number of rows or None, got {batch_size}.")
    out = []
    for start in range(0, total, chunk):
        rows = torch.arange(start, min(start + chunk, total), device=inputs.device)
        step, sample = rows // n, rows % n
        top = ranks[sample] < counts_t[step][:, None]
        kept = top if keep_top else ~top
        perturbed = torch.where(kept, flat[sample], base[sample]).reshape((len(rows),) + inputs.shape[1:])
        out.append(class_probability(model, perturbed, target[sample]))
    return torch.cat(out).reshape(len(counts), n)


def _fraction_scores(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    fractions: Sequence[float],
    baseline: Baseline,
    keep_top: bool,
    batch_size: int | None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    _check(inputs, attributions, target)
    if len(fractions) == 0:
        raise XAIConfigurationError("fractions is empty; give at least one fraction in [0, 1].")
    ranks, num_features = _feature_ranks(attributions, feature_dims)
    counts = [_top_count(float(q), num_features) for q in fractions]
    full = class_probability(model, inputs.detach(), target)
    perturbed = _perturbed_probabilities(model, inputs, target, ranks, counts, keep_top, baseline, batch_size)
    return (full[None] - perturbed).mean(0)


def comprehensiveness(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """ERASER comprehensiveness (DeYoung et al., ACL 2020): how much the prediction drops without the top features.

    For every fraction ``q``, the top ``k = ceil(q * F)`` of the ``F`` features of a sample (by attribution) are
    replaced by ``baseline``; the score is the mean over fractions of ``p_y(x) - p_y(x without its top-q)``.
    Higher is better: a faithful attribution ranks first the features the prediction needs.

    Args:
        model: maps inputs to logits.
        inputs: ``(N, ...)`` explained inputs.
        attributions: ``(N, ...)`` attributions, same shape as ``inputs``.
        target: ``(N,)`` explained classes.
        fractions: the fractions ``q`` in [0, 1] (the ERASER bins by default).
        baseline: the value of removed features (number or tensor broadcasting to ``inputs``).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per fraction.
        feature_dims: dimensions that index features (tokens: ``(1,)`` of ``(N, T, E)``); their elements are
            ranked and removed together. ``None``: every element is a feature.

    Returns:
        ``(N,)`` comprehensiveness per sample.

    Examples:
        >>> model = nn.Linear(4, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        >>> x = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
        >>> comprehensiveness(model, x, x, torch.tensor([1]), fractions=(0.25, 0.5))
        tensor([0.3665])
    """
    return _fraction_scores(model, inputs, attributions, target, fractions, baseline, False, batch_size, feature_dims)


def sufficiency(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """ERASER sufficiency (DeYoung et al., ACL 2020): how much the prediction drops with only the top features.

    For every fraction ``q`` only the top ``k = ceil(q * F)`` features are kept and the rest set to ``baseline``;
    the score is the mean over fractions of ``p_y(x) - p_y(top-q of x only)``. Lower is better (it can be
    negative when the top features alone make the model more confident).

    Args:
        model: maps inputs to logits.
        inputs: ``(N, ...)`` explained inputs.
        attributions: ``(N, ...)`` attributions, same shape as ``inputs``.
        target: ``(N,)`` explained classes.
        fractions: the fractions ``q`` in [0, 1].
        baseline: the value of removed features (number or tensor broadcasting to ``inputs``).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per fraction.
        feature_dims: dimensions that index features (tokens: ``(1,)`` of ``(N, T, E)``); their elements are
            ranked and removed together. ``None``: every element is a feature.

    Returns:
        ``(N,)`` sufficiency per sample.

    Examples:
        >>> model = nn.Linear(4, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        >>> x = torch.tensor([[3.0, 0.0, 1.0, 0.0]])
        >>> sufficiency(model, x, x, torch.tensor([1]), fractions=(0.25, 0.5))
        tensor([0.0147])
    """
    return _fraction_scores(model, inputs, attributions, target, fractions, baseline, True, batch_size, feature_dims)


def _curve(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    steps: int,
    baseline: Baseline,
    insert: bool,
    batch_size: int | None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    _check(inputs, attributions, target)
    if int(steps) < 1:
        raise XAIConfigurationError(f"steps must be a positive integer, got {steps}.")
    steps = int(steps)
    ranks, num_features = _feature_ranks(attributions, feature_dims)
    counts = [(i * num_features + steps - 1) // steps for i in range(steps + 1)]  # ceil(i * F / steps), exact
    probs = _perturbed_probabilities(model, inputs, target, ranks, counts, insert, baseline, batch_size)
    return probs.transpose(0, 1)


def deletion_curve(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """Probability of ``target`` as the top features are deleted (set to ``baseline``) in ``steps`` chunks.

    Point ``i`` (``i = 0..steps``, at ``x = i / steps``) has the top ``ceil(i * F / steps)`` features deleted:
    point 0 is the unperturbed input, point ``steps`` is the baseline.

    Returns:
        ``(N, steps + 1)`` probabilities.

    Examples:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> deletion_curve(model, x, x, torch.tensor([1]), steps=2)
        tensor([[0.9526, 0.7311, 0.5000]])
    """
    return _curve(model, inputs, attributions, target, steps, baseline, False, batch_size, feature_dims)


def insertion_curve(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """Probability of ``target`` as the top features are inserted into the ``baseline`` in ``steps`` chunks.

    Point ``i`` (``i = 0..steps``) keeps the top ``ceil(i * F / steps)`` features and has the rest at the
    baseline: point 0 is the baseline, point ``steps`` the unperturbed input.

    Returns:
        ``(N, steps + 1)`` probabilities.

    Examples:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> insertion_curve(model, x, x, torch.tensor([1]), steps=2)
        tensor([[0.5000, 0.8808, 0.9526]])
    """
    return _curve(model, inputs, attributions, target, steps, baseline, True, batch_size, feature_dims)


def _trapezoid(curve: Tensor) -> Tensor:
    steps = curve.shape[1] - 1
    return (curve.sum(1) - 0.5 * (curve[:, 0] + curve[:, -1])) / steps


def deletion_auc(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """Deletion score (Petsiuk et al., BMVC 2018, RISE): area under the deletion curve.

    The area of :func:`deletion_curve` by the trapezoid rule on ``x`` in [0, 1], endpoints included. Lower is
    better: the probability should collapse as soon as the most important features are gone.

    Args:
        model: maps inputs to logits.
        inputs: ``(N, ...)`` explained inputs.
        attributions: ``(N, ...)`` attributions, same shape as ``inputs``.
        target: ``(N,)`` explained classes.
        steps: number of equal chunks of features (the curve has ``steps + 1`` points).
        baseline: the value of removed features (number or tensor broadcasting to ``inputs``).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per step.
        feature_dims: dimensions that index features (tokens: ``(1,)`` of ``(N, T, E)``); their elements are
            ranked and removed together. ``None``: every element is a feature.

    Returns:
        ``(N,)`` areas in [0, 1].

    Examples:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> deletion_auc(model, x, x, torch.tensor([1]), steps=2)  # (0.9526 / 2 + 0.7311 + 0.5 / 2) / 2
        tensor([0.7287])
    """
    return _trapezoid(deletion_curve(model, inputs, attributions, target, steps, baseline, batch_size, feature_dims))


def insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int | None = None,
    feature_dims: Sequence[int] | None = None,
) -> Tensor:
    """Insertion score (Petsiuk et al., BMVC 2018, RISE): area under the insertion curve.

    The area of :func:`insertion_curve` by the trapezoid rule on ``x`` in [0, 1], endpoints included. Higher is
    better: the probability should rise as soon as the most important features are back.

    Args:
        model: maps inputs to logits.
        inputs: ``(N, ...)`` explained inputs.
        attributions: ``(N, ...)`` attributions, same shape as ``inputs``.
        target: ``(N,)`` explained classes.
        steps: number of equal chunks of features (the curve has ``steps + 1`` points).
        baseline: the starting value of every feature (number or tensor broadcasting to ``inputs``).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per step.
        feature_dims: dimensions that index features (tokens: ``(1,)`` of ``(N, T, E)``); their elements are
            ranked and removed together. ``None``: every element is a feature.

    Returns:
        ``(N,)`` areas in [0, 1].

    Examples:
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> insertion_auc(model, x, x, torch.tensor([1]), steps=2)
        tensor([0.8035])
    """
    return _trapezoid(insertion_curve(model, inputs, attributions, target, steps, baseline, batch_size, feature_dims))
