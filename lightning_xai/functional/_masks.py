"""Mask shapes: how a mask over features, pixels or token positions lines up with an input."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.errors import MaskShapeError, MaskValueError


def check_mask_values(mask: Tensor) -> Tensor:
    """``mask`` if every weight is a number in ``[0, 1]``, else a :class:`MaskValueError`.

    A NaN would spread through the decomposition and the penalty (``relevant + irrelevant`` no longer equals
    the output), and a weight outside ``[0, 1]`` makes a negative or more-than-whole share of a feature.

    Examples:
        >>> check_mask_values(torch.tensor([0.0, 0.5, 1.0]))
        tensor([0.0000, 0.5000, 1.0000])
    """
    if mask.is_floating_point() and mask.numel():
        if not bool(torch.isfinite(mask).all()):
            raise MaskValueError(
                f"a mask of shape {tuple(mask.shape)} holds NaN or infinite weights. Mark a sample without an "
                "annotation with an all-zero row (or an all-NaN row in an annotation tensor, or None in a list)."
            )
        low, high = float(mask.min()), float(mask.max())
        if low < 0.0 or high > 1.0:
            raise MaskValueError(
                f"a mask of shape {tuple(mask.shape)} holds weights in [{low:g}, {high:g}]; weights are 1 on the "
                "features to explain (or forbid), 0 elsewhere, or a share in between."
            )
    elif not mask.is_floating_point() and mask.dtype != torch.bool and mask.numel():
        if int(mask.min()) < 0 or int(mask.max()) > 1:
            raise MaskValueError(
                f"an integer mask of shape {tuple(mask.shape)} holds values in [{int(mask.min())}, "
                f"{int(mask.max())}]; use 0 and 1."
            )
    return mask


def broadcast_mask(mask: Tensor, inputs: Tensor) -> Tensor:
    """Shapes ``mask`` to broadcast against ``inputs``.

    Accepted: the input's shape; a leading part of it (``(N, T)`` for ``(N, T, E)`` embeddings); an image
    mask without the channel dimension (``(N, H, W)`` for ``(N, C, H, W)``); any of these without the
    batch dimension (one mask for every sample); or anything that already broadcasts.

    Raises:
        MaskShapeError: if none of these fits, naming both shapes.
        MaskValueError: if a weight is NaN or outside ``[0, 1]`` (see :func:`check_mask_values`).

    Examples:
        >>> broadcast_mask(torch.ones(2, 5, 5), torch.zeros(2, 3, 5, 5)).shape
        torch.Size([2, 1, 5, 5])
        >>> broadcast_mask(torch.ones(2, 7), torch.zeros(2, 7, 16)).shape
        torch.Size([2, 7, 1])
    """
    mask = check_mask_values(torch.as_tensor(mask, device=inputs.device))
    in_shape, m_shape = tuple(inputs.shape), tuple(mask.shape)
    if m_shape == in_shape:
        return mask
    candidates = []
    if 0 < mask.dim() < inputs.dim() and m_shape == in_shape[: mask.dim()]:
        candidates.append(mask.reshape(m_shape + (1,) * (inputs.dim() - mask.dim())))
    if inputs.dim() >= 3 and mask.dim() == inputs.dim() - 1 and m_shape == (in_shape[0],) + in_shape[2:]:
        candidates.append(mask.unsqueeze(1))
    if mask.dim() == inputs.dim() - 1 and m_shape == in_shape[1:]:
        candidates.append(mask.unsqueeze(0))
    if inputs.dim() >= 3 and mask.dim() == inputs.dim() - 2 and m_shape == in_shape[2:]:
        candidates.append(mask.reshape((1, 1) + m_shape))
    if mask.dim() == inputs.dim():
        try:
            torch.broadcast_shapes(m_shape, in_shape)
            candidates.append(mask)
        except RuntimeError:
            pass
    for candidate in candidates:
        if torch.broadcast_shapes(candidate.shape, in_shape) == inputs.shape:
            return candidate
    raise MaskShapeError(
        f"a mask of shape {m_shape} does not fit inputs of shape {in_shape}. Give a mask of the input's "
        f"shape, its leading dimensions (e.g. {in_shape[:2]} for per-position masks), an image mask "
        "without the channel dimension, or one of these without the batch dimension."
    )
