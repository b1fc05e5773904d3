"""ExplanationPenalty: trains a model to ignore the features a mask marks as forbidden."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_xai._contract import StepContext, is_compiled, logits_of, named_submodule, require_logits
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_warn
from lightning_xai._random import SeededGenerator
from lightning_xai.attribution.contextual_decomposition import decompose, returns_single_tensor
from lightning_xai.attribution.smooth_surrogate import SmoothOptions, smoothed
from lightning_xai.callbacks._loss_term import LossTerm, Schedule
from lightning_xai.errors import MaskShapeError, XAIConfigurationError
from lightning_xai.functional._layers import default_map_layer
from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.penalties import (
    DIFFERENTIATIONS,
    AblationMeasure,
    Branches,
    CDEPVariant,
    Differentiation,
    Norm,
    ablation_penalty,
    cdep_penalty,
    counterexample_inputs,
    counterexample_loss,
    double_backward_kernels,
    expected_gradients_penalty,
    hint_penalty,
    input_x_gradient_penalty,
    other_samples,
    rbr_penalty,
    rrr_gradcam_penalty,
    rrr_penalty,
)
from lightning_xai.masks import OccupancyMaskSampler, masks_from_annotations
from lightning_xai.mixin import XAIMixin

Method = Literal[
    "cdep",
    "rrr",
    "expected_gradients",
    "input_x_gradient",
    "ablation",
    "rrr_gradcam",
    "hint",
    "rbr",
    "counterexamples",
]
# attention implementations of Hugging Face models whose kernels have no double backward and no math fallback
_NO_DOUBLE_BACKWARD_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def _same_in_train_and_eval(module: nn.Module) -> bool:
    """No submodule in training mode behaves differently from eval mode (dropout, batch statistics)."""
    for submodule in module.modules():
        if not submodule.training:
            continue
        if isinstance(submodule, nn.modules.dropout._DropoutNd) and submodule.p > 0:
            return False
        if isinstance(submodule, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            return False
        if isinstance(submodule, nn.RNNBase) and submodule.dropout > 0 and submodule.num_layers > 1:
            return False
        if isinstance(submodule, nn.MultiheadAttention) and submodule.dropout > 0:
            return False
    return True


def _observed_submodules(module: nn.Module) -> bool:
    """Whether a forward of ``module`` that skips its submodules' ``__call__`` would be noticed.

    Forward (pre-)hooks on a submodule (concept heads, an ``output_layer`` capture, a user's hook, old-style
    ``weight_norm``/``spectral_norm``, which recompute the weight in a pre-hook) and global module hooks only
    fire when the submodule is called. CDEP may replace the step's forward by the decomposition only where
    nothing observes the submodules.
    """
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return True
    for child in module.modules():
        if child is module:
            continue
        if child._forward_hooks or child._forward_pre_hooks or child._backward_hooks or child._backward_pre_hooks:
            return True
    return False


@contextlib.contextmanager
def _batch_norm_in_eval(module: nn.Module) -> Iterator[None]:
    # Extra forwards of a penalty (path points, a second pass) must not update running statistics.
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


@contextlib.contextmanager
def _penalty_forward(module: nn.Module, double_backward: bool = True) -> Iterator[None]:
    if not double_backward:  # first-order: any attention kernel, the fused RNN
        with _batch_norm_in_eval(module):
            yield
        return
    with _batch_norm_in_eval(module), double_backward_kernels(module):
        yield


def _tile(value: Any, times: int, n: int) -> Any:
    if times == 1:
        return value
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value


@dataclass
class _Job:
    """One step's work for a penalty: the explained inputs, their masks and the batch they came from."""

    penalty: ExplanationPenalty
    module: XAIMixin
    context: StepContext
    inputs: Tensor
    mask: Tensor
    sample_weights: Tensor | None
    tiles: int

    @property
    def n(self) -> int:
        return self.inputs.shape[0]

    def target(self, required: bool) -> Tensor | None:
        where = self.penalty.where
        target = self.context.get("target", where) if required else self.context.data.get("target")
        return None if target is None else _tile(target, self.tiles, self.n)

    def tiled_data(self, times: int) -> Mapping[str, Any]:
        if times == 1:
            return self.context.data
        return {k: _tile(v, times, self.n) for k, v in self.context.data.items()}

    def differentiated(self) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The tensor whose gradient the penalty takes (inputs or token embeddings) and the forward from it."""
        if self.inputs.is_floating_point():
            explained = _tile(self.inputs.detach() if self.tiles > 1 else self.inputs, self.tiles, self.n)
            return explained, self.module.xai_forward
        forward = _from_embeddings(self.module, self.tiled_data(self.tiles))
        step = self.step_embeddings(forward)
        if step is not None:
            return step[0], forward
        return self.module.xai_embed(_tile(self.inputs, self.tiles, self.n)), forward

    def step_embeddings(self, forward: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor] | None:
        """The token embeddings the step's own forward ran on and its logits, when the penalty may reuse them."""
        step = self.context.cache.get(self.penalty.step_embeddings_key)
        if step is None or self.tiles != 1:
            return None
        if self.penalty.needs_double_backward:  # differentiates the step's own graph: exact whatever forward did
            return step
        # a finite difference evaluates the function again, which dropout would change under it
        if not _same_in_train_and_eval(self.module) or not self.penalty.confirm_step_embeddings(*step, forward):  # type: ignore[arg-type]
            return None
        return step

    def reused_logits(self, explained: Tensor) -> Tensor | None:
        """The step's own logits on ``explained`` (saves a forward), when the step computed them."""
        if self.inputs.is_floating_point():
            captured, source = self.context.captured_output, self.inputs
        else:
            source, captured = self.context.cache.get(self.penalty.step_embeddings_key, (None, None))
        # the step's logits come from the model itself, not from its smooth surrogate
        if captured is None or self.tiles != 1 or explained is not source or self.penalty.surrogate is not None:
            return None
        # an input-gradient method needs logits computed from inputs that require grad
        if PENALTY_METHODS[self.penalty.method].double_backward and not source.requires_grad:
            return None
        # a finite difference compares them with a penalty forward: both must compute one function (no dropout
        # mask it cannot replay, no batch statistics where the penalty's forward uses running ones), on the
        # branches the step recorded
        if not self.penalty.needs_double_backward and (
            self.branches is None or not _same_in_train_and_eval(self.module)  # type: ignore[arg-type]
        ):
            return None
        return captured

    @property
    def branches(self) -> Branches | None:
        """The ReLU / max-pooling branches of the step's forward (``differentiation="finite_difference"``)."""
        return self.context.cache.get(self.penalty.branches_key)


