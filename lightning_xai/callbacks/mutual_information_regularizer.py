"""MutualInformationRegularizer: makes predictions independent of intersectional groups of protected attributes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._contract import StepContext, logits_of, output_module, rows_of
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_warn
from lightning_xai.callbacks._fairness_common import check_attributes, read_groups
from lightning_xai.callbacks._loss_term import LossTerm, Schedule
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._labels import class_labels
from lightning_xai.functional.fairness import (
    ESTIMATORS,
    Estimator,
    as_probabilities,
    cell_statistics,
    dependence_from_statistics,
    intersectional_cells,
    running_statistics,
)
from lightning_xai.mixin import XAIMixin


class MutualInformationRegularizer(LossTerm):
    """Penalizes the mutual information between the model's predictions and intersectional groups.

    Kokhlikyan et al. (2022), "Bias mitigation framework for intersectional subgroups in neural networks":
    the loss gets ``weight * I(Yhat; S)``, the plug-in mutual information between the softmax prediction and
    the joint cell ``S`` of all protected attributes (e.g. sex x race: 10 cells), which drives the model
    towards equal prediction rates across cells (demographic parity) with little loss of accuracy. With
    ``conditional_on_target=True`` it is ``I(Yhat; S | Y)`` (equalized odds).

    The predictions are the outputs of the step's own forward pass, read by a forward hook on the
    LightningModule (or on ``output_layer``): no second forward. Softmax is applied to ``(N, C)`` logits and
    a sigmoid to ``(N,)``/``(N, 1)`` logits. The attributes come through the batch contract: one batch key
    per attribute (integer codes ``0..K-1``), or one ``groups_key`` entry of shape ``(N, A)``.

    Under DDP the fixed-shape per-cell sums and counts are gathered from all ranks with gradients, so the
    penalty and its gradient are those of the global batch.

    Small batches bias the plug-in estimate upward (a model independent of the groups still scores > 0,
    more so as cells get small); ``momentum`` evaluates the estimator at running (exponentially averaged)
    cell statistics, whose gradient is still the current batch's (see
    :func:`lightning_xai.functional.fairness.running_statistics`), and ``min_cell_count`` leaves out cells
    with too few examples. :class:`lightning_xai.samplers.StratifiedBatchSampler` keeps every cell in every
    batch.

    Args:
        attributes: batch keys of the protected attributes, e.g. ``["sex", "race"]``.
        num_values: number of values of each attribute, e.g. ``[2, 5]`` (fixed, so that all ranks agree).
        weight: weight of the term at full schedule.
        estimator: ``"plugin"`` (mutual information in nats), ``"chi2"`` (chi-square dependence, bounds
            HGR^2), ``"hsic"`` (linear-kernel HSIC) or ``"rate_gap"`` (the largest gap between cells' mean
            predictions; at ``temperature=1`` the DiffDP penalty). The plug-in estimate at ``temperature=1``
            and ``momentum=0`` is also Kamishima et al.'s prejudice remover (PRemover) divided by the batch size.
        conditional_on_target: condition on the true class (batch key ``target``).
        min_cell_count: cells with fewer (running) examples are left out of the estimate.
        momentum: weight of the past in the running cell statistics; 0 uses the batch alone.
        temperature: the logits are divided by it before the softmax. Below 1 the soft predictions approach
            the decisions, so the term equalizes decision rates rather than mean probabilities (a model can
            match mean probabilities across cells while its decision rates still differ).
        groups_key: batch key of an ``(N, A)`` tensor of codes, used when the attributes have no keys of their own.
        output_layer: dotted name of the submodule whose output are the logits; ``None``: the module itself
            (``self(x)`` in ``training_step``).
        schedule: ``"constant"``, ``"linear_warmup"`` or ``"dann"``.
        warmup_steps: steps of the linear warm-up.
        name: log name (``xai/<name>``) and state key; default ``"mutual_information"``.
        prog_bar: show ``xai/<name>`` on the progress bar.

    Examples:
        >>> from lightning_xai.callbacks import MutualInformationRegularizer
        >>> regularizer = MutualInformationRegularizer(attributes=["sex", "race"], num_values=[2, 5], weight=2.0)
        >>> regularizer.term_name, regularizer.num_cells
        ('mutual_information', 10)
    """

    def __init__(
        self,
        attributes: list[str],
        num_values: list[int],
        weight: float = 1.0,
        estimator: Estimator = "plugin",
        conditional_on_target: bool = False,
        min_cell_count: float = 1.0,
        momentum: float = 0.0,
        temperature: float = 1.0,
        groups_key: str = "groups",
        output_layer: str | None = None,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        name: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__(weight=weight, schedule=schedule, warmup_steps=warmup_steps, name=name, prog_bar=prog_bar)
        where = type(self).__name__
        check_attributes(attributes, num_values, where)
        if estimator not in ESTIMATORS:
            raise XAIConfigurationError(f"{where}: estimator must be one of {ESTIMATORS}, got {estimator!r}.")
        if not 0.0 <= momentum < 1.0:
            raise XAIConfigurationError(f"{where}: momentum must be in [0, 1), got {momentum}.")
        if min_cell_count < 0 or not math.isfinite(min_cell_count):
            raise XAIConfigurationError(f"{where}: min_cell_count must be a finite number >= 0, got {min_cell_count}.")
        self.attributes = list(attributes)
        self.num_values = [int(k) for k in num_values]
        self.estimator: Estimator = estimator
        self.conditional_on_target = conditional_on_target
        self.min_cell_count = float(min_cell_count)
        self.momentum = float(momentum)
        if not temperature > 0 or not math.isfinite(temperature):
            raise XAIConfigurationError(f"{where}: temperature must be a finite number > 0, got {temperature}.")
        self.temperature = float(temperature)
        self.groups_key = groups_key
        self.output_layer = output_layer
        self.running_sums: Tensor | None = None
        self.running_counts: Tensor | None = None
        self._last_value: Tensor | float = float("nan")

    @property
    def last_value(self) -> float:
        """The term's value at the last training step (NaN before the first)."""
        # kept on the device and read on demand: a float() every step would wait for the device every step
        return float(self._last_value)

    @property
    def num_cells(self) -> int:
        return math.prod(self.num_values)

    def default_name(self) -> str:
        return "mutual_information"

    @property
    def where(self) -> str:
        return f"MutualInformationRegularizer(name={self.term_name!r})"

    @property
    def _key(self) -> str:
        return f"mutual_information_regularizer/{self.term_name}"

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        output_module(pl_module, self.output_layer, self.where)
        self.refuse_compiled(pl_module, "the step's predictions")

    @override
    def prepare_step(self, pl_module: XAIMixin, context: StepContext) -> None:
        groups = read_groups(context.data, self.attributes, self.groups_key, self.where)
        context.cache[f"{self._key}/groups"] = groups
        module = output_module(pl_module, self.output_layer, self.where)  # type: ignore[arg-type]
        key = pl_module.xai_logits_key
        context.capture(
            module,
            f"{self._key}/outputs",
            select=lambda output: logits_of(output, key),
            accept=rows_of(lambda: len(groups)),
        )

    @override
    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        logits, cells, target = self._step_predictions(pl_module, context)
        logits = logits.float()
        probs = as_probabilities(logits if self.temperature == 1.0 else logits / self.temperature)
        sums, counts = self._global_statistics(pl_module, probs, cells, target)
        return self._running_dependence(sums, counts)

    def _step_predictions(self, pl_module: XAIMixin, context: StepContext) -> tuple[Tensor, Tensor, Tensor | None]:
        """The step's logits, each row's intersectional cell and (conditional form) its true class."""
        logits = context.cache.get(f"{self._key}/outputs")
        groups = context.cache[f"{self._key}/groups"]
        if logits is None:
            where = "the LightningModule" if self.output_layer is None else f"submodule {self.output_layer!r}"
            raise XAIConfigurationError(
                f"{self.where}: {where} returned no output with {groups.shape[0]} rows during training_step, so "
                "there are no predictions to regularize. Call self(x) on the batch in training_step (before "
                "self.xai_loss(batch) under manual optimization), or set output_layer= to the submodule that "
                "produces the logits."
            )
        cells = intersectional_cells(groups.to(logits.device), self.num_values, self.attributes)
        target = None
        if self.conditional_on_target:
            num_classes = as_probabilities(logits[:1].detach()).shape[1]
            target = class_labels(
                torch.as_tensor(context.get("target", self.where)),
                num_classes,
                f"{self.where} (conditional_on_target=True): the target, one of the model's {num_classes} classes,",
            ).to(logits.device)
        return logits, cells, target

    def _global_statistics(
        self, pl_module: XAIMixin, probs: Tensor, cells: Tensor, target: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-cell sums and counts of the global batch: this rank's, summed over all ranks with gradients."""
        sums, counts = cell_statistics(
            probs, cells, self.num_cells, target, probs.shape[1] if target is not None else None
        )
        trainer = pl_module.trainer  # type: ignore[attr-defined]
        if trainer.world_size > 1:
            # fixed shapes on every rank; sync_grads lets each rank's gradient see the global estimate
            sums = pl_module.all_gather(sums, sync_grads=True).sum(0)  # type: ignore[attr-defined]
            counts = pl_module.all_gather(counts).sum(0)  # type: ignore[attr-defined]
        return sums, counts

    def _running_dependence(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The estimator at the running statistics mixed with this step's (whose gradient it keeps)."""
        running = self.running_sums is not None and self.running_sums.shape == sums.shape
        if self.running_sums is not None and not running:  # e.g. the model's number of classes changed
            rank_zero_warn(
                f"{self.where}: the running cell statistics have shape {tuple(self.running_sums.shape)}, this "
                f"step's {tuple(sums.shape)}; the running estimate starts again from this step."
            )
        mixed_sums = running_statistics(self._on(self.running_sums, sums) if running else None, sums, self.momentum)
        mixed_counts = running_statistics(
            self._on(self.running_counts, counts) if running else None, counts, self.momentum
        )
        value = dependence_from_statistics(mixed_sums, mixed_counts, self.estimator, self.min_cell_count)
        if self.momentum > 0 and torch.isfinite(sums.detach()).all():
            self.running_sums = mixed_sums.detach().clone()
            self.running_counts = mixed_counts.detach().clone()
        self._last_value = value.detach()
        return value

    @staticmethod
    def _on(state: Tensor | None, like: Tensor) -> Tensor | None:
        return None if state is None else state.to(device=like.device, dtype=like.dtype)

    @property
    def _statistics_layout(self) -> dict[str, Any]:
        """What the running statistics are statistics of; a checkpoint's must match to be used."""
        return {"num_values": list(self.num_values), "conditional_on_target": self.conditional_on_target}

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["statistics_layout"] = self._statistics_layout
        if self.running_sums is not None and self.running_counts is not None:
            state["running_sums"] = self.running_sums.detach().cpu()
            state["running_counts"] = self.running_counts.detach().cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.running_sums = state_dict.get("running_sums")
        self.running_counts = state_dict.get("running_counts")
        layout = state_dict.get("statistics_layout")
        if self.running_sums is not None and layout is not None and layout != self._statistics_layout:
            rank_zero_warn(
                f"{self.where}: the checkpoint's running cell statistics were kept for {layout}, this run has "
                f"{self._statistics_layout}; they are dropped, and the running estimate starts again."
            )
            self.running_sums = self.running_counts = None
