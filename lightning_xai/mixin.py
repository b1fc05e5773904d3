"""``XAIMixin``: the one place where explanation and fairness terms join a LightningModule's loss.

Callbacks *declare* loss terms; the mixin wraps the subclass's ``training_step``, calls the user's step,
asks every loss-term callback on the trainer for its term and adds the weighted sum to the loss. It logs
each term as ``xai/<name>`` and the sum as ``xai/total``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_xai._contract import (
    LOGITS_KEY,
    STEP_LOGITS,
    StepContext,
    batch_rows,
    logits_of,
    parse_batch,
    require_logits,
)
from lightning_xai._step_log import log_each_step
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.penalties import double_backward_kernels

if TYPE_CHECKING:
    from lightning_xai.callbacks._loss_term import LossTerm

__all__ = ["StepContext", "XAIMixin"]


def _eager(function: Callable[..., Any]) -> Callable[..., Any]:
    """Runs ``function`` outside ``torch.compile``: the terms' Python machinery (hooks, fx traces, callbacks) is
    not for dynamo, and a compiled step (``Trainer.fit(torch.compile(model))``) calls it as an eager island."""
    return torch.compiler.disable(function, recursive=True)


def _wrap_training_step(step: Callable[..., Any]) -> Callable[..., Any]:
    # recursive=False: the wrapper runs eagerly, the user's step it calls is still compiled
    @functools.partial(torch.compiler.disable, recursive=False)
    @functools.wraps(step)
    def training_step(self: XAIMixin, batch: Any, *args: Any, **kwargs: Any) -> Any:
        # A subclass step that calls super().training_step() is wrapped twice: only the outermost adds terms.
        if getattr(self, "_xai_context", None) is not None:
            return step(self, batch, *args, **kwargs)
        terms = self._xai_loss_terms()
        if not terms:
            return step(self, batch, *args, **kwargs)
        context = StepContext(self, batch)
        self._xai_loss_called = False
        try:
            with contextlib.ExitStack() as around_step:
                self._xai_prepare(context, terms, around_step)
                self._xai_context = context
                output = step(self, batch, *args, **kwargs)
        finally:
            self._xai_context = None
            context.hooks.remove()
        if not self.automatic_optimization:  # type: ignore[attr-defined]
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
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach()).all()):
            # the mixin sees the task loss before Lightning does: say whose number it is
            warnings.warn(
                f"rank {getattr(self._trainer, 'global_rank', 0)}: {type(self).__name__}.training_step returned a "  # type: ignore[attr-defined]
                f"non-finite loss ({loss.detach().float().mean().item()}) at global step "
                f"{self._trainer.global_step}, before lightning_xai added its terms: the task loss itself is NaN or "  # type: ignore[attr-defined]
                "infinite (check the inputs, the learning rate and the loss).",
                UserWarning,
                stacklevel=2,
            )
        total = self._xai_total(context, terms, task_loss=loss)
        if isinstance(output, Tensor):
            return loss + total
        return {**output, "loss": loss + total}

    training_step._xai_wrapped = True  # type: ignore[attr-defined]
    return training_step


#: a weighted term this many times the task loss gets a warning (once per term): its weight is likely off-scale
DOMINANCE_RATIO = 1000.0
#: the smallest task loss the ratio is taken against (a loss fitted to 1e-4 is no sign of a bad weight)
TASK_LOSS_FLOOR = 0.1


def _warn_about_dominant_terms(
    computed: list[tuple[LossTerm, float, Tensor]],
    values: dict[str, Tensor],
    task_loss: Tensor,
    step: int,
    ratios: Mapping[str, float] | None = None,
) -> None:
    """Warns once per term whose weighted value exceeds the task loss :data:`DOMINANCE_RATIO`-fold.

    A penalty that dwarfs the task loss usually means a weight on the wrong scale (each method has its own:
    see ``PENALTY_METHODS[...].weight_range``); the model then learns the penalty instead of the task, as a
    CDEP weight of 100 did on a stripe decoy. Warnings are per rank and change nothing, so the ranks stay in
    step. ``ratios``: the ratios by term name, when the caller has them on the host already.
    """
    pending = [
        (term, weight)
        for term, weight, _ in computed
        if not getattr(term, "warned_dominance", False) and term.term_name in values
    ]
    if not pending or task_loss.numel() != 1:
        return
    if ratios is None:
        task = float(task_loss.detach())
        ratios = {term.term_name: _ratio(weight, float(values[term.term_name]), task) for term, weight in pending}
    for term, weight in pending:
        ratio = ratios[term.term_name]
        if ratio > DOMINANCE_RATIO:
            term.warned_dominance = True
            rank_zero_warn(
                f"{term.term_name}: the weighted term ({weight:g} x {values[term.term_name].item():.3g}) is "
                f"{ratio:.3g} times the task loss at global step {step}, so training optimises the penalty and "
                f"hardly the task. Choose the weight on a validation split{_weight_hint(term)}."
            )


def _ratio(weight: float, value: float, task_loss: float) -> float:
    # a task loss fitted to near zero says nothing about scale: compare with at least TASK_LOSS_FLOOR
    return weight * value / max(abs(task_loss), TASK_LOSS_FLOOR)


def _ranks_of_false(flags: list[bool], world: int, count: int) -> list[list[int]]:
    """Per term, the ranks whose flag is false, from rank-major flags of ``count`` terms."""
    return [[rank for rank in range(world) if not flags[rank * count + i]] for i in range(count)]


def _weight_hint(term: LossTerm) -> str:
    weight_range = getattr(term, "suggested_weight_range", None)
    return "" if weight_range is None else f"; weights that worked for this method lie in {weight_range}"


class XAIMixin:
    """Adds the loss terms of lightning_xai callbacks to a LightningModule's ``training_step``.

    Subclass it next to ``LightningModule``; ``training_step`` keeps returning your loss and the mixin adds
    the weighted terms of every :class:`~lightning_xai.callbacks.ExplanationPenalty` (and other loss-term
    callbacks) on the trainer.

    Override to adapt it to your model:

    * :meth:`xai_batch` if your batches are neither ``(x, y)``, ``(x, y, extras)`` nor dicts;
    * ``xai_logits_key`` if ``self(x)`` returns a dict or Hugging Face ``ModelOutput`` whose logits are not
      under ``"logits"``, or :meth:`xai_forward` if the logits need more than a key;
    * :meth:`xai_embed` and :meth:`xai_forward_from_embeddings` for text models, so that gradient
      penalties act on token embeddings.

    Class attributes:
        xai_input_key, xai_target_key: dict-batch keys of the input and the target (the usual aliases such
            as ``x``/``y`` or ``input_ids``/``labels`` are found without them).
        xai_logits_key: where the logits are in a dict or ``ModelOutput`` returned by ``self(x)``.
        xai_prog_bar: show ``xai/total`` on the progress bar (each callback's ``prog_bar`` shows its own term).

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
    xai_logits_key: str = LOGITS_KEY
    xai_prog_bar: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("training_step")
        if step is not None and not getattr(step, "_xai_wrapped", False):
            cls.training_step = _wrap_training_step(step)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ overridable contract

    def xai_batch(self, batch: Any) -> Mapping[str, Any]:
        """Maps a batch onto the keys the callbacks read: ``input``, ``target`` and any extras.

        Understands ``(x, y)``, ``(x, y, extras_dict)`` and dict batches (``input``/``target`` or the
        usual aliases such as ``x``/``y``, ``input_ids``/``labels``); see
        :func:`lightning_xai._contract.parse_batch`. Every callback reads batches through this method.
        """
        return parse_batch(batch, self.xai_input_key, self.xai_target_key)

    def xai_forward(self, inputs: Tensor) -> Tensor:
        """Logits for ``inputs``; the function that penalties differentiate and decompose.

        Default: ``self(inputs)``, or its ``xai_logits_key`` entry when it returns a dict or a ``ModelOutput``.
        """
        return require_logits(self(inputs), type(self).__name__, self.xai_logits_key)  # type: ignore[operator]

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

    @_eager
    def xai_loss(self, batch: Any) -> Tensor:
        """The weighted sum of all loss terms for ``batch``, for manual optimization.

        Call it inside ``training_step`` after the forward pass and add it to your loss before
        ``manual_backward``. It reads the outputs that forward produced (the hooks of the MI regularizer, the
        concept heads and the penalties are active during the step), so every loss term works under manual
        optimization. A step with several forward/backward rounds (two optimizers) calls it once per round:
        each call reads the outputs of the forward passes since the previous call.
        """
        terms = self._xai_loss_terms()
        self._xai_loss_called = True
        if not terms:
            reference = next((p for p in self.parameters()), None)  # type: ignore[attr-defined]
            return torch.zeros((), device=reference.device if reference is not None else None)
        context = getattr(self, "_xai_context", None)
        if context is None:  # called outside a training_step (a custom loop): no hooks ran
            return self._xai_total(StepContext(self, batch), terms)
        if batch is not context.batch:
            raise XAIConfigurationError(
                f"{type(self).__name__}.xai_loss(batch) got another object than the batch training_step received; "
                "the terms read the outputs of the step's forward on that batch. Pass the step's own batch."
            )
        try:
            return self._xai_total(context, terms)
        finally:
            context.consume_captures()

    # ------------------------------------------------------------------ internals

    def _xai_loss_terms(self) -> list[LossTerm]:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return [callback for callback in trainer.callbacks if getattr(callback, "xai_loss_term", False)]

    @_eager
    def _xai_prepare(self, context: StepContext, terms: list[LossTerm], around_step: contextlib.ExitStack) -> None:
        """Lets terms hook into the step's own forward pass, so that they need no second forward."""
        for term in terms:
            term.prepare_step(self, context)
        if not any(term.reuses_step_forward for term in terms):
            return
        inputs = context.data.get("input")
        # token ids: the penalties capture the embeddings and logits of the step's forward themselves
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or not inputs.is_leaf:
            return
        if type(self).xai_forward is not XAIMixin.xai_forward:
            return
        if any(term.differentiates_step_twice for term in terms):
            # the penalty differentiates the step's logits twice: attention and RNNs run on kernels built for it
            around_step.enter_context(double_backward_kernels(self))  # type: ignore[arg-type]
        if any(term.differentiates_step_inputs for term in terms):
            # only then: an input gradient the step's backward would compute for nothing costs a transposed
            # first layer (ablation on the demo CNN: 2.8x a vanilla step with it, 2.0x without)
            inputs.requires_grad_(True)
        key = self.xai_logits_key
        context.capture(
            self,  # type: ignore[arg-type]
            STEP_LOGITS,
            select=lambda output: logits_of(output, key),
            accept=lambda args, logits: bool(args) and args[0] is inputs and isinstance(logits, Tensor),
        )

    @_eager
    def _xai_total(self, context: StepContext, terms: list[LossTerm], task_loss: Tensor | None = None) -> Tensor:
        trainer = self._trainer  # type: ignore[attr-defined]
        computed: list[tuple[LossTerm, float, Tensor]] = []
        for term in terms:
            weight = term.current_weight(trainer)
            if weight == 0.0:  # the weight follows global_step: every rank skips alike
                continue
            computed.append((term, weight, term.compute_term(self, context)))
            term.steps_seen += 1
        reference = next(iter(self.parameters()))  # type: ignore[attr-defined]
        total = torch.zeros((), device=reference.device)
        values: dict[str, Tensor] = {}
        non_finite_ranks, ratios = self._xai_screen(computed, task_loss)
        for (term, weight, value), bad_ranks in zip(computed, non_finite_ranks):
            if bad_ranks:
                term.steps_skipped += 1
                where = f"rank {bad_ranks[0]}" if len(bad_ranks) == 1 else f"ranks {bad_ranks}"
                rank_zero_warn(
                    f"{term.term_name}: the term is not finite on {where} at global step {trainer.global_step}; it is "
                    "left out of this step's loss on every rank (training goes on). Frequent skips point at "
                    "exploding logits or NaN inputs."
                )
                # parameters only the term uses stay in the graph with zero gradient, as DDP expects every step
                for parameter in term.own_parameters(self):
                    total = total + 0.0 * parameter.sum()
                continue
            values[term.term_name] = value.detach()
            total = total + weight * value
        if task_loss is not None:
            _warn_about_dominant_terms(computed, values, task_loss, trainer.global_step, ratios)
        self._xai_log(terms, values, total, batch_rows(context.data))
        return total

    def _xai_screen(
        self, computed: list[tuple[LossTerm, float, Tensor]], task_loss: Tensor | None
    ) -> tuple[list[list[int]], dict[str, float] | None]:
        """Per computed term, the ranks on which it is NaN or infinite (one all-gather under DDP), and the
        dominance ratios of the terms (``None`` unless the terms and the task loss are scalars).

        Every rank must skip a term together: a term skipped on one rank only is logged on the others, and their
        ``self.log(..., sync_dist=True)`` all-reduces would wait forever for it. The values come to the host in
        one transfer and are judged there: this runs every step, and each device operation or transfer costs
        more than the arithmetic.
        """
        if not computed:
            return [], None
        world = self._trainer.world_size  # type: ignore[attr-defined]
        if not all(value.numel() == 1 for _, _, value in computed):
            finite = torch.stack([torch.isfinite(value.detach()).all() for _, _, value in computed]).to(torch.int32)
            flags = (finite if world == 1 else self.all_gather(finite)).reshape(-1).tolist()  # type: ignore[attr-defined]
            return _ranks_of_false(flags, world, len(computed)), None
        stacked = torch.stack([value.detach().reshape(()).float() for _, _, value in computed])
        parts = [stacked]
        if world > 1:
            parts.insert(0, self.all_gather(torch.isfinite(stacked)).reshape(-1).to(stacked.dtype))  # type: ignore[attr-defined]
        scalar_task = task_loss is not None and task_loss.numel() == 1
        if scalar_task:
            parts.append(task_loss.detach().reshape(1).float())  # type: ignore[union-attr]
        host = torch.cat(parts).tolist()
        count = len(computed)
        values = host[world * count : world * count + count] if world > 1 else host[:count]
        flags = [bool(flag) for flag in host[: world * count]] if world > 1 else [math.isfinite(v) for v in values]
        ranks = _ranks_of_false(flags, world, count)
        if not scalar_task:
            return ranks, None
        task = host[-1]
        return ranks, {
            term.term_name: _ratio(weight, value, task) for (term, weight, _), value in zip(computed, values)
        }

    def _xai_log(self, terms: list[LossTerm], values: dict[str, Tensor], total: Tensor, batch_size: int | None) -> None:
        # every step, so past the epoch's first step at the cost of a tensor update rather than of self.log
        shown = {term.term_name for term in terms if term.prog_bar}
        entries = [(f"xai/{name}", value, name in shown) for name, value in values.items()]
        entries.append(("xai/total", total.detach(), self.xai_prog_bar))
        for key, value, prog_bar in entries:
            log_each_step(self, key, value.float(), on_step=True, prog_bar=prog_bar, batch_size=batch_size)