def _cdep_term(job: _Job) -> Tensor:
    penalty = job.penalty
    target = job.target(required=penalty.cdep_variant == "text")
    decomposition = job.context.cache.get(penalty.decomposition_key)
    if decomposition is None:
        inputs = job.inputs
        explained = _tile(inputs.detach() if job.tiles > 1 else inputs, job.tiles, job.n)
        decomposition = decompose(
            job.module,  # type: ignore[arg-type]
            explained if inputs.is_floating_point() else inputs.repeat(job.tiles, 1),
            job.mask,
            forward=job.module.xai_forward,
        )
    else:
        penalty.steps_sharing_forward += 1
    return cdep_penalty(
        decomposition.relevant, decomposition.irrelevant, target, penalty.cdep_variant, job.sample_weights
    )


def _rrr_term(job: _Job) -> Tensor:
    explained, forward = job.differentiated()
    with _penalty_forward(job.module, job.penalty.needs_double_backward):  # type: ignore[arg-type]
        return rrr_penalty(
            forward,
            explained,
            job.mask,
            outputs=job.reused_logits(explained),
            sample_weights=job.sample_weights,
            differentiation=job.penalty.differentiation,
            branches=job.branches,
        )


def _input_x_gradient_term(job: _Job) -> Tensor:
    target = job.target(required=True)
    explained, forward = job.differentiated()
    with _penalty_forward(job.module, job.penalty.needs_double_backward):  # type: ignore[arg-type]
        return input_x_gradient_penalty(
            forward,
            explained,
            job.mask,
            target,
            outputs=job.reused_logits(explained),
            norm=job.penalty.norm,
            sample_weights=job.sample_weights,
            differentiation=job.penalty.differentiation,
            branches=job.branches,
        )


def _expected_gradients_term(job: _Job) -> Tensor:
    penalty = job.penalty
    target = job.target(required=True)
    explained, forward = job.differentiated()
    if penalty.num_references > 1 and not job.inputs.is_floating_point():
        # the references are drawn per row of the tiled batch: the per-sample entries follow them
        forward = _from_embeddings(job.module, job.tiled_data(job.tiles * penalty.num_references))
    trainer = job.module.trainer  # type: ignore[attr-defined]
    generator = penalty.random.for_rank(trainer.global_rank, trainer.world_size)
    references = penalty.references(explained, job.n, generator)
    penalty.remember(explained[: job.n])
    with _penalty_forward(job.module, penalty.needs_double_backward):  # type: ignore[arg-type]
        return expected_gradients_penalty(
            forward,
            explained,
            job.mask,
            target,
            penalty.num_references,
            references=references,
            norm=penalty.norm,
            sample_weights=job.sample_weights,
            generator=generator,
            differentiation=penalty.differentiation,
        )


def _ablation_term(job: _Job) -> Tensor:
    penalty = job.penalty
    explained, forward = job.differentiated()
    with _batch_norm_in_eval(job.module):  # type: ignore[arg-type]
        return ablation_penalty(
            forward,
            explained,
            job.mask,
            outputs=job.reused_logits(explained),
            baseline=penalty.ablation_baseline,
            measure=penalty.ablation_measure,
            sample_weights=job.sample_weights,
        )


def _rrr_gradcam_term(job: _Job) -> Tensor:
    penalty = job.penalty
    with _penalty_forward(job.module):  # type: ignore[arg-type]
        return rrr_gradcam_penalty(
            job.module.xai_forward,
            _tile(job.inputs.detach(), job.tiles, job.n),
            job.mask,
            penalty.layer_module,  # type: ignore[arg-type]
            sample_weights=job.sample_weights,
        )


