"""Base class of the callbacks that contribute a term to the training loss through ``XAIMixin``."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from torch import Tensor
from typing_extensions import override

from lightning_xai._contract import StepContext
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.mixin import XAIMixin

Schedule = Literal["constant", "linear_warmup", "dann"]


def schedule_factor(schedule: Schedule, step: int, total_steps: float, warmup_steps: int = 0) -> float:
    """The multiplier of a term's weight at optimizer step ``step``.

    * ``constant``: 1.
    * ``linear_warmup``: ``min(1, step / warmup_steps)``.
    * ``dann``: ``2 / (1 + exp(-10 p)) - 1`` with training progress ``p = step / total_steps`` (Ganin et al.).

    Examples:
        >>> schedule_factor("linear_warmup", 5, 100, warmup_steps=10)
        0.5
        >>> round(schedule_factor("dann", 50, 100), 4)
        0.9866
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear_warmup":
        return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
    if schedule == "dann":
        progress = min(1.0, step / total_steps) if math.isfinite(total_steps) and total_steps > 0 else 0.0
        return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0
    raise XAIConfigurationError(f"schedule must be 'constant', 'linear_warmup' or 'dann', got {schedule!r}.")


class LossTerm(XAICallback):
    """A callback that declares a weighted loss term; :class:`~lightning_xai.XAIMixin` adds it to the loss.

    Subclasses implement :meth:`compute_term` (and :meth:`prepare_step` to hook into the step's forward). The
    weight follows ``schedule`` over optimizer steps; the counters and any random state live in
    :meth:`state_dict` and survive checkpoint resume.

    Args:
        weight: the term's weight at full schedule.
        schedule: ``"constant"``, ``"linear_warmup"`` (over ``warmup_steps``) or ``"dann"``.
        warmup_steps: optimizer steps of the linear warm-up.
        name: the term's name in logs (``xai/<name>``) and in its ``state_key``; two terms of one trainer need
            distinct names (Lightning refuses duplicate state keys).
        prog_bar: show ``xai/<name>`` on the progress bar (``xai/total`` is there unless the module sets
            ``xai_prog_bar = False``).
    """

    #: how XAIMixin recognises its loss terms among the trainer's callbacks
    xai_loss_term: ClassVar[bool] = True
    mixin_use: ClassVar[str] = "adds a loss term"
    requires_mixin: ClassVar[bool] = True
    #: the term differentiates the logits of the step's own forward pass with respect to the input
    reuses_step_forward: bool = False
    #: ... and differentiates them with respect to the step's inputs (the inputs then require grad in the step)
    differentiates_step_inputs: bool = False
    #: ... twice (a double backward): the step's attention then runs on the math SDPA kernel
    differentiates_step_twice: bool = False

    def __init__(
        self,
        weight: float = 1.0,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        name: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__(name=name)
        if weight < 0 or not math.isfinite(weight):
            raise XAIConfigurationError(f"{type(self).__name__}: weight must be a finite number >= 0, got {weight}.")
        schedule_factor(schedule, 0, 1.0, warmup_steps)  # validates the name early
        if schedule == "linear_warmup" and warmup_steps <= 0:
            raise XAIConfigurationError(
                f"{type(self).__name__}: schedule='linear_warmup' needs warmup_steps > 0, got {warmup_steps}."
            )
        self.weight = float(weight)
        self.schedule: Schedule = schedule
        self.warmup_steps = int(warmup_steps)
        self.prog_bar = bool(prog_bar)
        self.steps_seen = 0
        self.steps_skipped = 0
        self.last_weight = 0.0
        #: the mixin warned that this term dwarfs the task loss (once per callback)
        self.warned_dominance = False

    @property
    def term_name(self) -> str:
        """The term's name: ``xai/<term_name>`` in the logs (the same as :attr:`name`)."""
        return self.name

    def schedule_factor(self, trainer: Trainer) -> float:
        total = trainer.estimated_stepping_batches if self.schedule == "dann" else math.inf
        return schedule_factor(self.schedule, trainer.global_step, total, self.warmup_steps)

    def current_weight(self, trainer: Trainer) -> float:
        self.last_weight = self.weight * self.schedule_factor(trainer)
        return self.last_weight

    def own_parameters(self, pl_module: XAIMixin) -> list[Tensor]:
        """Parameters that only this term uses (a concept head's); kept in the graph when the term is skipped."""
        return []

    def prepare_step(self, pl_module: XAIMixin, context: StepContext) -> None:
        """Called before the user's ``training_step``; may hook into its forward (``context.capture``)."""

    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        """The unweighted term for this step (a scalar tensor connected to the parameters)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # the training length from the limits, not from trainer.estimated_stepping_batches: that property sets the
        # train loader up here, before a resumed run restores it, and a stateful loader then restarts its epoch
        endless = trainer is not None and trainer.max_steps == -1 and trainer.max_epochs == -1
        if stage == "fit" and self.schedule == "dann" and endless:
            raise XAIConfigurationError(
                f"{type(self).__name__}(schedule='dann') needs the length of training: set max_epochs or max_steps."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen, "steps_skipped": self.steps_skipped, "last_weight": self.last_weight}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_seen = int(state_dict.get("steps_seen", 0))
        self.steps_skipped = int(state_dict.get("steps_skipped", 0))
        self.last_weight = float(state_dict.get("last_weight", 0.0))
