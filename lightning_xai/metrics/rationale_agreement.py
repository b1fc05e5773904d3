"""Agreement with a human rationale as a metric: average precision of the attribution ranking."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.plausibility import rationale_average_precision
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class RationaleAgreement(AttributionMetric):
    """Mean average precision of the attribution against the human rationale (Atanasova et al. 2020); higher is better.

    Every sample's attribution scores its features as a ranking of the rationale (``mask > 0``), see
    :func:`~lightning_xai.functional.plausibility.rationale_average_precision`: the signed value by default, the
    magnitude with ``absolute=True``. Samples without a rationale are left out of the mean. States are the sum of
    average precisions and the number of counted samples (reduced with ``sum``, exact under DDP).

    Args:
        absolute: rank features by ``|attribution|`` instead of the signed value.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> metric = RationaleAgreement()
        >>> a = torch.tensor([[0.9, 0.8, 0.1, 0.0], [1.0, 1.0, 0.0, 0.0]])
        >>> metric.update(a, a, mask=torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
        >>> metric.compute()  # (1.0 + 0.5) / 2
        tensor(0.7500, dtype=torch.float64)
    """

    requires = ("mask",)
    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    precision_sum: Tensor
    total: Tensor

    def __init__(self, absolute: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.absolute = bool(absolute)
        self.add_state("precision_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None = None,
        *,
        model: nn.Module | None = None,
        explain_fn: ExplainFn | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Adds the per-sample average precisions of a batch against ``mask`` (the human rationale).

        Raises:
            XAIConfigurationError: if ``mask`` is missing.
            MaskShapeError: if ``mask`` does not fit ``attributions``.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        ap = rationale_average_precision(attributions, mask, absolute=self.absolute)
        has_rationale = broadcast_mask(mask, attributions).expand_as(attributions).flatten(1).gt(0).any(1)
        self.precision_sum += ap[has_rationale].sum().to(self.precision_sum)
        self.total += has_rationale.sum()

    def compute(self) -> Tensor:
        """Mean average precision over every sample with a rationale."""
        return self.precision_sum / self.total

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
