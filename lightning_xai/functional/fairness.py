"""Intersectional fairness: cells of protected attributes, dependence estimators and count-based rates.

Several protected attributes (sex, race, ...) define *intersectional cells*: every combination of their values
is one cell, numbered in mixed radix (:func:`intersectional_cells`). Everything else works from per-cell sums
that are fixed-shape and additive, so a DDP all-gather or a running average of them gives exact global
statistics:

* :func:`cell_statistics`: per cell (optionally per true class), the sum of the soft predictions and the
  number of examples, from one matrix product;
* :func:`dependence_from_statistics`: plug-in mutual information ``I(Yhat; S)`` (or ``I(Yhat; S | Y)``),
  the chi-square dependence (an upper bound of HGR maximal correlation squared), linear-kernel HSIC or the
  largest gap between cells' mean predictions (:func:`rate_gap`: DiffDP's penalty, and with one-hot decisions
  fairlearn's demographic-parity and equalized-odds differences);
* :func:`wilson_interval` and :func:`difference_interval`: confidence intervals of per-cell rates and of the
  gap between two cells, and :func:`parity_gap_floor`, the gap a fair model shows on cells of these
  sizes, so that a gap within sampling noise shows as one;
* :func:`mutual_information_penalty`: both steps on one batch, differentiable;
* :func:`cell_confusion_counts` and :func:`fairness_report`: per-cell positive, true- and false-positive
  rates and accuracy, demographic-parity and equalized-odds differences (fairlearn's definitions).

The plug-in estimate is biased upward on small samples: a model whose predictions do not depend on the
cell still scores ``I > 0`` because each cell's mean prediction is noisy. For hard predictions the bias is
about ``(C - 1)(S - 1) / (2 N)`` (Miller-Madow); with soft predictions it is smaller but grows the same
way as cells get small. ``min_cell_count`` drops cells too small to estimate, and running statistics
(:func:`running_statistics`) average the cells over many steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_xai.errors import GroupValueError, XAIConfigurationError

Estimator = Literal["plugin", "chi2", "hsic", "rate_gap"]
ESTIMATORS: tuple[str, ...] = ("plugin", "chi2", "hsic", "rate_gap")


def _as_columns(groups: Tensor, num_attributes: int, where: str) -> Tensor:
    if groups.dim() == 1 and num_attributes == 1:
        groups = groups.unsqueeze(1)
    if groups.dim() != 2 or groups.shape[1] != num_attributes:
        raise GroupValueError(
            f"{where}: groups must have shape (N, {num_attributes}) (one column per protected attribute), got "
            f"{tuple(groups.shape)}."
        )
    if groups.is_floating_point():
        if not torch.equal(groups, groups.round()):
            raise GroupValueError(f"{where}: groups must hold integer codes of the attribute values, got fractions.")
        groups = groups.long()
    return groups.long()


def intersectional_cells(groups: Tensor, num_values: Sequence[int], names: Sequence[str] | None = None) -> Tensor:
    """The intersectional cell of every example: mixed-radix number of its attribute values.

    With attributes of ``num_values = (K_1, ..., K_A)`` values, the cell of ``(g_1, ..., g_A)`` is
    ``((g_1 K_2 + g_2) K_3 + g_3) ...``: the last attribute varies fastest, and there are ``prod K_a`` cells.

    Args:
        groups: ``(N, A)`` integer codes, column ``a`` in ``[0, K_a)``; ``(N,)`` when ``A == 1``.
        num_values: number of values ``K_a`` of each attribute.
        names: attribute names, used in error messages.

    Returns:
        ``(N,)`` long tensor of cell ids in ``[0, prod K_a)``.

    Raises:
        GroupValueError: wrong shape, a non-integer code, or a code outside ``[0, K_a)`` (the message names
            the attribute, the value and the fix).

    Examples:
        >>> import torch
        >>> sex_race = torch.tensor([[0, 0], [0, 4], [1, 2]])
        >>> intersectional_cells(sex_race, num_values=[2, 5])
        tensor([0, 4, 7])
    """
    where = "intersectional_cells"
    num_values = [int(k) for k in num_values]
    if not num_values or min(num_values) < 1:
        raise XAIConfigurationError(f"{where}: num_values must list at least one attribute with >= 1 value each.")
    columns = _as_columns(groups, len(num_values), where)
    names = list(names) if names is not None else [f"attribute {a}" for a in range(len(num_values))]
    # one check of all columns: this runs every training step, and each check waits for the device
    outside = (columns < 0) | (columns >= columns.new_tensor(num_values))
    if columns.numel() and bool(outside.any()):
        a = int(outside.any(0).nonzero()[0])
        bad, k = columns[outside[:, a], a][0].item(), num_values[a]
        raise GroupValueError(
            f"{where}: {names[a]!r} has the value {bad}, outside [0, {k}); encode it as 0..{k - 1} or raise "
            f"its number of values (num_values) to cover it."
        )
    cells = columns[:, 0]
    for a, k in enumerate(num_values[1:], start=1):
        cells = cells * k + columns[:, a]
    return cells.clone() if len(num_values) == 1 else cells  # never a view of the caller's codes


def as_probabilities(outputs: Tensor) -> Tensor:
    """Class probabilities ``(N, C)`` from logits: softmax over ``(N, C >= 2)``, sigmoid of ``(N,)``/``(N, 1)``.

    Examples:
        >>> import torch
        >>> as_probabilities(torch.tensor([0.0, 2.0])).round(decimals=3)
        tensor([[0.5000, 0.5000],
                [0.1190, 0.8810]])
    """
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        positive = torch.sigmoid(outputs.reshape(-1))
        return torch.stack([1 - positive, positive], dim=1)
    if outputs.dim() != 2:
        raise XAIConfigurationError(
            f"as_probabilities: expected (N, classes) logits or (N,) binary logits, got shape {tuple(outputs.shape)}."
        )
    return torch.softmax(outputs, dim=1)


def cell_statistics(
    probs: Tensor,
    cells: Tensor,
    num_cells: int,
    target: Tensor | None = None,
    num_target_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-cell sums of the soft predictions and per-cell counts, optionally per true class.

    ``sums[y, s, c] = sum over examples i of cell s (and true class y) of probs[i, c]``; ``counts[y, s]`` is
    the number of those examples. Without ``target`` the leading dimension has size 1. Both come from one
    matrix product with the one-hot cell (and class) indicator, so they are additive over batches and ranks.

    Args:
        probs: ``(N, C)`` class probabilities.
        cells: ``(N,)`` cell ids from :func:`intersectional_cells`.
        num_cells: number of cells ``S``.
        target: ``(N,)`` true classes, for the conditional (equalized-odds) form.
        num_target_classes: number of true classes ``Y``; default ``C``.

    Returns:
        ``(sums (Y, S, C), counts (Y, S))`` in ``probs``' dtype.

    Examples:
        >>> import torch
        >>> probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
        >>> sums, counts = cell_statistics(probs, torch.tensor([0, 0, 1]), num_cells=2)
        >>> sums
        tensor([[[0.8000, 1.2000],
                 [0.5000, 0.5000]]])
        >>> counts
        tensor([[2., 1.]])
    """
    if probs.dim() != 2 or cells.shape != (probs.shape[0],):
        raise XAIConfigurationError(
            f"cell_statistics: probs must be (N, C) and cells (N,), got {tuple(probs.shape)} and {tuple(cells.shape)}."
        )
    num_strata = 1
    index = cells
    if target is not None:
        num_strata = int(num_target_classes if num_target_classes is not None else probs.shape[1])
        target = target.reshape(-1).long()
        if target.numel() and (target.min() < 0 or target.max() >= num_strata):
            raise GroupValueError(
                f"cell_statistics: target holds classes outside [0, {num_strata}); pass num_target_classes."
            )
        index = target * num_cells + cells
    indicator = torch.nn.functional.one_hot(index, num_strata * num_cells).to(probs.dtype)
    sums = (indicator.T @ probs).view(num_strata, num_cells, probs.shape[1])
    counts = indicator.sum(0).view(num_strata, num_cells)
    return sums, counts


