"""Shared helpers of the consistency metrics (:class:`RationaleConsistency`, :class:`DatasetConsistency`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.metrics._base import ExplainFn

Classes = Literal["all", "target"]


def check_classes(owner: str, classes: str) -> str:
    if classes not in ("all", "target"):
        raise XAIConfigurationError(
            f"{owner}(classes={classes!r}): pass 'all' (saliencies of every class, as Atanasova et al.) or 'target' "
            "(the explained class only)."
        )
    return classes


def check_feature_dims(owner: str, feature_dims: Sequence[int] | None) -> tuple[int, ...] | None:
    if feature_dims is None:
        return None
    dims = tuple(int(d) for d in feature_dims)
    if not dims or min(dims) < 1:
        raise XAIConfigurationError(
            f"{owner}(feature_dims={feature_dims}): name non-batch input dimensions, e.g. (1,) for the tokens of "
            "(N, T, E) embeddings, or None for every element."
        )
    return dims


def reduce_features(saliency: Tensor, feature_dims: tuple[int, ...] | None) -> Tensor:
    """Sums an ``(N, ...)`` saliency over the input dimensions not in ``feature_dims`` (tokens: the embedding)."""
    if feature_dims is None:
        return saliency
    summed = [d for d in range(1, saliency.dim()) if d not in feature_dims]
    return saliency.sum(summed) if summed else saliency


def num_classes(logits: Tensor) -> int:
    return int(logits.shape[1]) if logits.dim() == 2 else 1


def predicted(logits: Tensor) -> Tensor:
    if logits.dim() == 2 and logits.shape[1] > 1:
        return logits.argmax(1)
    return (logits.reshape(-1) > 0).long()


def explain_classes(
    explain_fn: ExplainFn, model: nn.Module, inputs: Tensor, classes: int, feature_dims: tuple[int, ...] | None
) -> Tensor:
    """``(N, C, ...)`` saliencies of every class, each reduced to features."""
    return torch.stack(
        [
            reduce_features(
                explain_fn(model, inputs, torch.full((inputs.shape[0],), c, dtype=torch.long, device=inputs.device))
                .detach()
                .to(torch.float64),
                feature_dims,
            )
            for c in range(classes)
        ],
        dim=1,
    )
