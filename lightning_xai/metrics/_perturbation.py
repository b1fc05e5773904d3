"""Shared machinery of metrics that re-run the model on perturbed copies and average a per-sample score."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import Baseline
from lightning_xai.metrics._base import ExplainFn, MeanScoreMetric


class PerturbationScore(MeanScoreMetric):
    """Mean over every sample seen of a score that re-runs the model on perturbed copies."""

    requires = ("model", "target")
    full_state_update = False

    def __init__(
        self,
        baseline: Baseline = 0.0,
        batch_size: int | None = None,
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if batch_size is not None and int(batch_size) < 1:
            raise XAIConfigurationError(
                f"{type(self).__name__}(batch_size={batch_size}): give a positive number of rows per forward pass, "
                "or None."
            )
        # dimensions that index features (tokens: (1,) of (N, T, E)); None: every element is a feature
        self.feature_dims = None if feature_dims is None else tuple(feature_dims)
        self.baseline = baseline
        self.batch_size = batch_size

    def _scores(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None,
        model: nn.Module | None,
        explain_fn: ExplainFn | None,
        mask: Tensor | None,
    ) -> Tensor:
        return type(self).kernel(
            model,
            inputs,
            attributions,
            target,
            *self._kernel_options(),
            self.baseline,
            self.batch_size,
            self.feature_dims,
        )

    def _kernel_options(self) -> tuple[Any, ...]:
        raise NotImplementedError


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

    def _kernel_options(self) -> tuple[Any, ...]:
        return (self.fractions,)


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

    def _kernel_options(self) -> tuple[Any, ...]:
        return (self.steps,)