def _safe_log(x: Tensor, keep: Tensor) -> Tensor:
    return torch.log(torch.where(keep, x, torch.ones_like(x)))


def dependence_from_statistics(
    sums: Tensor, counts: Tensor, estimator: Estimator = "plugin", min_cell_count: float = 1.0
) -> Tensor:
    """Dependence between the soft prediction and the cell, from :func:`cell_statistics` (or their averages).

    Within each stratum ``y`` (one stratum without a target), with ``p(s, c) = sums[y, s, c] / n_y``,
    ``p(s) = counts[y, s] / n_y`` and ``p(c) = sum_s p(s, c)``:

    * ``"plugin"``: mutual information ``sum p(s,c) log(p(s,c) / (p(s) p(c)))`` in nats;
    * ``"chi2"``: ``sum (p(s,c) - p(s)p(c))^2 / (p(s)p(c))``, the chi-square divergence from independence,
      an upper bound of the squared HGR maximal correlation;
    * ``"hsic"``: ``sum (p(s,c) - p(s)p(c))^2``, HSIC with a linear kernel on the predictions and a delta
      kernel on the cells (the squared Frobenius norm of their cross-covariance);
    * ``"rate_gap"``: the largest difference between two cells' mean predictions, the worst stratum's
      (:func:`rate_gap`; not averaged over strata).

    The strata are averaged with weights ``n_y / n`` (conditional dependence ``I(Yhat; S | Y)``). Cells with
    fewer than ``min_cell_count`` examples, and strata without examples, are left out; all four are 0 when
    every cell has the same mean prediction.

    Args:
        sums: ``(Y, S, C)`` per-cell sums of probabilities.
        counts: ``(Y, S)`` per-cell counts.
        estimator: ``"plugin"``, ``"chi2"``, ``"hsic"`` or ``"rate_gap"``.
        min_cell_count: cells with a smaller count are ignored.

    Returns:
        A scalar, differentiable with respect to ``sums``; 0 (not NaN) when nothing is left to compare.

    Examples:
        Equal mean predictions in both cells: no dependence.

        >>> import torch
        >>> sums = torch.tensor([[[1.0, 3.0], [0.5, 1.5]]])
        >>> dependence_from_statistics(sums, torch.tensor([[4.0, 2.0]]))
        tensor(0.)
    """
    if estimator not in ESTIMATORS:
        raise XAIConfigurationError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    _check_statistics(sums, counts, "dependence_from_statistics")
    if estimator == "rate_gap":  # a gap between cells, not a divergence of the joint from the product
        return rate_gap(sums, counts, min_cell_count)
    kept = (counts >= min_cell_count) & (counts > 0)
    counts = torch.where(kept, counts, torch.zeros_like(counts))
    sums = sums * kept.unsqueeze(-1).to(sums.dtype)
    stratum_size = counts.sum(1)  # (Y,)
    has_examples = stratum_size > 0
    normalizer = torch.where(has_examples, stratum_size, torch.ones_like(stratum_size))
    joint = sums / normalizer[:, None, None]  # p(s, c | y)
    p_cell = counts / normalizer[:, None]  # p(s | y)
    p_class = joint.sum(1, keepdim=True)  # p(c | y)
    product = p_cell.unsqueeze(-1) * p_class
    per_stratum = _DIVERGENCES[estimator](joint, product).sum((1, 2))
    total = stratum_size.sum()
    weights = stratum_size / torch.where(total > 0, total, torch.ones_like(total))
    return (weights * per_stratum).sum()


