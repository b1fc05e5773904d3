"""TX-Ray (Rethmeier, Saxena, Augenstein, UAI 2020): what each neuron of a layer responds to, as a distribution over
discrete input features, and how training changes it.

A layer's output is read as activation vectors at *positions* (tokens of a sequence, pixels of a feature map, or
one position for a pooled vector). Each position carries a discrete *feature*: the token id there, a POS tag, or
the sample's class label. TX-Ray credits positions to neurons in one of two ways (the table :data:`CREDIT_MODES`):

* ``"max"`` (TX-Ray's max-1): each position is credited to its maximally activated neuron, with that activation;
* ``"topk"`` (the ALPS 2021 lab's CNN variant): each neuron keeps its ``k`` most activated positions of every
  sequence (``torch.topk`` over the positions), as max-over-time pooling passes them on.

Only positive activations are credited. Per neuron, the credited activation summed per feature is its *mass*
matrix row; normalised it is the neuron's feature distribution. Between two stages (the checkpoint training
started from and now, or two epochs) a neuron's change is the Hellinger distance of its two distributions,
``H(p, q) = ||sqrt(p) - sqrt(q)||_2 / sqrt(2)`` on the union of their supports: 0 for equal distributions, 1 for
disjoint ones. TX-Ray's reference code averages a per-token mean of normalised activations and divides the
distance by the union's size; we use the distribution of the mass, so that ``H`` is the textbook distance in
``[0, 1]`` and does not shrink with the vocabulary.

A neuron's *length* is its number of distinct features (its support); a shorter length after training means it
specialised. *Redundancy* is the Jaccard overlap of two neurons' supports. A neuron credited with nothing on the
probe data is *dead* there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_xai.errors import XAIConfigurationError

__all__ = [
    "CREDIT_MODES",
    "NEURON_SCORES",
    "NeuronFeatureCounts",
    "dead_neurons",
    "feature_distributions",
    "filter_redundancy",
    "hellinger_distance",
    "layer_positions",
    "length_shift",
    "lowest_scored",
    "neuron_feature_mass",
    "neuron_length",
    "neuron_scores",
    "position_features",
    "prune_neurons",
    "top_features",
]

CreditMode = Literal["max", "topk"]


class NeuronFeatureCounts(NamedTuple):
    """What :func:`neuron_feature_mass` credits: ``(num_neurons, num_features)`` matrices.

    Attributes:
        mass: the credited activation summed per neuron and feature.
        count: the number of positions credited per neuron and feature.
    """

    mass: Tensor
    count: Tensor


# ------------------------------------------------------------------------------------------------ positions


def _channels_first(module: nn.Module, output: Tensor) -> Tensor:
    # (B, C, *spatial) -> (B, positions, C): every pixel (or sequence step) of a feature map is a position
    return output.flatten(2).transpose(1, 2)


def _recurrent(module: nn.Module, output: Any) -> Tensor:
    sequence = output[0] if isinstance(output, tuple) else output
    if isinstance(sequence, nn.utils.rnn.PackedSequence):
        return nn.utils.rnn.pad_packed_sequence(sequence, batch_first=True)[0]
    if sequence.dim() == 2:  # an unbatched sequence
        return sequence.unsqueeze(0)
    return sequence if getattr(module, "batch_first", False) else sequence.transpose(0, 1)


def _last_dim(module: nn.Module, output: Any) -> Tensor:
    # Linear, activations, Hugging Face encoder layers (a tuple or ModelOutput whose first entry is the hidden state)
    if not isinstance(output, Tensor):
        output = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
    if output.dim() == 1:
        return output.view(1, 1, -1)
    if output.dim() == 2:
        return output.unsqueeze(1)
    return output.flatten(1, -2)


# module class -> how its output becomes (batch, positions, neurons); the first isinstance match wins
_POSITIONS: tuple[tuple[type[nn.Module], Callable[[nn.Module, Any], Tensor]], ...] = (
    (nn.modules.conv._ConvNd, _channels_first),
    (nn.modules.pooling._MaxPoolNd, _channels_first),
    (nn.modules.pooling._AvgPoolNd, _channels_first),
    (nn.modules.batchnorm._BatchNorm, _channels_first),
    (nn.RNNBase, _recurrent),
)


def layer_positions(module: nn.Module, output: Any) -> Tensor:
    """A layer's output as ``(batch, positions, neurons)`` activations.

    Convolutions, poolings and batch norms are channels-first (a neuron is a channel, a position a pixel or a
    sequence step); recurrent layers give their output sequence (respecting ``batch_first``, packed sequences
    padded); everything else (Linear, Hugging Face encoder layers, activations) has its neurons last, and the
    first tensor of a tuple or ``ModelOutput`` is read.

    Examples:
        >>> import torch
        >>> layer_positions(torch.nn.Conv1d(4, 6, 3), torch.zeros(2, 6, 10)).shape
        torch.Size([2, 10, 6])
        >>> layer_positions(torch.nn.LSTM(4, 5), (torch.zeros(7, 2, 5), None)).shape
        torch.Size([2, 7, 5])
    """
    read = next((read for kind, read in _POSITIONS if isinstance(module, kind)), _last_dim)
    return read(module, output)


def position_features(features: Tensor, positions: int, where: str = "position_features") -> Tensor:
    """The feature of each of ``positions`` positions: ``(batch,)`` labels are broadcast to every position;
    ``(batch, length)`` token features are used as they are, or (a convolution without padding has fewer
    positions than tokens) read at each window's first token, as the TX-Ray lab maps ``topk`` positions back.

    Examples:
        >>> import torch
        >>> position_features(torch.tensor([3, 5]), 2).tolist()
        [[3, 3], [5, 5]]
        >>> position_features(torch.tensor([[1, 2, 3, 4]]), 3).tolist()
        [[1, 2, 3]]
    """
    if features.dim() == 1:
        return features[:, None].expand(-1, positions)
    features = features.flatten(1)
    if features.shape[1] < positions:
        raise XAIConfigurationError(
            f"{where}: the layer has {positions} positions per sample but the features only {features.shape[1]}; "
            "token features need one feature per position (or per window start), labels shape (batch,)."
        )
    return features[:, :positions]


# ------------------------------------------------------------------------------------------------ credit


def _credit_max(activations: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    values, neurons = activations.max(dim=-1)  # (B, P)
    keep = valid & (values > 0)
    positions = torch.arange(activations.shape[1], device=activations.device).expand_as(values)
    batch = torch.arange(activations.shape[0], device=activations.device)[:, None].expand_as(values)
    return values[keep], neurons[keep], (batch[keep], positions[keep])


def _credit_topk(activations: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    masked = activations.masked_fill(~valid[..., None], -math.inf)
    values, positions = masked.topk(min(k, activations.shape[1]), dim=1)  # (B, k, N)
    keep = values > 0
    neurons = torch.arange(activations.shape[2], device=activations.device).expand_as(values)
    batch = torch.arange(activations.shape[0], device=activations.device)[:, None, None].expand_as(values)
    return values[keep], neurons[keep], (batch[keep], positions[keep])


#: how positions are credited to neurons: ``mode -> credit(activations, valid, k) -> (values, neurons, (b, p))``
CREDIT_MODES: dict[str, Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor, Any]]] = {
    "max": _credit_max,
    "topk": _credit_topk,
}


def neuron_feature_mass(
    activations: Tensor,
    features: Tensor,
    num_features: int,
    mode: CreditMode = "max",
    k: int = 1,
    valid: Tensor | None = None,
) -> NeuronFeatureCounts:
    """Credits every position's activation to neurons and sums it per neuron and feature.

    Args:
        activations: ``(batch, positions, neurons)``, e.g. from :func:`layer_positions`.
        features: ``(batch,)`` (a label per sample) or ``(batch, length)`` (a feature per position, e.g. token ids).
        num_features: the number of distinct features (the vocabulary or class count).
        mode: ``"max"`` (TX-Ray's max-1) or ``"topk"`` (each neuron's ``k`` strongest positions per sample).
        k: positions kept per neuron and sample in ``"topk"`` mode.
        valid: ``(batch, length)`` booleans; ``False`` positions (padding) credit nothing.

    Returns:
        :class:`NeuronFeatureCounts` of ``(neurons, num_features)`` float32 matrices.

    Example:
        >>> import torch
        >>> activations = torch.tensor([[[2.0, 0.5], [0.1, 3.0], [1.0, 0.0]]])  # 3 positions, 2 neurons
        >>> counts = neuron_feature_mass(activations, torch.tensor([[0, 1, 0]]), num_features=2)
        >>> counts.mass.tolist()
        [[3.0, 0.0], [0.0, 3.0]]
    """
    if mode not in CREDIT_MODES:
        raise XAIConfigurationError(f"neuron_feature_mass: unknown mode {mode!r}; available: {sorted(CREDIT_MODES)}.")
    if activations.dim() != 3:
        raise XAIConfigurationError(
            f"neuron_feature_mass: activations must be (batch, positions, neurons), got shape "
            f"{tuple(activations.shape)}; layer_positions(module, output) reads a layer's output that way."
        )
    batch, positions, neurons = activations.shape
    features = position_features(features.to(activations.device), positions, "neuron_feature_mass").long()
    ok = torch.ones(batch, positions, dtype=torch.bool, device=activations.device)
    if valid is not None:
        ok = position_features(valid.to(activations.device).bool(), positions, "neuron_feature_mass")
    if features.numel() and (features.min() < 0 or features.max() >= num_features):
        ok = ok & (features >= 0) & (features < num_features)
    values, credited, (rows, columns) = CREDIT_MODES[mode](activations.detach().float(), ok, k)
    index = credited * num_features + features[rows, columns]
    mass = torch.zeros(neurons * num_features, device=activations.device)
    count = torch.zeros_like(mass)
    mass.index_add_(0, index, values)
    count.index_add_(0, index, torch.ones_like(values))
    return NeuronFeatureCounts(mass.view(neurons, num_features), count.view(neurons, num_features))


# ------------------------------------------------------------------------------------------------ statistics


def feature_distributions(mass: Tensor) -> Tensor:
    """Each neuron's mass row normalised to a distribution over features; a dead neuron's row stays zero."""
    total = mass.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), torch.zeros_like(mass))


def dead_neurons(mass: Tensor) -> Tensor:
    """``(neurons,)`` booleans: the neurons credited with nothing."""
    return mass.sum(dim=-1) <= 0


def hellinger_distance(p: Tensor, q: Tensor) -> Tensor:
    """Row-wise Hellinger distance of two non-negative weight matrices, each row normalised first.

    Rows that are all zero on either side (a neuron dead at one stage) give NaN: the distance is undefined.

    Examples:
        >>> import torch
        >>> hellinger_distance(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 1.0]]))
        tensor([0., 1.])
    """
    if p.shape != q.shape:
        raise XAIConfigurationError(f"hellinger_distance: shapes differ, {tuple(p.shape)} and {tuple(q.shape)}.")
    distance = (feature_distributions(p).sqrt() - feature_distributions(q).sqrt()).norm(dim=-1) / math.sqrt(2.0)
    undefined = dead_neurons(p) | dead_neurons(q)
    return distance.clamp(0.0, 1.0).masked_fill(undefined, math.nan)


def neuron_length(mass: Tensor) -> Tensor:
    """``(neurons,)`` the number of distinct features credited to each neuron (TX-Ray's neuron length)."""
    return (mass > 0).sum(dim=-1)


def length_shift(mass: Tensor, reference: Tensor) -> Tensor:
    """``(neurons,)`` length now minus length at the reference; negative: the neuron specialised. NaN for a
    neuron dead at either stage."""
    shift = (neuron_length(mass) - neuron_length(reference)).float()
    return shift.masked_fill(dead_neurons(mass) | dead_neurons(reference), math.nan)


def filter_redundancy(mass: Tensor) -> Tensor:
    """``(neurons, neurons)`` Jaccard overlap of the neurons' feature supports (NaN where either is dead).

    Example:
        >>> import torch
        >>> filter_redundancy(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
        tensor([[1.0000, 0.3333],
                [0.3333, 1.0000]])
    """
    support = (mass > 0).float()
    shared = support @ support.T
    sizes = support.sum(dim=-1)
    union = sizes[:, None] + sizes[None, :] - shared
    alive = sizes > 0
    return torch.where(
        alive[:, None] & alive[None, :], shared / union.clamp_min(1.0), torch.full_like(shared, math.nan)
    )


def top_features(mass: Tensor, k: int = 8) -> tuple[Tensor, Tensor]:
    """Each neuron's ``k`` features of largest share: ``(ids, shares)``, both ``(neurons, k)``."""
    shares, ids = feature_distributions(mass).topk(min(k, mass.shape[-1]), dim=-1)
    return ids, shares


# ------------------------------------------------------------------------------------------------ pruning


def _mass_score(mass: Tensor, reference: Tensor | None) -> Tensor:
    total = mass.sum()
    return mass.sum(dim=-1) / total if total > 0 else torch.zeros(mass.shape[0], device=mass.device)


def _transfer_score(mass: Tensor, reference: Tensor | None) -> Tensor:
    if reference is None:
        raise XAIConfigurationError(
            "neuron_scores(score='transfer') needs the reference counts (the checkpoint training started from)."
        )
    distance = hellinger_distance(mass, reference)
    # dead now: nothing to keep; alive now but dead at the reference: entirely learnt in training
    distance = torch.where(dead_neurons(mass), torch.zeros_like(distance), distance)
    return torch.nan_to_num(distance, nan=1.0)


def _selectivity_score(mass: Tensor, reference: Tensor | None) -> Tensor:
    layer = mass.sum(dim=0, keepdim=True).expand_as(mass)
    distance = hellinger_distance(mass, layer)
    return torch.nan_to_num(distance, nan=0.0)


#: neuron importance scores (higher: keep): ``name -> score(mass, reference_mass) -> (neurons,)``
NEURON_SCORES: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    # relevance: the neuron's share of the layer's maximal activation on the task data
    "mass": _mass_score,
    # transfer: how far training moved the neuron's feature distribution from the reference (Hellinger)
    "transfer": _transfer_score,
    # selectivity: how far the neuron's distribution is from the whole layer's; with the labels as features, how
    # class-specific the neuron is (a neuron that fires alike on every class tells the classifier nothing)
    "selectivity": _selectivity_score,
}


