"""Model-randomization sanity check (Adebayo et al., NeurIPS 2018) as a metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.sanity import parameterised_layers, randomize_top_layers, rank_correlation
from lightning_xai.metrics._base import AttributionMetric, ExplainFn


class RandomizationSanity(AttributionMetric):
    """Spearman correlation between attributions of a model and of copies with re-initialised top layers.

    An explanation that passes the sanity check changes when the weights it explains are destroyed, so lower is
    better. With ``cascading=True`` the model is compared with copies whose top ``1, 2, ..., L`` parameterised
    layers are re-initialised (``L = num_layers``, or every parameterised layer when None); with
    ``cascading=False`` only with the copy whose top ``num_layers`` (default: all) layers are re-initialised. Copies
    come from :func:`~lightning_xai.functional.sanity.randomize_top_layers` with a fixed ``seed``, so every batch
    and every DDP rank compares against the same randomized models. The correlation is
    :func:`~lightning_xai.functional.sanity.rank_correlation` of ``|attributions|`` per sample; samples whose
    attribution is constant (correlation undefined) are left out.

    The states are, per depth, the sum of correlations and the number of counted samples (reduced with ``sum``);
    ``compute`` returns the mean over depths and samples, :meth:`compute_per_depth` the mean at every depth. With
    ``cascading=True`` and ``num_layers=None`` the number of depths is only known at the first ``update``.

    ``update`` re-explains with ``explain_fn(copy, inputs, target)``, with gradients enabled and outside inference
    mode (on a clone of ``inputs``), so it works inside validation loops; ``target=None`` explains the model's
    predicted classes.

    Args:
        cascading: compare with every depth ``1..L`` (True) or only depth ``num_layers`` (False).
        num_layers: the deepest randomization; None for every parameterised layer of the model.
        seed: seed of the re-initialisation.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> def gradient(model, x, target):
        ...     x = x.detach().requires_grad_(True)
        ...     score = model(x).gather(1, target[:, None]).sum()
        ...     return torch.autograd.grad(score, x)[0]
        >>> x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        >>> metric = RandomizationSanity()
        >>> metric.update(x, gradient(model, x, y), y, model=model, explain_fn=gradient)
        >>> metric.compute_per_depth().shape
        torch.Size([2])
        >>> bool(metric.compute() < 0.9)
        True
    """

    requires = ("model", "explain_fn")
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    correlation_sum: Tensor
    count: Tensor

    def __init__(self, cascading: bool = True, num_layers: int | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_layers is not None and int(num_layers) < 1:
            raise XAIConfigurationError(
                f"RandomizationSanity(num_layers={num_layers}): give a positive number of layers, or None for all."
            )
        self.cascading = bool(cascading)
        self.num_layers = None if num_layers is None else int(num_layers)
        self.seed = int(seed)
        depths = 0 if self.cascading and self.num_layers is None else (self.num_layers if self.cascading else 1)
        self.add_state("correlation_sum", torch.zeros(depths, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(depths, dtype=torch.float64), dist_reduce_fx="sum")

    def _depths(self, model: nn.Module) -> list[int]:
        available = len(parameterised_layers(model))
        deepest = available if self.num_layers is None else self.num_layers
        if deepest > available or deepest < 1:
            raise XAIConfigurationError(
                f"RandomizationSanity(num_layers={self.num_layers}): {type(model).__name__} has {available} "
                "parameterised layers; lower num_layers (or leave it None for all)."
            )
        return list(range(1, deepest + 1)) if self.cascading else [deepest]

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
        """Re-explains the batch with every randomized copy and adds the per-sample correlations.

        ``attributions`` are those of ``model`` itself (computed by the caller, usually with ``explain_fn``).

        Raises:
            XAIConfigurationError: if ``model`` or ``explain_fn`` is missing, or the model has fewer parameterised
                layers than ``num_layers``.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        depths = self._depths(model)
        if self.correlation_sum.numel() == 0:
            self.correlation_sum = torch.zeros(len(depths), dtype=torch.float64, device=self.device)
            self.count = torch.zeros(len(depths), dtype=torch.float64, device=self.device)
        elif self.correlation_sum.numel() != len(depths):
            raise XAIConfigurationError(
                f"RandomizationSanity saw a model with {len(depths)} depths after one with "
                f"{self.correlation_sum.numel()}; use one metric per model (or set num_layers)."
            )
        reference = attributions.detach()
        with torch.inference_mode(False), torch.enable_grad():
            inputs = inputs.detach().clone()
            if target is None:
                with torch.no_grad():
                    logits = model(inputs)
                target = logits.argmax(1) if logits.dim() == 2 and logits.shape[1] > 1 else (logits.reshape(-1) > 0)
                target = target.long()
            else:
                target = target.detach().clone()
            for i, depth in enumerate(depths):
                randomized = randomize_top_layers(model, depth, seed=self.seed)
                explained = explain_fn(randomized, inputs, target).detach()
                correlation = rank_correlation(reference, explained)
                finite = torch.isfinite(correlation)
                self.correlation_sum[i] += correlation[finite].sum().to(self.correlation_sum)
                self.count[i] += finite.sum().to(self.count)

    def compute(self) -> Tensor:
        """Mean correlation over depths and samples."""
        return self.correlation_sum.sum() / self.count.sum()

    def compute_per_depth(self) -> Tensor:
        """Mean correlation at every depth: entry ``i`` compares with the copy whose top ``i + 1`` layers (cascading)
        or top ``num_layers`` layers (not cascading) are re-initialised."""
        return self.correlation_sum / self.count

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
