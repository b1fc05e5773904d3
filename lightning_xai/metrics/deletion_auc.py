"""RISE deletion score as a metric: the prediction should collapse as top-attributed features go."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import Baseline, deletion_auc
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class DeletionAUC(AttributionMetric):
    """Deletion AUC (Petsiuk et al., BMVC 2018) over batches; lower is better.

    The area under the target probability as features are deleted in attribution order.
    See :func:`~lightning_xai.functional.faithfulness.deletion_auc`.

    States are the sum of per-sample scores and the number of samples (reduced with ``sum``, exact under DDP);
    ``compute`` returns their ratio, the mean over every sample seen.

    Args:
        steps: number of equal chunks of features; the curve has ``steps + 1`` points on [0, 1].
        baseline: the value of deleted features (number or tensor broadcasting to the inputs).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per step.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> metric = DeletionAUC(steps=2)
        >>> metric.update(x, x, torch.tensor([1, 1]), model=model)
        >>> metric.compute()
        tensor(0.7287, dtype=torch.float64)
    """

    requires = ("model", "target")
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    score_sum: Tensor
    total: Tensor

    def __init__(
        self,
        steps: int = 20,
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(steps) < 1:
            raise XAIConfigurationError(f"DeletionAUC(steps={steps}): give a positive number of steps.")
        self.steps = int(steps)
        if batch_size is not None and int(batch_size) < 1:
            raise XAIConfigurationError(
                f"DeletionAUC(batch_size={batch_size}): give a positive number of rows per forward pass, or None."
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
        """Adds the per-sample deletion AUC of a batch (``explain_fn`` and ``mask`` are not used)."""
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        scores = deletion_auc(model, inputs, attributions, target, self.steps, self.baseline, self.batch_size)
        self.score_sum += scores.sum().to(self.score_sum)
        self.total += scores.numel()

    def compute(self) -> Tensor:
        """Mean deletion AUC over every sample seen."""
        return self.score_sum / self.total

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