def _hint_term(job: _Job) -> Tensor:
    penalty = job.penalty
    # the annotation is the relevant region itself (relevant_key) or the complement of the forbidden one
    relevant = job.mask if penalty.relevant_key is not None else 1 - job.mask
    with _penalty_forward(job.module):  # type: ignore[arg-type]
        return hint_penalty(
            job.module.xai_forward,
            _tile(job.inputs.detach(), job.tiles, job.n),
            relevant,
            penalty.layer_module,  # type: ignore[arg-type]
            job.target(required=True),  # type: ignore[arg-type]
            sample_weights=job.sample_weights,
        )


def _rbr_term(job: _Job) -> Tensor:
    explained, forward = job.differentiated()
    parameters = [p for p in job.module.parameters() if p.requires_grad]  # type: ignore[attr-defined]
    with _penalty_forward(job.module):  # type: ignore[arg-type]
        return rbr_penalty(
            forward, explained, job.mask, job.target(required=True), parameters, sample_weights=job.sample_weights
        )


def _counterexamples_term(job: _Job) -> Tensor:
    trainer = job.module.trainer  # type: ignore[attr-defined]
    generator = job.penalty.random.for_rank(trainer.global_rank, trainer.world_size)
    copies = counterexample_inputs(_tile(job.inputs, job.tiles, job.n), job.mask, generator)
    with _batch_norm_in_eval(job.module):  # type: ignore[arg-type]
        return counterexample_loss(
            job.module.xai_forward, copies, job.target(required=True), sample_weights=job.sample_weights
        )


@dataclass(frozen=True)
class _PenaltyMethod:
    term: Callable[[_Job], Tensor]
    #: differentiates input gradients, so it needs a double backward
    double_backward: bool
    #: the weights that worked across the tests, DecoyDigits and SST (see the docs); a starting grid
    weight_range: tuple[float, float]
    #: can differentiate the logits of the step's own forward instead of running one
    reuses_step_forward: bool = False
    #: reads a map at a named layer (``layer=``)
    needs_layer: bool = False
    #: its parameter gradient can also come from a finite difference (``differentiation="finite_difference"``)
    first_order: bool = False


PENALTY_METHODS: dict[str, _PenaltyMethod] = {
    "cdep": _PenaltyMethod(_cdep_term, double_backward=False, weight_range=(1.0, 100.0)),
    "rrr": _PenaltyMethod(
        _rrr_term, double_backward=True, weight_range=(1.0, 1000.0), reuses_step_forward=True, first_order=True
    ),
    "input_x_gradient": _PenaltyMethod(
        _input_x_gradient_term,
        double_backward=True,
        weight_range=(10.0, 1000.0),
        reuses_step_forward=True,
        first_order=True,
    ),
    "expected_gradients": _PenaltyMethod(
        _expected_gradients_term, double_backward=True, weight_range=(1.0, 100.0), first_order=True
    ),
    "ablation": _PenaltyMethod(
        _ablation_term, double_backward=False, weight_range=(1.0, 10.0), reuses_step_forward=True
    ),
    "rrr_gradcam": _PenaltyMethod(_rrr_gradcam_term, double_backward=True, weight_range=(0.01, 1.0), needs_layer=True),
    "hint": _PenaltyMethod(_hint_term, double_backward=True, weight_range=(0.001, 0.1), needs_layer=True),
    "rbr": _PenaltyMethod(_rbr_term, double_backward=True, weight_range=(1e3, 1e6)),
    "counterexamples": _PenaltyMethod(_counterexamples_term, double_backward=False, weight_range=(0.5, 2.0)),
}


