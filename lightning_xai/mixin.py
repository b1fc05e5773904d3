"""``XAIMixin``: the one place where explanation and fairness terms join a LightningModule's loss.

Callbacks *declare* loss terms; the mixin wraps the subclass's ``training_step``, calls the user's step,
asks every loss-term callback on the trainer for its term and adds the weighted sum to the loss. It logs
each term as ``xai/<name>`` and the sum as ``xai/total``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_xai.errors import MissingBatchKeyError, XAIConfigurationError

if TYPE_CHECKING:
    from lightning_xai.callbacks._loss_term import LossTerm

_INPUT_ALIASES = ("input", "inputs", "x", "input_ids", "image", "images", "pixel_values", "features")
_TARGET_ALIASES = ("target", "targets", "y", "label", "labels")


class StepContext:
    """What one training step offers the loss terms: the batch view and outputs captured by hooks.

    Attributes:
        module: the LightningModule.
        batch: the batch as the user's ``training_step`` received it.
        captured_output: logits of the step's own forward pass on ``batch['input']``, when the module was
            called on exactly that tensor (lets input-gradient penalties skip a second forward).
        data: mapping from :meth:`XAIMixin.xai_batch`.
    """

    def __init__(self, module: XAIMixin, batch: Any) -> None:
        self.module = module
        self.batch = batch
        self.captured_output: Tensor | None = None
        self._data: Mapping[str, Any] | None = None
        self.cache: dict[str, Any] = {}

    @property
    def data(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self.module.xai_batch(self.batch)
        return self._data

    def get(self, key: str, requested_by: str) -> Any:
        """The batch entry ``key``; raises :class:`MissingBatchKeyError` naming the callback and the keys there are."""
        data = self.data
        if key not in data:
            raise MissingBatchKeyError(
                f"{requested_by} needs the batch key {key!r}, but the batch has the keys {sorted(data)}. "
                f"Add {key!r} to your batches (a dict, or a third tuple element {{'{key}': ...}}), set the "
                f"callback's key argument to one of these, or override xai_batch() on your LightningModule."
            )
        return data[key]


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: XAIMixin, batch: Any, *args: Any, **kwargs: Any) -> Any:
        # A subclass step that calls super().training_step() is wrapped twice: only the outermost adds terms.
        if getattr(self, "_xai_depth", 0) > 0:
            return step(self, batch, *args, **kwargs)
        terms = self._xai_loss_terms()
        if not terms:
            return step(self, batch, *args, **kwargs)
        context = StepContext(self, batch)
        self._xai_loss_called = False
        removers = self._xai_prepare(context, terms)
        self._xai_depth = 1
        try:
            output = step(self, batch, *args, **kwargs)
        finally:
            self._xai_depth = 0
            for remove in removers:
                remove()
        if not self.automatic_optimization:
            if not self._xai_loss_called:
                raise XAIConfigurationError(
                    f"{type(self).__name__} uses manual optimization, so XAIMixin cannot add the terms of "
                    f"{[t.term_name for t in terms]} to the loss. Call `loss = loss + self.xai_loss(batch)` "
                    "in training_step before self.manual_backward(loss)."
                )
            return output
        if output is None:  # the user skipped this batch
            return None
        if isinstance(output, Tensor):
            loss = output
        elif isinstance(output, Mapping) and "loss" in output:
            loss = output["loss"]
        else:
            raise XAIConfigurationError(
                f"{type(self).__name__}.training_step returned {type(output).__name__}; XAIMixin adds its terms "
                "to a returned loss tensor or to the 'loss' entry of a returned dict."
            )
        total = self._xai_total(context, terms)
        if isinstance(output, Tensor):
            return loss + total
        return {**output, "loss": loss + total}

    training_step._xai_wrapped = True  # type: ignore[attr-defined]
    return training_step


class XAIMixin:
    """Adds the loss terms of lightning_xai callbacks to a LightningModule's ``training_step``.

    Subclass it next to ``LightningModule``; ``training_step`` keeps returning your loss and the mixin adds
    the weighted terms of every :class:`~lightning_xai.callbacks.ExplanationPenalty` (and other loss-term
    callbacks) on the trainer.

    Override to adapt it to your model:

    * :meth:`xai_batch` if your batches are neither ``(x, y)``, ``(x, y, extras)`` nor dicts;
    * :meth:`xai_forward` if ``self(x)`` does not return logits;
    * :meth:`xai_embed` and :meth:`xai_forward_from_embeddings` for text models, so that gradient
      penalties act on token embeddings.

    Examples:
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> from lightning_xai import XAIMixin
        >>> class Classifier(XAIMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.net(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return torch.nn.functional.cross_entropy(self(x), y)
        >>> sorted(Classifier().xai_batch((torch.zeros(3, 4), torch.zeros(3), {"mask": torch.ones(3, 4)})))
        ['input', 'mask', 'target']
    """

    xai_input_key: str = "input"
    xai_target_key: str = "target"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_xai_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ overridable contract

    def xai_batch(self, batch: Any) -> Mapping[str, Any]:
        """Maps a batch onto the keys the callbacks read: ``input``, ``target`` and any extras.

        Understands ``(x, y)``, ``(x, y, extras_dict)`` and dict batches (``input``/``target`` or the
        usual aliases such as ``x``/``y``, ``input_ids``/``labels``).
        """
        if isinstance(batch, Mapping):
            data = dict(batch)
            for key, aliases in ((self.xai_input_key, _INPUT_ALIASES), (self.xai_target_key, _TARGET_ALIASES)):
                canonical = "input" if aliases is _INPUT_ALIASES else "target"
                if key in data:
                    data.setdefault(canonical, data[key])
                    continue
                for alias in aliases:
                    if alias in data:
                        data.setdefault(canonical, data[alias])
                        break
            return data
        if isinstance(batch, (list, tuple)):
            if len(batch) >= 2 and isinstance(batch[0], Tensor):
                data = {"input": batch[0], "target": batch[1]}
                if len(batch) >= 3:
                    if not isinstance(batch[2], Mapping):
                        raise XAIConfigurationError(
                            f"the third element of a tuple batch must be a dict of extras (e.g. {{'mask': m}}), "
                            f"got {type(batch[2]).__name__}; override xai_batch() for other layouts."
                        )
                    data.update(batch[2])
                return data
        if isinstance(batch, Tensor):
            return {"input": batch}
        raise XAIConfigurationError(
            f"XAIMixin.xai_batch does not understand a batch of type {type(batch).__name__}; override "
            "xai_batch(batch) to return a dict with 'input', 'target' and the keys your callbacks read."
        )

    def xai_forward(self, inputs: Tensor) -> Tensor:
        """Logits for ``inputs``; the function that penalties differentiate and decompose. Default: ``self(inputs)``."""
        return self(inputs)  # type: ignore[operator]

    def xai_embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings for ``input_ids``; override for text models (gradient penalties act on them)."""
        raise XAIConfigurationError(
            f"{type(self).__name__} received integer inputs, so gradient penalties need its token embeddings: "
            "override xai_embed(input_ids) -> embeddings and xai_forward_from_embeddings(embeddings, batch) "
            "-> logits."
        )

    def xai_forward_from_embeddings(self, embeddings: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Logits from token embeddings; ``batch`` is the :meth:`xai_batch` mapping (attention masks, lengths)."""
        raise XAIConfigurationError(
            f"{type(self).__name__} must override xai_forward_from_embeddings(embeddings, batch) -> logits for "
            "gradient penalties on text."
        )

    def xai_loss(self, batch: Any) -> Tensor:
        """The weighted sum of all loss terms for ``batch``, for manual optimization.

        Call it inside ``training_step`` and add it to your loss before ``manual_backward``.
        """
        terms = self._xai_loss_terms()
        self._xai_loss_called = True
        reference = next((p for p in self.parameters()), None)  # type: ignore[attr-defined]
        zero = torch.zeros((), device=reference.device if reference is not None else None)
        if not terms:
            return zero
        return self._xai_total(StepContext(self, batch), terms)

    # ------------------------------------------------------------------ internals

    def _xai_loss_terms(self) -> list[LossTerm]:
        from lightning_xai.callbacks._loss_term import LossTerm

        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [callback for callback in trainer.callbacks if isinstance(callback, LossTerm)]

    def _xai_prepare(self, context: StepContext, terms: list[LossTerm]) -> list[Callable[[], None]]:
        """Lets terms hook into the step's own forward pass, so that they need no second forward."""
        removers = [remover for term in terms if (remover := term.prepare_step(self, context)) is not None]
        if type(self).xai_forward is not XAIMixin.xai_forward:
            return removers
        if not any(term.reuses_step_forward for term in terms):
            return removers
        inputs = context.data.get("input")
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or not inputs.is_leaf:
            return removers
        inputs.requires_grad_(True)

        def capture(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if context.captured_output is None and args and args[0] is inputs and isinstance(output, Tensor):
                context.captured_output = output

        handle = self.register_forward_hook(capture)  # type: ignore[attr-defined]

        return [*removers, handle.remove]

    def _xai_total(self, context: StepContext, terms: list[LossTerm]) -> Tensor:
        trainer = self._trainer  # type: ignore[attr-defined]
        values: dict[str, Tensor] = {}
        total: Tensor | None = None
        batch_size = _batch_size(context)
        for term in terms:
            weight = term.current_weight(trainer)
            if weight == 0.0:
                continue
            value = term.compute_term(self, context)
            term.steps_seen += 1
            if not torch.isfinite(value.detach()).all():
                term.steps_skipped += 1
                rank_zero_warn(
                    f"{term.term_name}: the term is {value.item()} at global step {trainer.global_step}; it is left "
                    "out of this step's loss (training goes on). Frequent skips point at exploding logits or "
                    "NaN inputs."
                )
                continue
            values[term.term_name] = value.detach()
            weighted = weight * value
            total = weighted if total is None else total + weighted
        if total is None:
            reference = next(iter(self.parameters()))  # type: ignore[attr-defined]
            total = torch.zeros((), device=reference.device)
        log = self.log  # type: ignore[attr-defined]
        for name, value in values.items():
            log(f"xai/{name}", value.float(), on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        log("xai/total", total.detach().float(), on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return total


def _batch_size(context: StepContext) -> int | None:
    try:
        inputs = context.data.get("input")
    except Exception:
        return None
    return int(inputs.shape[0]) if isinstance(inputs, Tensor) and inputs.dim() > 0 else None
