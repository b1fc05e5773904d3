"""Attribution methods by name, for metrics and pictures: Captum's methods plus CD and split IG.

Captum does the work for its methods; this module only names them, picks defaults that suit images,
tabular inputs and text, and maps token-id inputs onto Captum's Layer variants over the embedding layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from captum import attr as captum_attr
from torch import Tensor, nn

from lightning_xai.attribution.contextual_decomposition import decompose
from lightning_xai.attribution.split_integrated_gradients import _repeat_rows, split_integrated_gradients
from lightning_xai.errors import XAIConfigurationError

AttributionFn = Callable[..., Tensor]
_METHODS: dict[str, AttributionFn] = {}
_TEXT_METHODS: dict[str, AttributionFn] = {}


def register_attribution_method(name: str, text: bool = False) -> Callable[[AttributionFn], AttributionFn]:
    """Registers ``fn(model, inputs, target, **kwargs) -> attributions`` under ``name``.

    With ``text=True`` the function handles integer token ids and receives ``embedding_layer``.
    """

    def decorator(fn: AttributionFn) -> AttributionFn:
        (_TEXT_METHODS if text else _METHODS)[name] = fn
        return fn

    return decorator


def available_attribution_methods(text: bool = False) -> list[str]:
    """Names accepted by :func:`attribute` for float inputs (or, with ``text=True``, for token ids).

    Examples:
        >>> "integrated_gradients" in available_attribution_methods()
        True
    """
    return sorted(_TEXT_METHODS if text else _METHODS)


def attribute(
    method: str,
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None = None,
    embedding_layer: nn.Module | None = None,
    **kwargs: Any,
) -> Tensor:
    """Attributions of ``model``'s ``target`` outputs for ``inputs`` with the method named ``method``.

    Float inputs give attributions of the inputs' shape. Integer token ids need ``embedding_layer``
    (the module whose output are the token embeddings): gradient methods then run as Captum's Layer
    variants over that layer and return ``(N, T, E)``; perturbation methods and CD score whole tokens and
    spread each token's score evenly over its ``E`` embedding values, so summing over ``E`` always gives
    per-token scores.

    Args:
        method: a name from :func:`available_attribution_methods`.
        model: maps inputs to logits.
        inputs: ``(N, ...)`` float inputs or ``(N, T)`` token ids.
        target: ``(N,)`` classes to explain.
        embedding_layer: the token-embedding module, for token-id inputs.
        **kwargs: method options (``n_steps``, ``baselines``, ``patch_size``, ``n_samples``, ...).

    Raises:
        XAIConfigurationError: unknown method, or token ids without ``embedding_layer``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
        >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
        >>> attribute("integrated_gradients", model, x, y, n_steps=8).shape
        torch.Size([2, 3, 8, 8])
        >>> attribute("feature_ablation", model, x, y, patch_size=4).shape
        torch.Size([2, 3, 8, 8])
    """
    if inputs.is_floating_point():
        if method not in _METHODS:
            raise XAIConfigurationError(
                f"unknown attribution method {method!r}; available: {available_attribution_methods()} "
                "(register more with lightning_xai.attribution.register_attribution_method)."
            )
        return _METHODS[method](model, inputs, target, **kwargs)
    if embedding_layer is None:
        raise XAIConfigurationError(
            f"attribution method {method!r} got integer inputs (token ids) but no `embedding_layer`: pass the "
            "embedding module so that attributions are computed on token embeddings."
        )
    if method not in _TEXT_METHODS:
        raise XAIConfigurationError(
            f"unknown attribution method {method!r} for token ids; available: {available_attribution_methods(True)}."
        )
    return _TEXT_METHODS[method](model, inputs, target, embedding_layer=embedding_layer, **kwargs)


# ----------------------------------------------------------------------------------- float inputs


def _patch_feature_mask(inputs: Tensor, patch_size: int | None) -> Tensor | None:
    """Feature groups: ``patch_size`` squares shared by all channels for images, single columns otherwise."""
    if inputs.dim() < 3 or patch_size is None:
        return None
    spatial = inputs.shape[2:]
    grid = [math.ceil(size / patch_size) for size in spatial]
    coordinates = torch.meshgrid(
        *[torch.arange(size, device=inputs.device) // patch_size for size in spatial], indexing="ij"
    )
    ids = torch.zeros(spatial, dtype=torch.long, device=inputs.device)
    stride = 1
    for coordinate, size in zip(reversed(coordinates), reversed(grid)):
        ids = ids + coordinate * stride
        stride *= size
    return ids.view(1, 1, *spatial)


def _default_patch(inputs: Tensor) -> int | None:
    return max(1, min(inputs.shape[2:]) // 7) if inputs.dim() >= 3 else None


def _baselines(inputs: Tensor, baselines: Tensor | float | None) -> Tensor | float:
    return 0.0 if baselines is None else baselines


@register_attribution_method("saliency")
def _saliency(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    abs: bool = True,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    return captum_attr.Saliency(model).attribute(
        inputs, target=target, abs=abs, additional_forward_args=additional_forward_args
    )


@register_attribution_method("input_x_gradient")
def _input_x_gradient(
    model: nn.Module, inputs: Tensor, target: Tensor | None, additional_forward_args: tuple[Any, ...] | None = None
) -> Tensor:
    return captum_attr.InputXGradient(model).attribute(
        inputs, target=target, additional_forward_args=additional_forward_args
    )


@register_attribution_method("integrated_gradients")
def _integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    baselines: Tensor | float | None = None,
    n_steps: int = 32,
    internal_batch_size: int | None = None,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    return captum_attr.IntegratedGradients(model).attribute(
        inputs,
        baselines=_baselines(inputs, baselines),
        target=target,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        additional_forward_args=additional_forward_args,
    )


@register_attribution_method("split_integrated_gradients")
def _split_integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    baselines: Tensor | float | None = None,
    n_steps: int = 32,
    psi: float = 0.95,
    internal_batch_size: int | None = None,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    return split_integrated_gradients(  # type: ignore[return-value]
        model,
        inputs,
        target,
        baselines,
        psi=psi,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        additional_forward_args=additional_forward_args,
    )


@register_attribution_method("deeplift")
def _deeplift(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    baselines: Tensor | float | None = None,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    return captum_attr.DeepLift(model).attribute(
        inputs, baselines=_baselines(inputs, baselines), target=target, additional_forward_args=additional_forward_args
    )


@register_attribution_method("gradient_shap")
def _gradient_shap(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    baselines: Tensor | None = None,
    n_samples: int = 8,
    stdevs: float = 0.0,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    # The batch itself is the baseline distribution (as in Expected Gradients), plus the all-zero input.
    distribution = torch.cat([torch.zeros_like(inputs[:1]), inputs.detach()]) if baselines is None else baselines
    return captum_attr.GradientShap(model).attribute(
        inputs,
        baselines=distribution,
        target=target,
        n_samples=n_samples,
        stdevs=stdevs,
        additional_forward_args=additional_forward_args,
    )


@register_attribution_method("occlusion")
def _occlusion(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    patch_size: int | None = None,
    stride: int | None = None,
    baselines: float = 0.0,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    if inputs.dim() >= 3:
        patch = patch_size or _default_patch(inputs) or 1
        window = (inputs.shape[1],) + (patch,) * (inputs.dim() - 2)
        strides = (inputs.shape[1],) + (stride or patch,) * (inputs.dim() - 2)
    else:
        window, strides = (1,) * (inputs.dim() - 1), (1,) * (inputs.dim() - 1)
    return captum_attr.Occlusion(model).attribute(
        inputs,
        sliding_window_shapes=window,
        strides=strides,
        target=target,
        baselines=baselines,
        additional_forward_args=additional_forward_args,
    )


def _patch_grouped(captum_class: type, **defaults: Any) -> AttributionFn:
    """A Captum perturbation method over feature groups: patches shared by all channels for images."""

    def method(
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | None,
        patch_size: int | None = None,
        baselines: float = 0.0,
        additional_forward_args: tuple[Any, ...] | None = None,
        **options: Any,
    ) -> Tensor:
        feature_mask = _patch_feature_mask(inputs, patch_size or _default_patch(inputs))
        return captum_class(model).attribute(
            inputs,
            target=target,
            feature_mask=feature_mask,
            baselines=baselines,
            additional_forward_args=additional_forward_args,
            **{**defaults, **options},
        )

    return method


register_attribution_method("feature_ablation")(_patch_grouped(captum_attr.FeatureAblation))
register_attribution_method("kernel_shap")(_patch_grouped(captum_attr.KernelShap, n_samples=64))
register_attribution_method("lime")(_patch_grouped(captum_attr.Lime, n_samples=64))


def _group_masks(inputs: Tensor, patch_size: int | None) -> Tensor:
    """``(G, 1|N, ...)`` one 0/1 mask per feature group (patches for images, columns for vectors)."""
    if inputs.dim() >= 3:
        ids = _patch_feature_mask(inputs, patch_size or _default_patch(inputs))
        assert ids is not None
    else:
        ids = torch.arange(inputs[0].numel(), device=inputs.device).view(1, *inputs.shape[1:])
    groups = int(ids.max()) + 1
    return (ids.unsqueeze(0) == torch.arange(groups, device=inputs.device).view(-1, *([1] * ids.dim()))).float()


@register_attribution_method("contextual_decomposition")
def _contextual_decomposition(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | None,
    patch_size: int | None = None,
    internal_batch_size: int = 1024,
    additional_forward_args: tuple[Any, ...] | None = None,
) -> Tensor:
    """CD relevance of the target class for each feature group, spread evenly over the group's elements."""
    if target is None:
        raise XAIConfigurationError("contextual_decomposition attributions need `target`.")
    masks = _group_masks(inputs, patch_size)  # (G, 1, ...)
    n, groups = inputs.shape[0], masks.shape[0]
    scores = []
    flat_inputs = inputs.detach().unsqueeze(0).expand(groups, *inputs.shape).flatten(0, 1)
    flat_masks = masks.expand(groups, n, *masks.shape[2:]).flatten(0, 1)
    flat_target = target.repeat(groups)
    with torch.no_grad():
        for start in range(0, flat_inputs.shape[0], internal_batch_size):
            stop = start + internal_batch_size
            extra = tuple(_repeat_rows(a, groups)[start:stop] for a in additional_forward_args or ())
            relevant = decompose(model, flat_inputs[start:stop], flat_masks[start:stop], extra).relevant
            scores.append(relevant.gather(1, flat_target[start:stop].view(-1, 1)).squeeze(1))
    score = torch.cat(scores).view(groups, n)
    elements = (masks.flatten(1).sum(1) * (inputs.shape[1] if inputs.dim() >= 3 else 1)).clamp_min(1)
    per_element = (score / elements.view(-1, 1)).view(groups, n, *([1] * (inputs.dim() - 1)))
    return (per_element * masks.expand(groups, n, *masks.shape[2:])).sum(0).expand_as(inputs).contiguous()


