"""Share of attribution in a region as a metric: how much of the explanation sits where it must not."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.plausibility import region_attribution_mass
from lightning_xai.metrics._base import ExplainFn, MeanScoreMetric


class RegionAttributionMass(MeanScoreMetric):
    """Mean share of absolute attribution inside a forbidden region (a decoy, a spurious patch); lower is better.

    Per sample ``sum(|a| * mask) / sum(|a|)`` (0 for an all-zero attribution), see
    :func:`~lightning_xai.functional.plausibility.region_attribution_mass`. Samples whose mask is empty (no
    forbidden region) are left out of the mean. States are the sum of shares and the number of counted samples
    (reduced with ``sum``, exact under DDP); ``compute`` is NaN before any sample with a region.

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> metric = RegionAttributionMass()
        >>> a = torch.tensor([[3.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
        >>> mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # no region in the last sample
        >>> metric.update(a, a, mask=mask)
        >>> metric.compute()  # (0.75 + 0.5) / 2
        tensor(0.6250, dtype=torch.float64)
    """

    requires = ("mask",)
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def _scores(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None,
        model: nn.Module | None,
        explain_fn: ExplainFn | None,
        mask: Tensor | None,
    ) -> Tensor:
        """The shares inside ``mask`` (the forbidden region) of the samples whose region is not empty.

        Raises:
            MaskShapeError: if ``mask`` does not fit ``attributions``.
        """
        mass = region_attribution_mass(attributions, mask)
        has_region = broadcast_mask(mask, attributions).expand_as(attributions).flatten(1).ne(0).any(1)
        return mass[has_region]
