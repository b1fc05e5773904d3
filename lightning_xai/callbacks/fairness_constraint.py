"""FairnessConstraint: a bound on a group-fairness gap, held by a Lagrange multiplier that follows dual ascent."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._contract import StepContext
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_warn
from lightning_xai.callbacks.mutual_information_regularizer import MutualInformationRegularizer
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.fairness import (
    ESTIMATORS,
    Estimator,
    as_probabilities,
    dependence_from_statistics,
    rate_gap,
    running_statistics,
)
from lightning_xai.mixin import XAIMixin


@dataclass(frozen=True)
class _Constraint:
    """What one kind of bound constrains: the measured quantity and the statistics it is measured on."""

    #: the gap is taken within each true class (equalized odds) instead of over all examples
    conditional_on_target: bool
    #: measured on the model's decisions (one-hot argmax), else on its probabilities at temperature 1
    on_decisions: bool
    #: the measurement from ``(sums, counts)`` running statistics
    measure: Any
    #: the default name of the callback (log prefix and state key)
    name: str


def _mutual_information(sums: Tensor, counts: Tensor, min_cell_count: float) -> Tensor:
    return dependence_from_statistics(sums, counts, "plugin", min_cell_count)


#: the bounds a user can state, by the keyword argument that states them
CONSTRAINTS: dict[str, _Constraint] = {
    "max_dp_difference": _Constraint(False, True, rate_gap, "dp_constraint"),
    "max_eo_difference": _Constraint(True, True, rate_gap, "eo_constraint"),
    "max_mutual_information": _Constraint(False, False, _mutual_information, "mi_constraint"),
}


class FairnessConstraint(MutualInformationRegularizer):
    """Trains under a bound on a fairness gap: you state the gap, a Lagrange multiplier finds the weight.

    Give exactly one bound:

    * ``max_dp_difference``: demographic-parity difference of the *decisions*, the largest gap between
      two intersectional cells' positive rates (fairlearn's ``demographic_parity_difference``);
    * ``max_eo_difference``: equalized-odds difference of the decisions, the larger of the TPR and FPR gaps
      (fairlearn's ``equalized_odds_difference``);
    * ``max_mutual_information``: the plug-in mutual information between the probabilities and the cell.

    The loss gets ``multiplier * surrogate``, where ``surrogate`` is a differentiable stand-in for the gap (an
    estimator of :func:`~lightning_xai.functional.fairness.dependence_from_statistics` on the tempered softmax,
    default the soft rate gap), and after every optimizer step the multiplier follows the *measured*
    violation ``v = gap - bound`` as a proportional-integral controller (the PI Lagrangian of Stooke et al.
    2020): ``integral <- clip(integral + multiplier_lr * v, 0, max_multiplier)`` (projected dual ascent) and
    ``multiplier = clip(integral + proportional_gain * v, 0, max_multiplier)``. The proportional part lowers
    the multiplier as soon as the gap falls under the bound, which damps the overshoot of plain dual ascent:
    on Adult (4 cells, bound 0.02, seed 0) it gave validation accuracy 83.1 % at DP 0.024 where plain
    ascent (``proportional_gain=0``) oscillated to 81.7 % at DP 0.070 (3 seeds: 83.2 % at 0.023). Decisions are not
    differentiable; measuring them while descending a surrogate is the proxy-Lagrangian of Cotter et al.
    (2019), which keeps the bound about the decisions a user reports. The
    gap is measured on running (exponentially averaged, ``momentum``) per-cell counts of the training
    batches, all-gathered under DDP, so every rank holds the same multiplier; under gradient accumulation the
    multiplier moves once per optimizer step, on the statistics of all its micro-batches.

    The bound is held on the training distribution. Held-out gaps are larger (small cells are noisy, and the
    model fits its training rows): choose the bound on a validation split, e.g. the loosest bound whose
    validation gap meets your target (``benchmarks/fairness_frontier.py`` does this).

    Logged every step and epoch: ``xai/<name>`` (``multiplier * surrogate``), ``xai/<name>/multiplier``,
    ``xai/<name>/gap`` (the measured running constraint value) and ``xai/<name>/surrogate``. The multiplier,
    its integral and the running statistics are in the checkpoint. If training ends with the running gap
    above the bound, a warning says so and what to change.

    Why not cooper-optim: it owns the optimizer step (a ``ConstrainedOptimizer`` wrapping the primal and
    dual optimizers), which would take ``configure_optimizers``, the optimizer loop and accumulation away from
    Lightning and the user; one scalar multiplier per callback needs no optimizer of its own.

    Args:
        attributes: batch keys of the protected attributes, e.g. ``["sex", "race"]``.
        num_values: number of values of each attribute, e.g. ``[2, 2]``.
        max_dp_difference: bound on the demographic-parity difference of the decisions, in ``[0, 1]``.
        max_eo_difference: bound on the equalized-odds difference of the decisions, in ``[0, 1]``
            (the batches need ``target``).
        max_mutual_information: bound on ``I(Yhat; S)`` in nats, ``>= 0``.
        surrogate: the differentiable term the multiplier weighs, one of
            ``"rate_gap"``, ``"plugin"``, ``"chi2"``, ``"hsic"``; ``"plugin"`` for a mutual-information bound
            by default, else ``"rate_gap"`` (the soft version of the constrained gap).
        temperature: the logits are divided by it before the surrogate's softmax; below 1 the soft rates
            approach the decision rates.
        multiplier_lr: dual step size per optimizer step, in multiplier units per unit of violation (the
            integral gain). The multiplier needs about ``multiplier / (multiplier_lr * violation)`` steps to
            reach the value a task needs: about 0.3 on Adult with the default surrogate (default 0.02,
            chosen on Adult's validation split), tens on a strongly biased toy task (raise it there).
        proportional_gain: the proportional gain (0: plain dual ascent).
        initial_multiplier: the multiplier before the first step.
        max_multiplier: the multiplier's ceiling (an infeasible bound then costs a bounded weight, not a
            diverging one).
        momentum: weight of the past in the running statistics of the measured gap and of the surrogate.
        min_cell_count: cells with fewer (running) examples are left out of the gap.
        groups_key: batch key of an ``(N, A)`` tensor of codes, used when the attributes have no keys of their own.
        output_layer: dotted name of the submodule whose output are the logits; ``None``: the module itself.
        name: log name and state key; default ``dp_constraint``, ``eo_constraint`` or ``mi_constraint``.
        prog_bar: show ``xai/<name>`` on the progress bar.

    Examples:
        >>> from lightning_xai.callbacks import FairnessConstraint
        >>> constraint = FairnessConstraint(["sex", "race"], [2, 2], max_dp_difference=0.03)
        >>> constraint.term_name, constraint.bound, constraint.surrogate, constraint.multiplier
        ('dp_constraint', 0.03, 'rate_gap', 0.0)
    """

    def __init__(
        self,
        attributes: list[str],
        num_values: list[int],
        max_dp_difference: float | None = None,
        max_eo_difference: float | None = None,
        max_mutual_information: float | None = None,
        surrogate: Estimator | None = None,
        temperature: float = 0.5,
        multiplier_lr: float = 0.02,
        proportional_gain: float = 2.0,
        initial_multiplier: float = 0.0,
        max_multiplier: float = 100.0,
        momentum: float = 0.9,
        min_cell_count: float = 1.0,
        groups_key: str = "groups",
        output_layer: str | None = None,
        name: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        where = type(self).__name__
        given = {
            key: value
            for key, value in (
                ("max_dp_difference", max_dp_difference),
                ("max_eo_difference", max_eo_difference),
                ("max_mutual_information", max_mutual_information),
            )
            if value is not None
        }
        if len(given) != 1:
            raise XAIConfigurationError(
                f"{where}: give exactly one bound of {list(CONSTRAINTS)}, got {given or 'none'}; e.g. "
                "FairnessConstraint(['sex'], [2], max_dp_difference=0.03)."
            )
        ((self.constraint, bound),) = given.items()
        kind = CONSTRAINTS[self.constraint]
        upper = 1.0 if kind.on_decisions else math.inf
        if not 0.0 <= bound <= upper or math.isnan(bound):
            raise XAIConfigurationError(f"{where}: {self.constraint} must be in [0, {upper}], got {bound}.")
        surrogate = surrogate or ("rate_gap" if kind.on_decisions else "plugin")
        if surrogate not in ESTIMATORS:
            raise XAIConfigurationError(f"{where}: surrogate must be one of {ESTIMATORS}, got {surrogate!r}.")
        for label, value in (
            ("multiplier_lr", multiplier_lr),
            ("proportional_gain", proportional_gain),
            ("initial_multiplier", initial_multiplier),
        ):
            if not value >= 0 or not math.isfinite(value):
                raise XAIConfigurationError(f"{where}: {label} must be a finite number >= 0, got {value}.")
        if not max_multiplier >= initial_multiplier or not math.isfinite(max_multiplier):
            raise XAIConfigurationError(
                f"{where}: max_multiplier must be finite and >= initial_multiplier ({initial_multiplier}), got "
                f"{max_multiplier}."
            )
        super().__init__(
            attributes,
            num_values,
            weight=1.0,
            estimator=surrogate,
            conditional_on_target=kind.conditional_on_target,
            min_cell_count=min_cell_count,
            momentum=momentum,
            temperature=temperature,
            groups_key=groups_key,
            output_layer=output_layer,
            name=name or kind.name,
            prog_bar=prog_bar,
        )
        self.bound = float(bound)
        self.surrogate: Estimator = surrogate
        self.multiplier_lr = float(multiplier_lr)
        self.initial_multiplier = float(initial_multiplier)
        self.max_multiplier = float(max_multiplier)
        self.proportional_gain = float(proportional_gain)
        self.multiplier = float(initial_multiplier)
        self.integral = float(initial_multiplier)  # the accumulated (integral) part of the multiplier
        self.last_gap = float("nan")
        self.dual_steps = 0
        # statistics of the measured quantity: running over optimizer steps, pending within one
        self.measured_sums: Tensor | None = None
        self.measured_counts: Tensor | None = None
        self.pending_sums: Tensor | None = None
        self.pending_counts: Tensor | None = None

    @property
    def max_dp_difference(self) -> float | None:
        return self.bound if self.constraint == "max_dp_difference" else None

    @property
    def max_eo_difference(self) -> float | None:
        return self.bound if self.constraint == "max_eo_difference" else None

    @property
    def max_mutual_information(self) -> float | None:
        return self.bound if self.constraint == "max_mutual_information" else None

    def default_name(self) -> str:
        return CONSTRAINTS[self.constraint].name

    @property
    def where(self) -> str:
        return f"FairnessConstraint(name={self.term_name!r})"

    @property
    def _key(self) -> str:
        return f"fairness_constraint/{self.term_name}"

    @override
    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        logits, cells, target = self._step_predictions(pl_module, context)
        logits = logits.float()
        measured = as_probabilities(logits.detach())
        if CONSTRAINTS[self.constraint].on_decisions:
            measured = torch.nn.functional.one_hot(measured.argmax(1), measured.shape[1]).to(measured.dtype)
        soft = as_probabilities(logits / self.temperature)
        # one gather for both: the measured statistics carry no gradient, the surrogate's do
        sums, counts = self._global_statistics(pl_module, torch.cat([soft, measured], 1), cells, target)
        classes = soft.shape[1]
        self._add_pending(sums[..., classes:].detach(), counts.detach())
        surrogate = self._running_dependence(sums[..., :classes], counts)
        log = pl_module.log  # type: ignore[attr-defined]
        for key, value in (("multiplier", self.multiplier), ("gap", self.last_gap), ("surrogate", self.last_value)):
            if math.isfinite(value):  # every rank holds the same values: no reduction needed
                log(f"xai/{self.term_name}/{key}", value, on_step=True, on_epoch=True, batch_size=len(cells))
        return self.multiplier * surrogate

    def _add_pending(self, sums: Tensor, counts: Tensor) -> None:
        if self.pending_sums is None or self.pending_sums.shape != sums.shape:
            self.pending_sums, self.pending_counts = sums.clone(), counts.clone()
        else:
            self.pending_sums = self.pending_sums + sums.to(self.pending_sums)
            self.pending_counts = self.pending_counts + counts.to(self.pending_counts)  # type: ignore[operator]

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """One dual-ascent step on the statistics of every micro-batch since the last optimizer step."""
        if self.pending_sums is None or self.pending_counts is None:
            return  # a second optimizer of the same step, or a step in which the term was not computed
        sums, counts = self.pending_sums, self.pending_counts
        self.pending_sums = self.pending_counts = None
        if self.measured_sums is not None and self.measured_sums.shape == sums.shape:
            sums = running_statistics(self.measured_sums.to(sums), sums, self.momentum)
            counts = running_statistics(self.measured_counts.to(counts), counts, self.momentum)  # type: ignore[union-attr]
        self.measured_sums, self.measured_counts = sums, counts
        gap = float(CONSTRAINTS[self.constraint].measure(sums, counts, self.min_cell_count))
        if not math.isfinite(gap):
            return  # NaN logits: the mixin skips the term this step; the multiplier waits
        self.last_gap = gap
        violation = gap - self.bound
        self.integral = min(max(self.integral + self.multiplier_lr * violation, 0.0), self.max_multiplier)
        self.multiplier = min(max(self.integral + self.proportional_gain * violation, 0.0), self.max_multiplier)
        self.dual_steps += 1

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # a bound missed by more than its sampling noise at the end of training is worth saying: the multiplier
        # was too slow (or hit its ceiling), or the bound is infeasible for this model
        slack = 0.01 if CONSTRAINTS[self.constraint].on_decisions else 1e-3
        if math.isfinite(self.last_gap) and self.last_gap > 1.25 * self.bound + slack:
            ceiling = " (its ceiling, max_multiplier)" if self.multiplier >= self.max_multiplier else ""
            rank_zero_warn(
                f"{self.where}: training ended with the running {self.constraint[4:]} at {self.last_gap:.4g}, above "
                f"the bound {self.bound:g}, at multiplier {self.multiplier:.4g}{ceiling}. Train longer, raise "
                "multiplier_lr or proportional_gain (the multiplier needs about multiplier / (multiplier_lr * "
                "violation) steps to grow), or loosen the bound."
            )

    @property
    def _statistics_layout(self) -> dict[str, Any]:
        return {**super()._statistics_layout, "constraint": self.constraint, "surrogate": self.surrogate}

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            multiplier=self.multiplier, integral=self.integral, last_gap=self.last_gap, dual_steps=self.dual_steps
        )
        for key in ("measured_sums", "measured_counts", "pending_sums", "pending_counts"):
            value = getattr(self, key)
            if value is not None:
                state[key] = value.detach().cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.multiplier = float(state_dict.get("multiplier", self.initial_multiplier))
        self.integral = float(state_dict.get("integral", self.multiplier))
        self.last_gap = float(state_dict.get("last_gap", float("nan")))
        self.dual_steps = int(state_dict.get("dual_steps", 0))
        same_layout = state_dict.get("statistics_layout") == self._statistics_layout
        for key in ("measured_sums", "measured_counts", "pending_sums", "pending_counts"):
            setattr(self, key, state_dict.get(key) if same_layout else None)
