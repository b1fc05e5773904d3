"""Where explanation masks come from: batch annotations, token spans, or a sampler of single-feature masks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from lightning_xai._random import SeededGenerator
from lightning_xai.errors import MaskShapeError, MaskValueError
from lightning_xai.functional._masks import broadcast_mask

__all__ = ["OccupancyMaskSampler", "broadcast_mask", "collate_annotations", "masks_from_annotations", "spans_to_mask"]


def spans_to_mask(spans: Sequence[Sequence[tuple[int, int]] | None], length: int, device: Any = None) -> Tensor:
    """Turns per-sample token spans ``[(start, end), ...]`` (end exclusive) into an ``(N, length)`` mask.

    ``None`` (or an empty list) marks a sample without annotation: its row stays zero.

    Examples:
        >>> spans_to_mask([[(1, 3)], None, [(0, 1), (4, 5)]], length=5)
        tensor([[0., 1., 1., 0., 0.],
                [0., 0., 0., 0., 0.],
                [1., 0., 0., 0., 1.]])
    """
    mask = torch.zeros(len(spans), length, device=device)
    for row, sample_spans in enumerate(spans):
        for start, end in sample_spans or ():
            if not 0 <= start <= end <= length:
                raise MaskShapeError(
                    f"token span ({start}, {end}) of sample {row} is outside the sequence of length {length}; "
                    "spans are (start, end) token positions with end exclusive."
                )
            mask[row, start:end] = 1.0
    return mask


def masks_from_annotations(annotation: Any, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Normalises a batch annotation into ``(mask, annotated)``.

    Accepts a tensor (rows that are all zero, or all NaN, count as "no annotation"), a list of per-sample
    tensors or ``None``, or a list of per-sample token spans (for ``(N, T)`` token ids or ``(N, T, E)``
    embeddings).

    Returns:
        The mask shaped to broadcast against ``inputs`` and a ``(N,)`` float tensor that is 1 for samples
        with an annotation.

    Examples:
        >>> mask, annotated = masks_from_annotations([torch.ones(2), None], torch.zeros(2, 2))
        >>> mask, annotated
        (tensor([[1., 1.],
                [0., 0.]]), tensor([1., 0.]))
    """
    n = inputs.shape[0]
    if isinstance(annotation, Tensor):
        mask = annotation.to(inputs.device)
        if mask.is_floating_point():
            nan = torch.isnan(mask).flatten(1) if mask.dim() > 1 else torch.isnan(mask)[:, None]
            missing = nan.all(1)
            partial = nan.any(1) & ~missing
            if bool(partial.any()):
                raise MaskValueError(
                    f"the masks of samples {partial.nonzero().flatten().tolist()[:10]} hold NaN in some features "
                    "only; an all-NaN row marks a sample without annotation, a partly NaN one is a data error."
                )
            mask = torch.nan_to_num(mask, nan=0.0)
        else:
            mask = mask.float()
            missing = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        if mask.shape[0] != n:
            raise MaskShapeError(f"the mask has {mask.shape[0]} rows but the batch has {n} samples.")
        mask = broadcast_mask(mask, inputs)
        annotated = (mask.flatten(1).abs().sum(1) > 0) & ~missing
        return mask, annotated.float()
    if isinstance(annotation, (list, tuple)):
        spans = _default_collated_spans(annotation, n)
        if spans is not None:
            annotation = spans
        if len(annotation) != n:
            raise MaskShapeError(
                f"the mask list has {len(annotation)} entries but the batch has {n} samples. A list needs one entry "
                "per sample (a mask, token spans or None); torch's default collate transposes per-sample lists, so "
                "give the DataLoader collate_fn=lightning_xai.masks.collate_annotations."
            )
        if all(a is None or _is_span_list(a) for a in annotation):
            length = inputs.shape[1]
            mask = spans_to_mask(annotation, length, device=inputs.device)
            annotated = torch.tensor([bool(a) for a in annotation], dtype=torch.float, device=inputs.device)
            return broadcast_mask(mask, inputs), annotated
        rows, annotated_rows = [], []
        for row, entry in enumerate(annotation):
            if entry is None:
                rows.append(torch.zeros(inputs.shape[1:], device=inputs.device))
                annotated_rows.append(0.0)
                continue
            entry = torch.as_tensor(entry, dtype=torch.float, device=inputs.device)
            try:
                rows.append(
                    broadcast_mask(entry.unsqueeze(0), inputs[row : row + 1]).expand_as(inputs[row : row + 1])[0]
                )
            except MaskShapeError as error:
                raise MaskShapeError(f"mask of sample {row}: {error}") from None
            annotated_rows.append(1.0)
        return torch.stack(rows), torch.tensor(annotated_rows, device=inputs.device)
    raise MaskShapeError(
        f"a mask must be a tensor, a list of per-sample tensors or None, or a list of token spans; "
        f"got {type(annotation).__name__}."
    )