# ------------------------------------------------------------------------------------- token ids


def _spread_over_embeddings(token_scores: Tensor, embedding_layer: nn.Module, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        width = embedding_layer(inputs[:1, :1]).shape[-1]
    return (token_scores / width).unsqueeze(-1).expand(*token_scores.shape, width).contiguous()


def _layer_method(captum_class: type, constructor: dict[str, Any] | None = None, **fixed: Any) -> AttributionFn:
    # Gradient methods on token ids run over the embedding layer's output; input-space sampling methods
    # (GradientShap's noisy baselines) have no meaning for discrete ids and are not offered for text.
    def method(
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | None,
        embedding_layer: nn.Module,
        baselines: Tensor | int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        explainer = captum_class(model, embedding_layer, **(constructor or {}))
        options = {**fixed, **kwargs}
        if captum_class is not captum_attr.LayerGradientXActivation:
            options["baselines"] = torch.zeros_like(inputs) if baselines is None else baselines
        return explainer.attribute(inputs, target=target, **options)

    return method


register_attribution_method("integrated_gradients", text=True)(
    _layer_method(captum_attr.LayerIntegratedGradients, n_steps=32)
)
register_attribution_method("input_x_gradient", text=True)(_layer_method(captum_attr.LayerGradientXActivation))
register_attribution_method("saliency", text=True)(
    _layer_method(captum_attr.LayerGradientXActivation, constructor={"multiply_by_inputs": False})
)
register_attribution_method("deeplift", text=True)(_layer_method(captum_attr.LayerDeepLift))


def _token_perturbation(captum_class: type) -> AttributionFn:
    def method(
        model: nn.Module,
        inputs: Tensor,
        target: Tensor | None,
        embedding_layer: nn.Module,
        baseline_token: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        explainer = captum_class(model)
        if captum_class is captum_attr.Occlusion:
            scores = explainer.attribute(inputs, sliding_window_shapes=(1,), target=target, baselines=baseline_token)
        else:
            scores = explainer.attribute(inputs, target=target, baselines=baseline_token, **kwargs)
        return _spread_over_embeddings(scores.float(), embedding_layer, inputs)

    return method


for _name, _class in (
    ("occlusion", captum_attr.Occlusion),
    ("feature_ablation", captum_attr.FeatureAblation),
    ("kernel_shap", captum_attr.KernelShap),
    ("lime", captum_attr.Lime),
):
    register_attribution_method(_name, text=True)(_token_perturbation(_class))


@register_attribution_method("contextual_decomposition", text=True)
def _token_contextual_decomposition(
    model: nn.Module, inputs: Tensor, target: Tensor | None, embedding_layer: nn.Module
) -> Tensor:
    if target is None:
        raise XAIConfigurationError("contextual_decomposition attributions need `target`.")
    n, length = inputs.shape
    masks = torch.eye(length, device=inputs.device).repeat_interleave(n, dim=0)  # (T * N, T), token by token
    with torch.no_grad():
        relevant = decompose(model, inputs.repeat(length, 1), masks).relevant
    scores = relevant.gather(1, target.repeat(length).view(-1, 1)).view(length, n).T
    return _spread_over_embeddings(scores, embedding_layer, inputs)
