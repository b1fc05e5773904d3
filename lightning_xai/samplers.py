"""Batch samplers that keep every intersectional cell in every batch, and splits stratified by cell and label."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_xai.errors import XAIConfigurationError


class StratifiedBatchSampler(Sampler[list[int]]):
    """Batches in which every cell (group) appears in proportion to its size, reshuffled each epoch.

    Random batches often miss small intersectional cells, which makes per-batch dependence estimates (the
    mutual-information regularizer's) noisy and biased. Here each epoch shuffles every cell, then deals
    the examples out to the batches in turn, cell after cell, so a cell of ``n_s`` examples lands
    ``floor(n_s / B)`` or ``ceil(n_s / B)`` times in each of the ``B`` batches; the batch order and the order
    within each batch are shuffled too. Every example is used once per epoch (with ``drop_last`` a random
    subset of the remainder is left out), and batch sizes differ by at most one.

    Lightning cannot insert a ``DistributedSampler`` into a custom batch sampler: under DDP, pass
    ``num_replicas`` and ``rank`` (each rank takes every ``num_replicas``-th batch; ranks get the same
    number of batches) and set ``Trainer(use_distributed_sampler=False)``.

    Args:
        cells: the cell id of every example of the dataset (e.g. from
            :func:`lightning_xai.functional.intersectional_cells`).
        batch_size: largest batch size.
        drop_last: make ``len(cells) // batch_size`` batches of exactly ``batch_size``.
        seed: base seed; epoch ``e`` uses ``seed + e`` (Lightning calls :meth:`set_epoch`).
        num_replicas: number of DDP ranks sharing the epoch.
        rank: this process's rank.

    Examples:
        >>> cells = [0] * 8 + [1] * 4
        >>> sampler = StratifiedBatchSampler(cells, batch_size=3)
        >>> [sorted(cells[i] for i in batch) for batch in sampler]
        [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]
    """

    def __init__(
        self,
        cells: Sequence[int] | Tensor,
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        self.cells = torch.as_tensor(cells).reshape(-1).long()
        if batch_size < 1:
            raise XAIConfigurationError(f"StratifiedBatchSampler: batch_size must be >= 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise XAIConfigurationError(
                f"StratifiedBatchSampler: rank must be in [0, num_replicas={num_replicas}), got {rank}."
            )
        if self.cells.numel() == 0:
            raise XAIConfigurationError("StratifiedBatchSampler: cells is empty; pass one cell id per example.")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        n = self.cells.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return -(-self._num_batches_total() // self.num_replicas)

    def _all_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        num_batches = self._num_batches_total()
        if num_batches == 0:
            return []
        keep = torch.ones(self.cells.numel(), dtype=torch.bool)
        if self.drop_last:
            surplus = self.cells.numel() - num_batches * self.batch_size
            keep[torch.randperm(self.cells.numel(), generator=generator)[:surplus]] = False
        dealt: list[Tensor] = []
        for cell in torch.unique(self.cells).tolist():
            members = torch.nonzero((self.cells == cell) & keep).reshape(-1)
            dealt.append(members[torch.randperm(members.numel(), generator=generator)])
        order = torch.cat(dealt)
        # a random start keeps the batches that receive a cell's extra example from always being the first ones
        slots = (torch.arange(order.numel()) + int(torch.randint(num_batches, (1,), generator=generator))) % num_batches
        batches = []
        for b in torch.randperm(num_batches, generator=generator).tolist():
            members = order[slots == b]
            batches.append(members[torch.randperm(members.numel(), generator=generator)].tolist())
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._all_batches()
        if self.num_replicas > 1:
            per_rank = len(self)
            batches = (batches * (1 + per_rank * self.num_replicas // max(len(batches), 1)))[
                : per_rank * self.num_replicas
            ]
            batches = batches[self.rank :: self.num_replicas]
        yield from batches


def stratified_split(strata: Sequence[int] | Tensor, fractions: Sequence[float], seed: int = 0) -> list[Tensor]:
    """Disjoint index sets (train / validation / test, ...) that each hold every stratum in proportion.

    Each stratum (e.g. an intersectional cell crossed with the label) is shuffled with ``seed`` and cut at the
    cumulative ``fractions``, so a small cell still appears in every part, and the parts' cell and label
    rates match the whole. The fractions must sum to 1.

    Args:
        strata: the stratum id of every example.
        fractions: the share of each part, e.g. ``[0.6, 0.2, 0.2]``.
        seed: the seed of the shuffle; the same seed gives the same split.

    Returns:
        One sorted ``(n_k,)`` long tensor of indices per part.

    Examples:
        >>> strata = [0] * 10 + [1] * 5
        >>> train, test = stratified_split(strata, [0.6, 0.4], seed=0)
        >>> len(train), len(test), sum(strata[i] for i in test.tolist())
        (9, 6, 2)
    """
    shares = [float(f) for f in fractions]
    if not shares or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        raise XAIConfigurationError(f"stratified_split: fractions must be >= 0 and sum to 1, got {list(fractions)}.")
    strata = torch.as_tensor(strata).reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.tensor(shares).cumsum(0)
    parts: list[list[Tensor]] = [[] for _ in shares]
    for stratum in torch.unique(strata).tolist():
        members = torch.nonzero(strata == stratum).squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        bounds = [0, *[round(float(c) * members.numel()) for c in cuts]]
        for part, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            parts[part].append(members[start:end])
    return [torch.sort(torch.cat(chunks)).values if chunks else torch.zeros(0, dtype=torch.long) for chunks in parts]
