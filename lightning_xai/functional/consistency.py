"""Consistency kernels (Atanasova, Simonsen, Lioma and Augenstein, EMNLP 2020): similar reasoning, similar explanations.

Two diagnostic properties of an explanation technique, both a Spearman correlation between how differently a model
*reasons* (the distance of its layer activations) and how differently it is *explained* (the distance of its
saliencies):

* **rationale consistency**, over pairs of models on the same instances:
  :func:`model_activation_distance` and :func:`saliency_distance`;
* **dataset consistency**, over pairs of instances in one model: :func:`instance_pairs` (same-label pairs with high
  word overlap, different-label pairs with low overlap, from :func:`token_overlap`), :func:`pair_activation_distance`
  and :func:`vocabulary_saliency_distance` (saliencies on the pair's union vocabulary, absent tokens count ``1e-7``).

:func:`consistency_correlation` min-max scales both distance lists and returns their Spearman correlation. The
activation distance of an instance is the mean over layers of ``|mean(act_A(x) - act_B(x))|``; since the mean of a
difference is the difference of the means, it only needs every layer's per-instance mean activation
(:func:`mean_activations`), the sufficient statistic the metrics keep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.sanity import parameterised_layers, rank_correlation

__all__ = [
    "ABSENT_SALIENCY",
    "activation_distance",
    "consistency_correlation",
    "instance_pairs",
    "layer_activations",
    "mean_activations",
    "min_max_scale",
    "model_activation_distance",
    "pair_activation_distance",
    "saliency_distance",
    "token_overlap",
    "vocabulary_saliency_distance",
]

#: the saliency of a token absent from one instance of a pair (Atanasova et al.'s ``0.0000001``)
ABSENT_SALIENCY = 1e-7


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None, where: str) -> dict[str, nn.Module]:
    """The hooked modules: the leaf modules with parameters, or the named ones (a name may omit a wrapper's prefix)."""
    if layers is None:
        return dict(parameterised_layers(model))
    modules = dict(model.named_modules())
    resolved = {}
    for wanted in layers:
        found = [name for name in modules if name == wanted or name.endswith("." + wanted)]
        if not found:
            raise XAIConfigurationError(
                f"{where}: {type(model).__name__} has no layer {wanted!r}; its layers with parameters are "
                f"{[name for name, _ in parameterised_layers(model)]}. Pass existing module names in layers=."
            )
        resolved[wanted] = modules[min(found, key=len)]
    return resolved


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    return None


def layer_activations(
    model: nn.Module, inputs: Tensor, layers: Sequence[str] | None = None, *args: Any, **kwargs: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """Runs ``model(inputs, *args, **kwargs)`` without gradients and returns its output and its layers' activations.

    Activations come from forward hooks on ``layers`` (module names; a name may leave out a wrapper's prefix, so
    ``"head"`` finds ``"pl_module.head"``) or, with None, on every leaf module that owns parameters. A layer's
    activation is its output (the first tensor of a tuple output, such as an LSTM's output sequence) on its first
    call. Layers that do not run, or whose output does not start with the batch dimension, are left out.

    Args:
        model: the model.
        inputs: ``(N, ...)`` its inputs.
        layers: module names to hook; None for every leaf module with parameters.
        args: further positional arguments of the forward.
        kwargs: further keyword arguments of the forward.

    Returns:
        ``(output, {layer name: (N, ...) activation})``.

    Raises:
        XAIConfigurationError: if a named layer does not exist.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> output, activations = layer_activations(model, torch.zeros(5, 3))
        >>> {name: tuple(a.shape) for name, a in activations.items()}
        {'0': (5, 4), '2': (5, 2)}
    """
    modules = _resolve_layers(model, layers, "layer_activations")
    captured: dict[str, Tensor] = {}
    rows = inputs.shape[0]

    def hook(name: str):
        def save(module: nn.Module, arguments: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if name not in captured and tensor is not None and tensor.dim() > 0 and tensor.shape[0] == rows:
                captured[name] = tensor.detach()

        return save

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            output = model(inputs, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return output, {name: captured[name] for name in modules if name in captured}


def mean_activations(activations: Mapping[str, Tensor]) -> Tensor:
    """Every layer's mean activation per instance: ``(N, L)`` float64, layers in the mapping's order.

    Example:
        >>> mean_activations({"a": torch.tensor([[1.0, 3.0], [0.0, 0.0]]), "b": torch.ones(2, 2, 2)})
        tensor([[2., 1.],
                [0., 1.]], dtype=torch.float64)
    """
    if not activations:
        raise XAIConfigurationError(
            "mean_activations got no layer activations: no hooked layer ran with an output that starts with the "
            "batch dimension; name the layers to compare with layers=."
        )
    return torch.stack([a.detach().flatten(1).to(torch.float64).mean(1) for a in activations.values()], dim=1)


def activation_distance(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> Tensor:
    """Per instance, the mean over layers of ``|mean(a_l - b_l)|`` (Atanasova et al.'s activation difference).

    Args:
        a: per-layer activations ``{name: (N, ...)}``, or their :func:`mean_activations` ``(N, L)``.
        b: the same layers' activations of the other model (or instance), of the same shapes.

    Returns:
        ``(N,)`` float64 distances, 0 for identical activations.

    Raises:
        XAIConfigurationError: if the layers or shapes do not match.

    Example:
        >>> a = {"x": torch.tensor([[1.0, 2.0]]), "y": torch.tensor([[0.0]])}
        >>> b = {"x": torch.tensor([[2.0, 3.0]]), "y": torch.tensor([[4.0]])}
        >>> activation_distance(a, b)  # (|1.5 - 2.5| + |0 - 4|) / 2
        tensor([2.5000], dtype=torch.float64)
    """
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)) or list(a) != list(b):
            raise XAIConfigurationError(
                f"activation_distance needs the same layers on both sides, got {list(a)} and {list(b)}; "
                "compare activations of matching layers."
            )
        for name in a:
            if a[name].shape != b[name].shape:
                raise XAIConfigurationError(
                    f"activation_distance: layer {name!r} has shape {tuple(a[name].shape)} on one side and "
                    f"{tuple(b[name].shape)} on the other; compare models of one architecture (or name layers=)."
                )
        a, b = mean_activations(a), mean_activations(b)
    if a.shape != b.shape or a.dim() != 2:
        raise XAIConfigurationError(
            f"activation_distance needs (N, L) mean activations of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}."
        )
    return (a.to(torch.float64) - b.to(torch.float64)).abs().mean(1)


def _matching(names_a: Sequence[str], names_b: Sequence[str]) -> list[tuple[str, str]]:
    """Pairs of layer names equal up to a wrapper's prefix (one is a dotted suffix of the other)."""
    pairs = []
    for name_a in names_a:
        for name_b in names_b:
            if name_a == name_b or name_a.endswith("." + name_b) or name_b.endswith("." + name_a):
                pairs.append((name_a, name_b))
                break
    return pairs


def _paired_means(
    activations_a: Mapping[str, Tensor], activations_b: Mapping[str, Tensor], where: str
) -> tuple[Tensor, Tensor]:
    pairs = [
        (name_a, name_b)
        for name_a, name_b in _matching(list(activations_a), list(activations_b))
        if activations_a[name_a].shape == activations_b[name_b].shape
    ]
    if not pairs:
        raise XAIConfigurationError(
            f"{where}: the two models share no layer with activations of one shape (first model: "
            f"{list(activations_a)}, second: {list(activations_b)}); compare models of one architecture or name "
            "the layers to compare with layers=."
        )
    return (
        mean_activations({a: activations_a[a] for a, _ in pairs}),
        mean_activations({b: activations_b[b] for _, b in pairs}),
    )


def model_activation_distance(
    model_a: nn.Module, model_b: nn.Module, inputs: Tensor, layers: Sequence[str] | None = None
) -> Tensor:
    """Per instance, the activation distance between two models on the same inputs (rationale consistency).

    Layers are matched by name (up to a wrapper's prefix) among those that ran in both models with activations of
    one shape; see :func:`layer_activations` and :func:`activation_distance`.

    Args:
        model_a: one model.
        model_b: the other (e.g. another seed, or a randomly initialised copy).
        inputs: ``(N, ...)`` inputs both models take.
        layers: module names to compare; None for every leaf module with parameters.

    Returns:
        ``(N,)`` float64 distances.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> model_activation_distance(model, model, torch.randn(2, 3))
        tensor([0., 0.], dtype=torch.float64)
    """
    _, activations_a = layer_activations(model_a, inputs, layers)
    _, activations_b = layer_activations(model_b, inputs, layers)
    means_a, means_b = _paired_means(activations_a, activations_b, "model_activation_distance")
    return activation_distance(means_a, means_b)


def pair_activation_distance(activations: Tensor | Mapping[str, Tensor], pairs: Tensor) -> Tensor:
    """Per instance pair ``(i, j)``, the activation distance between instances ``i`` and ``j`` of one model.

    Args:
        activations: per-layer activations ``{name: (N, ...)}`` or their :func:`mean_activations` ``(N, L)``.
        pairs: ``(P, 2)`` row indices.

    Returns:
        ``(P,)`` float64 distances; 0 for a duplicated instance.

    Example:
        >>> means = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 1.0]])
        >>> pair_activation_distance(means, torch.tensor([[0, 1], [0, 2]]))
        tensor([1., 0.], dtype=torch.float64)
    """
    means = mean_activations(activations) if isinstance(activations, Mapping) else activations
    pairs = _check_pairs(pairs, means.shape[0], "pair_activation_distance")
    return activation_distance(means[pairs[:, 0]], means[pairs[:, 1]])


def saliency_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per instance, the mean absolute difference of two saliencies (every class and feature element).

    Args:
        a: ``(N, ...)`` saliencies, e.g. ``(N, C, T)`` per class and token or ``(N, C, H, W)`` per class and pixel.
        b: the other saliencies, of the same shape.

    Returns:
        ``(N,)`` float64 distances.

    Example:
        >>> saliency_distance(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        tensor([1., 0.], dtype=torch.float64)
    """
    if a.shape != b.shape:
        raise XAIConfigurationError(
            f"saliency_distance needs saliencies of one shape, got {tuple(a.shape)} and {tuple(b.shape)}; explain "
            "the same inputs and classes with both."
        )
    return (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs().flatten(1).mean(1)


def min_max_scale(values: Tensor) -> Tensor:
    """``(v - min) / (max - min)``; a constant vector becomes zeros (as scikit-learn's ``MinMaxScaler``).

    Example:
        >>> min_max_scale(torch.tensor([2.0, 4.0, 3.0]))
        tensor([0.0000, 1.0000, 0.5000])
        >>> min_max_scale(torch.tensor([5.0, 5.0]))
        tensor([0., 0.])
    """
    values = values.detach()
    low, high = values.min(), values.max()
    span = high - low
    return (values - low) / torch.where(span > 0, span, torch.ones_like(span))


def consistency_correlation(activation_distances: Tensor, saliency_distances: Tensor) -> Tensor:
    """The Spearman correlation between min-max scaled activation and saliency distances (both properties' score).

    Ties get average ranks (as ``scipy.stats.spearmanr``). It is NaN when either list is constant (for instance
    saliency distances that are all 0 although the activations differ: the explanation does not see the
    difference, and there is nothing to rank) or has fewer than two entries.

    Args:
        activation_distances: ``(P,)`` one per model pair and instance, or per instance pair.
        saliency_distances: ``(P,)`` aligned with them.

    Returns:
        A float64 scalar in ``[-1, 1]`` (or NaN); 1 when the distances are monotone in each other.

    Example:
        >>> consistency_correlation(torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([1.0, 3.0, 2.0, 8.0]))
        tensor(1., dtype=torch.float64)
    """
    a = activation_distances.detach().reshape(-1).to(torch.float64)
    s = saliency_distances.detach().reshape(-1).to(torch.float64)
    if a.shape != s.shape:
        raise XAIConfigurationError(
            f"consistency_correlation needs aligned distance lists, got {a.numel()} activation and {s.numel()} "
            "saliency distances."
        )
    if a.numel() < 2:
        return torch.tensor(float("nan"), dtype=torch.float64, device=a.device)
    return rank_correlation(min_max_scale(a)[None], min_max_scale(s)[None], absolute=False)[0]


def _check_pairs(pairs: Tensor, rows: int, where: str) -> Tensor:
    pairs = torch.as_tensor(pairs).long()
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise XAIConfigurationError(f"{where}: pairs must have shape (P, 2), got {tuple(pairs.shape)}.")
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= rows):
        raise XAIConfigurationError(
            f"{where}: pair indices must lie in 0..{rows - 1}, got {pairs.min()}..{pairs.max()}."
        )
    return pairs


def _valid_tokens(token_ids: Tensor, ignore_ids: Sequence[int]) -> Tensor:
    valid = token_ids >= 0
    for ignored in ignore_ids:
        valid &= token_ids != int(ignored)
    return valid


def token_overlap(token_ids: Tensor, ignore_ids: Sequence[int] = ()) -> Tensor:
    """The number of distinct tokens every two instances share: an ``(N, N)`` count matrix.

    Args:
        token_ids: ``(N, T)`` token ids; negative ids are padding.
        ignore_ids: ids that do not count (padding, special tokens, stop words).

    Example:
        >>> token_overlap(torch.tensor([[1, 2, 2, 0], [2, 3, 1, 0], [4, 4, 4, 0]]), ignore_ids=[0])
        tensor([[2, 2, 0],
                [2, 3, 0],
                [0, 0, 1]])
    """
    token_ids = torch.as_tensor(token_ids).long()
    valid = _valid_tokens(token_ids, ignore_ids)
    # a compact vocabulary: only the ids that occur, so the (N, V) presence matrix stays small
    vocabulary, compact = torch.unique(token_ids, return_inverse=True)
    present = torch.zeros(token_ids.shape[0], max(1, vocabulary.numel()), dtype=torch.float64, device=token_ids.device)
    present.scatter_(1, compact.reshape(token_ids.shape), valid.to(torch.float64))
    return (present @ present.T).round().long()


def instance_pairs(
    labels: Tensor, similarity: Tensor, num_pairs: int, min_same_similarity: float | None = None
) -> Tensor:
    """Dataset-consistency pairs: the most similar same-label pairs and the least similar different-label pairs.

    Half of ``num_pairs`` (rounded down) are same-label pairs ``i < j`` in decreasing similarity, the rest
    different-label pairs in increasing similarity; ties keep index order. Atanasova et al. take the 2000 same-label
    pairs with the most shared (non-stop) words, at least one, and 2000 different-label pairs drawn from the 5000
    with the fewest; this takes the fewest directly. Fewer pairs are returned when fewer exist.

    Args:
        labels: ``(N,)`` class labels.
        similarity: ``(N, N)`` similarity, e.g. :func:`token_overlap`, or ``-torch.cdist(x, x)`` for features.
        num_pairs: how many pairs to return at most.
        min_same_similarity: same-label pairs below it are left out (1 for word overlap: at least one shared word).

    Returns:
        ``(P, 2)`` long indices, same-label pairs first.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 0])
        >>> overlap = token_overlap(torch.tensor([[1, 2, 3], [1, 2, 4], [5, 6, 7], [1, 7, 8]]))
        >>> instance_pairs(labels, overlap, 4, min_same_similarity=1)  # overlaps 2, 1 (same); 0, 0 (different)
        tensor([[0, 1],
                [0, 3],
                [0, 2],
                [1, 2]])
    """
    labels = torch.as_tensor(labels).reshape(-1)
    n = labels.shape[0]
    if similarity.shape != (n, n):
        raise XAIConfigurationError(
            f"instance_pairs needs an (N, N) similarity for N={n} labels, got {tuple(similarity.shape)}."
        )
    if int(num_pairs) < 0:
        raise XAIConfigurationError(f"instance_pairs(num_pairs={num_pairs}): give a non-negative number.")
    i, j = torch.triu_indices(n, n, offset=1, device=labels.device)
    values = similarity[i, j].to(torch.float64)
    same = labels[i] == labels[j]
    keep_same = same if min_same_similarity is None else same & (values >= float(min_same_similarity))
    num_same = int(num_pairs) // 2
    chosen = []
    for keep, descending, count in ((keep_same, True, num_same), (~same, False, int(num_pairs) - num_same)):
        index = keep.nonzero().reshape(-1)
        order = torch.sort(values[index], descending=descending, stable=True).indices[:count]
        chosen.append(index[order])
    index = torch.cat(chosen)
    return torch.stack([i[index], j[index]], dim=1)


def _per_token(token_ids: Tensor, saliency: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each instance's distinct tokens and their mean saliency over occurrences: ``(N, T)`` ids, ``(N, C, T)``
    saliencies and ``(N, T)`` validity, the distinct tokens first, in increasing id order."""
    n, length = token_ids.shape
    keyed = torch.where(valid, token_ids, torch.full_like(token_ids, torch.iinfo(torch.long).max))
    ordered, order = torch.sort(keyed, dim=1, stable=True)
    ordered_valid = valid.gather(1, order)
    ordered_saliency = saliency.gather(2, order[:, None, :].expand_as(saliency))
    first = torch.ones_like(ordered_valid)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    # invalid entries (sorted last) go to a dump slot ``length`` that is dropped
    slot = torch.where(ordered_valid, (first & ordered_valid).long().cumsum(1) - 1, torch.full_like(ordered, length))
    weights = ordered_valid.to(saliency.dtype)
    shape = (n, saliency.shape[1], length + 1)
    sums = saliency.new_zeros(shape).scatter_add_(2, slot[:, None, :].expand_as(saliency), ordered_saliency)
    counts = saliency.new_zeros(n, length + 1).scatter_add_(1, slot, weights)
    ids = token_ids.new_full((n, length + 1), -1).scatter_(1, slot, torch.where(ordered_valid, ordered, -1))
    counts = counts[:, :length]
    return ids[:, :length], sums[:, :, :length] / counts.clamp_min(1)[:, None], counts > 0


def vocabulary_saliency_distance(
    token_ids: Tensor,
    saliencies: Tensor,
    pairs: Tensor,
    ignore_ids: Sequence[int] = (),
    absent: float = ABSENT_SALIENCY,
    chunk_size: int = 256,
) -> Tensor:
    """Per instance pair, the mean absolute saliency difference over the pair's union vocabulary.

    Every instance maps each of its distinct tokens to its saliency (the mean over the token's occurrences); a token
    of the union absent from one instance counts ``absent`` there (Atanasova et al.'s ``1e-7``). With per-class
    saliencies the mean runs over classes and union tokens.

    Args:
        token_ids: ``(N, T)`` token ids; negative ids are padding.
        saliencies: ``(N, T)`` per-token saliencies, or ``(N, C, T)`` per class.
        pairs: ``(P, 2)`` instance indices.
        ignore_ids: token ids left out of the vocabulary (padding, special tokens).
        absent: the saliency of a token an instance does not contain.
        chunk_size: pairs compared at once (memory grows with ``chunk_size * T * T``).

    Returns:
        ``(P,)`` float64 distances; 0 for duplicated instances, NaN for a pair without a counted token.

    Example:
        >>> ids = torch.tensor([[1, 2], [2, 3]])
        >>> saliency = torch.tensor([[0.5, 1.0], [1.0, 0.25]])
        >>> vocabulary_saliency_distance(ids, saliency, torch.tensor([[0, 1], [0, 0]]), absent=0.0)
        tensor([0.2500, 0.0000], dtype=torch.float64)
    """
    token_ids = torch.as_tensor(token_ids).long()
    saliencies = saliencies.detach().to(torch.float64)
    if saliencies.dim() == 2:
        saliencies = saliencies[:, None]
    if token_ids.dim() != 2 or saliencies.dim() != 3 or saliencies.shape[::2] != token_ids.shape:
        raise XAIConfigurationError(
            f"vocabulary_saliency_distance needs (N, T) token ids and (N, T) or (N, C, T) saliencies, got "
            f"{tuple(token_ids.shape)} and {tuple(saliencies.shape)}; sum embedding saliencies over the embedding "
            "dimension first."
        )
    pairs = _check_pairs(pairs, token_ids.shape[0], "vocabulary_saliency_distance")
    ids, values, valid = _per_token(token_ids, saliencies, _valid_tokens(token_ids, ignore_ids))
    classes = values.shape[1]
    out = []
    for start in range(0, pairs.shape[0], max(1, int(chunk_size))):
        chunk = pairs[start : start + max(1, int(chunk_size))]
        ids_a, ids_b = ids[chunk[:, 0]], ids[chunk[:, 1]]
        valid_a, valid_b = valid[chunk[:, 0]], valid[chunk[:, 1]]
        values_a, values_b = values[chunk[:, 0]], values[chunk[:, 1]]
        match = (ids_a[:, :, None] == ids_b[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]
        in_b, in_a = match.any(2), match.any(1)
        matched_b = torch.einsum("pab,pcb->pca", match.to(torch.float64), values_b)
        shared = ((values_a - matched_b).abs() * in_b[:, None]).sum((1, 2))
        only_a = ((values_a - absent).abs() * (valid_a & ~in_b)[:, None]).sum((1, 2))
        only_b = ((values_b - absent).abs() * (valid_b & ~in_a)[:, None]).sum((1, 2))
        union = valid_a.sum(1) + valid_b.sum(1) - in_b.sum(1)
        out.append((shared + only_a + only_b) / (union.to(torch.float64) * classes))
    if not out:
        return torch.zeros(0, dtype=torch.float64, device=token_ids.device)
    return torch.cat(out)
