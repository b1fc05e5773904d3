"""Shared machinery of metrics that re-run the model on perturbed copies and average a per-sample score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import Baseline
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class PerturbationScore(AttributionMetric):
    """Mean over every sample seen of ``_scores(...)``; states are sums (exact under DDP)."""

    requires = ("model", "target")
    is_differentiable = False
    full_state_update = False

    score_sum: Tensor
    total: Tensor

    def __init__(
        self,
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # dimensions that index features (tokens: (1,) of (N, T, E)); None: every element is a feature
        self.feature_dims = None if feature_dims is None else tuple(feature_dims)
        if batch_size is not None and int(batch_size) < 1:
            raise XAIConfigurationError(
                f"{type(self).__name__}(batch_size={batch_size}): give a positive number of rows per forward pass, "
                "or None."
            )
        self.baseline = baseline
        self.batch_size = batch_size
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _scores(self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

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
        """Adds the per-sample scores of a batch (``explain_fn`` and ``mask`` are not used)."""
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        assert model is not None and target is not None  # checked above
        scores = self._scores(model, inputs, attributions, target)
        self.score_sum += scores.sum().to(self.score_sum)
        self.total += scores.numel()

    def compute(self) -> Tensor:
        """The mean score over every sample seen."""
        return self.score_sum / self.total

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)


class FractionScore(PerturbationScore):
    """A score over the top-``q`` fractions of features (ERASER comprehensiveness and sufficiency)."""

    kernel: Any  # staticmethod(fn(model, inputs, attributions, target, fractions, baseline, batch_size))

    def __init__(
        self,
        fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        fractions = tuple(float(q) for q in fractions)
        if not fractions or any(not 0.0 <= q <= 1.0 for q in fractions):
            raise XAIConfigurationError(
                f"{type(self).__name__}(fractions={fractions}): give at least one fraction, each in [0, 1]."
            )
        super().__init__(baseline, batch_size, feature_dims, **kwargs)
        self.fractions = fractions

    def _scores(self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor) -> Tensor:
        return type(self).kernel(
            model, inputs, attributions, target, self.fractions, self.baseline, self.batch_size, self.feature_dims
        )


class CurveScore(PerturbationScore):
    """The area under a probability curve as features are deleted or inserted in ``steps`` chunks."""

    kernel: Any  # staticmethod(fn(model, inputs, attributions, target, steps, baseline, batch_size))

    def __init__(
        self,
        steps: int = 20,
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        if int(steps) < 1:
            raise XAIConfigurationError(f"{type(self).__name__}(steps={steps}): give a positive number of steps.")
        super().__init__(baseline, batch_size, feature_dims, **kwargs)
        self.steps = int(steps)

    def _scores(self, model: nn.Module, inputs: Tensor, attributions: Tensor, target: Tensor) -> Tensor:
        return type(self).kernel(
            model, inputs, attributions, target, self.steps, self.baseline, self.batch_size, self.feature_dims
        )
