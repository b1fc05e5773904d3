"""Concept activation vectors and the ClArC corrections (Anders et al. 2022; Pahde et al., Reveal to Revise, 2023).

A concept activation vector (CAV) ``v`` is a unit direction in the feature space of one layer along which samples
with an artifact (a decoy patch, a ruler, a watermark) differ from samples without it. The ClArC family then
corrects a model along ``v``:

* :func:`clarc_projection` (P-ClArC, A-ClArC): move every sample's activation along ``v`` to one fixed concept
  strength, that of clean samples (P) or of artifact samples (A), so the artifact's direction carries no
  information downstream.
* :func:`rrclarc_penalty` (RR-ClArC): a training loss that makes the output's gradient with respect to the layer
  orthogonal to ``v``, so the model becomes insensitive to the artifact's direction.

Features per sample are the spatial maximum of a layer's activations (:func:`pooled_features`), as in the
Reveal-to-Revise code. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._labels import class_labels
from lightning_xai.functional._layers import forward_with_activation, replace_layer_tensor
from lightning_xai.functional.penalties import Reduction, _reduce, _widen

CAVMethod = Literal["signal", "svm", "logistic", "ridge"]
Criterion = Literal["all_logits_random", "all_logits", "max_logit", "target_logit", "logprobs"]

__all__ = [
    "CAV_METHODS",
    "RRCLARC_CRITERIA",
    "clarc_projection",
    "concept_strength",
    "fit_cav",
    "pooled_features",
    "replace_layer_tensor",
    "rrclarc_penalty",
]


# --------------------------------------------------------------------------------------------- features


def _channel_dim(activation: Tensor, channel_dim: int | None) -> int:
    """The (non-negative) channel dimension: dim 1, except the last for ``(N, T, D)`` sequences by default."""
    if activation.dim() < 2:
        raise XAIConfigurationError(
            f"a layer activation needs a sample and a channel dimension, got shape {tuple(activation.shape)}."
        )
    if channel_dim is None:
        return 2 if activation.dim() == 3 else 1
    dim = channel_dim % activation.dim()
    if dim == 0:
        raise XAIConfigurationError("channel_dim cannot be the sample dimension 0.")
    return dim


def _per_channel(activation: Tensor, channel_dim: int | None) -> Tensor:
    """``(N, C, P)``: the channels second and every other (position) dimension flattened last."""
    dim = _channel_dim(activation, channel_dim)
    return activation.movedim(dim, 1).flatten(2) if activation.dim() > 2 else activation.unsqueeze(2)


def pooled_features(activation: Tensor, channel_dim: int | None = None) -> Tensor:
    """``(N, C)`` features of a layer's activations: the maximum over positions of each channel.

    ``(N, C, H, W)`` maps are reduced over ``H, W``, ``(N, T, D)`` sequences over ``T`` (the channels are the last
    dimension for 3-d activations unless ``channel_dim`` says otherwise; give ``channel_dim=1`` for a ``Conv1d``'s
    ``(N, C, L)``), and ``(N, D)`` features pass as they are.

    Args:
        activation: the layer's output, samples first.
        channel_dim: the dimension of the channels; by default 1, or the last for 3-d activations.

    Examples:
        >>> maps = torch.tensor([[[[1.0, 5.0], [2.0, 0.0]], [[-1.0, -3.0], [-2.0, -4.0]]]])  # (1, 2, 2, 2)
        >>> pooled_features(maps)
        tensor([[ 5., -1.]])
        >>> pooled_features(torch.tensor([[[1.0, 9.0], [3.0, 0.0]]]))  # (N, T, D): max over T
        tensor([[3., 9.]])
    """
    return _per_channel(activation, channel_dim).amax(2)


def concept_strength(features: Tensor, cav: Tensor) -> Tensor:
    """``(N,)`` strength of the concept in each sample: ``v . features``.

    Examples:
        >>> concept_strength(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([0.6, 0.8]))
        tensor([5.0000, 0.6000])
    """
    if features.dim() != 2 or cav.dim() != 1 or features.shape[1] != cav.shape[0]:
        raise XAIConfigurationError(
            f"concept_strength needs (N, C) features and a (C,) vector, got {tuple(features.shape)} and "
            f"{tuple(cav.shape)}."
        )
    return features @ cav.to(features)


# --------------------------------------------------------------------------------------------- fitting a CAV


def _signal_direction(features: Tensor, labels: Tensor) -> Tensor:
    # cov(X, y) / var(y) per feature: the pattern the artifact adds (Haufe et al.'s signal vector)
    centred_y = labels - labels.mean()
    covariance = ((features - features.mean(0)) * centred_y[:, None]).mean(0)
    return covariance / centred_y.pow(2).mean()


def _sklearn_direction(make: Callable[[], object]) -> Callable[[Tensor, Tensor], Tensor]:
    def direction(features: Tensor, labels: Tensor) -> Tensor:
        centred = (features - features.mean(0)).numpy()
        model = make()
        model.fit(centred, labels.numpy().astype(int))  # type: ignore[attr-defined]
        return torch.as_tensor(model.coef_, dtype=torch.float64).reshape(-1)  # type: ignore[attr-defined]

    return direction


def _svm() -> object:
    from sklearn.svm import LinearSVC

    return LinearSVC(fit_intercept=False, C=1.0, max_iter=10_000)


def _logistic() -> object:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(fit_intercept=False, max_iter=1_000)


def _ridge() -> object:
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(fit_intercept=False, alpha=1.0)


#: how each ``method`` of :func:`fit_cav` finds the direction on ``(N, C)`` float64 features and 0/1 labels
CAV_METHODS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "signal": _signal_direction,
    "svm": _sklearn_direction(_svm),
    "logistic": _sklearn_direction(_logistic),
    "ridge": _sklearn_direction(_ridge),
}


def fit_cav(features: Tensor, is_artifact: Tensor, method: CAVMethod = "signal") -> Tensor:
    """The unit concept activation vector ``(C,)`` that points from clean towards artifact samples.

    Methods:
        * ``"signal"`` (default): ``w = cov(X, y) / var(y)`` per feature with ``y = 1`` on artifact samples, the
          pattern the artifact adds to the features (Pahde et al. found it better than filters from classifiers).
        * ``"svm"``, ``"logistic"``, ``"ridge"``: the weights of scikit-learn's ``LinearSVC``,
          ``LogisticRegression`` or ``RidgeClassifier`` fitted without intercept on centred features.

    The vector is normalised to unit length and has the dtype and device of ``features``.

    Args:
        features: ``(N, C)`` features (:func:`pooled_features`).
        is_artifact: ``(N,)`` booleans or 0/1, 1 for samples with the artifact; both kinds must occur.
        method: one of the methods above.

    Examples:
        >>> features = torch.tensor([[1.0, 0.0], [3.0, 1.0], [0.0, 0.0], [2.0, 1.0]])
        >>> fit_cav(features, torch.tensor([0, 1, 0, 1]))  # w = (2, 1) / |(2, 1)|
        tensor([0.8944, 0.4472])
    """
    if method not in CAV_METHODS:
        raise XAIConfigurationError(f"fit_cav: method must be one of {tuple(CAV_METHODS)}, got {method!r}.")
    if features.dim() != 2:
        raise XAIConfigurationError(f"fit_cav needs (N, C) features, got shape {tuple(features.shape)}.")
    labels = torch.as_tensor(is_artifact).reshape(-1)
    if labels.shape[0] != features.shape[0]:
        raise XAIConfigurationError(
            f"fit_cav: {features.shape[0]} feature rows but {labels.shape[0]} artifact labels; give one per sample."
        )
    labels = labels.detach().cpu().to(torch.float64)
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise XAIConfigurationError("fit_cav: is_artifact must hold booleans or 0/1 (1 = artifact).")
    artifacts = int(labels.sum())
    if artifacts == 0 or artifacts == labels.shape[0]:
        raise XAIConfigurationError(
            f"fit_cav needs samples with and without the artifact, got {artifacts} artifact samples of "
            f"{labels.shape[0]}."
        )
    direction = CAV_METHODS[method](features.detach().cpu().to(torch.float64), labels)
    norm = direction.norm()
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise XAIConfigurationError(
            f"fit_cav(method={method!r}): the artifact and clean features do not differ at this layer (the fitted "
            "direction is zero); choose a layer where the artifact changes the activations."
        )
    return (direction / norm).to(dtype=features.dtype, device=features.device)


# --------------------------------------------------------------------------------------------- projection


def clarc_projection(activation: Tensor, cav: Tensor, strength: float, channel_dim: int | None = None) -> Tensor:
    """Moves each sample along ``v`` so that its concept strength becomes ``strength`` (P-ClArC / A-ClArC).

    ``a' = a + (strength - v . maxpool(a)) / (v . v) * v`` at every position (broadcast over ``H, W`` or ``T``).
    Adding one constant per channel moves every position's value alike and keeps each channel's arg-max, so
    ``v . maxpool(a') = strength`` exactly for every sample. With ``strength`` the mean over clean samples the
    artifact is projected out (P-ClArC); with the mean over artifact samples it is added to every sample (A-ClArC).

    Args:
        activation: ``(N, C, ...)`` maps or ``(N, T, D)`` sequences or ``(N, D)`` features.
        cav: the ``(C,)`` concept vector (any nonzero length; the division makes the result exact).
        strength: the concept strength every sample gets.
        channel_dim: as in :func:`pooled_features`.

    Examples:
        >>> a = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[0.0, 0.0]], [[4.0, 1.0]]]])  # (2, 2, 1, 2)
        >>> v = torch.tensor([0.6, 0.8])
        >>> concept_strength(pooled_features(a), v)
        tensor([3.4000, 3.2000])
        >>> projected = clarc_projection(a, v, strength=1.0)
        >>> concept_strength(pooled_features(projected), v)
        tensor([1.0000, 1.0000])
    """
    dim = _channel_dim(activation, channel_dim)
    channels = activation.shape[dim]
    if cav.dim() != 1 or cav.shape[0] != channels:
        raise XAIConfigurationError(
            f"clarc_projection: the concept vector has shape {tuple(cav.shape)}, but the activation "
            f"{tuple(activation.shape)} has {channels} channels in dim {dim}."
        )
    v = cav.to(activation)
    squared_length = v.pow(2).sum()
    if float(squared_length) == 0.0:
        raise XAIConfigurationError("clarc_projection: the concept vector is zero.")
    current = concept_strength(pooled_features(activation, dim), v)
    shift = (strength - current) / squared_length
    sample_shape = [activation.shape[0]] + [1] * (activation.dim() - 1)
    channel_shape = [1] * activation.dim()
    channel_shape[dim] = channels
    return activation + shift.view(sample_shape) * v.view(channel_shape)


# --------------------------------------------------------------------------------------------- RR-ClArC


def _random_signs(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else logits.device
    signs = torch.randint(0, 2, logits.shape, generator=generator, device=device) * 2 - 1
    return signs.to(device=logits.device, dtype=logits.dtype)


def _needs_target(name: str) -> Callable[[Tensor, Tensor | None, torch.Generator | None], Tensor]:
    def target_logit(logits: Tensor, target: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if target is None:
            raise XAIConfigurationError(f"rrclarc_penalty(criterion={name!r}) needs the true classes in `target`.")
        index = class_labels(target, logits.shape[1], "the target classes").view(-1, 1).to(logits.device)
        return logits.gather(1, index).squeeze(1)

    return target_logit


#: ``criterion -> c(logits (N, K), target, generator) -> (N,)``, the output whose gradient RR-ClArC constrains
RRCLARC_CRITERIA: dict[str, Callable[[Tensor, Tensor | None, torch.Generator | None], Tensor]] = {
    # R2R's later default: every class's logit with a random sign per sample and class, drawn each step
    "all_logits_random": lambda logits, target, generator: (logits * _random_signs(logits, generator)).sum(1),
    "all_logits": lambda logits, target, generator: logits.sum(1),
    "max_logit": lambda logits, target, generator: logits.max(1).values,
    "target_logit": _needs_target("target_logit"),
    "logprobs": lambda logits, target, generator: F.log_softmax(logits, dim=1).mean(1),
}


def check_criterion(criterion: str, where: str = "rrclarc_penalty") -> None:
    """Raises unless ``criterion`` is one of :data:`RRCLARC_CRITERIA`."""
    if criterion not in RRCLARC_CRITERIA:
        raise XAIConfigurationError(f"{where}: criterion must be one of {tuple(RRCLARC_CRITERIA)}, got {criterion!r}.")


def rrclarc_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    layer: nn.Module,
    cav: Tensor,
    criterion: Criterion = "all_logits_random",
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    channel_dim: int | None = None,
) -> Tensor:
    """Right Reason ClArC (Pahde et al., 2023): the gradient at ``layer`` must be orthogonal to the CAV.

    ``(v . mean_positions(d c_b / d a_b))^2`` per sample ``b``, where ``a`` is ``layer``'s output in
    ``forward(inputs)`` and ``c`` a criterion of the logits (:data:`RRCLARC_CRITERIA`):

    * ``"all_logits_random"`` (default): ``sum_k s_bk z_bk`` with random signs ``s = +-1`` drawn from ``generator``
      per sample and class (every class is constrained, without the cancellation of a plain sum);
    * ``"all_logits"``: ``sum_k z_bk``; ``"max_logit"``: ``max_k z_bk``; ``"target_logit"``: ``z_b,y_b`` (needs
      ``target``); ``"logprobs"``: ``mean_k log softmax(z_b)_k``.

    The gradient is taken with ``create_graph=True``, so the penalty trains the parameters (one double backward
    through the layers above ``layer``; with the layers up to ``layer`` frozen it trains only those above).
    Samples must not interact in ``forward`` (batch norm in eval mode).

    Args:
        forward: maps ``inputs`` to ``(N, K)`` logits and runs ``layer`` once.
        inputs: the batch (images, token ids: no gradient with respect to them is taken).
        layer: the submodule whose output ``a`` is differentiated.
        cav: ``(C,)`` concept vector (unit length from :func:`fit_cav`).
        criterion: one of the criteria above.
        target: ``(N,)`` true classes for ``"target_logit"``.
        generator: the random signs' generator for ``"all_logits_random"`` (the global one when ``None``).
        sample_weights: ``(N,)`` per-sample weights.
        reduction: ``"mean"`` over the batch, ``"sum"`` or ``"none"``.
        channel_dim: as in :func:`pooled_features`.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> # d sum_k z_k / d a = column sums of the head (4, 6); along v = (1, 0): 4, squared: 16
        >>> rrclarc_penalty(net, torch.randn(3, 2), net[0], torch.tensor([1.0, 0.0]), criterion="all_logits")
        tensor(16., grad_fn=<MeanBackward0>)
    """
    check_criterion(criterion)
    logits, activation = forward_with_activation(forward, inputs, layer, "rrclarc_penalty")
    if not activation.requires_grad:
        raise XAIConfigurationError(
            "rrclarc_penalty: gradients are disabled (torch.no_grad or inference mode), so the gradient at the "
            "layer cannot be taken; compute the penalty with gradients enabled."
        )
    dim = _channel_dim(activation, channel_dim)
    if cav.dim() != 1 or cav.shape[0] != activation.shape[dim]:
        raise XAIConfigurationError(
            f"rrclarc_penalty: the concept vector has shape {tuple(cav.shape)}, but the layer's output "
            f"{tuple(activation.shape)} has {activation.shape[dim]} channels in dim {dim}."
        )
    logits = _widen(logits)
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    outputs = RRCLARC_CRITERIA[criterion](logits, target, generator)
    (gradient,) = torch.autograd.grad(outputs.sum(), activation, create_graph=True)
    per_channel = _widen(_per_channel(gradient, dim).mean(2))
    per_sample = (per_channel @ cav.to(per_channel)).pow(2)
    return _reduce(per_sample, sample_weights, reduction)