class ExplanationPenalty(LossTerm):
    """Adds an explanation penalty to the loss so that the model stops using the masked features.

    The methods:
        * ``"cdep"``: contextual decomposition explanation penalization (Rieger et al., ICML 2020); costs
          about two forward streams.
        * ``"rrr"``: right for the right reasons, squared input gradients of the summed log-probabilities
          in the mask (Ross et al., 2017); reuses the step's forward pass and costs one double backward.
        * ``"expected_gradients"``: attribution prior on Expected Gradients with ``num_references``
          references drawn from the batch (Erion et al., 2021).
        * ``"input_x_gradient"``: Input x Gradient of the true class in the mask.
        * ``"ablation"``: the change of the prediction when the masked features are removed (replaced by
          ``ablation_baseline``); counts what they do through interactions, which CDEP's decomposition gives to
          the unmasked part (on SST with a decoy word CDEP was gamed that way, ablation was not: see the docs).
          One forward and one backward more than the task loss, no double backward.
        * ``"rrr_gradcam"``: RRR-G, the Grad-CAM mass (predicted class, min-max normalized) inside the mask at
          ``layer`` (Schramowski et al., 2020, as the XIL typology implements it).
        * ``"hint"``: HINT, the squared difference between the true class's normalized Grad-CAM at ``layer`` and
          the *relevant* region: the batch key ``relevant_key`` when given, else the complement of the mask
          (Selvaraju et al., 2019).
        * ``"rbr"``: Right for Better Reasons, input gradients of the influence-function term times RRR's input
          gradients inside the mask (Shao et al., 2021); third-order, the most expensive method.
        * ``"counterexamples"``: the cross-entropy of copies whose masked region is randomized (uniform in the
          batch's range; random batch tokens for token ids): the XIL typology's CE as a loss term, one forward.

    Each method's weight lives on its own scale; :data:`PENALTY_METHODS` holds a measured ``weight_range`` per
    method (the docs give the grids and a sweep on a validation split). The mixin warns once when a weighted
    term exceeds the task loss a thousandfold.

    Masks come from one of: a batch key (``mask_key``; per-sample tensors, a list with ``None`` for samples
    without annotation, or token spans), a fixed ``mask`` for every sample, or a ``mask_sampler`` of
    single-feature masks drawn in proportion to feature occupancy (the ColorMNIST scheme).

    Integer inputs are token ids: CDEP decomposes through the embedding layer with a mask over token
    positions; the gradient methods act on the embeddings from ``xai_embed`` and
    ``xai_forward_from_embeddings``.

    Args:
        method: one of the methods above.
        weight: the penalty's weight (lambda).
        mask_key: batch key of the annotation masks.
        mask: a fixed mask applied to every sample instead of ``mask_key``.
        mask_sampler: a sampler of single-feature masks instead of ``mask_key``.
        schedule: ``"constant"``, ``"linear_warmup"`` or ``"dann"``.
        warmup_steps: optimizer steps of the linear warm-up.
        cdep_variant: ``"image"``, ``"text"`` or ``"shift_invariant"`` (see
            :func:`~lightning_xai.functional.cdep_penalty`).
        num_references: references per sample for ``"expected_gradients"``.
        norm: ``"l2"`` or ``"l1"`` for ``"expected_gradients"`` and ``"input_x_gradient"``.
        ablation_measure: ``"logits"`` (the squared change of the class-centred logits) or ``"kl"``, for
            ``"ablation"``.
        ablation_baseline: the value that replaces the masked features for ``"ablation"`` (a zero pixel, a zero
            embedding).
        layer: the submodule whose output is the Grad-CAM map for ``"rrr_gradcam"`` and ``"hint"`` (default: the
            last convolution, else the last recurrent layer).
        relevant_key: for ``"hint"``, a batch key of masks marking where the model *should* look (the digit's
            pixels); samples without one are skipped. ``None``: the complement of ``mask_key``'s masks.
        name: name of the term in the logs, ``xai/<name>``; defaults to the method.
        seed: seed of the penalty's random draws (Expected-Gradients references and path points, counterexamples).
        prog_bar: show ``xai/<name>`` on the progress bar.
        surrogate: penalise the input gradients of the model's smooth surrogate instead of its own,
            ``{"relu_beta": 10.0, "maxpool_tau": 10.0}`` (see :func:`~lightning_xai.attribution.smoothed`): the
            penalty's forward runs with every ``nn.ReLU`` as ``Softplus(relu_beta)`` and every max pooling as
            LogSumExp pooling (``maxpool_tau``), on the live parameters, so its gradient trains the model; the task
            loss still uses the model itself. Only for the input-gradient methods (``rrr``, ``input_x_gradient``,
            ``expected_gradients``, ``rrr_gradcam``, ``hint``, ``rbr``); costs one forward more for the methods
            that otherwise reuse the step's forward. The default name becomes ``<method>_surrogate``.
        differentiation: for ``rrr``, ``input_x_gradient`` and ``expected_gradients``: ``"double_backward"``
            (exact) or ``"finite_difference"``: the exact penalty value with a first-order, finite-difference
            parameter gradient (relative error about 1e-3), which needs no double backward, so it trains
            ``torch.compile``d modules and keeps the fused attention kernels (see
            :data:`~lightning_xai.functional.penalties.DIFFERENTIATIONS`).

    Composition: CDEP runs the step's forward through the decomposition only when nothing observes the
    submodules (no forward hooks from other callbacks or the user, no old-style weight/spectral norm); otherwise
    it decomposes separately and every hook fires as usual. The gradient methods run their forwards with the
    math attention kernel (the one with a double backward) and refuse ``torch.compile`` in ``setup``, unless
    ``differentiation="finite_difference"``; CDEP trains compiled modules, decomposing the uncompiled module.
    On token ids, RRR, Input x Gradient and ablation reuse the embeddings and logits of the step's own
    ``self(ids)`` (docs: the injection contract).

    Examples:
        >>> import pytorch_lightning as pl
        >>> penalty = ExplanationPenalty(method="rrr", weight=10.0, mask_key="mask")
        >>> penalty.term_name, penalty.state_key
        ('rrr', "ExplanationPenalty{'name': 'rrr'}")
        >>> ExplanationPenalty(method="rrr", differentiation="finite_difference").needs_double_backward
        False
    """

    def __init__(
        self,
        method: Method = "cdep",
        weight: float = 1.0,
        mask_key: str = "mask",
        mask: Tensor | list[float] | list[list[float]] | None = None,
        mask_sampler: OccupancyMaskSampler | None = None,
        schedule: Schedule = "constant",
        warmup_steps: int = 0,
        cdep_variant: CDEPVariant = "image",
        num_references: int = 1,
        norm: Norm = "l2",
        name: str | None = None,
        seed: int = 0,
        prog_bar: bool = False,
        ablation_measure: AblationMeasure = "logits",
        ablation_baseline: float = 0.0,
        layer: str | None = None,
        relevant_key: str | None = None,
        surrogate: Mapping[str, float | None] | None = None,
        differentiation: Differentiation = "double_backward",
    ) -> None:
        if method not in PENALTY_METHODS:
            raise XAIConfigurationError(
                f"ExplanationPenalty: method must be one of {tuple(PENALTY_METHODS)}, got {method!r}."
            )
        where = f"ExplanationPenalty(method={method!r})"
        if differentiation not in DIFFERENTIATIONS:
            raise XAIConfigurationError(
                f"{where}: differentiation must be one of {tuple(DIFFERENTIATIONS)}, got {differentiation!r}."
            )
        if not DIFFERENTIATIONS[differentiation].double_backward and not PENALTY_METHODS[method].first_order:
            first_order = [name for name, entry in PENALTY_METHODS.items() if entry.first_order]
            raise XAIConfigurationError(
                f"{where}: differentiation={differentiation!r} replaces the double backward of the input-gradient "
                f"penalties {first_order}; this method has none to replace. Drop differentiation=."
            )
        #: how the input-gradient penalty gets its parameter gradient (see :data:`DIFFERENTIATIONS`)
        self.differentiation: Differentiation = differentiation
        #: smoothing of the penalty's forward (None: the model itself), see :func:`lightning_xai.attribution.smoothed`
        self.surrogate = None if surrogate is None else SmoothOptions.from_mapping(surrogate, where)
        if self.surrogate is not None and not PENALTY_METHODS[method].double_backward:
            gradient_methods = [name for name, entry in PENALTY_METHODS.items() if entry.double_backward]
            raise XAIConfigurationError(
                f"{where}: surrogate= smooths the input gradients a penalty differentiates, and this method takes "
                f"none; use one of {gradient_methods}, or drop surrogate=."
            )
        super().__init__(weight=weight, schedule=schedule, warmup_steps=warmup_steps, name=name, prog_bar=prog_bar)
        if mask is not None and mask_sampler is not None:
            raise XAIConfigurationError("ExplanationPenalty: give either a fixed `mask` or a `mask_sampler`, not both.")
        if cdep_variant not in ("image", "text", "shift_invariant"):
            raise XAIConfigurationError(
                f"ExplanationPenalty: cdep_variant must be 'image', 'text' or 'shift_invariant', got {cdep_variant!r}."
            )
        if num_references < 1:
            raise XAIConfigurationError(f"ExplanationPenalty: num_references must be >= 1, got {num_references}.")
        if norm not in ("l1", "l2"):
            raise XAIConfigurationError(f"ExplanationPenalty: norm must be 'l1' or 'l2', got {norm!r}.")
        if ablation_measure not in ("logits", "kl"):
            raise XAIConfigurationError(
                f"ExplanationPenalty: ablation_measure must be 'logits' or 'kl', got {ablation_measure!r}."
            )
        self.method: Method = method
        self.mask_key = mask_key
        self.mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float)
        self.mask_sampler = mask_sampler
        self.cdep_variant: CDEPVariant = cdep_variant
        self.num_references = num_references
        self.norm: Norm = norm
        self.ablation_measure: AblationMeasure = ablation_measure
        self.ablation_baseline = float(ablation_baseline)
        if layer is not None and not PENALTY_METHODS[method].needs_layer:
            needing = [name for name, entry in PENALTY_METHODS.items() if entry.needs_layer]
            raise XAIConfigurationError(
                f"ExplanationPenalty(method={method!r}) reads no layer, so `layer={layer!r}` would be ignored; the "
                f"methods with a layer are {needing}."
            )
        if relevant_key is not None and method != "hint":
            raise XAIConfigurationError(
                f"ExplanationPenalty(method={method!r}): relevant_key is HINT's annotation; use method='hint' or "
                "drop relevant_key."
            )
        self.layer = layer
        self.relevant_key = relevant_key
        #: the module ``layer`` names, resolved in setup
        self.layer_module: nn.Module | None = None
        self.seed = seed
        #: the penalty's random stream (Expected-Gradients references and path points), plain data in pickles
        self.random = SeededGenerator(seed)
        # the surrogate's forward is not the step's: it runs one of its own
        self.reuses_step_forward = (
            PENALTY_METHODS[method].reuses_step_forward and mask_sampler is None and self.surrogate is None
        )
        self.differentiates_step_inputs = self.reuses_step_forward and PENALTY_METHODS[method].double_backward
        self.differentiates_step_twice = self.differentiates_step_inputs and self.needs_double_backward
        #: steps on which CDEP's decomposition doubled as the step's forward pass
        self.steps_sharing_forward = 0
        self._shares_forward = False
        #: the embedding the step's forward runs on token ids, and whether the penalty's forward agrees with it
        self._step_embedding: nn.Module | None = None
        self._step_embedding_found = False
        self._step_embeddings_agree: bool | None = None
        #: the last explained samples: Expected-Gradients references for a batch of one sample
        self.reference_bank: Tensor | None = None

    @property
    def needs_double_backward(self) -> bool:
        """Whether the penalty builds a double backward (then no torch.compile, and attention on the math kernel)."""
        return PENALTY_METHODS[self.method].double_backward and DIFFERENTIATIONS[self.differentiation].double_backward

    @property
    def branches_key(self) -> tuple[int, str]:
        return (id(self), "branches")

    @property
    def step_embeddings_key(self) -> tuple[int, str]:
        return (id(self), "step embeddings")

    def default_name(self) -> str:
        return self.method if self.surrogate is None else f"{self.method}_surrogate"

    @property
    def suggested_weight_range(self) -> tuple[float, float]:
        """The weights that worked for this method (the low and high end of a first grid)."""
        return PENALTY_METHODS[self.method].weight_range

    @property
    def where(self) -> str:
        return f"ExplanationPenalty(method={self.method!r}, name={self.term_name!r})"

    @property
    def generator(self) -> torch.Generator:
        return self.random.generator

    @property
    def decomposition_key(self) -> tuple[int, str]:
        return (id(self), "decomposition")

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._step_embedding, self._step_embedding_found, self._step_embeddings_agree = None, False, None
        method = PENALTY_METHODS[self.method]
        if self.needs_double_backward and is_compiled(pl_module):
            raise XAIConfigurationError(
                f"{self.where} differentiates input gradients (a double backward), which torch.compile does not "
                "support. Train the uncompiled module (compile a copy for inference), use "
                "differentiation='finite_difference' (first order), or use method='cdep', which trains compiled "
                "modules."
            )
        if self.needs_double_backward:
            for path, module in pl_module.named_modules():
                attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
                if attention in _NO_DOUBLE_BACKWARD_ATTENTION:
                    raise XAIConfigurationError(
                        f"{self.where} needs a double backward through attention, but '{path or '<root>'}' uses "
                        f"attn_implementation={attention!r}, whose kernels have no double backward. Build the "
                        "model with attn_implementation='sdpa' or 'eager' (from_pretrained(..., "
                        "attn_implementation='sdpa') or config._attn_implementation = 'sdpa'); the penalty runs "
                        "SDPA on its math kernel. Or use differentiation='finite_difference', which needs no double "
                        "backward."
                    )
        if method.needs_layer:
            path = self.layer if self.layer is not None else default_map_layer(pl_module, self.where)
            self.layer_module = named_submodule(pl_module, path, self.where)
        if self.surrogate is not None:
            # fail here, not at the first step, when there is nothing to smooth
            with smoothed(pl_module, self.surrogate.relu_beta, self.surrogate.maxpool_tau):
                pass
        # The decomposition can stand in for the step's forward only where it computes the same function: the
        # default xai_forward of an uncompiled module that returns one tensor.
        self._shares_forward = (
            self.method == "cdep"
            and type(pl_module).xai_forward is XAIMixin.xai_forward
            and not is_compiled(pl_module)
            and returns_single_tensor(pl_module)
        )

    # ----------------------------------------------------------------- masks

    def _resolve_masks(self, context: StepContext, inputs: Tensor) -> tuple[Tensor, Tensor | None, int]:
        """Returns ``(mask, sample_weights, tiles)``: masks for ``tiles`` copies of the batch (once per step)."""
        key = (id(self), "masks")
        if key not in context.cache:
            context.cache[key] = self._draw_masks(context, inputs)
        return context.cache[key]

    def _draw_masks(self, context: StepContext, inputs: Tensor) -> tuple[Tensor, Tensor | None, int]:
        if self.mask_sampler is not None:
            self.mask_sampler.update(inputs)
            masks = self.mask_sampler.sample(inputs)
            return masks, None, masks.shape[0] // inputs.shape[0]
        if self.mask is not None:
            try:
                return broadcast_mask(self.mask.to(inputs.device), inputs), None, 1
            except MaskShapeError as error:
                raise MaskShapeError(f"{self.where}, fixed mask: {error}") from None
        key = self.relevant_key or self.mask_key
        annotation = context.get(key, self.where)
        try:
            mask, annotated = masks_from_annotations(annotation, inputs)
        except MaskShapeError as error:
            raise MaskShapeError(f"{self.where}, batch key {key!r}: {error}") from None
        return mask, annotated, 1

    # ----------------------------------------------------------------- sharing the step's forward

    @override
    def prepare_step(self, pl_module: XAIMixin, context: StepContext) -> None:
        """For CDEP, runs the user's ``self(x)`` through the decomposition and returns its total stream.

        When the network behaves the same in train and eval mode and nothing observes its submodules, the
        decomposition's total stream *is* the step's forward pass: the task loss and the penalty then share one
        forward and one backward, and CDEP costs one extra (relevant) stream instead of two.

        For a finite difference that reuses the step's logits, records the ReLU and max-pooling branches of the
        step's forward (:class:`~lightning_xai.functional.penalties.Branches`) for the shifted forward to replay.
        """
        if self.reuses_step_forward:
            self._capture_step_forward(pl_module, context)
        if not self._shares_forward:
            return
        inputs = context.data.get("input")
        if not isinstance(inputs, Tensor) or not _same_in_train_and_eval(pl_module):  # type: ignore[arg-type]
            return
        mask, sample_weights, tiles = self._resolve_masks(context, inputs)
        if tiles != 1 or (sample_weights is not None and not bool(sample_weights.any())):
            return  # no annotated sample: the term is zero and the step keeps its plain forward
        key = self.decomposition_key
        context.capture_keys.add(key)  # a second round of manual optimization decomposes again
        original_forward = pl_module.forward  # type: ignore[attr-defined]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if (
                key in context.cache
                or len(args) != 1
                or kwargs
                or args[0] is not inputs
                or _observed_submodules(pl_module)  # type: ignore[arg-type]
            ):
                return original_forward(*args, **kwargs)
            decomposition = decompose(
                pl_module,  # type: ignore[arg-type]
                inputs,
                mask,
                forward=pl_module.xai_forward,
            )
            context.cache[key] = decomposition
            return decomposition.total

        _wrap_step_forward(pl_module, context, original_forward, forward)

    def _capture_step_forward(self, pl_module: XAIMixin, context: StepContext) -> None:
        """Wraps the step's forward to keep what the penalty reuses of it.

        On token ids, the embeddings it ran on and its logits (the mixin captures the logits of float inputs);
        for a first-order penalty, the branches of its ReLUs and max poolings.
        """
        inputs = context.data.get("input")
        # a compiled forward is not wrapped: the penalty runs its own
        if not isinstance(inputs, Tensor) or is_compiled(pl_module):  # type: ignore[arg-type]
            return
        first_order = not self.needs_double_backward
        if inputs.is_floating_point() and not first_order:
            return  # the mixin captures the logits; no branches to record
        embedding = None
        if not inputs.is_floating_point():
            # token ids: the step's forward embeds them; the penalty reuses those embeddings and the logits
            embedding = self._token_embedding(pl_module, inputs)
            if embedding is None:
                return
            context.capture_keys.add(self.step_embeddings_key)
        key = self.branches_key
        context.capture_keys.add(key)
        original_forward = pl_module.forward  # type: ignore[attr-defined]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if key in context.cache or not args or args[0] is not inputs:
                return original_forward(*args, **kwargs)
            branches, embedded = Branches() if first_order else None, []
            with contextlib.ExitStack() as stack:
                if embedding is not None:
                    stack.callback(
                        embedding.register_forward_hook(
                            lambda _, ids, output: embedded.append(output) if ids and ids[0] is inputs else None
                        ).remove
                    )
                if branches is not None:
                    stack.enter_context(branches)
                elif embedding is not None:  # differentiated twice: on the kernels with a cheap double backward
                    stack.enter_context(double_backward_kernels(pl_module))  # type: ignore[arg-type]
                output = original_forward(*args, **kwargs)
            context.cache[key] = branches
            logits = logits_of(output, pl_module.xai_logits_key)
            if len(embedded) == 1 and logits is not None:
                context.cache[self.step_embeddings_key] = (embedded[0], logits)
            return output

        _wrap_step_forward(pl_module, context, original_forward, forward)

    def _token_embedding(self, pl_module: XAIMixin, input_ids: Tensor) -> nn.Module | None:
        """The ``nn.Embedding`` whose output ``xai_embed`` returns (found once per fit), or ``None``."""
        if not self._step_embedding_found:
            calls: list[tuple[nn.Module, Tensor]] = []
            handles = [
                module.register_forward_hook(lambda module, _, output: calls.append((module, output)))
                for module in pl_module.modules()  # type: ignore[attr-defined]
                if isinstance(module, nn.Embedding)
            ]
            try:
                with torch.no_grad():
                    embedded = pl_module.xai_embed(input_ids)
            except XAIConfigurationError:  # xai_embed not overridden: the term raises it with the fix
                embedded = None
            finally:
                for handle in handles:
                    handle.remove()
            # an embedding that xai_embed transforms (scaled, plus positions) is not the one the penalty explains
            self._step_embedding = next((module for module, output in calls if output is embedded), None)
            self._step_embedding_found = True
        return self._step_embedding

    def confirm_step_embeddings(self, embeddings: Tensor, logits: Tensor, forward: Callable[[Tensor], Tensor]) -> bool:
        """Whether ``xai_forward_from_embeddings`` computes the step's logits from the step's embeddings.

        Checked once per fit, on the first step that offers them: a forward that does more than embed the ids and
        call ``xai_forward_from_embeddings`` (scaled embeddings, another head) would make the finite difference
        compare two different functions. Where it does, the penalty runs its own forward, after a warning.
        """
        if self._step_embeddings_agree is None:
            with torch.no_grad():
                again = forward(embeddings.detach()).float()
            reference = logits.detach().float()
            tolerance = 1e-4 * (1.0 + float(reference.abs().max()))
            self._step_embeddings_agree = again.shape == reference.shape and bool(
                (again - reference).abs().max() <= tolerance
            )
            if not self._step_embeddings_agree:
                rank_zero_warn(
                    f"{self.where}: xai_forward_from_embeddings(xai_embed(ids), batch) does not give the logits of "
                    "the step's own forward(ids), so the penalty explains another function than the one trained, "
                    "and runs a forward of its own (one forward and backward more per step). Make forward(ids) "
                    "embed the ids with xai_embed's embedding and call xai_forward_from_embeddings."
                )
        return self._step_embeddings_agree

    # ----------------------------------------------------------------- the term

    @override
    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        inputs = context.get("input", self.where)
        if not isinstance(inputs, Tensor):
            raise XAIConfigurationError(
                f"{self.where}: batch['input'] must be a tensor, got {type(inputs).__name__}; override xai_batch()."
            )
        mask, sample_weights, tiles = self._resolve_masks(context, inputs)
        if sample_weights is not None and not bool(sample_weights.any()):
            return inputs.new_zeros((), dtype=torch.float)  # no annotated sample in this batch
        job = _Job(self, pl_module, context, inputs, mask, sample_weights, tiles)
        if self.surrogate is None:
            return PENALTY_METHODS[self.method].term(job)
        # Swapped in place (parameter-free modules only): the penalty's graph runs the live parameters and stays
        # valid after the block, so the backward of the total loss reaches the model.
        with smoothed(pl_module, self.surrogate.relu_beta, self.surrogate.maxpool_tau):  # type: ignore[arg-type]
            return PENALTY_METHODS[self.method].term(job)

    # ----------------------------------------------------------------- Expected-Gradients references

    #: rows kept in :attr:`reference_bank`
    reference_bank_size: int = 64

    def references(self, explained: Tensor, samples: int, generator: torch.Generator) -> Tensor:
        """References for the ``num_references * rows`` path starts, never a row's own sample.

        A sample drawn as its own reference gets no attribution (``x - x' = 0``) and no penalty. References come
        from the batch's other samples; a batch of one sample draws them from the samples of earlier steps
        (:attr:`reference_bank`), and the very first such step uses a zero baseline.
        """
        draws = self.num_references * explained.shape[0]
        data = explained.detach()
        if samples >= 2:
            return data[other_samples(samples, explained.shape[0], self.num_references, generator).to(data.device)]
        bank = self.reference_bank
        if bank is None or tuple(bank.shape[1:]) != tuple(data.shape[1:]):
            rank_zero_warn(
                f"{self.where}: a batch of one sample has no other sample to take Expected-Gradients references "
                "from, and no earlier batch has been seen; this step uses a zero baseline (later steps draw from "
                "the samples of earlier ones)."
            )
            return torch.zeros((draws, *data.shape[1:]), dtype=data.dtype, device=data.device)
        chosen = torch.randint(0, bank.shape[0], (draws,), generator=generator)
        return bank[chosen].to(device=data.device, dtype=data.dtype)

    def remember(self, samples: Tensor) -> None:
        """Keeps the step's samples (detached, on the CPU) as references for later batches of one sample."""
        rows = samples[-self.reference_bank_size :].detach().float().cpu()
        bank = self.reference_bank
        if bank is not None and tuple(bank.shape[1:]) == tuple(rows.shape[1:]):
            rows = torch.cat([bank, rows])
        self.reference_bank = rows[-self.reference_bank_size :].clone()

    # ----------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.random.get_state()
        if self.reference_bank is not None:
            state["reference_bank"] = self.reference_bank
        if self.mask_sampler is not None:
            state["mask_sampler"] = self.mask_sampler.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" in state_dict:
            self.random.set_state(state_dict["generator"])
        self.reference_bank = state_dict.get("reference_bank")
        if self.mask_sampler is not None and "mask_sampler" in state_dict:
            self.mask_sampler.load_state_dict(state_dict["mask_sampler"])


def _from_embeddings(pl_module: XAIMixin, data: Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    def forward(embeddings: Tensor) -> Tensor:
        output = pl_module.xai_forward_from_embeddings(embeddings, data)
        return require_logits(
            output, f"{type(pl_module).__name__}.xai_forward_from_embeddings", pl_module.xai_logits_key
        )

    return forward


def _wrap_step_forward(
    pl_module: Any, context: StepContext, original_forward: Callable[..., Any], forward: Callable[..., Any]
) -> None:
    """Installs ``forward`` as the module's forward for this step; the step's hooks put the original back."""
    pl_module.forward = forward

    def restore() -> None:
        if pl_module.__dict__.get("forward") is forward:
            del pl_module.forward
        else:  # another term wrapped ours: put the original back underneath it
            pl_module.forward = original_forward

    context.hooks.append(restore)
