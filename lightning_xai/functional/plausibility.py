"""Plausibility kernels: does an attribution agree with where the evidence is (or must not be)?

* :func:`region_attribution_mass`: the share of absolute attribution inside a region (a forbidden decoy, or a
  ground-truth object);
* :func:`rationale_average_precision`: average precision of the attribution as a ranking of the human rationale
  (Atanasova et al., EMNLP 2020);
* confidence indication (Atanasova et al., EMNLP 2020): how well simple statistics of an attribution predict the
  model's confidence, as the RMSE of a least-squares fit kept as sufficient statistics
  (:func:`confidence_indication_statistics`, :func:`confidence_indication_from_statistics`).

Features are the elements of one sample; masks may take any shape that
:func:`~lightning_xai.functional._masks.broadcast_mask` accepts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._masks import broadcast_mask

__all__ = [
    "confidence_features",
    "confidence_indication",
    "confidence_indication_from_statistics",
    "confidence_indication_statistics",
    "rationale_average_precision",
    "region_attribution_mass",
]


def _expanded_mask(mask: Tensor, attributions: Tensor) -> Tensor:
    return broadcast_mask(mask, attributions).expand_as(attributions).flatten(1)


def _widen(values: Tensor) -> Tensor:
    return (
        values.float() if not values.is_floating_point() or values.dtype in (torch.float16, torch.bfloat16) else values
    )


def region_attribution_mass(attributions: Tensor, mask: Tensor) -> Tensor:
    """Share of the absolute attribution of every sample that falls inside ``mask``.

    ``sum(|a| * mask) / sum(|a|)`` per sample, 0 for an all-zero attribution. The mask is binary (or soft, with
    weights in [0, 1]).

    Args:
        attributions: ``(N, ...)`` attributions.
        mask: the region, any shape that ``broadcast_mask`` accepts for ``attributions``.

    Returns:
        ``(N,)`` shares in [0, 1].

    Raises:
        MaskShapeError: if ``mask`` does not fit ``attributions``.

    Examples:
        >>> a = torch.tensor([[3.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
        >>> region_attribution_mass(a, torch.tensor([1, 0, 0, 0]))
        tensor([0.7500, 0.0000])
    """
    a = _widen(attributions.detach()).abs().flatten(1)
    m = _expanded_mask(mask, attributions).to(a.dtype)
    total = a.sum(1)
    inside = (a * m).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(total))


def rationale_average_precision(attributions: Tensor, rationale: Tensor, absolute: bool = False) -> Tensor:
    """Average precision of the attribution as scores for the human rationale, per sample (Atanasova et al. 2020).

    The scores are the attribution values as given (signed: a feature that speaks against the explained class
    ranks last), or their magnitudes with ``absolute=True``. Labels are ``rationale > 0``. Ties are handled as in
    :func:`sklearn.metrics.average_precision_score`, which this equals per sample: one threshold per distinct
    score, ``AP = sum_t (R_t - R_{t-1}) P_t``. A sample without any rationale feature scores 0 (as sklearn).

    Args:
        attributions: ``(N, ...)`` attributions.
        rationale: binary human rationale, any shape that ``broadcast_mask`` accepts for ``attributions``.
        absolute: rank features by ``|attribution|`` instead of the signed value.

    Returns:
        ``(N,)`` average precisions in [0, 1].

    Raises:
        MaskShapeError: if ``rationale`` does not fit ``attributions``.

    Examples:
        >>> a = torch.tensor([[0.9, 0.8, 0.1, 0.0], [1.0, 1.0, 0.0, 0.0]])
        >>> rationale_average_precision(a, torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
        tensor([1.0000, 0.5000])
    """
    scores = _widen(attributions.detach()).flatten(1)
    if absolute:
        scores = scores.abs()
    labels = (_expanded_mask(rationale, attributions) > 0).to(scores.dtype)
    num_features = scores.shape[1]
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    sorted_labels = labels.gather(1, order)
    true_positives = sorted_labels.cumsum(1)
    predicted = torch.arange(1, num_features + 1, device=scores.device, dtype=scores.dtype)
    precision = true_positives / predicted
    # one threshold per distinct score: every feature takes the precision at the last position of its tie group
    group_start = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_start[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    group = group_start.long().cumsum(1) - 1
    group_end = torch.ones_like(group_start)
    group_end[:, :-1] = group_start[:, 1:]
    # only group ends carry a precision; the other positions send a 0 to slot 0, so reduce with a maximum
    precision_at_end = torch.zeros_like(precision).scatter_reduce_(
        1, torch.where(group_end, group, 0), precision * group_end, reduce="amax"
    )
    feature_precision = precision_at_end.gather(1, group)
    positives = sorted_labels.sum(1)
    ap = (sorted_labels * feature_precision).sum(1) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.zeros_like(ap))


def confidence_features(attributions: Tensor) -> Tensor:
    """Per-sample attribution statistics of confidence indication: ``[max, mean, std]``.

    The standard deviation is the population one (divides by the number of features).

    Args:
        attributions: ``(N, ...)`` attributions of the predicted class.

    Returns:
        ``(N, 3)`` features.

    Examples:
        >>> confidence_features(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
        tensor([[3., 2., 1.],
                [2., 2., 0.]])
    """
    a = _widen(attributions.detach()).flatten(1)
    return torch.stack([a.max(1).values, a.mean(1), a.std(1, correction=0)], dim=1)


def confidence_indication_statistics(features: Tensor, probabilities: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sufficient statistics of the least-squares fit ``probability ~ intercept + features``.

    With ``X = [1, features]`` (an intercept column first) and ``y = probabilities``, returns ``X^T X``,
    ``X^T y``, ``y^T y`` and ``n`` in float64. Statistics of disjoint batches add up to those of their union.

    Args:
        features: ``(N, D)`` per-sample features (e.g. :func:`confidence_features`).
        probabilities: ``(N,)`` the model's predicted-class probabilities.

    Returns:
        ``(D + 1, D + 1)``, ``(D + 1,)``, ``()`` and ``()`` tensors.

    Examples:
        >>> xtx, xty, yty, n = confidence_indication_statistics(torch.tensor([[1.0], [2.0]]), torch.tensor([0.5, 1.0]))
        >>> xtx
        tensor([[2., 3.],
                [3., 5.]], dtype=torch.float64)
        >>> xty, yty.item(), n.item()
        (tensor([1.5000, 2.5000], dtype=torch.float64), 1.25, 2.0)
    """
    features = features.detach().to(torch.float64)
    y = probabilities.detach().to(torch.float64).reshape(-1)
    if features.dim() != 2 or features.shape[0] != y.numel():
        raise XAIConfigurationError(
            f"features of shape {tuple(features.shape)} and probabilities of shape {tuple(probabilities.shape)} "
            "do not match; pass (N, D) features and (N,) probabilities."
        )
    x = torch.cat([torch.ones_like(features[:, :1]), features], dim=1)
    return x.T @ x, x.T @ y, y @ y, torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)


def confidence_indication_from_statistics(xtx: Tensor, xty: Tensor, yty: Tensor, n: Tensor) -> Tensor:
    """RMSE of the least-squares fit described by the sufficient statistics of :func:`confidence_indication_statistics`.

    Solves the normal equations ``X^T X b = X^T y`` with a pseudo-inverse after scaling every column to unit norm
    (stable for collinear or constant features), then ``SSE = y^T y - 2 b^T X^T y + b^T X^T X b``.
    Returns NaN when ``n`` is 0.

    Examples:
        >>> stats = confidence_indication_statistics(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([0.2, 0.4, 0.6]))
        >>> confidence_indication_from_statistics(*stats).abs() < 1e-6
        tensor(True)
    """
    xtx, xty, yty, n = (t.to(torch.float64) for t in (xtx, xty, yty, n))
    if float(n) <= 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=xtx.device)
    diag = xtx.diagonal()
    scale = torch.where(diag > 0, diag.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.ones_like(diag))
    scaled = xtx * scale[:, None] * scale[None, :]
    coef = scale * (torch.linalg.pinv(scaled, hermitian=True) @ (scale * xty))
    sse = yty - 2 * coef @ xty + coef @ xtx @ coef
    return (sse.clamp_min(0) / n).sqrt()


def confidence_indication(attributions: Tensor, probabilities: Tensor) -> Tensor:
    """Confidence indication (Atanasova et al., EMNLP 2020) of one batch: RMSE of predicting confidence.

    A linear regression with intercept predicts the model's predicted-class probability from
    :func:`confidence_features` (max, mean, std of each sample's attribution); the score is the RMSE of the
    least-squares fit. Lower is better: a low error means the attribution's statistics indicate how confident the
    model is.

    Args:
        attributions: ``(N, ...)`` attributions of the predicted class.
        probabilities: ``(N,)`` predicted-class probabilities (see
            :func:`~lightning_xai.functional.faithfulness.class_probability`).

    Returns:
        Scalar RMSE (float64).

    Examples:
        >>> a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [0.5, 0.5]])
        >>> p = 0.1 + 0.2 * a.max(1).values  # an exact linear function of the max
        >>> confidence_indication(a, p).item() < 1e-6
        True
    """
    return confidence_indication_from_statistics(
        *confidence_indication_statistics(confidence_features(attributions), probabilities)
    )
