"""Shared machinery of the concept-head callbacks: a head on a named layer's output, trained through XAIMixin."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_xai._contract import StepContext, check_name, named_submodule
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_info
from lightning_xai._step_log import log_each_step
from lightning_xai.callbacks._loss_term import LossTerm, Schedule
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._labels import class_labels
from lightning_xai.functional.concepts import Pooling, gradient_reversal, pool
from lightning_xai.mixin import XAIMixin

HEADS_ATTRIBUTE = "xai_concept_heads"
Selector = int | str | None


def select_features(output: Any, selector: Selector, where: str) -> Tensor:
    """The feature tensor in a layer's output: ``selector`` picks a tuple index or an attribute/key; ``None``
    takes a tensor as is, a Hugging Face ``ModelOutput``'s ``last_hidden_state``, or a tuple's first element."""
    if isinstance(selector, int):
        value = output[selector]
    elif isinstance(selector, str):
        value = output[selector] if isinstance(output, Mapping) else getattr(output, selector, None)
    elif isinstance(output, Tensor):
        value = output
    elif getattr(output, "last_hidden_state", None) is not None:
        value = output.last_hidden_state
    elif isinstance(output, (tuple, list)) and output:
        value = output[0]
    else:
        value = None
    if not isinstance(value, Tensor):
        raise XAIConfigurationError(
            f"{where}: the layer returned {type(output).__name__} and selector={selector!r} picks no tensor from it; "
            "set selector= to the tuple index or attribute that holds the features."
        )
    return value


def infer_width(pl_module: nn.Module, layer: nn.Module) -> int | None:
    """The feature width of ``layer``'s output when the module says it (Linear, Embedding, RNN, HF config)."""
    # a container's output width is that of its last module that states one (Sequential(..., Linear))
    for module in reversed(list(layer.modules())):
        for attribute in ("out_features", "embedding_dim", "hidden_size", "out_channels"):
            value = getattr(module, attribute, None)
            if isinstance(value, int):
                if isinstance(module, nn.RNNBase) and module.bidirectional:
                    return 2 * value
                return value
    for module in (layer, pl_module, *pl_module.modules()):
        config = getattr(module, "config", None)
        if config is not None and isinstance(getattr(config, "hidden_size", None), int):
            return int(config.hidden_size)
    return None


