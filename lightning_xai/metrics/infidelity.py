"""Explanation infidelity as a torchmetrics metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.functional.robustness import Target, check_memory_format, gaussian_perturbation, infidelity
from lightning_xai.metrics._base import ExplainFn, SeededMetric


class Infidelity(SeededMetric):
    """Mean explanation infidelity (Yeh et al., 2019) of the attributions, Captum's definition.

    For each example, ``E_I[(I^T attr - (f(x) - f(x - I)))^2]`` with Gaussian perturbations
    ``I ~ N(0, noise_std^2)``, where ``f`` is the model's logit of the explained class; ``compute`` returns the
    mean over all examples seen. The ``N * n_perturb_samples`` perturbed inputs of a batch go through the model
    in chunks of ``max_examples_per_batch`` rows (see :func:`lightning_xai.functional.robustness.infidelity`).
    Suited to local attributions (gradients, saliency); lower is better.

    Args:
        n_perturb_samples: perturbations per example.
        noise_std: standard deviation of the Gaussian perturbation.
        normalize: rescale the attributions by the least-squares factor first (scale-invariant infidelity).
        seed: seed of the metric's own random generator (re-seeded by ``reset``), for reproducible values;
            ``None`` draws from torch's global generator.
        max_examples_per_batch: perturbed rows per model call: an int, ``None`` (all at once) or ``"auto"``
            (128 rows on CPU, where cache-sized chunks are fastest; all at once elsewhere).
        memory_format: the layout images go into the model in: ``"auto"`` (channels last on CPU, about 1.4-2x
            faster through oneDNN's convolutions, equal to rounding), ``"channels_last"`` or ``"contiguous"``
            (Captum's numbers bit for bit).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(4, 3)
        >>> metric = Infidelity(seed=0)
        >>> x, target = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> metric.update(x, model.weight[target].detach(), target, model=model)  # exact for a linear model
        >>> bool(metric.compute() < 1e-10)
        True
    """

    requires = ("model",)
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    sum_value: Tensor
    count: Tensor

    def __init__(
        self,
        n_perturb_samples: int = 10,
        noise_std: float = 0.003,
        normalize: bool = False,
        seed: int | None = None,
        max_examples_per_batch: int | str | None = "auto",
        memory_format: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n_perturb_samples = n_perturb_samples
        self.noise_std = noise_std
        self.normalize = normalize
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
        """Add the infidelity of one batch of attributions (``explain_fn`` and ``mask`` are not used)."""
        self._check_required(model=model, explain_fn=explain_fn, mask=mask)
        perturb_fn = gaussian_perturbation(self.noise_std, generator=self._generator_on(inputs.device))
        values = infidelity(
            model,
            perturb_fn,
            inputs,
            attributions,
            target,
            n_perturb_samples=self.n_perturb_samples,
            normalize=self.normalize,
            max_examples_per_batch=self.max_examples_per_batch,
            memory_format=self.memory_format,
        )
        self.sum_value += values.sum().to(self.sum_value.dtype)
        self.count += values.numel()

    def compute(self) -> Tensor:
        """Mean infidelity over all examples seen."""
        return self.sum_value / self.count

    def plot(self, val: Tensor | list[Tensor] | None = None, ax: Any = None) -> Any:
        """Plot one value or a sequence of values (torchmetrics' ``plot``); returns ``(figure, axis)``."""
        return self._plot(val, ax)
