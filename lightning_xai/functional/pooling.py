"""LogSumExp pooling: a smooth stand-in for max pooling (Kokhlikyan et al. 2021, sanity checks for saliency maps).

``lse(z) = tau^-1 log sum_window exp(tau z)`` lies between ``max(z)`` and ``max(z) + log(k) / tau`` for a window of
``k`` elements, so it tends to max pooling as ``tau -> inf``; for small ``tau`` it is
``mean(z) + log(k) / tau + O(tau)``. Unlike max pooling its gradient is a softmax over the window, spread over all
elements instead of sitting on the arg-max only.

The windows follow :func:`torch.nn.functional.max_pool2d` exactly (kernel, stride, padding, dilation, ceil mode):
padded positions hold ``-inf`` as they do for max pooling, so they add nothing to the sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_xai.errors import XAIConfigurationError

__all__ = ["lse_pool1d", "lse_pool2d"]

IntOrPair = int | Sequence[int]


def _tuple(value: IntOrPair | None, dims: int, name: str, where: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)  # type: ignore[union-attr]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise XAIConfigurationError(f"{where}: {name} needs 1 or {dims} values, got {values}.")
    return values


def _output_size(length: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The output length max pooling gives (``pooling_output_shape`` in ATen)."""
    span = dilation * (kernel - 1) + 1
    numerator = length + 2 * padding - span
    if ceil_mode:
        size = -(-numerator // stride) + 1
        # the last window must start inside the input or the left padding, as in ATen
        if (size - 1) * stride >= length + padding:
            size -= 1
        return size
    return numerator // stride + 1


def _lse_pool(
    input: Tensor,
    dims: int,
    kernel_size: IntOrPair,
    tau: float,
    stride: IntOrPair | None,
    padding: IntOrPair,
    dilation: IntOrPair,
    ceil_mode: bool,
    where: str,
) -> Tensor:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise XAIConfigurationError(
            f"{where}: tau must be a finite number > 0 (larger is closer to max pooling), got {tau!r}."
        )
    if input.dim() not in (dims + 1, dims + 2):
        raise XAIConfigurationError(
            f"{where}: expected a {dims + 1}-d (unbatched) or {dims + 2}-d (batched) input, got shape "
            f"{tuple(input.shape)}."
        )
    if not input.is_floating_point():
        raise XAIConfigurationError(f"{where}: expected a floating-point input, got {input.dtype}.")
    kernel = _tuple(kernel_size, dims, "kernel_size", where)
    # F.max_pool2d reads stride=None (nn.MaxPool2d's default) and an empty list as "the kernel size"
    empty = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    strides = kernel if empty else _tuple(stride, dims, "stride", where)
    pads = _tuple(padding, dims, "padding", where)
    dilations = _tuple(dilation, dims, "dilation", where)
    if min(kernel + strides + dilations) < 1 or min(pads) < 0:
        raise XAIConfigurationError(
            f"{where}: kernel_size {kernel}, stride {strides} and dilation {dilations} must be >= 1 and padding "
            f"{pads} >= 0."
        )
    if any(p > k // 2 for p, k in zip(pads, kernel)):
        raise XAIConfigurationError(
            f"{where}: padding {pads} must be at most half the kernel size {kernel}, as for max pooling."
        )
    lengths = input.shape[-dims:]
    sizes = [_output_size(*args, ceil_mode) for args in zip(lengths, kernel, strides, pads, dilations)]
    if min(sizes) < 1:
        raise XAIConfigurationError(
            f"{where}: input of spatial size {tuple(lengths)} is too small for kernel {kernel} with padding {pads} "
            f"and dilation {dilations} (output size {tuple(sizes)})."
        )
    # Pad with -inf like max pooling, on the right as far as the last (ceil-mode) window reaches.
    widths: list[int] = []
    for length, k, s, p, d, size in zip(lengths, kernel, strides, pads, dilations, sizes):
        right = max(p, (size - 1) * s + d * (k - 1) + 1 - length - p)
        widths = [p, right, *widths]  # F.pad lists the last dimension first
    padded = torch.nn.functional.pad(input, widths, value=-math.inf) if any(widths) else input
    if strides == kernel and set(dilations) == {1}:
        return _tiled_lse(padded, dims, kernel, sizes, tau)
    windows = padded
    for axis, (k, s, d, size) in enumerate(zip(kernel, strides, dilations, sizes)):
        dim = input.dim() - dims + axis
        # a window of span d(k-1)+1 taken every s, then every d-th element of it: the dilated window
        windows = windows.unfold(dim, d * (k - 1) + 1, s).narrow(dim, 0, size)[..., ::d]
    # (..., out_1, ..., out_dims, k_1, ..., k_dims): logsumexp subtracts the window's max, so exp cannot overflow
    scaled = windows.flatten(-dims) * tau
    return torch.logsumexp(scaled, dim=-1) / tau


def _tiled_lse(padded: Tensor, dims: int, kernel: tuple[int, ...], sizes: list[int], tau: float) -> Tensor:
    """Non-overlapping windows (stride = kernel, no dilation), the usual 2x2 pooling: about twice as fast.

    Each element lies in one window, so each can be shifted by its own window's max ``m`` (no overflow, no
    underflow of the max), and ``m + tau^-1 log(k * avg_pool(exp(tau (z - m))))`` runs on the pooling kernels.
    ``m`` is detached: the value does not depend on the shift, so neither does any derivative.
    """
    tiles = padded
    for axis, (k, size) in enumerate(zip(kernel, sizes)):
        tiles = tiles.narrow(padded.dim() - dims + axis, 0, k * size)  # floor mode drops the remainder
    max_pool = torch.nn.functional.max_pool1d if dims == 1 else torch.nn.functional.max_pool2d
    avg_pool = torch.nn.functional.avg_pool1d if dims == 1 else torch.nn.functional.avg_pool2d
    shift = max_pool(tiles.detach(), kernel)
    spread = shift
    for axis, k in enumerate(kernel):
        spread = spread.repeat_interleave(k, dim=padded.dim() - dims + axis)
    total = avg_pool(torch.exp(tau * (tiles - spread)), kernel) * math.prod(kernel)
    return shift + torch.log(total) / tau


def lse_pool2d(
    input: Tensor,
    kernel_size: IntOrPair,
    tau: float = 10.0,
    stride: IntOrPair | None = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """LogSumExp pooling over the last two dimensions, ``tau^-1 log sum_window exp(tau z)``.

    The windows are those of :func:`torch.nn.functional.max_pool2d` with the same arguments; padding holds
    ``-inf``. Computed stably (``torch.logsumexp`` subtracts each window's maximum) and differentiable twice.

    Args:
        input: ``(N, C, H, W)`` or ``(C, H, W)`` floating-point tensor.
        kernel_size: window size, an int or ``(kh, kw)``.
        tau: temperature, ``> 0``; the result tends to max pooling as ``tau -> inf`` and exceeds it by at most
            ``log(kh * kw) / tau``.
        stride: window stride; defaults to ``kernel_size`` as for max pooling.
        padding: ``-inf`` padding on both sides, at most half the kernel size.
        dilation: spacing of the window's elements.
        ceil_mode: round the output size up, as max pooling's ``ceil_mode``.

    Returns:
        The pooled tensor, of the shape ``max_pool2d`` returns.

    Raises:
        XAIConfigurationError: ``tau`` is not a positive finite number, the input is not 3-d or 4-d floating point,
            or the window arguments are ones max pooling rejects.

    Example:
        >>> z = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
        >>> lse_pool2d(z, 2, tau=100.0)  # close to the max, 3
        tensor([[[[3.]]]])
        >>> lse_pool2d(z, 2, tau=1.0)  # log(e^0 + e^1 + e^2 + e^3)
        tensor([[[[3.4402]]]])
    """
    return _lse_pool(input, 2, kernel_size, tau, stride, padding, dilation, ceil_mode, "lse_pool2d")


def lse_pool1d(
    input: Tensor,
    kernel_size: IntOrPair,
    tau: float = 10.0,
    stride: IntOrPair | None = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """LogSumExp pooling over the last dimension, with the windows of :func:`torch.nn.functional.max_pool1d`.

    Args:
        input: ``(N, C, L)`` or ``(C, L)`` floating-point tensor.
        kernel_size: window size.
        tau: temperature, ``> 0``; larger is closer to max pooling (at most ``log(k) / tau`` above it).
        stride: window stride; defaults to ``kernel_size``.
        padding: ``-inf`` padding on both sides, at most half the kernel size.
        dilation: spacing of the window's elements.
        ceil_mode: round the output size up.

    Returns:
        The pooled tensor, of the shape ``max_pool1d`` returns.

    Raises:
        XAIConfigurationError: as :func:`lse_pool2d`.

    Example:
        >>> z = torch.tensor([[[0.0, 0.0, 5.0, 1.0]]])
        >>> lse_pool1d(z, 2, tau=1.0)  # log(2) and log(e^5 + e^1)
        tensor([[[0.6931, 5.0181]]])
    """
    return _lse_pool(input, 1, kernel_size, tau, stride, padding, dilation, ceil_mode, "lse_pool1d")