def _mutual_information_entries(joint: Tensor, product: Tensor) -> Tensor:
    positive = (joint > 0) & (product > 0)
    return torch.where(positive, joint * (_safe_log(joint, positive) - _safe_log(product, positive)), 0.0)


def _chi2_entries(joint: Tensor, product: Tensor) -> Tensor:
    denominator = torch.where(product > 0, product, torch.ones_like(product))
    return torch.where(product > 0, (joint - product).pow(2) / denominator, 0.0)


def _hsic_entries(joint: Tensor, product: Tensor) -> Tensor:
    return (joint - product).pow(2)


# per (cell, class) entry of each divergence between p(s, c | y) and p(s | y) p(c | y)
_DIVERGENCES = {"plugin": _mutual_information_entries, "chi2": _chi2_entries, "hsic": _hsic_entries}


def _check_statistics(sums: Tensor, counts: Tensor, where: str) -> None:
    if sums.dim() != 3 or counts.shape != sums.shape[:2]:
        raise XAIConfigurationError(
            f"{where}: sums must be (Y, S, C) and counts (Y, S), got {tuple(sums.shape)} and {tuple(counts.shape)}."
        )


def rate_gap(sums: Tensor, counts: Tensor, min_cell_count: float = 1.0) -> Tensor:
    """The largest difference between two cells' mean predictions, in the worst stratum and class.

    With ``rate[y, s, c] = sums[y, s, c] / counts[y, s]``, it is ``max over y, c of (max_s - min_s) rate[y, s, c]``
    over the cells with at least ``min_cell_count`` examples. On one-hot *decisions* this is fairlearn's
    ``demographic_parity_difference`` (one stratum) and ``equalized_odds_difference`` (strata = true
    classes: the larger of the TPR and FPR gaps); on soft probabilities it is the DiffDP penalty (Chuang &
    Mroueh 2021, as in FFB) generalized to many cells, and with tempered logits (temperature < 1) a
    differentiable surrogate of the decision gap. Its gradient reaches the two extreme cells only.

    Args:
        sums: ``(Y, S, C)`` per-cell sums of predictions (:func:`cell_statistics`).
        counts: ``(Y, S)`` per-cell counts.
        min_cell_count: cells with fewer examples are left out.

    Returns:
        A scalar; 0 when fewer than two cells of a stratum are left.

    Examples:
        >>> import torch
        >>> decisions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])  # one-hot
        >>> sums, counts = cell_statistics(decisions, torch.tensor([0, 0, 1, 1]), num_cells=2)
        >>> rate_gap(sums, counts)
        tensor(0.)
        >>> sums, counts = cell_statistics(decisions, torch.tensor([0, 1, 1, 1]), num_cells=2)
        >>> rate_gap(sums, counts).round(decimals=4)  # positive rates 0 and 2/3
        tensor(0.6667)
    """
    _check_statistics(sums, counts, "rate_gap")
    kept = ((counts >= min_cell_count) & (counts > 0)).unsqueeze(-1)  # (Y, S, 1)
    rates = sums / torch.where(kept, counts.unsqueeze(-1), torch.ones_like(counts.unsqueeze(-1)))
    highest = torch.where(kept, rates, torch.full_like(rates, -torch.inf)).amax(1)  # (Y, C)
    lowest = torch.where(kept, rates, torch.full_like(rates, torch.inf)).amin(1)
    comparable = kept.squeeze(-1).sum(1, keepdim=True) >= 2  # (Y, 1)
    gaps = torch.where(comparable, highest - lowest, torch.zeros_like(highest))
    return gaps.amax() if gaps.numel() else sums.sum() * 0


