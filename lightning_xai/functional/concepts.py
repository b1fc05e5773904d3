"""Concept removal and concept-effect estimation: gradient reversal, pooling, probes, TReATE, ATE, CONEXP.

CausaLM (Feder et al., Computational Linguistics 2021) estimates the causal effect of a concept ``C`` on a
classifier without counterfactual inputs: train a counterfactual representation that forgets ``C``
(an adversarial head through :func:`gradient_reversal`) and compare the predictions of the classifier on
the original and on the counterfactual representation (:func:`treate`). With real counterfactual pairs
the ground truth is :func:`ate_ground_truth`; :func:`conexp` is the observational baseline that confounding
fools.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_xai.errors import XAIConfigurationError

Distance = Literal["class", "tv", "l2"]
Contrast = Literal["removal", "flip"]
Pooling = Literal["mean", "cls", "none"]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coefficient: float) -> Tensor:  # type: ignore[override]
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return -ctx.coefficient * grad, None


def gradient_reversal(x: Tensor, lambda_: float = 1.0) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-lambda_`` in the backward pass (Ganin et al.).

    A head trained on ``gradient_reversal(features)`` learns to predict a concept, while the layers below
    receive the opposite gradient and learn to hide it.

    Examples:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y = gradient_reversal(x, 0.5)
        >>> torch.equal(y, x), torch.autograd.grad(y.sum(), x)[0]
        (True, tensor([-0.5000, -0.5000]))
    """
    return _GradientReversal.apply(x, float(lambda_))


def pool(hidden: Tensor, pooling: Pooling = "mean", attention_mask: Tensor | None = None) -> Tensor:
    """Sequence features ``(N, T, D)`` to ``(N, D)``: masked mean, the first (CLS) token, or ``"none"`` (as is).

    ``(N, D)`` features pass through unchanged; ``(N, C, H, W)`` feature maps are averaged over space by
    ``"mean"``.

    Examples:
        >>> import torch
        >>> hidden = torch.arange(12.0).view(1, 3, 4)
        >>> pool(hidden, "mean", attention_mask=torch.tensor([[1, 1, 0]]))
        tensor([[2., 3., 4., 5.]])
    """
    if pooling not in ("mean", "cls", "none"):
        raise XAIConfigurationError(f"pooling must be 'mean', 'cls' or 'none', got {pooling!r}.")
    if hidden.dim() == 2 or pooling == "none":
        return hidden
    if hidden.dim() >= 4 and pooling == "mean":  # (N, C, H, W) feature maps: global average over space
        return hidden.flatten(2).mean(2)
    if hidden.dim() != 3:
        raise XAIConfigurationError(f"pool: expected (N, T, D) or (N, D) features, got shape {tuple(hidden.shape)}.")
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@dataclass(frozen=True)
class EffectEstimate:
    """A mean effect with a normal-approximation confidence interval."""

    value: float
    low: float
    high: float
    n: int

    def __float__(self) -> float:
        return self.value


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise XAIConfigurationError(f"confidence must be in (0, 1), got {confidence}.")
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(confidence, dtype=torch.float64)).item()


def _as_probs(p: Tensor) -> Tensor:
    return torch.stack([1 - p, p], 1) if p.dim() == 1 else p


def prediction_distance(p: Tensor, q: Tensor, distance: Distance = "tv", class_index: int = 1) -> Tensor:
    """Per-example distance between two ``(N, C)`` probability tables (``(N,)``: positive-class probabilities).

    * ``"class"``: ``|p_c - q_c|`` of class ``class_index``;
    * ``"tv"``: total variation ``0.5 * sum_c |p_c - q_c|``;
    * ``"l2"``: Euclidean distance.

    Examples:
        >>> import torch
        >>> prediction_distance(torch.tensor([[0.7, 0.3]]), torch.tensor([[0.4, 0.6]])).float()
        tensor([0.3000])
    """
    p, q = _as_probs(p).double(), _as_probs(q).double()
    if p.shape != q.shape:
        raise XAIConfigurationError(f"prediction_distance: shapes {tuple(p.shape)} and {tuple(q.shape)} differ.")
    if distance == "class":
        return (p[:, class_index] - q[:, class_index]).abs()
    if distance == "tv":
        return 0.5 * (p - q).abs().sum(1)
    if distance == "l2":
        return (p - q).norm(dim=1)
    raise XAIConfigurationError(f"distance must be 'class', 'tv' or 'l2', got {distance!r}.")


def _mean_estimate(values: Tensor, confidence: float) -> EffectEstimate:
    n = values.numel()
    if n == 0:
        return EffectEstimate(math.nan, math.nan, math.nan, 0)
    mean = values.mean().item()
    half = _z(confidence) * (values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else math.inf)
    return EffectEstimate(mean, mean - half, mean + half, n)


