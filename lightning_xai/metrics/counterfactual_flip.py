"""Causal flip test of protected attributes that are model inputs, as a torchmetrics metric."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError


class CounterfactualFlip(Metric):
    """How much predictions move when one protected attribute of the input is set to another value.

    For every example, every attribute ``a`` and every value ``v'`` other than the example's own, the caller
    runs the model on the input with ``a := v'`` and passes both predictions here. Per attribute and per
    cell of the original example, the metric averages ``|p(x_a:=v') - p(x)|`` of the positive-class probability
    (``abs_change``) and how often the decision changes (``flip_rate``). A model blind to ``a`` scores 0 on
    both; with ``a`` as an input, a model can be fair by group rates and still decide by ``a`` for an individual,
    which only this test shows.

    Args:
        attributes: names of the protected attributes.
        num_values: number of values of each attribute (its cells are the mixed-radix combinations).
        cell_names: one name per cell; default ``cell0``, ...

    Examples:
        >>> import torch
        >>> metric = CounterfactualFlip(["sex"], [2])
        >>> metric.update(
        ...     attribute=0,
        ...     cells=torch.tensor([0, 1]),
        ...     probability=torch.tensor([0.7, 0.4]),
        ...     counterfactual_probability=torch.tensor([0.3, 0.45]),
        ...     decision=torch.tensor([1, 0]),
        ...     counterfactual_decision=torch.tensor([0, 0]),
        ... )
        >>> values = metric.compute()
        >>> values["sex/flip_rate"].item(), round(values["sex/abs_change"].item(), 3)
        (0.5, 0.225)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    abs_change: Tensor
    flips: Tensor
    comparisons: Tensor

    def __init__(
        self,
        attributes: Sequence[str],
        num_values: Sequence[int],
        cell_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.attributes = list(attributes)
        self.num_cells = math.prod(int(k) for k in num_values)
        self.cell_names = list(cell_names) if cell_names is not None else [f"cell{i}" for i in range(self.num_cells)]
        if len(self.cell_names) != self.num_cells or len(self.attributes) != len(num_values):
            raise XAIConfigurationError(
                f"CounterfactualFlip: {len(self.attributes)} attributes with num_values={list(num_values)} make "
                f"{self.num_cells} cells; got {len(self.cell_names)} cell_names."
            )
        shape = (len(self.attributes), self.num_cells)
        self.add_state("abs_change", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("flips", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("comparisons", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        attribute: int,
        cells: Tensor,
        probability: Tensor,
        counterfactual_probability: Tensor,
        decision: Tensor,
        counterfactual_decision: Tensor,
    ) -> None:
        """Add one counterfactual value of attribute number ``attribute`` for a batch (all ``(N,)``)."""
        cells = cells.to(self.device).reshape(-1)
        change = (counterfactual_probability.detach() - probability.detach()).abs().to(self.device, torch.float64)
        flipped = (counterfactual_decision.reshape(-1) != decision.reshape(-1)).to(self.device, torch.float64)
        self.abs_change[attribute].index_add_(0, cells, change.reshape(-1))
        self.flips[attribute].index_add_(0, cells, flipped)
        self.comparisons[attribute].index_add_(0, cells, torch.ones_like(flipped))

    def compute(self) -> dict[str, Tensor]:
        """``<attribute>/abs_change``, ``<attribute>/flip_rate``, and per cell over all attributes."""

        def mean(total: Tensor, count: Tensor) -> Tensor:
            return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, torch.nan))

        values: dict[str, Tensor] = {}
        for index, attribute in enumerate(self.attributes):
            count = self.comparisons[index].sum()
            values[f"{attribute}/abs_change"] = mean(self.abs_change[index].sum(), count)
            values[f"{attribute}/flip_rate"] = mean(self.flips[index].sum(), count)
        per_cell_count = self.comparisons.sum(0)
        per_cell_change = mean(self.abs_change.sum(0), per_cell_count)
        per_cell_flips = mean(self.flips.sum(0), per_cell_count)
        for cell, name in enumerate(self.cell_names):
            values[f"cell/{name}/abs_change"] = per_cell_change[cell]
            values[f"cell/{name}/flip_rate"] = per_cell_flips[cell]
        return values