def wilson_interval(successes: Tensor, trials: Tensor, z: float = 1.96) -> tuple[Tensor, Tensor]:
    """Wilson score interval of a binomial rate ``successes / trials`` (elementwise; NaN where ``trials`` is 0).

    Unlike the normal approximation it stays inside ``[0, 1]`` and keeps its coverage for small cells and
    rates near 0 or 1 (Brown, Cai & DasGupta 2001), the regime of the small intersectional cells.

    Args:
        successes: counts of successes.
        trials: counts of trials.
        z: the normal quantile of the two-sided level (1.96: 95 %).

    Returns:
        ``(low, high)`` in float64.

    Examples:
        >>> import torch
        >>> low, high = wilson_interval(torch.tensor([5]), torch.tensor([50]))
        >>> low.round(decimals=4), high.round(decimals=4)
        (tensor([0.0435], dtype=torch.float64), tensor([0.2136], dtype=torch.float64))
    """
    k, n = successes.to(torch.float64), trials.to(torch.float64)
    defined = n > 0
    n_safe = torch.where(defined, n, torch.ones_like(n))
    p = k / n_safe
    z2 = z * z
    centre = (p + z2 / (2 * n_safe)) / (1 + z2 / n_safe)
    half = z * torch.sqrt(p * (1 - p) / n_safe + z2 / (4 * n_safe * n_safe)) / (1 + z2 / n_safe)
    nan = torch.full_like(p, torch.nan)
    return (
        torch.where(defined, (centre - half).clamp_min(0.0), nan),
        torch.where(defined, (centre + half).clamp_max(1.0), nan),
    )


