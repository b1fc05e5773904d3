"""MeanActivationMap: a layer's mean ``|activation|`` map over every sample seen (Mind the Pad's mean feature map)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError


class MeanActivationMap(Metric):
    """The mean over samples and channels of ``|activation|`` at each spatial position of a layer's output.

    The states are the float64 sum of the per-sample channel-mean maps and the sample count, both reduced with
    ``sum``: under DDP the map is exactly the map of the global probe set. The map's shape is taken from the first
    update after each reset (a layer's output size depends on the input size), so one metric serves any layer;
    every rank must update at least once before ``compute`` (an empty batch ``(0, C, *spatial)`` counts and sizes
    the sum without adding to it).

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> metric = MeanActivationMap()
        >>> metric.update(torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]]))  # (N=1, C=2, 1, 2): channel mean [2, 1]
        >>> metric.update(torch.zeros(1, 2, 1, 2))
        >>> metric.compute()
        tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    map_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # sized on the first update: an empty default that reset() restores
        self.add_state("map_sum", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        """Adds the channel-mean ``|activations|`` ``(N, C, *spatial)`` of ``N`` samples.

        Raises:
            XAIConfigurationError: the output has no spatial dimension, or its spatial size changed since the last
                reset (the probe's input size must stay fixed).
        """
        if activations.dim() < 3:
            raise XAIConfigurationError(
                f"MeanActivationMap.update needs a layer output (N, C, *spatial), got {tuple(activations.shape)}; "
                "hook a convolution (or another layer with spatial outputs)."
            )
        summed = activations.detach().abs().to(torch.float64).mean(dim=1).sum(dim=0)
        if self.map_sum.shape == (0,) and summed.shape != (0,):
            self.map_sum = torch.zeros_like(summed, device=self.total.device)
        if self.map_sum.shape != summed.shape:
            raise XAIConfigurationError(
                f"MeanActivationMap: this update's map is {tuple(summed.shape)} but earlier ones were "
                f"{tuple(self.map_sum.shape)}; feed inputs of one size between resets."
            )
        self.map_sum += summed.to(self.map_sum.device)
        self.total += activations.shape[0]

    def compute(self) -> Tensor:
        """The mean map (NaN where no sample was seen)."""
        return self.map_sum / self.total