def _is_span_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(i, int) for i in span) for span in value
    )


def _default_collated_spans(annotation: Sequence[Any], n: int) -> list[list[tuple[int, int]]] | None:
    """Per-sample spans from what ``default_collate`` makes of them, or ``None`` if ``annotation`` is not that.

    ``default_collate`` turns N samples of S spans each into S pairs of ``(N,)`` integer tensors (starts, ends).
    """
    pairs = [
        entry
        for entry in annotation
        if isinstance(entry, (list, tuple))
        and len(entry) == 2
        and all(isinstance(t, Tensor) and t.dim() == 1 and t.shape[0] == n and not t.is_floating_point() for t in entry)
    ]
    if not annotation or len(pairs) != len(annotation):
        return None
    return [[(int(start[i]), int(end[i])) for start, end in pairs] for i in range(n)]


def collate_annotations(samples: Sequence[Any]) -> Any:
    """A DataLoader ``collate_fn`` that keeps per-sample annotations as lists and collates the rest as usual.

    ``torch.utils.data.default_collate`` cannot collate ``None`` (a sample without annotation), transposes a
    sample's list of token spans, and refuses spans of different counts or masks of different shapes. This
    keeps any field whose values are ``None``, lists or tuples of spans, or tensors of differing shapes as a list
    of the per-sample values (what :func:`masks_from_annotations` reads); every other field goes through
    ``default_collate``. It works on dict samples and on ``(x, y, extras_dict)`` tuples.

    Examples:
        >>> import torch
        >>> samples = [
        ...     {"input_ids": torch.tensor([5, 1, 7]), "mask": [(1, 2)]},
        ...     {"input_ids": torch.tensor([4, 6, 8]), "mask": None},
        ... ]
        >>> batch = collate_annotations(samples)
        >>> batch["input_ids"].shape, batch["mask"]
        (torch.Size([2, 3]), [[(1, 2)], None])
        >>> masks_from_annotations(batch["mask"], batch["input_ids"])
        (tensor([[0., 1., 0.],
                [0., 0., 0.]]), tensor([1., 0.]))
    """
    first = samples[0]
    if isinstance(first, Mapping):
        return {key: _collate_field([sample[key] for sample in samples]) for key in first}
    if isinstance(first, tuple) and not _is_span_list(first):
        return [_collate_field([sample[i] for sample in samples]) for i in range(len(first))]
    return default_collate(list(samples))


def _collate_field(values: list[Any]) -> Any:
    if any(value is None or _is_span_list(value) for value in values):
        return list(values)
    if all(isinstance(value, Tensor) for value in values) and len({tuple(value.shape) for value in values}) > 1:
        return list(values)
    if isinstance(values[0], Mapping):
        return collate_annotations(values)
    return default_collate(values)


