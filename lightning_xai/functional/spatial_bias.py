"""Static spatial-bias check of CNNs (Mind the Pad, Alsallakh et al., ICLR 2021): strided layers whose padding is
consumed on one side only.

A strided convolution or pooling with kernel ``k``, stride ``s``, dilation ``d`` and padding ``p`` on an input of
size ``H`` covers ``(H + 2p - d (k - 1) - 1) // s + 1`` windows; when ``(H + 2p - d (k - 1) - 1) % s = r != 0``
the last ``r`` rows (columns) of the padded input are never read. The far side's padding (or, without padding,
the input's last rows) is then skipped while the near side's is used, so the layer sees zeros on the top/left
border only: learned kernels become asymmetric and blind spots form. ``ceil_mode`` pooling instead adds an
implicit pad on the far side, the same asymmetry mirrored. The fix is an input size for which every strided
stage is even (225 instead of 224 for a ResNet) or mirror padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_xai.errors import XAIConfigurationError

__all__ = ["UnevenPadding", "even_input_sizes", "uneven_padding"]

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
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for module, mode in modes.items():
            module.training = mode
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