def difference_interval(
    rate_a: Tensor, interval_a: tuple[Tensor, Tensor], rate_b: Tensor, interval_b: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Newcombe's hybrid score interval of ``rate_a - rate_b`` from the two rates' Wilson intervals.

    ``d - sqrt((a - l_a)^2 + (u_b - b)^2)`` to ``d + sqrt((u_a - a)^2 + (b - l_b)^2)`` (Newcombe 1998, method
    10). Applied to the cells with the highest and the lowest rate it ignores that this pair was selected,
    so it is an optimistic interval of a max - min gap: a gap whose interval includes 0 is within noise.

    Examples:
        >>> import torch
        >>> k, n = torch.tensor([30, 10]), torch.tensor([100, 100])
        >>> low, high = wilson_interval(k, n)
        >>> rates = k / n
        >>> d_low, d_high = difference_interval(rates[0], (low[0], high[0]), rates[1], (low[1], high[1]))
        >>> round(float(d_low), 3), round(float(d_high), 3)
        (0.09, 0.306)
    """
    low_a, high_a = interval_a
    low_b, high_b = interval_b
    difference = rate_a.to(torch.float64) - rate_b.to(torch.float64)
    below = torch.sqrt((rate_a - low_a) ** 2 + (high_b - rate_b) ** 2)
    above = torch.sqrt((high_a - rate_a) ** 2 + (rate_b - low_b) ** 2)
    return difference - below, difference + above


def parity_gap_floor(counts: Tensor, rate: float | Tensor, draws: int = 2000, seed: int = 0) -> Tensor:
    """The expected demographic-parity difference of a *fair* model on cells of these sizes: the noise floor.

    A model whose positive rate is ``rate`` in every cell still shows a max - min gap between the cells'
    observed rates, because each cell's rate is a binomial proportion. This is the mean of that gap over
    ``draws`` seeded simulations. A measured gap near it is indistinguishable from a fair model's; on Adult's
    10 sex x race cells (22-39 rows in the smallest test cells) it is 0.17 at ``rate=0.2``, on the 4-cell
    grouping 0.03.

    Args:
        counts: examples per cell (cells with 0 are left out).
        rate: the common positive rate, e.g. the overall rate of the decisions.
        draws: simulations.
        seed: their seed (the floor is deterministic for given counts).

    Returns:
        A float64 scalar; 0 with fewer than two non-empty cells.

    Examples:
        >>> import torch
        >>> floor = parity_gap_floor(torch.tensor([100, 100]), 0.5)
        >>> round(float(floor), 2)  # about sqrt(2 / pi) * sqrt(0.5 * 0.5 * (1/100 + 1/100))
        0.06
    """
    n = torch.as_tensor(counts).detach().cpu().to(torch.float64).reshape(-1)  # the generator is a CPU one
    n = n[n > 0]
    if n.numel() < 2:
        return torch.zeros((), dtype=torch.float64)
    p = float(torch.as_tensor(rate).detach().cpu().to(torch.float64).clamp(0.0, 1.0))
    generator = torch.Generator().manual_seed(seed)
    positives = torch.binomial(
        n.expand(draws, -1).contiguous(), torch.full((draws, n.numel()), p, dtype=torch.float64), generator=generator
    )
    rates = positives / n
    return (rates.amax(1) - rates.amin(1)).mean()


def running_statistics(previous: Tensor | None, current: Tensor, momentum: float) -> Tensor:
    """An exponential moving average of cell statistics whose gradient is the current batch's.

    The value is ``momentum * previous + (1 - momentum) * current``, but the gradient flows into ``current``
    with weight 1 (not ``1 - momentum``). A dependence estimated from this mix is evaluated at smoothed,
    less biased cell statistics, while its gradient is the estimator's derivative there times the batch's
    own (unbiased) statistics: the chain rule for the dependence of the population, not of the batch.

    Args:
        previous: the running statistics so far (detached), or ``None`` at the first step.
        current: this step's statistics (with gradient).
        momentum: weight of the past, in ``[0, 1)``.

    Examples:
        >>> import torch
        >>> current = torch.tensor([2.0], requires_grad=True)
        >>> mixed = running_statistics(torch.tensor([4.0]), current, momentum=0.75)
        >>> mixed
        tensor([3.5000], grad_fn=<AddBackward0>)
        >>> mixed.sum().backward(); current.grad
        tensor([1.])
    """
    if previous is None or momentum == 0.0:
        return current
    smoothed = momentum * previous.detach() + (1.0 - momentum) * current.detach()
    return smoothed + (current - current.detach())


def mutual_information_penalty(
    probs: Tensor,
    groups: Tensor,
    num_values: Sequence[int],
    target: Tensor | None = None,
    *,
    estimator: Estimator = "plugin",
    conditional_on_target: bool = False,
    min_cell_count: float = 1.0,
    num_target_classes: int | None = None,
) -> Tensor:
    """Differentiable dependence between soft predictions and intersectional cells of protected attributes.

    The regularizer of Kokhlikyan et al. (2022), "Bias mitigation framework for intersectional subgroups in
    neural networks": the plug-in mutual information ``I(Yhat; S)`` between the softmax prediction and the
    joint cell ``S`` of all protected attributes, computed from one matrix product. With
    ``conditional_on_target`` it is ``I(Yhat; S | Y)`` (equalized odds instead of demographic parity).

    Args:
        probs: ``(N, C)`` class probabilities (e.g. ``logits.softmax(1)``), or ``(N,)`` probabilities of the
            positive class.
        groups: ``(N, A)`` integer codes of the ``A`` protected attributes (``(N,)`` for one).
        num_values: number of values of each attribute.
        target: ``(N,)`` true classes; needed for ``conditional_on_target``.
        estimator: ``"plugin"`` (mutual information, nats), ``"chi2"`` or ``"hsic"``; see
            :func:`dependence_from_statistics`.
        conditional_on_target: condition on the true class.
        min_cell_count: cells with fewer examples in the batch are left out.
        num_target_classes: number of true classes; default ``C``.

    Returns:
        A scalar tensor with gradient with respect to ``probs``.

    Examples:
        Predictions that depend on the cell only:

        >>> import torch
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
        >>> sex = torch.tensor([0, 0, 1, 1])
        >>> mutual_information_penalty(probs, sex, num_values=[2]).round(decimals=4)
        tensor(0.3681)
        >>> mutual_information_penalty(probs, torch.tensor([0, 1, 0, 1]), num_values=[2])
        tensor(0.)
    """
    if probs.dim() == 1:
        probs = torch.stack([1 - probs, probs], dim=1)
    if conditional_on_target and target is None:
        raise XAIConfigurationError(
            "mutual_information_penalty: conditional_on_target=True needs target= (the true class of each example)."
        )
    cells = intersectional_cells(groups, num_values)
    num_cells = 1
    for k in num_values:
        num_cells *= int(k)
    sums, counts = cell_statistics(
        probs, cells, num_cells, target if conditional_on_target else None, num_target_classes
    )
    return dependence_from_statistics(sums, counts, estimator, min_cell_count)


def cell_confusion_counts(decisions: Tensor, target: Tensor, cells: Tensor, num_cells: int) -> Tensor:
    """Per-cell confusion counts ``(S, 4)``: true negatives, false positives, false negatives, true positives.

    Args:
        decisions: ``(N,)`` binary decisions (0/1, or bool).
        target: ``(N,)`` binary true labels.
        cells: ``(N,)`` cell ids.
        num_cells: number of cells ``S``.

    Examples:
        >>> import torch
        >>> cell_confusion_counts(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]), 2)
        tensor([[0, 0, 1, 1],
                [0, 1, 0, 0]])
    """
    decisions = decisions.reshape(-1).long()
    target = target.reshape(-1).long()
    if decisions.shape != target.shape or decisions.shape != cells.shape:
        raise XAIConfigurationError(
            f"cell_confusion_counts: decisions {tuple(decisions.shape)}, target {tuple(target.shape)} and cells "
            f"{tuple(cells.shape)} must all be (N,)."
        )
    if target.numel() and (target.min() < 0 or target.max() > 1 or decisions.min() < 0 or decisions.max() > 1):
        raise XAIConfigurationError(
            "cell_confusion_counts: decisions and target must be binary (0/1); for multi-class tasks pick the "
            "positive class (positive_class=...)."
        )
    index = cells * 4 + target * 2 + decisions
    return torch.bincount(index, minlength=num_cells * 4).view(num_cells, 4)


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.full_like(numerator, torch.nan))


def _spread(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(max - min, min / max, min) over the defined (non-NaN) values; NaN when none is defined."""
    defined = values[~values.isnan()]
    if defined.numel() == 0:
        nan = torch.tensor(torch.nan, dtype=values.dtype, device=values.device)
        return nan, nan, nan
    high, low = defined.max(), defined.min()
    ratio = torch.where(high > 0, low / torch.where(high > 0, high, torch.ones_like(high)), torch.ones_like(high))
    return high - low, ratio, low


