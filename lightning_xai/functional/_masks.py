"""Mask shapes: how a mask over features, pixels or token positions lines up with an input."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.errors import MaskShapeError


def broadcast_mask(mask: Tensor, inputs: Tensor) -> Tensor:
    """Shapes ``mask`` to broadcast against ``inputs``.

    Accepted: the input's shape; a leading part of it (``(N, T)`` for ``(N, T, E)`` embeddings); an image
    mask without the channel dimension (``(N, H, W)`` for ``(N, C, H, W)``); any of these without the
    batch dimension (one mask for every sample); or anything that already broadcasts.

    Raises:
        MaskShapeError: if none of these fits, naming both shapes.

    Examples:
        >>> broadcast_mask(torch.ones(2, 5, 5), torch.zeros(2, 3, 5, 5)).shape
        torch.Size([2, 1, 5, 5])
        >>> broadcast_mask(torch.ones(2, 7), torch.zeros(2, 7, 16)).shape
        torch.Size([2, 7, 1])
    """
    mask = torch.as_tensor(mask, device=inputs.device)
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
