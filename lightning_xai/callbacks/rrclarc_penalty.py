"""RRClArCPenalty: fine-tunes a model to become insensitive to an artifact's direction in a layer (RR-ClArC)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_xai._contract import StepContext
from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai._random import SeededGenerator
from lightning_xai.callbacks._concept_vector import ConceptVector, ConceptVectorArguments
from lightning_xai.callbacks._loss_term import LossTerm, Schedule
from lightning_xai.callbacks.explanation_penalty import _penalty_forward
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.concept_vectors import Criterion, check_criterion, rrclarc_penalty
from lightning_xai.mixin import XAIMixin

#: criteria that read the true classes of the batch
_TARGET_CRITERIA = ("target_logit",)
#: criteria that draw from the penalty's random stream
_RANDOM_CRITERIA = ("all_logits_random",)


class RRClArCPenalty(ConceptVectorArguments, LossTerm):
    """Right Reason ClArC (Pahde et al., *Reveal to Revise*, 2023): unlearns an artifact along its concept vector.

    A concept activation vector ``v`` at ``layer`` points from clean samples towards samples with the artifact
    (:func:`~lightning_xai.functional.fit_cav` on the layer's spatially max-pooled activations). The term is

    ``mean_b (v . mean_positions(d c_b / d a_b))^2``

    with ``a`` the layer's output and ``c`` a criterion of the logits (see
    :func:`~lightning_xai.functional.rrclarc_penalty`): the model's output must not change when the activations
    move along ``v``. It acts on every sample; no mask is needed once ``v`` is known.

    ``v`` is given (``cav=``) or fitted at the start of training (``on_train_start``: after Lightning moved the
    model to its device, built the training loader and restored a checkpoint) from the first ``cav_batches`` batches
    of a seeded shuffle (``seed``) of the training dataset: each sample with a non-empty mask under ``mask_key``
    against its clean version (the masked features set to 0, masked token ids replaced by ``clean_token_id``), with
    the model in eval mode. Fit it on a model that has learnt the artifact: RR-ClArC fine-tunes a trained model.
    Under DDP rank 0's vector is broadcast. The vector, the mean concept strengths and the random stream live in
    :meth:`state_dict`, so a resumed run and a later ``test()`` use the same vector.

    Args:
        layer: the path of the layer (``None``: the last convolution, else the last recurrent layer).
        weight: the term's weight (lambda).
        cav: a concept vector (one entry per channel; normalised to unit length) instead of fitting one.
        cav_method: ``"signal"`` (default), ``"svm"``, ``"logistic"`` or ``"ridge"`` (see ``fit_cav``).
        criterion: ``"all_logits_random"`` (default), ``"all_logits"``, ``"max_logit"``, ``"target_logit"`` or
            ``"logprobs"``.
        mask_key: the batch key of the artifact masks the vector is fitted from.
        cav_batches: how many training batches the fit reads at most.
        seed: seed of the random signs of ``"all_logits_random"``.
        schedule: ``"constant"``, ``"linear_warmup"`` or ``"dann"``.
        warmup_steps: optimizer steps of the linear warm-up.
        name: the term's name in the logs (``xai/<name>``); default ``"rrclarc"``.
        prog_bar: show ``xai/<name>`` on the progress bar.
        clean_token_id: the token that replaces masked positions of token-id inputs in the clean versions.
        channel_dim: the channel dimension of the layer's output (``None``: 1, or the last for an ``(N, T, D)``
            sequence; ``Conv1d`` layers are recognised).

    Examples:
        >>> penalty = RRClArCPenalty(layer="features.3", weight=10.0)
        >>> penalty.term_name, penalty.criterion
        ('rrclarc', 'all_logits_random')
        >>> RRClArCPenalty(cav=[3.0, 4.0]).cav
        tensor([0.6000, 0.8000])
    """

    def __init__(
        self,
        layer: str | None = None,
        weight: float = 1.0,
        cav: Tensor | list[float] | None = None,
        cav_method: str = "signal",
        criterion: Criterion = "all_logits_random",
        mask_key: str = "mask",
        cav_batches: int = 20,
        seed: int = 0,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        name: str | None = None,
        prog_bar: bool = False,
        clean_token_id: int = 0,
        channel_dim: int | None = None,
    ) -> None:
        super().__init__(weight=weight, schedule=schedule, warmup_steps=warmup_steps, name=name, prog_bar=prog_bar)
        check_criterion(criterion, "RRClArCPenalty")
        self.criterion: Criterion = criterion
        self.seed = int(seed)
        #: the random signs' stream of "all_logits_random", plain data in pickles
        self.random = SeededGenerator(self.seed)
        self.concept = ConceptVector(
            self.where, layer, cav, cav_method, mask_key, cav_batches, clean_token_id, channel_dim, seed=self.seed
        )

    def default_name(self) -> str:
        return "rrclarc"

    @property
    def where(self) -> str:
        return f"RRClArCPenalty(name={self.term_name!r})"

    #: weights that removed a shortcut in the measurements of docs/callbacks/clarc.md (the ends of a first grid)
    weight_range: tuple[float, float] = (10.0, 1000.0)

    @property
    def suggested_weight_range(self) -> tuple[float, float]:
        """The weights that worked (the low and high end of a first grid), as for ExplanationPenalty."""
        return self.weight_range

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.refuse_compiled(pl_module, "the layer's output")
        self.concept.setup(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.concept.ensure(trainer, pl_module, trainer.train_dataloader, "train")

    # ----------------------------------------------------------------- the term

    @override
    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        if not self.concept.fitted:
            raise XAIConfigurationError(
                f"{self.where}: the concept vector is fitted at the start of Trainer.fit(); outside it give the "
                "vector (cav=...)."
            )
        inputs = context.get("input", self.where)
        if not isinstance(inputs, Tensor):
            raise XAIConfigurationError(
                f"{self.where}: batch['input'] must be a tensor, got {type(inputs).__name__}; override xai_batch()."
            )
        target = context.get("target", self.where) if self.criterion in _TARGET_CRITERIA else None
        generator = None
        if self.criterion in _RANDOM_CRITERIA:
            trainer = pl_module.trainer  # type: ignore[attr-defined]
            generator = self.random.for_rank(trainer.global_rank, trainer.world_size)
        layer = self.concept.module(pl_module)  # type: ignore[arg-type]
        with _penalty_forward(pl_module), torch.enable_grad():  # type: ignore[arg-type]
            try:
                return rrclarc_penalty(
                    pl_module.xai_forward,
                    inputs,
                    layer,
                    self.concept.on_device(inputs),
                    self.criterion,
                    target=target,
                    generator=generator,
                    channel_dim=self.concept.channel_dim,
                )
            except XAIConfigurationError as error:
                raise XAIConfigurationError(f"{self.where}, layer {self.layer!r}: {error}") from None

    # ----------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.random.get_state()
        state.update(self.concept.state_dict())
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" in state_dict:
            self.random.set_state(state_dict["generator"])
        self.concept.load_state_dict(state_dict)
