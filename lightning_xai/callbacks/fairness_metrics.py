"""FairnessMetrics: intersectional group-fairness rates, gaps and a causal flip test, logged per validation epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._contract import (
    LOGITS_KEY,
    batch_view,
    capture_output,
    forward_logits,
    logits_of,
    output_module,
    rows_of,
)
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_info
from lightning_xai.callbacks._base import EpochMetricCallback, Stage, picture_cadence, renamed_arguments
from lightning_xai.callbacks._fairness_common import attribute_keys, cell_names, check_attributes, read_groups
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.fairness import intersectional_cells
from lightning_xai.loggers import log_image
from lightning_xai.metrics.counterfactual_flip import CounterfactualFlip
from lightning_xai.metrics.intersectional_fairness import (
    CELL_KEYS,
    RATE_COUNTS,
    IntersectionalFairness,
    positive_probability,
)

CounterfactualFn = Callable[[Tensor, str, int], Tensor]


class FairnessMetrics(EpochMetricCallback):
    """Logs intersectional fairness metrics of the model's predictions on every validation and test epoch.

    During validation the callback reads the outputs of the module's own forward pass with a forward hook
    (a forward of its own, ``xai_forward(input)``, only when the validation step never calls the module on
    the batch) and the protected attributes through the batch contract, and accumulates per-cell counts
    (:class:`~lightning_xai.metrics.IntersectionalFairness`; exact under DDP). At the end of the epoch it
    logs, under ``name`` (``fair``; ``test/fair`` under ``trainer.test()``):

    * ``fair/dp_diff``, ``fair/dp_ratio``, ``fair/eo_diff``, ``fair/eo_diff_mean``, ``fair/worst_cell_accuracy``,
      ``fair/mi`` (soft predictions), ``fair/mi_decision`` (decisions);
    * per cell ``fair/cell/<cell>/{count,pos_rate,tpr,fpr,accuracy}``, cells named ``Male_White`` from
      ``value_names`` (or ``sex0_race4``); undefined rates are not logged;
    * confidence intervals (level ``confidence``): ``fair/dp_diff_low``/``_high``, ``fair/eo_diff_low``/``_high``
      and per cell ``fair/cell/<cell>/{pos_rate,tpr,fpr}_low``/``_high`` (Wilson; see
      :class:`~lightning_xai.metrics.IntersectionalFairness`), drawn as whiskers in the chart, and
      ``fair/dp_diff_floor``, the DP difference a fair model would show on cells of these sizes;
    * with ``attribute_columns`` or ``counterfactual_fn``, the causal flip test: every protected attribute of
      every example is set to each of its other values and the model re-run, giving
      ``fair/flip/<attribute>/{abs_change,flip_rate}`` and ``fair/cell/<cell>/{abs_change,flip_rate}``
      (:class:`~lightning_xai.metrics.CounterfactualFlip`);
    * a bar chart of the per-cell rates, ``fair/cell_rates``, through the trainer's loggers
      (:mod:`lightning_xai.loggers`) every ``pictures_every_n_epochs`` epochs, by rank 0.

    The sanity-check pass is skipped. Binary tasks: ``(N,)``/``(N, 1)`` outputs score the positive class,
    ``(N, C)`` outputs are class scores with ``positive_class`` as the positive decision; ``outputs`` says
    whether they are logits (the default, read as the MI regularizer reads them) or probabilities.

    Args:
        attributes: batch keys of the protected attributes (integer codes ``0..K-1``), e.g. ``["sex", "race"]``.
        num_values: number of values of each attribute, e.g. ``[2, 5]``.
        value_names: names of the values per attribute, for the cell names in the logs and the chart.
        threshold: decision threshold for ``(N,)`` outputs.
        positive_class: the positive class of ``(N, C)`` outputs.
        min_cell_count: cells with fewer examples over the epoch are left out of the gaps (still logged).
        groups_key: batch key of an ``(N, A)`` tensor of codes, used when the attributes have no keys of their own.
        output_layer: dotted name of the submodule whose output are the logits; ``None``: the module itself.
        attribute_columns: for the flip test on tabular inputs ``(N, F)``, the input columns of each attribute:
            ``K`` one-hot columns, or one column holding the integer code.
        counterfactual_fn: for the flip test on other inputs, ``fn(inputs, attribute, value) -> inputs`` with the
            attribute set to ``value`` in every row.
        pictures_every_n_epochs: log the bar chart on the first computation and every this many after it; 0 never.
        name: the log prefix and the name in the ``state_key``.
        every_n_epochs: compute every this many epochs of ``fit``.
        outputs: ``"logits"`` or ``"probabilities"``: what the model returns. Never guessed from the values: a
            batch of logits that all lie in ``[0, 1]`` would pass for probabilities.
        confidence: the level of the confidence intervals of the rates and gaps, in ``(0, 1)``.
        plot_every_n_epochs: deprecated name of ``pictures_every_n_epochs``.
        prefix: deprecated name of ``name``.

    Examples:
        >>> callback = FairnessMetrics(["sex", "race"], [2, 2], value_names={"sex": ["M", "F"], "race": ["A", "B"]})
        >>> callback.cell_names
        ['M_A', 'M_B', 'F_A', 'F_B']
    """

    def __init__(
        self,
        attributes: list[str],
        num_values: list[int],
        value_names: dict[str, list[str]] | None = None,
        threshold: float = 0.5,
        positive_class: int = 1,
        min_cell_count: int = 1,
        groups_key: str = "groups",
        output_layer: str | None = None,
        attribute_columns: dict[str, list[int]] | None = None,
        counterfactual_fn: CounterfactualFn | None = None,
        pictures_every_n_epochs: int = 1,
        name: str | None = None,
        every_n_epochs: int = 1,
        outputs: Literal["logits", "probabilities"] = "logits",
        confidence: float = 0.95,
        plot_every_n_epochs: int | None = None,
        prefix: str | None = None,
    ) -> None:
        pictures_every_n_epochs = picture_cadence(
            "FairnessMetrics", pictures_every_n_epochs, plot_every_n_epochs=plot_every_n_epochs
        )
        renamed_arguments("FairnessMetrics", {"prefix": "name="}, prefix=prefix)
        super().__init__(
            name=name if name is not None else prefix,
            every_n_epochs=every_n_epochs,
            pictures_every_n_epochs=pictures_every_n_epochs,
        )
        check_attributes(attributes, num_values, "FairnessMetrics")
        self.attributes = list(attributes)
        self.num_values = [int(k) for k in num_values]
        self.value_names = value_names
        self.cell_names = cell_names(self.attributes, self.num_values, value_names)
        self.threshold = threshold
        self.positive_class = positive_class
        self.min_cell_count = min_cell_count
        self.groups_key = groups_key
        self.output_layer = output_layer
        self.attribute_columns = {k: [int(c) for c in v] for k, v in (attribute_columns or {}).items()}
        self.counterfactual_fn = counterfactual_fn
        for attribute, columns in self.attribute_columns.items():
            if attribute not in self.attributes:
                raise XAIConfigurationError(
                    f"FairnessMetrics: attribute_columns names {attribute!r}, which is not among the attributes "
                    f"{self.attributes}."
                )
            k = self.num_values[self.attributes.index(attribute)]
            if len(columns) not in (1, k):
                raise XAIConfigurationError(
                    f"FairnessMetrics: attribute_columns[{attribute!r}] lists {len(columns)} columns; give {k} one-hot "
                    "columns or 1 column holding the integer code."
                )
        self.outputs = outputs
        self.confidence = float(confidence)
        self.fairness = IntersectionalFairness(
            self.num_values,
            self.cell_names,
            threshold,
            positive_class,
            min_cell_count,
            outputs=outputs,
            attribute_names=self.attributes,
            confidence=confidence,
        )
        # the flip test's keys (fair/flip/<attribute>/...) name the attributes: log-safe, as the cells are
        self.flip = CounterfactualFlip(attribute_keys(self.attributes), self.num_values, self.cell_names)
        self._store: dict[str, Any] = {}
        self._fallback_announced = False

    def default_name(self) -> str:
        return "fair"

    @property
    def flip_test(self) -> bool:
        return bool(self.attribute_columns) or self.counterfactual_fn is not None

    # ----------------------------------------------------------------- the measurement

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        output_module(pl_module, self.output_layer, self.where)
        if self.output_layer is not None:  # the module's own output has a forward fallback; a layer's has none
            self.refuse_compiled(pl_module, f"the output of {self.output_layer!r}")

    @override
    def epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        self.fairness.to(pl_module.device)
        self.flip.to(pl_module.device)
        self.fairness.reset()
        self.flip.reset()

    @override
    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        data = batch_view(pl_module, batch)
        groups = read_groups(data, self.attributes, self.groups_key, self.where)
        self._store = {"groups": groups, "data": data}
        module = output_module(pl_module, self.output_layer, self.where)
        key = getattr(pl_module, "xai_logits_key", LOGITS_KEY)
        self.hooks.append(
            capture_output(
                module,
                self._store,
                "logits",
                select=lambda output: logits_of(output, key),
                accept=rows_of(lambda: len(groups)),
            )
        )

    @override
    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        if "groups" not in self._store:
            return
        data, groups = self._store["data"], self._store["groups"]
        logits = self._store.get("logits")
        inputs = data.get("input")
        if logits is None:
            if not self._fallback_announced:
                rank_zero_info(
                    "FairnessMetrics: the validation step did not call the model on the batch; running "
                    "xai_forward(input) once per batch for the predictions."
                )
                self._fallback_announced = True
            logits = self._forward(pl_module, self._input(inputs))
        if "target" not in data:
            raise XAIConfigurationError(
                f"FairnessMetrics needs the batch key 'target' (the true labels), but the batch has {sorted(data)}."
            )
        target = torch.as_tensor(data["target"]).reshape(-1)
        self.fairness.update(logits.detach(), target, groups)
        if self.flip_test:
            self._update_flip(pl_module, self._input(inputs), logits.detach(), groups)
        self._store = {}

    @override
    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        values = dict(self.fairness.compute())  # collective under DDP
        if self.flip_test:
            flips = self.flip.compute()
            values.update({(key if key.startswith("cell/") else f"flip/{key}"): value for key, value in flips.items()})
        self.log_values(pl_module, values, stage)
        if self.pictures_due(trainer, stage):
            self.log_pictures(trainer, self._log_chart, stage)

    # ----------------------------------------------------------------- helpers

    @staticmethod
    def _input(inputs: Any) -> Tensor:
        if not isinstance(inputs, Tensor):
            raise XAIConfigurationError(
                "FairnessMetrics needs the batch input (key 'input') as a tensor to run the model; override "
                "xai_batch() or make the validation step call the model on the batch."
            )
        return inputs

    def _forward(self, pl_module: LightningModule, inputs: Tensor) -> Tensor:
        return forward_logits(pl_module, inputs, self.where)

    def _decisions(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        probability = positive_probability(logits, self.positive_class, self.outputs)
        if logits.dim() == 2 and logits.shape[1] > 1:
            return probability, (logits.argmax(1) == self.positive_class).long()
        return probability, (probability >= self.threshold).long()

    def _counterfactual(self, inputs: Tensor, attribute: str, value: int) -> Tensor:
        if self.counterfactual_fn is not None:
            return self.counterfactual_fn(inputs, attribute, value)
        columns = self.attribute_columns.get(attribute)
        if columns is None:
            raise XAIConfigurationError(
                f"FairnessMetrics: the flip test needs the input columns of {attribute!r}; add it to "
                "attribute_columns or pass counterfactual_fn."
            )
        if inputs.dim() != 2 or max(columns) >= inputs.shape[1]:
            raise XAIConfigurationError(
                f"FairnessMetrics: attribute_columns[{attribute!r}]={columns} needs (N, F) inputs with F > "
                f"{max(columns)}, got shape {tuple(inputs.shape)}; pass counterfactual_fn for other inputs."
            )
        changed = inputs.clone()
        if len(columns) == 1:
            changed[:, columns[0]] = value
        else:
            changed[:, columns] = 0
            changed[:, columns[value]] = 1
        return changed

    def _update_flip(self, pl_module: LightningModule, inputs: Tensor, logits: Tensor, groups: Tensor) -> None:
        cells = intersectional_cells(groups.to(logits.device), self.num_values, self.attributes)
        probability, decision = self._decisions(logits)
        for index, attribute in enumerate(self.attributes):
            current = groups[:, index].to(inputs.device)
            for value in range(self.num_values[index]):
                rows = current != value
                if not bool(rows.any()):
                    continue
                counterfactual = self._forward(pl_module, self._counterfactual(inputs[rows], attribute, value))
                cf_probability, cf_decision = self._decisions(counterfactual)
                self.flip.update(index, cells[rows], probability[rows], cf_probability, decision[rows], cf_decision)

    def _log_chart(self, trainer: Trainer, stage: Stage) -> None:
        from lightning_xai.visualization import render_cell_rates

        values = self.last_values
        present = [i for i, name in enumerate(self.cell_names) if values[f"cell/{name}/count"] > 0]
        names = [self.cell_names[i] for i in present]
        rates = {
            key: [values[f"cell/{self.cell_names[i]}/{key}"] for i in present] for key in CELL_KEYS if key != "count"
        }
        intervals = {
            key: tuple([values[f"cell/{name}/{key}_{end}"] for name in names] for end in ("low", "high"))
            for key in RATE_COUNTS
        }
        counts = [values[f"cell/{name}/count"] for name in names]
        when = "test set" if stage == "test" else f"epoch {trainer.current_epoch}"
        gaps = [
            f"{label} {values.get(key, math.nan):.3f} [{values.get(f'{key}_low', math.nan):.2f}, "
            f"{values.get(f'{key}_high', math.nan):.2f}]"
            for key, label in (("dp_diff", "DP difference"), ("eo_diff", "EO difference"))
        ]
        floor = values.get("dp_diff_floor", math.nan)
        title = (
            f"{when}: {', '.join(gaps)}\n({100 * self.fairness.confidence:.0f} % intervals; "
            f"a fair model's DP difference on these cells: {floor:.3f})"
        )
        image = render_cell_rates(names, rates, counts, title, intervals)  # type: ignore[arg-type]
        log_image(trainer, self.key("cell_rates", stage), image, trainer.global_step)