class ConceptHead(LossTerm):
    """A classifier of a concept on the output of a named layer, created as a submodule of the LightningModule.

    Subclasses set ``objective`` (what the layer below is pushed towards; ``"none"`` for an ordinary head). See
    :class:`~lightning_xai.callbacks.AdversarialConceptHead` and :class:`~lightning_xai.callbacks.ControlConceptHead`.
    """

    objective: str = "none"
    condition_key: str | None = None

    def __init__(
        self,
        layer: str,
        concept_key: str,
        num_classes: int,
        weight: float = 1.0,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        pooling: Pooling = "mean",
        hidden: int | None = None,
        in_features: int | None = None,
        selector: int | str | None = None,
        attention_mask_key: str = "attention_mask",
        name: str | None = None,
        prog_bar: bool = False,
    ) -> None:
        super().__init__(weight=weight, schedule=schedule, warmup_steps=warmup_steps, name=name, prog_bar=prog_bar)
        if num_classes < 2:
            raise XAIConfigurationError(f"{type(self).__name__}: num_classes must be >= 2, got {num_classes}.")
        if pooling not in ("mean", "cls", "none"):
            raise XAIConfigurationError(
                f"{type(self).__name__}: pooling must be 'mean', 'cls' or 'none', got {pooling!r}."
            )
        self.layer = layer
        self.concept_key = concept_key
        self.num_classes = int(num_classes)
        self.pooling: Pooling = pooling
        self.hidden = hidden
        self.in_features = in_features
        self.selector = selector
        self.attention_mask_key = attention_mask_key
        self.correct = 0
        self.counted = 0
        self._counted_epoch: int | None = None  # the training epoch the counts belong to
        check_name(self.name, "name (by default from concept_key)", type(self).__name__)

    def default_name(self) -> str:
        return f"{self.concept_key}_{'control' if self.objective == 'none' else 'adversary'}"

    @property
    def where(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, concept_key={self.concept_key!r})"

    def head(self, pl_module: nn.Module) -> nn.Module:
        heads = getattr(pl_module, HEADS_ATTRIBUTE, None)
        if heads is None or self.term_name not in heads:
            raise XAIConfigurationError(f"{self.where}: the head was not created; the callback's setup did not run.")
        return heads[self.term_name]

    @override
    def own_parameters(self, pl_module: XAIMixin) -> list[Tensor]:
        return list(self.head(pl_module).parameters())  # type: ignore[arg-type]

    def _layer(self, pl_module: nn.Module) -> nn.Module:
        return named_submodule(pl_module, self.layer, self.where)

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.refuse_compiled(pl_module, f"the output of layer {self.layer!r}")
        layer = self._layer(pl_module)
        width = self.in_features or infer_width(pl_module, layer)
        if width is None:
            raise XAIConfigurationError(
                f"{self.where}: cannot tell the width of {type(layer).__name__}'s output; pass in_features=."
            )
        heads = getattr(pl_module, HEADS_ATTRIBUTE, None)
        if heads is None:
            heads = nn.ModuleDict()
            pl_module.add_module(HEADS_ATTRIBUTE, heads)
        existing = heads[self.term_name] if self.term_name in heads else None
        if existing is not None and getattr(existing, "_xai_shape", None) == (width, self.hidden, self.num_classes):
            return  # idempotent across fit / validate / a second fit
        if self.hidden:
            head: nn.Module = nn.Sequential(
                nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.num_classes)
            )
        else:
            head = nn.Linear(width, self.num_classes)
        head._xai_shape = (width, self.hidden, self.num_classes)  # type: ignore[assignment]
        reference = next(pl_module.parameters(), None)
        if reference is not None:
            head.to(device=reference.device)
        heads[self.term_name] = head

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        parameters = list(self.head(pl_module).parameters())
        optimizers = trainer.optimizers
        if not optimizers:
            return
        known = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in parameters if id(p) not in known]
        if missing:
            optimizers[0].add_param_group({"params": missing})
            rank_zero_info(
                f"{self.where}: the optimizer did not hold the head's parameters (configure_optimizers ran on a "
                "parameter list made before setup); they were added as a parameter group with its defaults."
            )

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._counted_epoch != trainer.current_epoch:  # a run resumed mid-epoch keeps that epoch's counts
            self.correct = 0
            self.counted = 0
        self._counted_epoch = trainer.current_epoch

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(correct=self.correct, counted=self.counted, counted_epoch=self._counted_epoch)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.correct = int(state_dict.get("correct", 0))
        self.counted = int(state_dict.get("counted", 0))
        self._counted_epoch = state_dict.get("counted_epoch")

    # ----------------------------------------------------------------- the term

    @property
    def _key(self) -> str:
        return f"concept_head/{self.term_name}"

    @override
    def prepare_step(self, pl_module: XAIMixin, context: StepContext) -> None:
        context.capture(self._layer(pl_module), self._key)  # type: ignore[arg-type]

    def reversal_coefficient(self) -> float:
        return 1.0

    @override
    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        output = context.cache.get(self._key)
        if output is None:
            raise XAIConfigurationError(
                f"{self.where}: layer {self.layer!r} did not run during training_step; name a layer of the forward "
                "pass that training_step calls (before self.xai_loss(batch) under manual optimization)."
            )
        objective = OBJECTIVES[self.objective]
        features = select_features(output, self.selector, self.where)
        labels = class_labels(
            torch.as_tensor(context.get(self.concept_key, self.where)),
            self.num_classes,
            f"{self.where}: batch[{self.concept_key!r}]",
            ignore_index=-100,
        ).to(features.device)
        mask = context.data.get(self.attention_mask_key)
        features = pool(features, self.pooling, mask if isinstance(mask, Tensor) else None)
        head = self.head(pl_module)  # type: ignore[arg-type]
        if objective.reversed_gradient:
            head_input = gradient_reversal(features, self.reversal_coefficient()).float()
        else:
            head_input = features.detach().float() if objective.encoder_loss is not None else features.float()
        logits = head(head_input).reshape(-1, self.num_classes)
        labels = labels.reshape(-1)
        if logits.shape[0] != labels.shape[0]:
            raise XAIConfigurationError(
                f"{self.where}: batch[{self.concept_key!r}] holds {labels.shape[0]} labels for {logits.shape[0]} "
                f"head outputs (pooling={self.pooling!r}); give one label per example, or per token with "
                "pooling='none' (-100 for tokens without a label)."
            )
        labelled = labels != -100
        if not bool(labelled.any()):
            return logits.sum() * 0.0  # keeps the head in the graph, so DDP sees its gradients
        loss = F.cross_entropy(logits[labelled], labels[labelled])
        if objective.encoder_loss is not None:
            encoder_loss = objective.encoder_loss(self, head, features, labels, labelled, context)
            loss = loss + self.reversal_coefficient() * encoder_loss
        self._log_head(pl_module, logits[labelled].detach(), labels[labelled], loss.detach())
        return loss

    def _log_head(self, pl_module: XAIMixin, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        correct = logits.argmax(1) == labels
        self.correct += int(correct.sum())
        self.counted += int(labels.numel())
        # every step: past the epoch's first, at the cost of a tensor update rather than of self.log
        for key, value in (("accuracy", correct.float().mean()), ("loss", loss.float())):
            log_each_step(
                pl_module, f"concept/{self.term_name}/{key}", value, on_step=False, batch_size=int(labels.numel())
            )

    def condition(self, context: StepContext, labels: Tensor, labelled: Tensor) -> Tensor | None:
        """The labelled rows' values of the control concept ``condition_key`` (``None`` without one)."""
        if self.condition_key is None:
            return None
        condition = torch.as_tensor(context.get(self.condition_key, self.where), device=labels.device)
        condition = condition.long().reshape(-1)
        if condition.shape[0] != labels.shape[0]:
            raise XAIConfigurationError(
                f"{self.where}: batch[{self.condition_key!r}] holds {condition.shape[0]} values for "
                f"{labels.shape[0]} concept labels; give one per labelled row."
            )
        return condition[labelled]

    def decorrelation(
        self, features: Tensor, labels: Tensor, labelled: Tensor, condition: Tensor | None = None
    ) -> Tensor:
        """Sum of squared feature-concept covariances over the feature variances, on this batch.

        Zero cross-covariance between the features and the concept is linear guardedness (Belrose et al.,
        LEACE, 2023): no linear probe then does better than a constant. With ``condition`` (a control concept
        correlated with the treated one) the covariance is zeroed within each of its strata, so that the
        features may keep what the control concept explains. The batch covariance is noisy: this works with
        large batches (tests: 1,200 rows reach chance; 100-row batches leave the probe at 0.94).
        """
        flat = features.float().reshape(-1, features.shape[-1])[labelled]
        onehot = F.one_hot(labels[labelled], self.num_classes).float()
        if condition is None:
            return _normalized_covariance(flat, onehot)
        # each stratum separately: pooled within-strata covariances could cancel between strata
        total = flat.new_zeros(())
        for value in torch.unique(condition).tolist():
            rows = condition == value
            if int(rows.sum()) > 1:
                total = total + rows.float().mean() * _normalized_covariance(flat[rows], onehot[rows])
        return total

    @property
    def epoch_accuracy(self) -> float:
        return self.correct / self.counted if self.counted else math.nan


def _normalized_covariance(features: Tensor, onehot: Tensor) -> Tensor:
    """``sum_{d,k} Cov(z_d, y_k)^2 / Var(z_d)``: zero exactly when no feature correlates linearly with the concept."""
    centred = features - features.mean(0)
    covariance = centred.T @ (onehot - onehot.mean(0)) / max(features.shape[0] - 1, 1)
    variance = centred.pow(2).mean(0).detach().clamp_min(1e-6)
    return (covariance.pow(2) / variance[:, None]).sum()


def _confusion_loss(
    head_callback: ConceptHead,
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    labelled: Tensor,
    context: StepContext,
) -> Tensor:
    """The encoder is pushed towards features on which the (frozen) head predicts uniformly (Tzeng et al. 2015)."""
    frozen = {name: p.detach() for name, p in head.named_parameters()}
    logits = torch.func.functional_call(head, frozen, (features.float(),)).reshape(-1, head_callback.num_classes)
    uniform = torch.full_like(logits[labelled], 1.0 / head_callback.num_classes)
    return F.cross_entropy(logits[labelled], uniform)


def _decorrelation_loss(
    head_callback: ConceptHead,
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    labelled: Tensor,
    context: StepContext,
) -> Tensor:
    """Zero cross-covariance between features and concept: linear guardedness (Belrose et al. 2023)."""
    condition = head_callback.condition(context, labels, labelled)
    return head_callback.decorrelation(features, labels, labelled, condition)


EncoderLoss = Callable[[ConceptHead, nn.Module, Tensor, Tensor, Tensor, StepContext], Tensor]


@dataclass(frozen=True)
class _Objective:
    """What a head's layer is pushed towards, besides the head learning to predict the concept."""

    #: the head's gradient reaches the layer reversed (DANN); otherwise as is, or not at all
    reversed_gradient: bool = False
    #: a loss of the layer's own, scaled by the reversal strength; the head then learns on detached features
    encoder_loss: EncoderLoss | None = None


OBJECTIVES: dict[str, _Objective] = {
    "none": _Objective(),
    "reversal": _Objective(reversed_gradient=True),
    "confusion": _Objective(encoder_loss=_confusion_loss),
    "decorrelation": _Objective(encoder_loss=_decorrelation_loss),
}


def strip_concept_heads(
    checkpoint: dict[str, Any] | str | os.PathLike, output_path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Remove the concept heads from a Lightning checkpoint (or a plain ``state_dict``), for the bare model.

    The heads live under ``xai_concept_heads.`` in the LightningModule's ``state_dict``. A module built without
    the callbacks loads the result with ``strict=True``; alternatively keep the heads in the file and load with
    ``LightningModule.load_from_checkpoint(path, strict=False)`` (or ``strict_loading = False`` on the module).

    Args:
        checkpoint: a checkpoint dict (with ``"state_dict"``), a ``state_dict``, or the path of a checkpoint file.
        output_path: where to save the stripped checkpoint (``torch.save``); ``None`` only returns it.

    Returns:
        The checkpoint without the head parameters (the input dict is not modified).

    Examples:
        >>> state = {"state_dict": {"net.weight": 1, "xai_concept_heads.gender_adversary.weight": 2}}
        >>> strip_concept_heads(state)["state_dict"]
        {'net.weight': 1}
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = checkpoint
        try:  # a checkpoint is data: unpickling anything else could run code
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise XAIConfigurationError(
                f"strip_concept_heads: {path} holds objects that torch.load(weights_only=True) refuses to unpickle "
                f"({error}). Lightning checkpoints load that way; a file that does not is either not a checkpoint or "
                "not safe to open. Load it yourself if you trust it, and pass the dict."
            ) from None
    if not isinstance(checkpoint, dict):
        raise XAIConfigurationError(
            f"strip_concept_heads: expected a checkpoint dict or a state_dict, got {type(checkpoint).__name__}."
        )
    prefix = f"{HEADS_ATTRIBUTE}."

    def strip(state: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in state.items() if not k.startswith(prefix) and f".{prefix}" not in k}

    stripped = dict(checkpoint)
    if "state_dict" in stripped:
        stripped["state_dict"] = strip(stripped["state_dict"])
    else:
        stripped = strip(stripped)
    if output_path is not None:
        torch.save(stripped, output_path)
    return stripped
