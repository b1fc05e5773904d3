"""Agreement with a human rationale as a metric: average precision of the attribution ranking."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.plausibility import rationale_average_precision
from lightning_xai.metrics._base import ExplainFn, MeanScoreMetric


class RationaleAgreement(MeanScoreMetric):
    """Mean average precision of the attribution against the human rationale (Atanasova et al. 2020); higher is better.

    Every sample's attribution scores its features as a ranking of the rationale (``mask > 0``), see
    :func:`~lightning_xai.functional.plausibility.rationale_average_precision`: the signed value by default, the
    magnitude with ``absolute=True``. Samples without a rationale are left out of the mean. States are the sum of
    average precisions and the number of counted samples (reduced with ``sum``, exact under DDP).

    Args:
        absolute: rank features by ``|attribution|`` instead of the signed value.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
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

    def __init__(self, absolute: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.absolute = bool(absolute)

    def _scores(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None,
        model: nn.Module | None,
        explain_fn: ExplainFn | None,
        mask: Tensor | None,
    ) -> Tensor:
        """The average precisions against ``mask`` (the human rationale) of the samples that have one.

        Raises:
            MaskShapeError: if ``mask`` does not fit ``attributions``.
        """
        ap = rationale_average_precision(attributions, mask, absolute=self.absolute)
        has_rationale = broadcast_mask(mask, attributions).expand_as(attributions).flatten(1).gt(0).any(1)
        return ap[has_rationale]