def treate(
    p_original: Tensor,
    p_counterfactual: Tensor,
    distance: Distance = "tv",
    class_index: int = 1,
    confidence: float = 0.95,
    concept: Tensor | None = None,
    contrast: Contrast = "removal",
    prevalence: Sequence[float] | Tensor | None = None,
) -> EffectEstimate:
    """TReATE: mean distance between the predictions on the original and on the counterfactual representation.

    ``TReATE = mean_x d(p_O(x), p_CF(x))`` where ``p_O`` is the classifier on the original encoder and ``p_CF``
    the same classifier trained on the counterfactual encoder that forgot the treated concept.

    The two contrasts:

    * ``"removal"`` (CausaLM's TReATE): the effect of taking the concept away. A classifier that cannot see a
      concept ``C`` predicts the prevalence-weighted mixture ``p_CF(x) = sum_c pi_c p_O(x | C=c)``, so for a
      binary concept ``p_O(x) - p_CF(x) = (1 - pi_{c(x)}) (p_O(x) - p_O(x_cf))``: removal moves a prediction
      only part of the way to its twin's, half of it for a balanced concept.
    * ``"flip"``: the effect of changing the concept's value, on the scale of :func:`ate_ground_truth`. Each
      example's distance is divided by ``1 - pi_{c(x)}``, which is exact when both classifiers are the
      Bayes classifiers of their representations and the distance is homogeneous in ``p - q`` (all three
      are). It needs the binary ``concept`` of every example; ``prevalence`` (the concept's value shares in
      the classifiers' training data) defaults to the shares in ``concept``.

    Args:
        p_original: ``(N, K)`` probabilities of the classifier on the original representation (``(N,)``:
            positive-class probabilities).
        p_counterfactual: the same for the classifier on the counterfactual representation.
        distance: ``"tv"``, ``"class"`` (``|delta p|`` of ``class_index``) or ``"l2"``.
        class_index: the class of the ``"class"`` distance.
        confidence: level of the normal-approximation interval.
        concept: ``(N,)`` binary concept values, for ``contrast="flip"``.
        contrast: ``"removal"`` or ``"flip"``.
        prevalence: the shares of the concept's two values, for ``contrast="flip"``.

    Raises:
        XAIConfigurationError: ``"flip"`` without a binary ``concept``, or a value with prevalence 0 or 1 (a
            concept that never varies has no flip effect to estimate).

    Examples:
        >>> import torch
        >>> estimate = treate(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]]))
        >>> round(estimate.value, 3), estimate.n
        (0.1, 2)

        A balanced binary concept: the twins' predictions differ by 0.4, removal moves each one 0.2.

        >>> p_o = torch.tensor([[0.8, 0.2], [0.4, 0.6]])  # an example and its concept-flipped twin
        >>> p_cf = torch.tensor([[0.6, 0.4], [0.6, 0.4]])  # both see the mixture
        >>> flipped = treate(p_o, p_cf, concept=torch.tensor([1, 0]), contrast="flip")
        >>> round(treate(p_o, p_cf).value, 3), round(flipped.value, 3)
        (0.2, 0.4)
    """
    distances = prediction_distance(p_original, p_counterfactual, distance, class_index)
    if contrast == "flip":
        distances = distances / _other_value_share(concept, prevalence, distances.shape[0]).to(distances.device)
    elif contrast != "removal":
        raise XAIConfigurationError(f"treate: contrast must be 'removal' or 'flip', got {contrast!r}.")
    return _mean_estimate(distances, confidence)


def _other_value_share(concept: Tensor | None, prevalence: Sequence[float] | Tensor | None, n: int) -> Tensor:
    """``(N,)`` share ``1 - pi_{c(x)}`` of the examples whose binary concept value differs from each example's."""
    if concept is None:
        raise XAIConfigurationError(
            "treate(contrast='flip') needs the concept value of every example: pass concept=<(N,) binary tensor>."
        )
    concept = torch.as_tensor(concept).reshape(-1).long().cpu()
    values = torch.unique(concept).tolist()  # sorted
    if concept.numel() != n or not set(values) <= {0, 1}:
        raise XAIConfigurationError(
            f"treate(contrast='flip'): concept must hold one value in {{0, 1}} per example ({n}), got "
            f"{concept.numel()} values among {values[:5]}; the flip contrast is defined for binary concepts."
        )
    shares = (
        torch.bincount(concept, minlength=2).double() / max(n, 1)
        if prevalence is None
        else torch.as_tensor(prevalence, dtype=torch.float64).reshape(-1)
    )
    if shares.numel() != 2 or not bool(((shares > 0) & (shares < 1)).all()):
        raise XAIConfigurationError(
            f"treate(contrast='flip'): the concept's value shares are {shares.tolist()}; both values must occur "
            "(0 < share < 1), or a flip has nothing to be estimated from."
        )
    return 1.0 - shares[concept]


