"""Split (saturation-aware) Integrated Gradients (Miglani et al., 2020).

Along the straight path from a baseline to the input, a network's output often saturates early: most of
the output change happens on the first part of the path, while the rest contributes gradients from a
saturated region that can swamp the picture. Split IG walks the path once, finds the first point where
the output has covered ``psi`` of its total change, and splits the Integrated-Gradients sum there: the
*left* part (before the split) is the saturation-aware attribution, the *right* part the rest. Both use
Captum's quadrature, so ``left + right`` equals Captum's Integrated Gradients with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import Tensor

from lightning_xai.errors import XAIConfigurationError


def _target_output(
    model: Callable[..., Tensor], inputs: Tensor, target: Tensor | None, extra: tuple[Any, ...] = ()
) -> Tensor:
    output = model(inputs, *extra)
    if output.dim() == 1:
        return output
    if output.dim() == 2 and output.shape[1] == 1 and target is None:
        return output[:, 0]
    if target is None:
        raise XAIConfigurationError("split_integrated_gradients needs `target` for a model with several outputs.")
    return output.gather(1, target.view(-1, 1)).squeeze(1)


def _repeat_rows(value: Any, times: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value


def split_integrated_gradients(
    model: Callable[[Tensor], Tensor],
    inputs: Tensor,
    target: Tensor | None = None,
    baselines: Tensor | float | None = None,
    psi: float = 0.95,
    n_steps: int = 50,
    method: str = "gausslegendre",
    internal_batch_size: int | None = None,
    return_parts: bool = False,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Integrated Gradients up to the point where the output has covered ``psi`` of its change.

    Args:
        model: maps a batch of inputs to outputs (logits, or probabilities to split on them).
        inputs: ``(N, ...)`` float inputs.
        target: ``(N,)`` output indices; not needed for a model with a single output per sample.
        baselines: a tensor like ``inputs``, a number, or ``None`` for zeros.
        psi: the fraction of the output change ``F(x) - F(x')`` at which the path is split.
        n_steps: path points, as in Captum's ``IntegratedGradients``.
        method: Captum's approximation method (``"gausslegendre"``, ``"riemann_trapezoid"``, ...).
        internal_batch_size: path points per forward pass; all ``n_steps * N`` at once when ``None``.
        return_parts: also return the right part and the per-sample split position ``alpha``.

    Returns:
        The left (saturation-aware) attribution, or ``(left, right, split_alpha)``.

    Examples:
        >>> import torch
        >>> from captum.attr import IntegratedGradients
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, target = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
        >>> left, right, alpha = split_integrated_gradients(model, x, target, return_parts=True)
        >>> plain = IntegratedGradients(model).attribute(x, target=target)
        >>> torch.allclose(left + right, plain, atol=1e-6)
        True
    """
    if not 0.0 < psi <= 1.0:
        raise XAIConfigurationError(f"psi must be in (0, 1], got {psi}.")
    if baselines is None:
        baselines = torch.zeros_like(inputs)
    elif not isinstance(baselines, Tensor):
        baselines = torch.full_like(inputs, float(baselines))
    inputs, baselines = inputs.detach(), baselines.detach().expand_as(inputs)
    step_sizes_fn, alphas_fn = approximation_parameters(method)
    step_sizes = torch.tensor(step_sizes_fn(n_steps), dtype=inputs.dtype, device=inputs.device)
    alphas = torch.tensor(alphas_fn(n_steps), dtype=inputs.dtype, device=inputs.device)
    n = inputs.shape[0]
    difference = inputs - baselines
    feature_dims = (1,) * (inputs.dim() - 1)

    path = (baselines.unsqueeze(0) + alphas.view(-1, 1, *feature_dims) * difference.unsqueeze(0)).flatten(0, 1)
    path_target = None if target is None else target.repeat(n_steps)
    extra = tuple(additional_forward_args or ())
    path_extra = tuple(_repeat_rows(a, n_steps) for a in extra)
    chunk = path.shape[0] if internal_batch_size is None else max(1, internal_batch_size)
    outputs, gradients = [], []
    with torch.enable_grad():
        for start in range(0, path.shape[0], chunk):
            points = path[start : start + chunk].clone().requires_grad_(True)
            chunk_target = None if path_target is None else path_target[start : start + chunk]
            chunk_extra = tuple(a[start : start + chunk] if isinstance(a, Tensor) else a for a in path_extra)
            values = _target_output(model, points, chunk_target, chunk_extra)
            (gradient,) = torch.autograd.grad(values.sum(), points)
            outputs.append(values.detach())
            gradients.append(gradient)
    path_outputs = torch.cat(outputs).view(n_steps, n)
    path_gradients = torch.cat(gradients).view(n_steps, n, *inputs.shape[1:])
    with torch.no_grad():
        both = _target_output(
            model,
            torch.cat([inputs, baselines]),
            None if target is None else target.repeat(2),
            tuple(_repeat_rows(a, 2) for a in extra),
        )
    at_input, at_baseline = both[:n], both[n:]

    change = at_input - at_baseline
    progress = (path_outputs - at_baseline) / torch.where(change == 0, torch.ones_like(change), change)
    crossed = (progress >= psi) & (change != 0)
    # index of the first path point past the split; n_steps (no split) where the output never gets there
    first = torch.where(crossed.any(0), crossed.float().argmax(0), torch.full_like(at_input, n_steps).long())
    before_split = (torch.arange(n_steps, device=inputs.device).view(-1, 1) < first.view(1, -1)).to(inputs.dtype)
    weighted = path_gradients * step_sizes.view(-1, 1, *feature_dims)
    left = difference * (weighted * before_split.view(n_steps, n, *feature_dims)).sum(0)
    right = difference * (weighted * (1 - before_split).view(n_steps, n, *feature_dims)).sum(0)
    if not return_parts:
        return left
    split_alpha = torch.where(first < n_steps, alphas[first.clamp_max(n_steps - 1)], torch.ones_like(at_input))
    return left, right, split_alpha
