"""Agreement between two attribution methods, per explained item, as a metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.sanity import rank_correlation


class AttributionAgreement(Metric):
    """Mean Spearman rank correlation between two methods' attributions of the same items (higher: they agree).

    Items may have different numbers of features (prompts of different lengths): each pair is ranked on its own,
    with :func:`~lightning_xai.functional.sanity.rank_correlation` (of ``|a|`` and ``|b|`` when ``absolute``).
    Pairs with a constant attribution (correlation undefined) are left out. States are the sum of correlations
    and the number of pairs counted (``sum``-reduced, exact under DDP).

    Args:
        absolute: rank by magnitude (True) or by signed value.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> metric = AttributionAgreement(absolute=False)
        >>> metric.update([torch.tensor([0.1, 0.5, 0.2]), torch.tensor([1.0, 2.0])],
        ...               [torch.tensor([1.0, 9.0, 2.0]), torch.tensor([2.0, 1.0])])
        >>> metric.compute()
        tensor(0., dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    correlation_sum: Tensor
    count: Tensor

    def __init__(self, absolute: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.absolute = bool(absolute)
        self.add_state("correlation_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, first: Sequence[Tensor], second: Sequence[Tensor]) -> None:
        """Adds the correlation of every pair ``(first[i], second[i])`` (same shape per pair)."""
        if len(first) != len(second):
            raise XAIConfigurationError(
                f"AttributionAgreement: {len(first)} and {len(second)} attributions; pair them."
            )
        for a, b in zip(first, second):
            if a.shape != b.shape:
                raise XAIConfigurationError(
                    f"AttributionAgreement: paired attributions of shapes {tuple(a.shape)} and {tuple(b.shape)}."
                )
            correlation = rank_correlation(
                a.detach().reshape(1, -1).float(), b.detach().reshape(1, -1).float(), absolute=self.absolute
            )
            if torch.isfinite(correlation).all():
                self.correlation_sum += correlation.sum().to(self.correlation_sum)
                self.count += 1

    def compute(self) -> Tensor:
        """The mean correlation over the counted pairs."""
        return self.correlation_sum / self.count
