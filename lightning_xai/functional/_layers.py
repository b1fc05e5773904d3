"""A named layer's output next to the logits: what Grad-CAM penalties and concept-vector methods differentiate."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError

#: layer types a spatial or sequential map is read from, last first, when no layer is named
MAP_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Conv1d, nn.RNNBase)


#: layer types whose 3-d outputs are (N, C, L); other 3-d outputs (an LSTM's, a transformer layer's) are (N, T, D)
CHANNELS_FIRST_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._BatchNorm,
)


def map_layout(layer: nn.Module, activation: Tensor) -> str:
    """``"channels_first"`` for ``(N, C, H, W)`` outputs and ``(N, C, L)`` ones of 1-d layers, else ``"channels_last"``.

    Examples:
        >>> import torch
        >>> map_layout(nn.Conv1d(2, 3, 1), torch.zeros(1, 3, 5)), map_layout(nn.LSTM(2, 3), torch.zeros(1, 5, 3))
        ('channels_first', 'channels_last')
    """
    if activation.dim() != 3 or isinstance(layer, CHANNELS_FIRST_LAYERS):
        return "channels_first"
    return "channels_last"


def layer_tensor(output: Any, where: str) -> Tensor:
    """The tensor of a layer's output: an LSTM's ``(output, (h, c))`` and a transformer layer's tuple give the first."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, Tensor):
        raise XAIConfigurationError(f"{where}: the layer returned {type(output).__name__}, not a tensor.")
    return output


def default_map_layer(module: nn.Module, where: str) -> str:
    """The path of the last convolution (else the last recurrent layer) of ``module``."""
    for kind in MAP_LAYERS:
        paths = [path for path, sub in module.named_modules() if isinstance(sub, kind) and path]
        if paths:
            return paths[-1]
    raise XAIConfigurationError(
        f"{where}: the model has no Conv2d, Conv1d or recurrent layer to read a map from; name one with layer='...'."
    )


def replace_layer_tensor(output: Any, value: Tensor, where: str) -> Any:
    """``output`` with the tensor :func:`~lightning_xai.functional._layers.layer_tensor` reads replaced by ``value``."""
    if isinstance(output, Tensor):
        return value
    if isinstance(output, (tuple, list)) and output:
        return type(output)((replace_layer_tensor(output[0], value, where), *output[1:]))
    if isinstance(output, Mapping) and "last_hidden_state" in output:  # a Hugging Face ModelOutput
        replaced = type(output)(**output)
        replaced["last_hidden_state"] = value
        return replaced
    raise XAIConfigurationError(
        f"{where}: the layer returned {type(output).__name__}, whose activation cannot be replaced; name a layer "
        "that returns a tensor (or a tuple starting with one)."
    )


def forward_with_activation(
    forward: Callable[[Tensor], Tensor], inputs: Tensor, layer: nn.Module, where: str = "layer"
) -> tuple[Tensor, Tensor]:
    """``(forward(inputs), layer's output in that forward)``, the output in the graph even when everything below
    it is frozen.

    A layer whose inputs and parameters need no gradient (the layers up to it frozen, as Reveal to Revise
    fine-tunes) returns a tensor outside the graph; it is replaced by a copy that requires grad, so that the
    gradient with respect to it exists and trains the layers above.

    Examples:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> logits, hidden = forward_with_activation(net, torch.randn(5, 3), net[1])
        >>> tuple(logits.shape), tuple(hidden.shape)
        ((5, 2), (5, 4))
    """
    seen: list[Tensor] = []

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if seen:
            return None
        activation = layer_tensor(output, where)
        if activation.requires_grad or not torch.is_grad_enabled():
            seen.append(activation)
            return None
        activation = activation.detach().requires_grad_(True)
        seen.append(activation)
        return replace_layer_tensor(output, activation, where)

    handle = layer.register_forward_hook(hook)
    try:
        logits = forward(inputs)
    finally:
        handle.remove()
    if not seen:
        raise XAIConfigurationError(f"{where}: the layer did not run in the forward pass; name a layer the model uses.")
    return logits, seen[0]
