"""ERASER sufficiency as a metric: the top-attributed features alone should keep the prediction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import Baseline, sufficiency
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class Sufficiency(AttributionMetric):
    """Sufficiency (DeYoung et al., ACL 2020) over batches; lower is better.

    The mean drop of the target probability when only the top-q features are kept.
    See :func:`~lightning_xai.functional.faithfulness.sufficiency`.

    States are the sum of per-sample scores and the number of samples (reduced with ``sum``, exact under DDP);
    ``compute`` returns their ratio, the mean over every sample seen.

    Args:
        fractions: fractions ``q`` of the features (top ``ceil(q * F)`` per sample), the ERASER bins by default.
        baseline: the value of removed features (number or tensor broadcasting to the inputs).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per fraction.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> metric = Sufficiency(fractions=(0.5,))
        >>> metric.update(x, x, torch.tensor([1, 1]), model=model)
        >>> metric.compute()
        tensor(0.0718, dtype=torch.float64)
    """

    requires = ("model", "target")
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    score_sum: Tensor
    total: Tensor

    def __init__(
        self,
        fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        fractions = tuple(float(q) for q in fractions)
        if not fractions or any(not 0.0 <= q <= 1.0 for q in fractions):
            raise XAIConfigurationError(
                f"Sufficiency(fractions={fractions}): give at least one fraction, each in [0, 1]."
            )
        self.fractions = fractions
        if batch_size is not None and int(batch_size) < 1:
            raise XAIConfigurationError(
                f"Sufficiency(batch_size={batch_size}): give a positive number of rows per forward pass, or None."
            )
        self.baseline = baseline
        self.batch_size = batch_size
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
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
        """Adds the per-sample sufficiency of a batch (``explain_fn`` and ``mask`` are not used)."""
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        scores = sufficiency(model, inputs, attributions, target, self.fractions, self.baseline, self.batch_size)
        self.score_sum += scores.sum().to(self.score_sum)
        self.total += scores.numel()

    def compute(self) -> Tensor:
        """Mean sufficiency over every sample seen."""
        return self.score_sum / self.total

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
