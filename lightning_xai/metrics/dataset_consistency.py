"""Dataset consistency (Atanasova et al., EMNLP 2020) as a metric: similar instances, similar explanations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics.utilities.data import dim_zero_cat

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.consistency import (
    ABSENT_SALIENCY,
    consistency_correlation,
    instance_pairs,
    layer_activations,
    mean_activations,
    pair_activation_distance,
    saliency_distance,
    token_overlap,
    vocabulary_saliency_distance,
)
from lightning_xai.metrics._base import AttributionMetric, ExplainFn
from lightning_xai.metrics._consistency import (
    Classes,
    check_classes,
    check_feature_dims,
    explain_classes,
    num_classes,
    reduce_features,
)


def _empty(state: Any) -> bool:
    """An empty list state, or the empty tensor DDP synchronisation makes of one."""
    if isinstance(state, list):
        return not state or all(t.numel() == 0 for t in state)
    return state.numel() == 0


def _canonical_order(keys: Tensor, labels: Tensor) -> Tensor:
    """A permutation sorting instances by their key rows (lexicographically), then by label: the same instances in any
    order (one process, or DDP ranks gathered rank by rank) give the same order, so pair ties break alike."""
    order = torch.sort(labels, stable=True).indices
    for column in reversed(range(keys.shape[1])):
        order = order[torch.sort(keys[order, column], stable=True).indices]
    return order


class DatasetConsistency(AttributionMetric):
    """Spearman correlation between how differently a model computes and explains pairs of instances.

    The metric keeps, for every instance seen, the model's per-layer mean activations (forward hooks on the leaf
    layers with parameters, or the named ``layers``), its label (``target``), its saliencies and its token ids (text)
    or inputs (images, features). ``compute`` then draws instance pairs from everything seen (gathered over DDP
    ranks): the ``num_pairs // 2`` same-label pairs with the highest similarity and the rest different-label pairs
    with the lowest (:func:`~lightning_xai.functional.consistency.instance_pairs`). For each pair it takes

    * the activation distance, the mean over layers of ``|mean(act(x_i) - act(x_j))|``;
    * the saliency distance: for text, on the pair's union vocabulary (every token maps to its saliency, a token
      absent from one instance counts ``absent = 1e-7``,
      :func:`~lightning_xai.functional.consistency.vocabulary_saliency_distance`); for images and features, the
      elementwise mean absolute difference;

    and returns the Spearman correlation of the two lists, min-max scaled. Higher is better: instances the model
    processes alike should be explained alike. NaN when either list is constant or fewer than two pairs exist.

    Similarity is word overlap for text (distinct shared tokens, at least one for a same-label pair, as Atanasova et
    al.; ``ignore_ids`` drop padding, special tokens or stop words) and minus the Euclidean distance of the inputs
    otherwise. Text is recognised by the ``token_ids`` keyword of ``update``: ``(N, T)`` ids of the instances whose
    ``inputs`` are their ``(N, T, E)`` embeddings; the per-token saliency is the attribution summed over the
    embedding. The :class:`~lightning_xai.callbacks.AttributionMetrics` callback passes the probe's token ids (its
    labels are its ``target``: the labels, or the predictions with ``target="prediction"``). Without ``token_ids``
    the inputs are features and ``feature_dims`` chooses which input dimensions keep their saliency (the others are
    summed). Instances are ordered canonically (by their token ids or inputs) before pairs are drawn, so the pairs,
    and the value, do not depend on batch order or world size.

    Saliencies are those of every class (``classes="all"``, re-explained with ``explain_fn``, as Atanasova et al.
    intend) or the given ``attributions`` (``classes="target"``). The states grow with the instances seen (a few
    numbers per layer plus the saliencies); pair selection builds an ``(N, N)`` similarity. Differences from the
    authors' scripts (copenlu/xai-benchmark, ``consist_data.py``): different-label pairs are the least similar ones,
    not a random 2000 of the 5000 least similar; a repeated token's saliency is the mean over its occurrences, not the
    last one; the vocabulary distance uses every class's saliency.

    Args:
        num_pairs: how many pairs to correlate at most (Atanasova et al.: 4000).
        classes: ``"all"`` (saliencies of every class) or ``"target"``.
        layers: module names whose activations are compared; None for every leaf module with parameters.
        ignore_ids: token ids that count neither for overlap nor in the vocabulary.
        absent: the saliency of a token missing from one instance of a pair.
        feature_dims: input dimensions that index features (without ``token_ids``); None for every element.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> embedding, model = nn.Embedding(20, 4), nn.Sequential(nn.Flatten(), nn.Linear(4 * 5, 2))
        >>> def input_x_gradient(model, x, target):
        ...     x = x.detach().requires_grad_(True)
        ...     score = model(x).gather(1, target[:, None]).sum()
        ...     return x * torch.autograd.grad(score, x)[0]
        >>> ids, labels = torch.randint(1, 20, (16, 5)), torch.randint(0, 2, (16,))
        >>> inputs = embedding(ids).detach()
        >>> metric = DatasetConsistency(num_pairs=40)
        >>> metric.update(inputs, input_x_gradient(model, inputs, labels), labels, model=model,
        ...               explain_fn=input_x_gradient, token_ids=ids)
        >>> activations, saliencies = metric.compute_distances()
        >>> activations.shape == saliencies.shape
        True
        >>> bool(-1 <= metric.compute() <= 1)
        True
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    #: the AttributionMetrics callback passes ``token_ids=`` to metrics that set this
    takes_token_ids: ClassVar[bool] = True

    layer_means: list[Tensor]
    labels: list[Tensor]
    saliencies: list[Tensor]
    token_ids: list[Tensor]
    lengths: list[Tensor]
    keys: list[Tensor]

    def __init__(
        self,
        num_pairs: int = 256,
        classes: Classes = "all",
        layers: Sequence[str] | None = None,
        ignore_ids: Sequence[int] = (),
        absent: float = ABSENT_SALIENCY,
        feature_dims: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_pairs) < 2:
            raise XAIConfigurationError(
                f"DatasetConsistency(num_pairs={num_pairs}): a rank correlation needs at least 2 pairs."
            )
        self.num_pairs = int(num_pairs)
        self.classes = check_classes("DatasetConsistency", classes)
        self.requires = ("model", "target", "explain_fn") if self.classes == "all" else ("model", "target")
        self.layers = None if layers is None else list(layers)
        self.ignore_ids = tuple(int(i) for i in ignore_ids)
        self.absent = float(absent)
        self.feature_dims = check_feature_dims("DatasetConsistency", feature_dims)
        for name in ("layer_means", "labels", "saliencies", "token_ids", "lengths", "keys"):
            self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self,
        inputs: Tensor,
        attributions: Tensor,
        target: Tensor | None = None,
        *,
        model: nn.Module | None = None,
        explain_fn: ExplainFn | None = None,
        mask: Tensor | None = None,
        token_ids: Tensor | None = None,
    ) -> None:
        """Adds the batch's instances: their mean activations, labels, saliencies and token ids or inputs.

        Args:
            inputs: ``(N, ...)`` inputs of ``model`` (for text: the embeddings of ``token_ids``).
            attributions: ``(N, ...)`` attributions of ``target`` (used with ``classes="target"``).
            target: ``(N,)`` labels that decide same-label and different-label pairs.
            model: maps ``inputs`` to logits.
            explain_fn: ``explain_fn(model, inputs, target) -> attributions`` (with ``classes="all"``).
            mask: not used.
            token_ids: ``(N, T)`` token ids for text; negative ids are padding.

        Raises:
            XAIConfigurationError: if a required argument is missing, ``token_ids`` do not match the inputs, or text
                and non-text batches are mixed.
        """
        self._check_required(model=model, explain_fn=explain_fn, mask=mask, target=target)
        text = token_ids is not None
        if (text and not _empty(self.keys)) or (not text and not _empty(self.token_ids)):
            raise XAIConfigurationError(
                "DatasetConsistency got batches with and without token_ids; use one metric for text (always pass "
                "token_ids=) and another for features."
            )
        if text:
            token_ids = torch.as_tensor(token_ids).long()
            if token_ids.dim() != 2 or token_ids.shape != inputs.shape[:2]:
                raise XAIConfigurationError(
                    f"DatasetConsistency.update(token_ids=...) needs (N, T) ids of the (N, T, ...) inputs, got ids of "
                    f"shape {tuple(token_ids.shape)} for inputs of shape {tuple(inputs.shape)}."
                )
        feature_dims = (1,) if text else self.feature_dims
        with torch.inference_mode(False), torch.enable_grad():
            inputs = inputs.detach().clone()
            logits, activations = layer_activations(model, inputs, self.layers)
            if self.classes == "all":
                saliency = explain_classes(explain_fn, model, inputs, num_classes(logits), feature_dims)
            else:
                saliency = reduce_features(attributions.detach().to(torch.float64), feature_dims)[:, None]
        self.layer_means.append(mean_activations(activations))
        self.labels.append(target.detach().reshape(-1).long())
        if text:
            # one row per token: instances of any length concatenate (DDP gathers flat states)
            self.token_ids.append(token_ids.reshape(-1))
            self.lengths.append(torch.full((inputs.shape[0],), token_ids.shape[1], device=token_ids.device))
            self.saliencies.append(saliency.transpose(1, 2).reshape(-1, saliency.shape[1]))
        else:
            self.keys.append(inputs.detach().flatten(1).to(torch.float64))
            self.saliencies.append(saliency.flatten(1))

    def _instances(self) -> dict[str, Tensor]:
        means, labels = dim_zero_cat(self.layer_means), dim_zero_cat(self.labels)
        saliencies = dim_zero_cat(self.saliencies).to(torch.float64)
        if _empty(self.token_ids):
            keys = dim_zero_cat(self.keys)
            order = _canonical_order(keys, labels)
            return {
                "means": means[order],
                "labels": labels[order],
                "saliencies": saliencies[order],
                "keys": keys[order],
            }
        flat, lengths = dim_zero_cat(self.token_ids), dim_zero_cat(self.lengths).long()
        length = int(lengths.max())
        rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=flat.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        columns = torch.arange(flat.numel(), device=flat.device) - starts[rows]
        ids = flat.new_full((lengths.numel(), length), -1)
        ids[rows, columns] = flat
        per_token = saliencies.new_zeros(lengths.numel(), saliencies.shape[1], length)
        per_token[rows, :, columns] = saliencies
        order = _canonical_order(ids, labels)
        return {"means": means[order], "labels": labels[order], "saliencies": per_token[order], "token_ids": ids[order]}

    def compute_distances(self) -> tuple[Tensor, Tensor]:
        """The ``(P,)`` activation and saliency distances of the chosen pairs (over every instance, every rank)."""
        return self._distances()[1:]

    def compute_pairs(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The ``(P, 2)`` chosen pairs, indexing the returned instances (canonically ordered ``means``, ``labels``,
        ``saliencies`` and ``token_ids`` or ``keys``)."""
        pairs, _, _, instances = self._distances(with_instances=True)
        return pairs, instances

    def _distances(self, with_instances: bool = False) -> Any:
        instances = self._instances()
        if "token_ids" in instances:
            similarity = token_overlap(instances["token_ids"], self.ignore_ids)
            pairs = instance_pairs(instances["labels"], similarity, self.num_pairs, min_same_similarity=1)
            saliency = vocabulary_saliency_distance(
                instances["token_ids"], instances["saliencies"], pairs, self.ignore_ids, self.absent
            )
        else:
            similarity = -torch.cdist(instances["keys"], instances["keys"])
            pairs = instance_pairs(instances["labels"], similarity, self.num_pairs)
            saliency = saliency_distance(instances["saliencies"][pairs[:, 0]], instances["saliencies"][pairs[:, 1]])
        activation = pair_activation_distance(instances["means"], pairs)
        if with_instances:
            return pairs, activation, saliency, instances
        return pairs, activation, saliency

    def compute(self) -> Tensor:
        """The Spearman correlation of the min-max scaled pair distances (NaN when either list is constant)."""
        if _empty(self.labels):
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        return consistency_correlation(*self.compute_distances())

    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plots the value (or ``val``) with torchmetrics' plotting; returns ``(figure, axes)``."""
        return self._plot(val, ax)