def fairness_report(confusion: Tensor) -> dict[str, Tensor]:
    """Per-cell rates and group-fairness gaps from :func:`cell_confusion_counts`.

    Per cell: ``count``, ``pos_rate`` (selection rate), ``tpr``, ``fpr`` and ``accuracy``; a rate is NaN
    where its denominator is 0 (a cell without examples, without positives for ``tpr`` or without negatives
    for ``fpr``). The gaps are taken over the cells where the rate is defined, as fairlearn's
    ``between_groups`` differences:

    * ``dp_diff`` / ``dp_ratio``: max - min and min / max of ``pos_rate``
      (fairlearn's ``demographic_parity_difference`` / ``_ratio``);
    * ``eo_diff``: the larger of the ``tpr`` and ``fpr`` differences, ``eo_diff_mean`` their mean
      (``equalized_odds_difference(agg="worst_case" | "mean")``); fairlearn counts a rate with a zero
      denominator as 0, which inflates the gap, so on such data its value differs from this one;
    * ``worst_cell_accuracy``: the lowest ``accuracy``.

    Args:
        confusion: ``(S, 4)`` counts (tn, fp, fn, tp) per cell.

    Returns:
        A dict of ``(S,)`` tensors (per-cell entries) and scalars (gaps), in float64.

    Examples:
        >>> import torch
        >>> report = fairness_report(torch.tensor([[5, 1, 1, 3], [8, 0, 1, 1]]))
        >>> report["pos_rate"], report["dp_diff"]
        (tensor([0.4000, 0.1000], dtype=torch.float64), tensor(0.3000, dtype=torch.float64))
    """
    confusion = confusion.to(torch.float64)
    tn, fp, fn, tp = confusion.unbind(-1)
    count = confusion.sum(-1)
    report = {
        "count": count,
        "pos_rate": _ratio(fp + tp, count),
        "tpr": _ratio(tp, tp + fn),
        "fpr": _ratio(fp, fp + tn),
        "accuracy": _ratio(tp + tn, count),
    }
    report["dp_diff"], report["dp_ratio"], _ = _spread(report["pos_rate"])
    tpr_diff, _, _ = _spread(report["tpr"])
    fpr_diff, _, _ = _spread(report["fpr"])
    report["tpr_diff"], report["fpr_diff"] = tpr_diff, fpr_diff
    report["eo_diff"] = torch.maximum(tpr_diff, fpr_diff)
    report["eo_diff_mean"] = (tpr_diff + fpr_diff) / 2
    _, _, report["worst_cell_accuracy"] = _spread(report["accuracy"])
    return report
