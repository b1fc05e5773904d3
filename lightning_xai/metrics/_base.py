"""The common interface of attribution-quality metrics.

Every metric is a :class:`torchmetrics.Metric` whose ``update`` takes the same keyword arguments, so
that :class:`~lightning_xai.callbacks.AttributionMetrics` can feed any of them:

``update(inputs, attributions, target=None, *, model=None, explain_fn=None, mask=None)``

* ``inputs``: ``(N, ...)`` the explained inputs (images, features, or token embeddings);
* ``attributions``: ``(N, ...)`` attributions of the same shape as ``inputs``;
* ``target``: ``(N,)`` the explained classes;
* ``model``: a module mapping ``inputs`` to logits (needed by metrics that re-run the model);
* ``explain_fn``: ``explain_fn(model, inputs, target) -> attributions`` (needed by metrics that
  re-explain: sensitivity, randomization);
* ``mask``: a region mask over features (forbidden region or human rationale), any shape that
  :func:`~lightning_xai.functional._masks.broadcast_mask` accepts.

A metric names what it needs in ``requires``; missing arguments raise ``XAIConfigurationError``.
States are sufficient statistics reduced with ``sum``, so values are exact under DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


class AttributionMetric(Metric):
    """Base class: checks the shared ``update`` arguments named in ``requires``."""

    requires: tuple[str, ...] = ()
    full_state_update = False

    def _check_required(self, **arguments: Any) -> None:
        missing = [name for name in self.requires if arguments.get(name) is None]
        if missing:
            raise XAIConfigurationError(
                f"{type(self).__name__}.update needs {missing} (it requires {list(self.requires)}); pass them as "
                "keyword arguments."
            )


class MeanScoreMetric(AttributionMetric):
    """The mean of a per-sample score over every sample counted; float64 sums ``score_sum`` and ``total``.

    Subclasses implement :meth:`_scores`, returning the scores of the samples that count (a metric over
    masks, for example, leaves out samples whose mask is empty).
    """

    is_differentiable = False

    score_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _scores(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None,
        model: nn.Module | None,
        explain_fn: ExplainFn | None,
        mask: Tensor | None,
    ) -> Tensor:
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
        """Adds the per-sample scores of a batch; arguments the metric does not ``require`` are not used.

        Raises:
            XAIConfigurationError: if an argument named in ``requires`` is missing.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        scores = self._scores(inputs, attributions, target, model, explain_fn, mask)
        self.score_sum += scores.sum().to(self.score_sum)
        self.total += scores.numel()

    def compute(self) -> Tensor:
        """The mean score over every sample counted."""
        return self.score_sum / self.total

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)


class SeededMetric(AttributionMetric):
    """Draws its random perturbations from its own generator, seeded with ``self.seed`` and re-seeded by reset.

    With ``seed=None`` the global torch generator is used.
    """

    seed: int | None = None
    _generator: torch.Generator | None = None

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def reset(self) -> None:
        """Reset the states and re-seed the generator."""
        super().reset()
        self._generator = None
