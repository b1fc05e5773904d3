"""Static spatial-bias check of CNNs (Mind the Pad, Alsallakh et al., ICLR 2021): strided layers whose padding is
consumed on one side only.

A strided convolution or pooling with kernel ``k``, stride ``s``, dilation ``d`` and padding ``p`` on an input of
size ``H`` covers ``(H + 2p - d (k - 1) - 1) // s + 1`` windows; when ``(H + 2p - d (k - 1) - 1) % s = r != 0``
the last ``r`` rows (columns) of the padded input are never read. The far side's padding (or, without padding,
the input's last rows) is then skipped while the near side's is used, so the layer sees zeros on the top/left
border only: learned kernels become asymmetric and blind spots form. ``ceil_mode`` pooling instead adds an
implicit pad on the far side, the same asymmetry mirrored. The fix is an input size for which every strided
stage is even (225 instead of 224 for a ResNet) or mirror padding.

The dynamic side: :func:`mean_activation_map` (mean ``|activation|`` over samples and channels),
:func:`border_ratio` and :func:`side_asymmetry` of such a map, :func:`mean_kernel` (the paper's mean 3x3 kernel
per layer) and :func:`blind_spot_map` (a small stimulus swept over a blank image, the score per position).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai._contract import eval_mode, require_logits
from lightning_xai.errors import XAIConfigurationError

__all__ = [
    "UnevenPadding",
    "blind_spot_map",
    "border_ratio",
    "even_input_sizes",
    "mean_activation_map",
    "mean_kernel",
    "side_asymmetry",
    "spatial_bias_statistics",
    "uneven_padding",
]

_STRIDED = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


@dataclass(frozen=True)
class UnevenPadding:
    """One strided layer that treats the two sides of a spatial dimension differently.

    Attributes:
        path: the layer's name in ``model.named_modules()``.
        layer: its class name.
        input_size: its input's spatial size.
        dimension: the spatial dimension (0: height or length, 1: width, ...).
        remainder: the rows (columns) of the padded input never read on the far side (``ceil_mode`` pooling:
            negative, the rows of implicit padding added there).
        padding: the layer's padding along ``dimension``.
        padding_mode: ``"zeros"`` (the paper's case), ``"reflect"``, ``"replicate"`` or ``"circular"``.
    """

    path: str
    layer: str
    input_size: tuple[int, ...]
    dimension: int
    remainder: int
    padding: int
    padding_mode: str

    def __str__(self) -> str:
        side = "skips the far side's" if self.remainder > 0 else "adds implicit far-side"
        what = "padding" if self.padding or self.remainder < 0 else "input rows (no padding)"
        return (
            f"{self.path} ({self.layer}) on input {self.input_size}: dimension {self.dimension} {side} {what} "
            f"({abs(self.remainder)} of them)"
        )


def _tuple(value: int | Sequence[int] | str, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),) * dims  # type: ignore[arg-type]


def _remainders(layer: nn.Module, size: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(dimension, remainder, padding)`` of every spatial dimension a strided ``layer`` treats unevenly."""
    dims = len(size)
    stride = _tuple(layer.stride if layer.stride is not None else layer.kernel_size, dims)
    if all(s == 1 for s in stride):
        return []
    kernel = _tuple(layer.kernel_size, dims)
    dilation = _tuple(getattr(layer, "dilation", 1), dims)
    padding_value = layer.padding
    if isinstance(padding_value, str):  # "valid" (PyTorch refuses "same" with stride > 1)
        padding_value = 0
    padding = _tuple(padding_value, dims)
    ceil_mode = bool(getattr(layer, "ceil_mode", False))
    found = []
    for dim in range(dims):
        span = size[dim] + 2 * padding[dim] - dilation[dim] * (kernel[dim] - 1) - 1
        remainder = span % stride[dim]
        if remainder:
            # ceil_mode reads one more window, over rows of implicit far-side padding: negative by convention
            found.append((dim, remainder - stride[dim] if ceil_mode else remainder, padding[dim]))
    return found


def uneven_padding(model: nn.Module, input_shape: Sequence[int]) -> list[UnevenPadding]:
    """Every strided convolution or pooling of ``model`` that pads (or reads) its input unevenly at this input size.

    The input sizes of the layers come from one forward pass of zeros of ``(1, *input_shape)`` (no gradients, the
    model's modes kept), so any architecture whose forward takes one tensor works: residual branches, downsampling
    shortcuts, layers called twice (listed per call).

    Args:
        model: the network.
        input_shape: one sample's shape, channels first: ``(C, H, W)`` (or ``(C, L)``, ``(C, D, H, W)``).

    Returns:
        the uneven layers in call order; empty when every strided stage is even.

    Examples:
        >>> stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        ...                      nn.Conv2d(8, 8, 3, stride=2, padding=1))
        >>> [str(u) for u in uneven_padding(stem, (3, 32, 32))][:1]
        ["0 (Conv2d) on input (32, 32): dimension 0 skips the far side's padding (1 of them)"]
        >>> uneven_padding(stem, (3, 33, 33))
        []
    """
    records: list[UnevenPadding] = []
    names = {module: name for name, module in model.named_modules()}

    def check(module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        size = tuple(int(s) for s in args[0].shape[2:])
        mode = str(getattr(module, "padding_mode", "zeros"))
        for dim, remainder, padding in _remainders(module, size):
            records.append(
                UnevenPadding(names.get(module, "?"), type(module).__name__, size, dim, remainder, padding, mode)
            )

    hooks = [m.register_forward_pre_hook(check) for m in model.modules() if isinstance(m, _STRIDED)]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return records


def even_input_sizes(model: nn.Module, input_shape: Sequence[int], dimension: int = -1, search: int = 64) -> list[int]:
    """The input sizes from ``input_shape``'s up to ``search`` larger at which no strided stage is uneven along
    ``dimension`` (the last spatial one by default), the other dimensions kept; for a ResNet at 224: 225, 257, ...

    Raises:
        XAIConfigurationError: ``input_shape`` has no spatial dimension.
    """
    shape = list(input_shape)
    if len(shape) < 2:
        raise XAIConfigurationError(f"input_shape {tuple(shape)} has no spatial dimension; give (C, H, W).")
    axis = dimension % len(shape) if dimension < 0 else dimension + 1
    if axis == 0:
        raise XAIConfigurationError("dimension names a spatial dimension (0 is the first one after the channels).")
    spatial = axis - 1
    found = []
    for size in range(shape[axis], shape[axis] + search + 1):
        trial = shape.copy()
        trial[axis] = size
        if not any(u.dimension == spatial for u in uneven_padding(model, trial)):
            found.append(size)
    return found


# ------------------------------------------------------------------------------------------------ mean maps


def mean_activation_map(activations: Tensor) -> Tensor:
    """The mean ``|activation|`` map of a layer's output ``(N, C, *spatial)``: averaged over samples and channels.

    Mind the Pad reads artefacts off these maps: over many inputs the content averages out and what stays is what
    the network does at each position regardless of the input, such as lines along a padded border.

    Examples:
        >>> mean_activation_map(torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]]))  # (1, 2, 1, 2)
        tensor([[2., 1.]])
    """
    if activations.dim() < 3:
        raise XAIConfigurationError(
            f"mean_activation_map needs a layer output of shape (N, C, *spatial), got {tuple(activations.shape)}."
        )
    return activations.detach().abs().mean(dim=(0, 1))


def border_ratio(mean_map: Tensor) -> Tensor:
    """Mean of the 1-pixel border of a map over the mean of its interior; 1 for a flat map.

    The border is the outer ring of a 2-D map (first and last rows and columns) or both ends of a 1-D map; maps
    with no interior (a side below 3) give NaN.

    Examples:
        >>> border_ratio(torch.ones(4, 4))
        tensor(1.)
        >>> flat = torch.ones(5, 5)
        >>> flat[0] = 3.0  # a bright top line: border mean (5 * 3 + 11) / 16
        >>> border_ratio(flat)
        tensor(1.6250)
    """
    if mean_map.dim() not in (1, 2):
        raise XAIConfigurationError(f"border_ratio takes a 1-D or 2-D map, got shape {tuple(mean_map.shape)}.")
    if min(mean_map.shape) < 3:
        return torch.tensor(float("nan"), dtype=mean_map.dtype)
    border = torch.ones_like(mean_map, dtype=torch.bool)
    border[(slice(1, -1),) * mean_map.dim()] = False
    return mean_map[border].mean() / mean_map[~border].mean()


def side_asymmetry(mean_map: Tensor, dimension: int = -1) -> Tensor:
    """``(first half - second half) / (first half + second half)`` of a non-negative map along ``dimension``.

    The halves are the first and last ``size // 2`` positions (the middle one of an odd size counts for neither),
    so a map that is mirror-symmetric along ``dimension`` gives exactly 0; the value lies in ``[-1, 1]``, positive
    when the first side (top for ``dimension=-2``, left for ``-1``) is stronger. An all-zero map gives 0.

    Examples:
        >>> side_asymmetry(torch.tensor([[1.0, 5.0, 1.0], [2.0, 0.0, 2.0]]))  # mirror-symmetric left to right
        tensor(0.)
        >>> side_asymmetry(torch.tensor([[3.0, 1.0]]))  # (3 - 1) / (3 + 1)
        tensor(0.5000)
        >>> side_asymmetry(torch.tensor([[1.0], [3.0]]), dimension=-2)  # the bottom is stronger
        tensor(-0.5000)
    """
    size = mean_map.shape[dimension]
    half = size // 2
    first = mean_map.narrow(dimension, 0, half).sum()
    second = mean_map.narrow(dimension, size - half, half).sum()
    total = first + second
    return torch.where(total > 0, (first - second) / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def spatial_bias_statistics(mean_map: Tensor) -> dict[str, Tensor]:
    """The scalars of a mean map: ``border_ratio``, ``lr_asymmetry`` (along the last dimension) and, for 2-D maps,
    ``tb_asymmetry`` (along the first); see :func:`border_ratio` and :func:`side_asymmetry`.

    Examples:
        >>> {k: round(float(v), 3) for k, v in spatial_bias_statistics(torch.tensor([[2.0, 1.0], [1.0, 1.0]])).items()}
        {'border_ratio': nan, 'lr_asymmetry': 0.2, 'tb_asymmetry': 0.2}
    """
    values = {"border_ratio": border_ratio(mean_map), "lr_asymmetry": side_asymmetry(mean_map, -1)}
    if mean_map.dim() == 2:
        values["tb_asymmetry"] = side_asymmetry(mean_map, -2)
    return values


def mean_kernel(weight: Tensor) -> Tensor:
    """The mean ``|w|`` kernel of a convolution's weight ``(out, in, *kernel)``: averaged over both channel axes.

    The paper's figure of mean 3x3 kernels per layer shows where the learned weight mass sits. The signed mean
    of a trained layer is mostly noise around 0 (filters of either sign cancel), so the magnitude is averaged: a
    kernel that learned to rely on one side (the side that sees the zero padding, under uneven padding) shows a
    heavier row or column, and :func:`side_asymmetry` of the result measures it.

    Examples:
        >>> w = torch.zeros(2, 1, 3, 3)
        >>> w[:, :, :, 0] = torch.tensor([1.0, -1.0]).view(2, 1, 1)  # the left column, either sign
        >>> mean_kernel(w)
        tensor([[1., 0., 0.],
                [1., 0., 0.],
                [1., 0., 0.]])
        >>> side_asymmetry(mean_kernel(w))
        tensor(1.)
    """
    if weight.dim() < 3:
        raise XAIConfigurationError(
            f"mean_kernel takes a convolution weight (out, in, *kernel), got shape {tuple(weight.shape)}."
        )
    return weight.detach().abs().mean(dim=(0, 1))


# ------------------------------------------------------------------------------------------------ blind spots


def blind_spot_map(
    model: Callable[[Tensor], Any],
    stimulus: Tensor,
    canvas: Tensor | Sequence[int],
    target: int | None = None,
    stride: int = 1,
    batch_size: int = 256,
) -> Tensor:
    """The model's probability of ``target`` with ``stimulus`` pasted at every position of ``canvas``.

    Mind the Pad's blind-spot picture: a small object swept over a blank (or mean) image, the score per position.
    A model without spatial bias scores the object alike everywhere; where the score drops, the object is missed.
    The stimulus replaces the canvas pixels it covers; its top-left corner moves in steps of ``stride``.

    Args:
        model: maps a batch ``(B, C, H, W)`` to logits (a module's ``xai_forward`` is used when it has one; dict
            and ``ModelOutput`` outputs are read through their ``logits``). Run in eval mode without gradients, its
            modes restored afterwards.
        stimulus: the object, ``(C, h, w)`` or ``(h, w)`` (one channel, repeated over the canvas's channels).
        canvas: the background ``(C, H, W)`` (a mean image), or its shape for a blank (zero) one.
        target: the class scored; by default the class the model predicts with the stimulus at the centre.
        stride: the step between positions.
        batch_size: positions evaluated per forward pass.

    Returns:
        ``(H', W')`` probabilities, ``H' = (H - h) // stride + 1``; entry ``(i, j)`` has the stimulus's top-left
        corner at ``(i * stride, j * stride)``.

    Raises:
        XAIConfigurationError: the stimulus does not fit on the canvas, or the shapes or options are wrong.

    Examples:
        >>> class Corner(nn.Module):  # class 1 when the top-left pixel is lit: blind everywhere else
        ...     def forward(self, x):
        ...         return torch.stack([torch.zeros(len(x)), 10 * x[:, 0, 0, 0]], dim=1)
        >>> blind_spot_map(Corner(), torch.ones(2, 2), canvas=(1, 4, 4), target=1).round(decimals=2)
        tensor([[1.0000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    if stride < 1 or batch_size < 1:
        raise XAIConfigurationError(f"blind_spot_map: stride and batch_size must be >= 1, got {stride}, {batch_size}.")
    module = model if isinstance(model, nn.Module) else None
    parameter = next(module.parameters(), None) if module is not None else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    if isinstance(canvas, Tensor):
        background = canvas.detach().to(device=device, dtype=dtype)
    else:
        background = torch.zeros(tuple(int(s) for s in canvas), device=device, dtype=dtype)
    if background.dim() != 3:
        raise XAIConfigurationError(
            f"blind_spot_map: canvas must be (C, H, W) or its shape, got {tuple(background.shape)}."
        )
    patch = stimulus.detach().to(device=device, dtype=dtype)
    if patch.dim() == 2:
        patch = patch.expand(background.shape[0], *patch.shape)
    if patch.dim() != 3 or patch.shape[0] != background.shape[0]:
        raise XAIConfigurationError(
            f"blind_spot_map: the stimulus {tuple(stimulus.shape)} must be (h, w) or (C, h, w) with the canvas's "
            f"{background.shape[0]} channels."
        )
    (_, height, width), (_, h, w) = background.shape, patch.shape
    if h > height or w > width:
        raise XAIConfigurationError(
            f"blind_spot_map: the stimulus ({h}x{w}) is larger than the canvas ({height}x{width})."
        )
    rows = torch.arange(0, height - h + 1, stride, device=device)
    columns = torch.arange(0, width - w + 1, stride, device=device)
    positions = torch.cartesian_prod(rows, columns)
    forward = getattr(model, "xai_forward", model)

    def paste(corners: Tensor) -> Tensor:
        images = background.expand(len(corners), *background.shape).clone()
        for index, (top, left) in enumerate(corners.tolist()):
            images[index, :, top : top + h, left : left + w] = patch
        return images

    def probabilities(images: Tensor) -> Tensor:
        output = forward(images)
        return torch.softmax(require_logits(output, "blind_spot_map").float(), dim=-1)

    with eval_mode(module), torch.no_grad():
        if target is None:
            centre = torch.tensor([[(height - h) // 2, (width - w) // 2]])
            target = int(probabilities(paste(centre)).argmax(-1))
        scores = [
            probabilities(paste(positions[start : start + batch_size]))[:, target]
            for start in range(0, len(positions), batch_size)
        ]
    return torch.cat(scores).reshape(len(rows), len(columns)).cpu()
