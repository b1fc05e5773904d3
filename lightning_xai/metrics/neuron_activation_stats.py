"""NeuronActivationStats: TX-Ray's per-neuron feature counts of one layer as torchmetrics states."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.neurons import CREDIT_MODES, CreditMode, NeuronFeatureCounts, neuron_feature_mass


class NeuronActivationStats(Metric):
    """Accumulates :func:`~lightning_xai.functional.neurons.neuron_feature_mass` over batches (and DDP ranks).

    The states are the ``(num_neurons, num_features)`` mass and count matrices, summed: under DDP the result is
    exactly that of one process over the union of the ranks' samples. :meth:`compute` returns both matrices;
    :mod:`lightning_xai.functional.neurons` turns them into distributions, Hellinger distances, lengths and scores.

    Args:
        num_neurons: the layer's neurons (channels, hidden units).
        num_features: the number of distinct features (vocabulary size, tag set, classes).
        mode: ``"max"`` (TX-Ray's max-1: each position credited to its argmax neuron) or ``"topk"``.
        k: positions per neuron and sample in ``"topk"`` mode.

    Example:
        >>> import torch
        >>> stats = NeuronActivationStats(num_neurons=2, num_features=3)
        >>> stats.update(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[0, 2]]))
        >>> stats.update(torch.tensor([[[3.0, 0.0]]]), torch.tensor([[1]]))
        >>> stats.compute().mass.tolist()
        [[1.0, 3.0, 0.0], [0.0, 0.0, 2.0]]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    mass: Tensor
    count: Tensor

    def __init__(self, num_neurons: int, num_features: int, mode: CreditMode = "max", k: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        if num_neurons < 1 or num_features < 1 or k < 1:
            raise XAIConfigurationError(
                f"NeuronActivationStats: num_neurons, num_features and k must be >= 1, got {num_neurons}, "
                f"{num_features} and {k}."
            )
        if mode not in CREDIT_MODES:
            raise XAIConfigurationError(
                f"NeuronActivationStats: unknown mode {mode!r}; available: {sorted(CREDIT_MODES)}."
            )
        self.num_neurons = int(num_neurons)
        self.num_features = int(num_features)
        self.mode = mode
        self.k = int(k)
        for state in ("mass", "count"):
            self.add_state(state, torch.zeros(self.num_neurons, self.num_features), dist_reduce_fx="sum")

    def update(self, activations: Tensor, features: Tensor, valid: Tensor | None = None) -> None:
        """Adds a batch of ``(batch, positions, neurons)`` activations with their ``features``.

        Args:
            activations: the layer's activations, e.g. ``layer_positions(module, output)``.
            features: ``(batch,)`` labels or ``(batch, length)`` per-position features.
            valid: ``(batch, length)`` booleans; ``False`` positions (padding) are not credited.
        """
        if activations.shape[-1] != self.num_neurons:
            raise XAIConfigurationError(
                f"NeuronActivationStats: the activations have {activations.shape[-1]} neurons, the metric was built "
                f"for {self.num_neurons}."
            )
        counts = neuron_feature_mass(activations, features, self.num_features, self.mode, self.k, valid)
        self.mass += counts.mass.to(self.mass)
        self.count += counts.count.to(self.count)

    def compute(self) -> NeuronFeatureCounts:
        return NeuronFeatureCounts(self.mass.clone(), self.count.clone())