def ate_ground_truth(
    p_factual: Tensor,
    p_counterfactual_input: Tensor,
    distance: Distance = "tv",
    class_index: int = 1,
    confidence: float = 0.95,
) -> EffectEstimate:
    """ATE_gt: mean distance between one model's predictions on ``x`` and on its counterfactual ``x_cf``.

    Needs real counterfactual pairs (``x_cf`` = ``x`` with the concept changed, all else equal).

    Examples:
        >>> import torch
        >>> round(ate_ground_truth(torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.4]), distance="class").value, 4)
        0.1
    """
    return _mean_estimate(prediction_distance(p_factual, p_counterfactual_input, distance, class_index), confidence)


def conexp(
    probs: Tensor,
    concept: Tensor,
    distance: Distance = "tv",
    class_index: int = 1,
    confidence: float = 0.95,
) -> EffectEstimate:
    """CONEXP: ``d(E[p | C=1], E[p | C=0])``, the observational difference of mean predictions between concept groups.

    It is what a correlation study measures: it mixes the concept's effect with everything correlated with
    it (confounding). The interval is a normal approximation of the difference of two means (Welch), for
    the ``"class"`` distance; for ``"tv"`` and ``"l2"`` it propagates the per-class standard errors.

    Examples:
        >>> import torch
        >>> probs = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3]])
        >>> round(conexp(probs, torch.tensor([1, 1, 0, 0]), distance="class").value, 3)
        0.5
    """
    probs = _as_probs(probs).double()
    concept = concept.reshape(-1).bool()
    treated, control = probs[concept], probs[~concept]
    if treated.shape[0] == 0 or control.shape[0] == 0:
        return EffectEstimate(math.nan, math.nan, math.nan, int(probs.shape[0]))
    difference = treated.mean(0) - control.mean(0)

    def variance(group: Tensor) -> Tensor:
        return (
            group.var(0, unbiased=True) / group.shape[0] if group.shape[0] > 1 else torch.full_like(group[0], math.inf)
        )

    standard_error = (variance(treated) + variance(control)).sqrt()
    if distance == "class":
        value, spread = difference[class_index].abs().item(), standard_error[class_index].item()
    elif distance == "tv":
        value, spread = 0.5 * difference.abs().sum().item(), 0.5 * standard_error.pow(2).sum().sqrt().item()
    elif distance == "l2":
        value, spread = difference.norm().item(), standard_error.pow(2).sum().sqrt().item()
    else:
        raise XAIConfigurationError(f"distance must be 'class', 'tv' or 'l2', got {distance!r}.")
    half = _z(confidence) * spread
    return EffectEstimate(value, max(value - half, 0.0), value + half, int(probs.shape[0]))


def linear_probe_accuracy(
    features: Tensor,
    labels: Tensor,
    train_fraction: float = 0.5,
    seed: int = 0,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> tuple[float, float]:
    """Held-out accuracy of a fresh logistic-regression probe, and the majority-class rate of the held-out part.

    An adversary at chance during training can still leave a concept linearly decodable; a probe trained
    from scratch on the frozen features is the honest measure. Features are standardized on the training
    part; the probe is fit with L-BFGS (multinomial, L2 ``weight_decay``).

    Args:
        features: ``(N, D)`` frozen features.
        labels: ``(N,)`` concept classes (``-100`` rows are ignored).
        train_fraction: share of rows (seeded shuffle) used to fit the probe.
        seed: seed of the split.
        weight_decay: L2 penalty of the probe.
        max_iter: L-BFGS iterations.

    Returns:
        ``(probe accuracy, majority-class rate)`` on the held-out rows.

    Examples:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> labels = torch.randint(0, 2, (200,), generator=g)
        >>> features = torch.randn(200, 5, generator=g) + 3 * labels[:, None]
        >>> accuracy, majority = linear_probe_accuracy(features, labels)
        >>> accuracy > 0.95, 0.4 < majority < 0.6
        (True, True)
    """
    # callers may sit in a validation loop (no_grad) or trainer.validate() (inference mode)
    with torch.inference_mode(False), torch.enable_grad():
        return _fit_probe(features.detach().clone(), labels.clone(), train_fraction, seed, weight_decay, max_iter)


def _fit_probe(
    features: Tensor, labels: Tensor, train_fraction: float, seed: int, weight_decay: float, max_iter: int
) -> tuple[float, float]:
    keep = labels.reshape(-1) != -100
    features, labels = features.double()[keep], labels.reshape(-1)[keep].long()
    n = labels.shape[0]
    if n < 4:
        return math.nan, math.nan
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, min(n - 1, int(n * train_fraction)))
    train, test = order[:cut], order[cut:]
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-8)
    x = (features - mean) / std
    classes = int(labels.max().item()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, labels[train])
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        accuracy = ((x[test] @ weight + bias).argmax(1) == labels[test]).double().mean().item()
    majority = torch.bincount(labels[test], minlength=classes).max().item() / test.numel()
    return accuracy, majority
