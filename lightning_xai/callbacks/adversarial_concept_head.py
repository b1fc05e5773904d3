"""AdversarialConceptHead: makes a layer forget a concept through a gradient-reversed classifier head."""

from __future__ import annotations

from typing import Literal

from typing_extensions import override

from lightning_xai._lightning import Trainer
from lightning_xai.callbacks._concept_head import OBJECTIVES, ConceptHead
from lightning_xai.callbacks._loss_term import Schedule
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.concepts import Pooling


class AdversarialConceptHead(ConceptHead):
    """A classifier of the treated concept on a named layer, trained through gradient reversal (DANN, CausaLM).

    The head (a linear layer, or an MLP with ``hidden`` units) is created in ``setup`` as a submodule of the
    LightningModule (under ``xai_concept_heads``), so your optimizer and DDP see it. Each training step, a forward
    hook reads the layer's output (tensors, tuples and Hugging Face ``ModelOutput`` s; ``selector`` picks
    another element), pools it (``"mean"`` over tokens with the batch's ``attention_mask``, ``"cls"``, or
    ``"none"`` for token-level concepts with ``-100`` on unlabelled tokens) and the head predicts
    ``batch[concept_key]``. The head minimizes its cross-entropy with weight ``weight``; the layers below get
    the reversed gradient, scaled by ``reversal`` times the schedule (default ``"dann"``:
    ``2 / (1 + exp(-10 p)) - 1`` over training progress ``p``), and learn to hide the concept.

    Logged per epoch: ``concept/<name>/accuracy`` and ``concept/<name>/loss`` of the head (an adversary at
    chance is not proof of forgetting: :class:`~lightning_xai.callbacks.ConceptEffect` trains a fresh probe).

    Args:
        layer: dotted name of the submodule whose output is the representation (``"encoder.layer.5"``).
        concept_key: batch key of the concept labels (``(N,)``, or ``(N, T)`` with ``pooling="none"``).
        num_classes: number of concept classes.
        weight: weight of the head's loss.
        reversal: strength of the reversed gradient at full schedule.
        schedule: schedule of the reversal strength: ``"dann"``, ``"linear_warmup"`` or ``"constant"``.
        warmup_steps: steps of the linear warm-up.
        pooling: ``"mean"``, ``"cls"`` or ``"none"``.
        hidden: hidden units of an MLP head; ``None`` for a linear head.
        in_features: the layer's output width, when it cannot be read from the module.
        selector: tuple index or attribute of the layer output holding the features.
        attention_mask_key: batch key of the attention mask used by mean pooling.
        objective: what the encoder is pushed towards, with strength ``reversal`` times the schedule:

            * ``"reversal"`` (CausaLM, DANN): the head's gradient, reversed;
            * ``"confusion"``: features on which the (frozen) head predicts the uniform distribution
              (Tzeng et al. 2015);
            * ``"decorrelation"``: zero covariance between features and concept, linear guardedness
              (Belrose et al. 2023). The head is then trained on detached features and only monitors.

            Measured on a planted concept (tests/callbacks/test_concept_heads.py): ``"reversal"`` and
            ``"confusion"`` bring the head to chance while a fresh linear probe still decodes the concept
            (0.88-0.98); ``"decorrelation"`` brings the probe to chance when the batch is large enough to
            estimate the covariance.
        condition_key: with ``"decorrelation"``, a batch key of a control concept (e.g. the mood) that is
            correlated with the treated one: covariances are taken within its strata, so the encoder may keep
            what the control concept explains while forgetting the rest of the treated concept.
        name: log name and state key; default ``"<concept_key>_adversary"``.
        prog_bar: show ``xai/<name>`` on the progress bar.

    Examples:
        >>> head = AdversarialConceptHead(layer="encoder.layer.1", concept_key="gender", num_classes=2)
        >>> head.term_name, head.schedule
        ('gender_adversary', 'dann')
    """

    def __init__(
        self,
        layer: str,
        concept_key: str,
        num_classes: int,
        weight: float = 1.0,
        reversal: float = 1.0,
        schedule: Schedule = "dann",
        warmup_steps: int = 0,
        pooling: Pooling = "mean",
        hidden: int | None = None,
        in_features: int | None = None,
        selector: int | str | None = None,
        attention_mask_key: str = "attention_mask",
        objective: Literal["reversal", "confusion", "decorrelation"] = "reversal",
        condition_key: str | None = None,
        name: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__(
            layer=layer,
            concept_key=concept_key,
            num_classes=num_classes,
            weight=weight,
            schedule=schedule,
            warmup_steps=warmup_steps,
            pooling=pooling,
            hidden=hidden,
            in_features=in_features,
            selector=selector,
            attention_mask_key=attention_mask_key,
            name=name,
            prog_bar=prog_bar,
        )
        if objective not in OBJECTIVES or objective == "none":
            raise XAIConfigurationError(
                f"objective must be 'reversal', 'confusion' or 'decorrelation', got {objective!r}."
            )
        self.objective = objective
        if condition_key is not None and objective != "decorrelation":
            raise XAIConfigurationError(
                f"condition_key={condition_key!r} applies to objective='decorrelation' only, got {objective!r}."
            )
        self.condition_key = condition_key
        self.reversal = float(reversal)
        self._reversal_now = 0.0

    @override
    def current_weight(self, trainer: Trainer) -> float:
        # the head always learns at full weight; the schedule ramps up what the encoder is told to unlearn
        self._reversal_now = self.reversal * self.schedule_factor(trainer)
        self.last_weight = self.weight
        return self.weight

    @override
    def reversal_coefficient(self) -> float:
        return self._reversal_now
