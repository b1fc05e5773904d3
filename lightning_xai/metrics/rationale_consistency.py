"""Rationale consistency (Atanasova et al., EMNLP 2020): models that reason differently should explain differently."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_cat

from lightning_xai._contract import eval_mode
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.consistency import (
    _paired_means,
    activation_distance,
    consistency_correlation,
    layer_activations,
    saliency_distance,
)
from lightning_xai.functional.sanity import parameterised_layers, randomize_top_layers
from lightning_xai.metrics._base import AttributionMetric, ExplainFn
from lightning_xai.metrics._consistency import (
    Classes,
    check_classes,
    check_feature_dims,
    explain_classes,
    num_classes,
    predicted,
    reduce_features,
)


class RationaleConsistency(AttributionMetric):
    """Spearman correlation between how differently two models compute and how differently they are explained.

    For every instance ``x`` seen, the metric compares the explained ``model`` (A) with a second model (B): a
    ``reference`` model the user gives (another training seed, an earlier checkpoint) or, by default, a randomly
    initialised copy of ``model`` (every layer with parameters re-initialised under ``seed``, so every batch and every
    DDP rank compares with the same copy). It records

    * the activation distance, the mean over layers of ``|mean(act_A(x) - act_B(x))|``, over the leaf layers with
      parameters that run in both models (or the named ``layers``), read with forward hooks;
    * the saliency distance, the mean absolute difference of the two models' saliencies of every class
      (``classes="all"``, as Atanasova et al.) or of the explained class (``classes="target"``).

    ``compute`` returns the Spearman correlation of the two lists, min-max scaled
    (:func:`~lightning_xai.functional.consistency.consistency_correlation`). Higher is better: an explanation
    technique is consistent when the instances on which the models' computations differ most are those on which
    their explanations differ most. It is NaN when every saliency distance is equal, e.g. when the models differ only
    in a branch the explanation cannot see (all saliency distances 0), or when fewer than two instances were seen.

    The states are the per-instance distances, list states reduced with ``cat`` (a rank correlation is no sum
    statistic), so DDP gathers them and ``compute`` correlates the global lists. ``update`` explains with
    ``explain_fn(model, inputs, target)`` with gradients enabled and outside inference mode, on a clone of ``inputs``;
    the ``attributions`` given are used for model A with ``classes="target"``. ``feature_dims`` names the input
    dimensions that index features: ``(1,)`` for ``(N, T, E)`` token embeddings sums the saliency over the embedding
    (the :class:`~lightning_xai.callbacks.AttributionMetrics` callback sets it for text).

    In Atanasova et al.'s scripts (copenlu/xai-benchmark, ``consistency_rats.py``) the pairs are two trained seeds,
    two random initialisations, or one of each, and the final score takes ``|mean over layers|`` of the signed
    per-layer mean differences; this follows the paper's text (the mean over layers of the absolute values).

    Args:
        reference: model B, called like ``model`` on the same inputs (left in its own device; put in eval mode during
            ``update``). None: a randomly initialised copy of ``model``.
        seed: seed of the random initialisation (with ``reference=None``).
        layers: module names whose activations are compared (a name may leave out a wrapper's prefix); None for
            every leaf module with parameters.
        classes: ``"all"`` (saliencies of every class) or ``"target"``.
        feature_dims: input dimensions that index features; the saliency is summed over the others.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> def input_x_gradient(model, x, target):
        ...     x = x.detach().requires_grad_(True)
        ...     score = model(x).gather(1, target[:, None]).sum()
        ...     return x * torch.autograd.grad(score, x)[0]
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> metric = RationaleConsistency(seed=0)
        >>> metric.update(x, input_x_gradient(model, x, y), y, model=model, explain_fn=input_x_gradient)
        >>> activations, saliencies = metric.compute_distances()
        >>> activations.shape, saliencies.shape
        (torch.Size([64]), torch.Size([64]))
        >>> bool(-1 <= metric.compute() <= 1)
        True
    """

    requires = ("model", "explain_fn")
    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    activation_distances: list[Tensor]
    saliency_distances: list[Tensor]

    def __init__(
        self,
        reference: nn.Module | None = None,
        seed: int = 0,
        layers: Sequence[str] | None = None,
        classes: Classes = "all",
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.classes = check_classes("RationaleConsistency", classes)
        self.feature_dims = check_feature_dims("RationaleConsistency", feature_dims)
        self.seed = int(seed)
        self.layers = None if layers is None else list(layers)
        # a tuple keeps the reference out of the metric's (and so the LightningModule's) submodules and state_dict
        self._reference: tuple[nn.Module, ...] = () if reference is None else (reference,)
        self.add_state("activation_distances", [], dist_reduce_fx="cat")
        self.add_state("saliency_distances", [], dist_reduce_fx="cat")

    @property
    def reference(self) -> nn.Module | None:
        """The user's model B, or None for a randomly initialised copy of the explained model."""
        return self._reference[0] if self._reference else None

    def _model_b(self, model: nn.Module) -> nn.Module:
        if self._reference:
            return self._reference[0]
        try:
            return randomize_top_layers(model, len(parameterised_layers(model)), seed=self.seed)
        except XAIConfigurationError as error:
            raise XAIConfigurationError(
                f"RationaleConsistency cannot build the randomly initialised copy of {type(model).__name__}: {error} "
                "Alternatively pass the second model as RationaleConsistency(reference=...)."
            ) from error

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
        """Adds the activation and saliency distance of every instance of the batch (``mask`` is not used).

        ``target=None`` explains model A's predicted classes (with ``classes="target"``).

        Raises:
            XAIConfigurationError: if ``model`` or ``explain_fn`` is missing, a named layer does not exist, or the
                two models share no layer with activations of one shape.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        other = self._model_b(model)
        with eval_mode(other), torch.inference_mode(False), torch.enable_grad():
            inputs = inputs.detach().clone()
            logits, activations_a = layer_activations(model, inputs, self.layers)
            _, activations_b = layer_activations(other, inputs, self.layers)
            means_a, means_b = _paired_means(activations_a, activations_b, "RationaleConsistency")
            if self.classes == "all":
                count = num_classes(logits)
                saliency_a = explain_classes(explain_fn, model, inputs, count, self.feature_dims)
                saliency_b = explain_classes(explain_fn, other, inputs, count, self.feature_dims)
            else:
                target = predicted(logits) if target is None else target.detach().clone().long()
                saliency_a = reduce_features(attributions.detach().to(torch.float64), self.feature_dims)
                saliency_b = reduce_features(
                    explain_fn(other, inputs, target).detach().to(torch.float64), self.feature_dims
                )
        self.activation_distances.append(activation_distance(means_a, means_b))
        self.saliency_distances.append(saliency_distance(saliency_a, saliency_b))

    def compute_distances(self) -> tuple[Tensor, Tensor]:
        """The ``(P,)`` activation and saliency distances of every instance seen (gathered over ranks)."""
        return (
            dim_zero_cat(self.activation_distances).to(torch.float64),
            dim_zero_cat(self.saliency_distances).to(torch.float64),
        )

    def compute(self) -> Tensor:
        """The Spearman correlation of the min-max scaled distances (NaN when either list is constant)."""
        distances = self.activation_distances
        if not len(distances) or (isinstance(distances, Tensor) and distances.numel() == 0):
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return consistency_correlation(*self.compute_distances())

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
