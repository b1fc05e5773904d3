"""Confidence indication (Atanasova et al., EMNLP 2020) as a metric: do attributions reveal the model's confidence?"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.functional.faithfulness import class_probability
from lightning_xai.functional.plausibility import (
    confidence_features,
    confidence_indication_from_statistics,
    confidence_indication_statistics,
)
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class ConfidenceIndication(AttributionMetric):
    """RMSE of predicting the predicted-class probability from attribution statistics; lower is better.

    A linear regression with intercept predicts the model's predicted-class probability (softmax maximum) from
    the max, mean and std of every sample's attribution (which should explain the predicted class), fitted by
    least squares over every sample seen. The states are the sufficient statistics ``X^T X``, ``X^T y``, ``y^T y``
    and ``n`` in float64 (reduced with ``sum``), so the fit under DDP is exactly the fit on the global data;
    ``compute`` solves the normal equations, see
    :func:`~lightning_xai.functional.plausibility.confidence_indication_from_statistics`.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0], [2.0, 2.0]])
        >>> metric = ConfidenceIndication()
        >>> metric.update(x, x, model=model)  # attributions: input x gradient of the predicted class 1
        >>> metric.update(x / 2, x / 2, model=model)
        >>> metric.compute()
        tensor(0.0364, dtype=torch.float64)
    """

    requires = ("model",)
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    xtx: Tensor
    xty: Tensor
    yty: Tensor
    n: Tensor

    num_features = 3  # max, mean, std

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        d = self.num_features + 1
        self.add_state("xtx", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("xty", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("yty", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

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
        """Adds a batch to the regression statistics (``target``, ``explain_fn`` and ``mask`` are not used).

        Raises:
            XAIConfigurationError: if ``model`` is missing.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        probabilities = class_probability(model, inputs.detach())
        xtx, xty, yty, n = confidence_indication_statistics(confidence_features(attributions), probabilities)
        self.xtx += xtx.to(self.xtx)
        self.xty += xty.to(self.xty)
        self.yty += yty.to(self.yty)
        self.n += n.to(self.n)

    def compute(self) -> Tensor:
        """RMSE of the least-squares fit over every sample seen (NaN before any)."""
        return confidence_indication_from_statistics(self.xtx, self.xty, self.yty, self.n)

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