def neuron_scores(mass: Tensor, reference: Tensor | None = None, score: str = "mass") -> Tensor:
    """TX-Ray's per-neuron importance (higher: more important) from the mass matrices; see :data:`NEURON_SCORES`.

    Example:
        >>> import torch
        >>> neuron_scores(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), score="mass").tolist()
        [1.0, 0.0]
    """
    if score not in NEURON_SCORES:
        raise XAIConfigurationError(f"neuron_scores: unknown score {score!r}; available: {sorted(NEURON_SCORES)}.")
    return NEURON_SCORES[score](mass, reference)


def lowest_scored(scores: Tensor, amount: float | int) -> Tensor:
    """The indices of the ``amount`` (a fraction, or a count) lowest-scored neurons; ties broken by index."""
    count = int(round(float(amount) * scores.numel())) if isinstance(amount, float) else int(amount)
    if not 0 <= count <= scores.numel():
        raise XAIConfigurationError(f"lowest_scored: amount {amount} is outside [0, {scores.numel()}] neurons.")
    order = torch.sort(scores.detach().cpu().double(), stable=True).indices
    return order[:count].sort().values


def _neuron_axis(module: nn.Module) -> int:
    kind = next((read for kind, read in _POSITIONS if isinstance(module, kind)), _last_dim)
    return 1 if kind is _channels_first else -1


