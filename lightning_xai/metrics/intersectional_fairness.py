"""Intersectional group-fairness rates and gaps as a torchmetrics metric, from per-cell counts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.fairness import (
    as_probabilities,
    cell_confusion_counts,
    dependence_from_statistics,
    difference_interval,
    fairness_report,
    intersectional_cells,
    parity_gap_floor,
    wilson_interval,
)

SUMMARY_KEYS = ("dp_diff", "dp_ratio", "eo_diff", "eo_diff_mean", "worst_cell_accuracy", "mi", "mi_decision")
CELL_KEYS = ("count", "pos_rate", "tpr", "fpr", "accuracy")
#: rate -> (its numerator, its denominator) as columns (tn, fp, fn, tp) of the confusion counts
RATE_COUNTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "pos_rate": ((1, 3), (0, 1, 2, 3)),
    "tpr": ((3,), (2, 3)),
    "fpr": ((1,), (0, 1)),
}
#: gap -> the rates whose largest between-cell difference it is (the worst of them for equalized odds)
GAP_RATES = {"dp_diff": ("pos_rate",), "eo_diff": ("tpr", "fpr")}


Outputs = Literal["logits", "probabilities"]


def positive_probability(preds: Tensor, positive_class: int = 1, outputs: Outputs = "logits") -> Tensor:
    """Probability of the positive class from ``(N,)`` or ``(N, C)`` predictions.

    ``outputs`` says what the predictions are; it is never guessed from their values (a batch of binary logits
    that all lie in ``[0, 1]`` would pass for probabilities). ``"logits"``: a sigmoid for ``(N,)``, a softmax for
    ``(N, C)``, as :class:`~lightning_xai.callbacks.MutualInformationRegularizer` reads them. ``"probabilities"``:
    taken as they are, and checked.

    Examples:
        >>> import torch
        >>> positive_probability(torch.tensor([0.3, 0.9])).round(decimals=4)
        tensor([0.5744, 0.7109])
        >>> positive_probability(torch.tensor([0.3, 0.9]), outputs="probabilities")
        tensor([0.3000, 0.9000])
        >>> positive_probability(torch.tensor([[2.0, 0.0]])).round(decimals=4)
        tensor([0.1192])
    """
    if outputs not in ("logits", "probabilities"):
        raise XAIConfigurationError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}.")
    preds = preds.detach().float()
    if preds.dim() == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.dim() not in (1, 2) or (preds.dim() == 2 and not 0 <= positive_class < preds.shape[1]):
        raise XAIConfigurationError(
            f"predictions must be (N,) or (N, C) with positive_class={positive_class} < C, got shape "
            f"{tuple(preds.shape)}."
        )
    if outputs == "logits":
        return as_probabilities(preds)[:, 1 if preds.dim() == 1 else positive_class]
    outside = preds.numel() > 0 and not bool(((preds >= 0) & (preds <= 1)).all())
    rows_off = preds.dim() == 2 and not torch.allclose(preds.sum(1), torch.ones_like(preds[:, 0]), atol=1e-4)
    if outside or rows_off:
        raise XAIConfigurationError(
            "outputs='probabilities', but the predictions are not probabilities (values outside [0, 1], or (N, C) "
            "rows that do not sum to 1); set outputs='logits' if the model returns logits."
        )
    return preds if preds.dim() == 1 else preds[:, positive_class]


class IntersectionalFairness(Metric):
    """Group-fairness rates over the intersectional cells of several protected attributes.

    Accumulates, per cell, confusion counts of the binary decisions and the sum of the positive-class
    probabilities (fixed-shape sums: exact under DDP, and a batch that lacks a cell is counted right, unlike
    torchmetrics 1.9's ``BinaryFairness``). ``compute`` returns a dict:

    * ``dp_diff``, ``dp_ratio``: demographic-parity difference and ratio of the positive rates;
    * ``eo_diff``, ``eo_diff_mean``: equalized-odds difference, worst case and mean of the TPR and FPR gaps;
    * ``worst_cell_accuracy``;
    * ``mi``: plug-in mutual information (nats) between the soft prediction and the cell, the quantity
      :class:`~lightning_xai.callbacks.MutualInformationRegularizer` minimizes; ``mi_decision``: the same for
      the hard decisions;
    * per cell ``cell/<name>/<key>`` for ``count``, ``pos_rate``, ``tpr``, ``fpr`` and ``accuracy`` (NaN
      where undefined, e.g. a cell without positives has no ``tpr``);
    * confidence intervals at level ``confidence``: ``cell/<name>/<rate>_low`` and ``_high`` for ``pos_rate``,
      ``tpr`` and ``fpr`` (Wilson score intervals), and ``dp_diff_low``/``_high`` and ``eo_diff_low``/``_high``
      (Newcombe's interval of the difference between the two cells that attain the gap). A gap whose interval
      reaches 0 is within sampling noise: on Adult's test split the smallest intersectional cells hold a few
      dozen rows, and their rates are uncertain by +-0.1;
    * ``dp_diff_floor``: the DP difference a fair model (the same positive rate, the overall one, in every
      cell) would show on cells of these sizes (:func:`~lightning_xai.functional.fairness.parity_gap_floor`).

    The gaps follow fairlearn's ``between_groups`` definitions (they equal ``demographic_parity_difference``,
    ``equalized_odds_difference`` and ``MetricFrame`` results on data where every cell has both labels),
    taken over the cells where a rate is defined; cells with fewer than ``min_cell_count`` examples are left
    out of the gaps, since a handful of examples makes a rate noise.

    Args:
        num_values: number of values of each protected attribute, e.g. ``[2, 5]``.
        cell_names: one name per cell (mixed-radix order, last attribute fastest); default ``cell0``, ...
        threshold: decision threshold on the positive-class probability for ``(N,)`` predictions.
        positive_class: the positive class of ``(N, C)`` predictions (decision: argmax equals it).
        min_cell_count: smallest cell counted in the gaps.
        outputs: ``"logits"`` or ``"probabilities"``: what ``update`` receives (never guessed from the values).
        attribute_names: the attributes' names, for errors about their values; default ``attribute 0``, ...
        confidence: the level of the confidence intervals, in ``(0, 1)``.

    Examples:
        >>> import torch
        >>> metric = IntersectionalFairness(num_values=[2], outputs="probabilities")
        >>> metric.update(torch.tensor([0.9, 0.8, 0.2, 0.6]), torch.tensor([1, 0, 0, 1]), torch.tensor([0, 0, 1, 1]))
        >>> values = metric.compute()
        >>> float(values["dp_diff"]), float(values["cell/cell0/pos_rate"]), float(values["eo_diff"])
        (0.5, 1.0, 1.0)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    confusion: Tensor
    positive_sum: Tensor

    def __init__(
        self,
        num_values: Sequence[int],
        cell_names: Sequence[str] | None = None,
        threshold: float = 0.5,
        positive_class: int = 1,
        min_cell_count: int = 1,
        outputs: Outputs = "logits",
        attribute_names: Sequence[str] | None = None,
        confidence: float = 0.95,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < confidence < 1.0:
            raise XAIConfigurationError(f"IntersectionalFairness: confidence must be in (0, 1), got {confidence}.")
        self.confidence = float(confidence)
        if outputs not in ("logits", "probabilities"):
            raise XAIConfigurationError(
                f"IntersectionalFairness: outputs must be 'logits' or 'probabilities', got {outputs!r}."
            )
        self.outputs: Outputs = outputs
        self.attribute_names = None if attribute_names is None else list(attribute_names)
        self.num_values = [int(k) for k in num_values]
        self.num_cells = math.prod(self.num_values)
        self.cell_names = list(cell_names) if cell_names is not None else [f"cell{i}" for i in range(self.num_cells)]
        if len(self.cell_names) != self.num_cells:
            raise XAIConfigurationError(
                f"IntersectionalFairness: {len(self.cell_names)} cell_names for {self.num_cells} cells "
                f"(num_values={self.num_values})."
            )
        self.threshold = threshold
        self.positive_class = positive_class
        self.min_cell_count = min_cell_count
        self.add_state("confusion", default=torch.zeros(self.num_cells, 4, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("positive_sum", default=torch.zeros(self.num_cells, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add a batch: predictions ``(N,)``/``(N, C)``, binary ``target`` ``(N,)``, ``groups`` ``(N, A)`` codes."""
        positive = positive_probability(preds, self.positive_class, self.outputs)
        if preds.dim() == 2 and preds.shape[1] > 1:
            decisions = (preds.argmax(1) == self.positive_class).long()
        else:
            decisions = (positive >= self.threshold).long()
        cells = intersectional_cells(groups.to(self.device), self.num_values, self.attribute_names)
        target = torch.as_tensor(target, device=self.device).reshape(-1)
        if target.shape[0] != cells.shape[0] or positive.shape[0] != cells.shape[0]:
            raise XAIConfigurationError(
                f"IntersectionalFairness.update: preds ({positive.shape[0]}), target ({target.shape[0]}) and groups "
                f"({cells.shape[0]}) must have one row per example."
            )
        if preds.dim() == 2 and preds.shape[1] > 2:
            target = (target == self.positive_class).long()
        self.confusion += cell_confusion_counts(decisions.to(self.device), target, cells, self.num_cells)
        self.positive_sum += torch.zeros_like(self.positive_sum).index_add_(
            0, cells, positive.to(self.device, torch.float64)
        )

    def compute(self) -> dict[str, Tensor]:
        """The gaps, the dependence estimates and the per-cell rates (see the class docstring)."""
        confusion = self.confusion
        full = fairness_report(confusion)
        report = full
        if self.min_cell_count > 1:  # the gaps leave small cells out; the per-cell rates keep them
            counted = confusion.sum(1) >= self.min_cell_count
            report = fairness_report(torch.where(counted[:, None], confusion, torch.zeros_like(confusion)))
        counts = confusion.sum(1).to(torch.float64)
        soft = torch.stack([counts - self.positive_sum, self.positive_sum], 1)
        decided = torch.stack([confusion[:, 0] + confusion[:, 2], confusion[:, 1] + confusion[:, 3]], 1).double()
        values = {key: report[key] for key in SUMMARY_KEYS if key in report}
        values["mi"] = dependence_from_statistics(soft[None], counts[None], min_cell_count=self.min_cell_count)
        values["mi_decision"] = dependence_from_statistics(
            decided[None], counts[None], min_cell_count=self.min_cell_count
        )
        intervals = self._rate_intervals(confusion)
        counted = confusion.sum(1) >= max(self.min_cell_count, 1)
        for gap, rates in GAP_RATES.items():
            values[f"{gap}_low"], values[f"{gap}_high"] = self._gap_interval(full, intervals, rates, counted)
        cell_counts = confusion.sum(1)[counted]
        overall = (confusion[counted][:, 1] + confusion[counted][:, 3]).sum() / cell_counts.sum().clamp_min(1)
        values["dp_diff_floor"] = parity_gap_floor(cell_counts, overall).to(counts.device)
        for cell, name in enumerate(self.cell_names):
            for key in CELL_KEYS:
                values[f"cell/{name}/{key}"] = full[key][cell]
            for key, (low, high) in intervals.items():
                values[f"cell/{name}/{key}_low"], values[f"cell/{name}/{key}_high"] = low[cell], high[cell]
        return values

    def _rate_intervals(self, confusion: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        z = statistics.NormalDist().inv_cdf(0.5 + self.confidence / 2)
        return {
            rate: wilson_interval(confusion[:, list(numerator)].sum(1), confusion[:, list(denominator)].sum(1), z)
            for rate, (numerator, denominator) in RATE_COUNTS.items()
        }

    @staticmethod
    def _gap_interval(
        report: dict[str, Tensor], intervals: dict[str, tuple[Tensor, Tensor]], rates: tuple[str, ...], counted: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The interval of the gap's difference between its two extreme cells, for the rate that attains the gap."""
        best: tuple[Tensor, Tensor] | None = None
        best_gap = -math.inf
        for rate in rates:
            values = torch.where(counted, report[rate], torch.full_like(report[rate], torch.nan))
            defined = ~values.isnan()
            if int(defined.sum()) < 2:
                continue
            high = int(torch.where(defined, values, torch.full_like(values, -math.inf)).argmax())
            low = int(torch.where(defined, values, torch.full_like(values, math.inf)).argmin())
            gap = float(values[high] - values[low])
            if gap > best_gap:
                (lows, highs), best_gap = intervals[rate], gap
                best = difference_interval(
                    values[high], (lows[high], highs[high]), values[low], (lows[low], highs[low])
                )
        if best is None:
            nan = torch.tensor(math.nan, dtype=torch.float64)
            return nan, nan
        return best