class OccupancyMaskSampler:
    """Samples single-feature masks in proportion to how often each feature is non-zero (the ColorMNIST scheme).

    For images ``(N, C, H, W)`` a feature is a pixel with all its channels; for ``(N, D)`` inputs it is one
    column. Occupancy is the fraction of samples in which the feature is non-zero. Give it explicitly
    (e.g. ``ColorDigits.occupancy()``) or let the sampler estimate it from the training batches it sees.

    Args:
        num_masks: masks drawn per sample (distinct features); the batch is tiled this many times.
        occupancy: feature occupancy, shaped like one sample without channels (``(H, W)`` or ``(D,)``).
        seed: seed of the sampler's own generator (its state is saved in checkpoints).

    Examples:
        >>> sampler = OccupancyMaskSampler(num_masks=2, occupancy=torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
        >>> masks = sampler.sample(torch.ones(3, 3, 2, 2))
        >>> masks.shape, masks.sum((1, 2, 3)).tolist(), masks[:, 0, 0, 0].sum().item()
        (torch.Size([6, 1, 2, 2]), [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 0.0)
    """

    def __init__(
        self, num_masks: int = 1, occupancy: Tensor | list[float] | list[list[float]] | None = None, seed: int = 0
    ) -> None:
        if num_masks < 1:
            raise ValueError(f"num_masks must be >= 1, got {num_masks}.")
        self.num_masks = num_masks
        self.occupancy = None if occupancy is None else torch.as_tensor(occupancy, dtype=torch.float)
        self._count = 0 if occupancy is None else -1  # -1: given, not estimated
        self.random = SeededGenerator(seed)  # plain data in pickles: ddp_spawn sends the sampler to its workers

    @staticmethod
    def _feature_shape(inputs: Tensor) -> tuple[int, ...]:
        return tuple(inputs.shape[2:]) if inputs.dim() >= 3 else tuple(inputs.shape[1:])

    def update(self, inputs: Tensor) -> None:
        """Adds a batch to the running occupancy estimate (no-op when occupancy was given)."""
        if self._count < 0:
            return
        active = inputs.detach().abs() > 1e-6
        if inputs.dim() >= 3:
            active = active.any(1)
        batch_occupancy = active.float().mean(0).cpu()
        n = inputs.shape[0]
        if self.occupancy is None or self._count == 0:
            self.occupancy = batch_occupancy
        else:
            self.occupancy = (self.occupancy * self._count + batch_occupancy * n) / (self._count + n)
        self._count += n

    def sample(self, inputs: Tensor) -> Tensor:
        """Draws ``num_masks`` masks per sample; returns ``(num_masks * N, 1, *spatial)`` or ``(num_masks * N, D)``."""
        shape = self._feature_shape(inputs)
        if self.occupancy is None:
            self.update(inputs)
        if tuple(self.occupancy.shape) != shape:
            raise MaskShapeError(
                f"OccupancyMaskSampler has occupancy of shape {tuple(self.occupancy.shape)} but the inputs have "
                f"features of shape {shape} (inputs {tuple(inputs.shape)})."
            )
        probabilities = self.occupancy.flatten().clamp_min(0)
        if probabilities.sum() <= 0:
            probabilities = torch.ones_like(probabilities)
        n = inputs.shape[0]
        features = probabilities.numel()
        draws = min(self.num_masks, features)
        chosen = torch.multinomial(
            probabilities.expand(n, -1), draws, replacement=False, generator=self.random.generator
        )
        masks = torch.zeros(draws, n, features)
        masks.scatter_(2, chosen.T.unsqueeze(2), 1.0)
        masks = masks.view(draws * n, *shape)
        if inputs.dim() >= 3:
            masks = masks.unsqueeze(1)
        return masks.to(device=inputs.device, dtype=inputs.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"occupancy": self.occupancy, "count": self._count, "generator": self.random.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the draws; an occupancy given to this sampler is kept (a warning says if the checkpoint differs)."""
        self.random.set_state(state["generator"])
        saved = state["occupancy"]
        if self._count < 0 and self.occupancy is not None:  # the user gave one: their configuration wins
            if (
                saved is None
                or tuple(saved.shape) != tuple(self.occupancy.shape)
                or not torch.allclose(saved, self.occupancy)
            ):
                warnings.warn(
                    "OccupancyMaskSampler: the checkpoint was drawn with another occupancy than the one given to "
                    "this sampler; the given occupancy is kept (the draws continue from the checkpoint's state).",
                    UserWarning,
                    stacklevel=2,
                )
            return
        self.occupancy = saved
        self._count = state["count"]