def prune_neurons(module: nn.Module, neurons: Tensor | list[int], fill: float = 0.0) -> RemovableHandle:
    """Prunes neurons inline: a forward hook that sets their outputs to ``fill`` (0, or ``-inf`` before a max-pool
    that should then never pick them, as the TX-Ray lab does). Remove the returned handle to undo.

    The neuron axis is the one :func:`layer_positions` reads (channels of a convolution, the last dimension
    otherwise; a recurrent layer's output sequence, not its recurrent state).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 4)
        >>> handle = prune_neurons(layer, [1, 3])
        >>> (layer(torch.ones(2, 3))[:, [1, 3]] == 0).all().item()
        True
        >>> handle.remove()
    """
    index = torch.as_tensor(neurons, dtype=torch.long)
    axis = _neuron_axis(module)

    def hook(_: nn.Module, __: Any, output: Any) -> Any:
        def pruned(tensor: Tensor) -> Tensor:
            return tensor.index_fill(axis, index.to(tensor.device), fill)

        if isinstance(output, Tensor):
            return pruned(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (pruned(output[0]), *output[1:])
        raise XAIConfigurationError(
            f"prune_neurons: {type(module).__name__} returned {type(output).__name__}; only a tensor or a tuple "
            "whose first entry is a tensor can be pruned inline."
        )

    return module.register_forward_hook(hook)
