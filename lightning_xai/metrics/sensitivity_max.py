"""Max-sensitivity of explanations as a torchmetrics metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.functional.robustness import Target, check_memory_format, sensitivity_max
from lightning_xai.metrics._base import ExplainFn, SeededMetric


class SensitivityMax(SeededMetric):
    """Mean max-sensitivity (Yeh et al., 2019) of an explanation method, Captum's definition.

    For each example, ``max_j ||e(x_j) - e(x)|| / ||e(x)||`` over ``n_perturb_samples`` inputs
    ``x_j = x + U(-perturb_radius, perturb_radius)``, where ``e = explain_fn(model, ., target)``;
    ``compute`` returns the mean over all examples seen. The explanation is recomputed on ``inputs`` (the
    ``attributions`` argument is not used unless ``reuse_attributions``) and computed on the perturbed inputs in
    chunks of ``max_examples_per_batch`` rows (see :func:`lightning_xai.functional.robustness.sensitivity_max`).
    Lower is better.

    ``explain_fn`` runs with gradients enabled, outside inference mode (inference tensors are cloned), so
    ``update`` may be called from a validation step.

    Args:
        n_perturb_samples: perturbations per example.
        perturb_radius: half-width of the uniform noise.
        seed: seed of the metric's own random generator (re-seeded by ``reset``), for reproducible values;
            ``None`` draws from torch's global generator.
        reuse_attributions: take the ``attributions`` given to ``update`` as ``explain_fn``'s explanation of
            the unperturbed inputs instead of recomputing it, as Captum does (one explanation fewer per batch).
            Only correct when ``attributions`` come from ``explain_fn`` itself; AttributionMetrics turns it on.
        max_examples_per_batch: perturbed rows per ``explain_fn`` call: an int, ``None`` (all at once) or
            ``"auto"`` (128 rows on CPU, where cache-sized chunks are fastest; all at once elsewhere).
        memory_format: the layout images go into the model in: ``"auto"`` (channels last on CPU, about 1.4-2x
            faster through oneDNN's convolutions, equal to rounding), ``"channels_last"`` or ``"contiguous"``
            (Captum's numbers bit for bit).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> def gradient(model, x, target):
        ...     x = x.detach().requires_grad_(True)
        ...     (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
        ...     return grad
        >>> model = nn.Linear(4, 3)  # gradients of a linear model do not move: sensitivity 0
        >>> metric = SensitivityMax(seed=0)
        >>> x, target = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> metric.update(x, gradient(model, x, target), target, model=model, explain_fn=gradient)
        >>> metric.compute()
        tensor(0.)
    """

    requires = ("model", "explain_fn")
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    sum_value: Tensor
    count: Tensor

    def __init__(
        self,
        n_perturb_samples: int = 10,
        perturb_radius: float = 0.02,
        seed: int | None = None,
        reuse_attributions: bool = False,
        max_examples_per_batch: int | str | None = "auto",
        memory_format: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reuse_attributions = reuse_attributions
        self.n_perturb_samples = n_perturb_samples
        self.perturb_radius = perturb_radius
        self.seed = seed
        self.max_examples_per_batch = max_examples_per_batch
        check_memory_format(memory_format, type(self).__name__)
        self.memory_format = memory_format
        self.add_state("sum_value", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Target = None,
        *,
        model: nn.Module | None = None,
        explain_fn: ExplainFn | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Add the max-sensitivity of ``explain_fn`` on one batch (``mask`` is not used)."""
        self._check_required(model=model, explain_fn=explain_fn, mask=mask)
        assert model is not None and explain_fn is not None  # checked above
        with torch.inference_mode(False), torch.enable_grad():
            if inputs.is_inference():
                inputs = inputs.clone()
            if isinstance(target, Tensor) and target.is_inference():
                target = target.clone()
            values = sensitivity_max(
                lambda x, t: explain_fn(model, x, t),
                inputs,
                target,
                perturb_radius=self.perturb_radius,
                n_perturb_samples=self.n_perturb_samples,
                generator=self._generator_on(inputs.device),
                explanations=attributions.detach() if self.reuse_attributions else None,
                max_examples_per_batch=self.max_examples_per_batch,
                memory_format=self.memory_format,
            )
        self.sum_value += values.sum().to(self.sum_value.dtype)
        self.count += values.numel()

    def compute(self) -> Tensor:
        """Mean max-sensitivity over all examples seen."""
        return self.sum_value / self.count

    def plot(self, val: Tensor | list[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot one value or a sequence of values (torchmetrics' ``plot``); returns ``(figure, axis)``."""
        return self._plot(val, ax)
