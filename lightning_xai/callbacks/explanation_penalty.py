"""ExplanationPenalty: trains a model to ignore the features a mask marks as forbidden."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_xai.attribution.contextual_decomposition import decompose
from lightning_xai.callbacks._loss_term import LossTerm, Schedule
from lightning_xai.errors import MaskShapeError, XAIConfigurationError
from lightning_xai.functional._masks import broadcast_mask
from lightning_xai.functional.penalties import (
    CDEPVariant,
    Norm,
    cdep_penalty,
    expected_gradients_penalty,
    input_x_gradient_penalty,
    rrr_penalty,
)
from lightning_xai.masks import OccupancyMaskSampler, masks_from_annotations
from lightning_xai.mixin import StepContext, XAIMixin

Method = Literal["cdep", "rrr", "expected_gradients", "input_x_gradient"]
_METHODS = ("cdep", "rrr", "expected_gradients", "input_x_gradient")


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
def _rnn_without_onednn(module: nn.Module) -> Iterator[None]:
    # oneDNN's fused CPU RNN kernel differentiates its own backward through a slow per-step path that
    # zero-fills buffers; PyTorch's native RNN makes the double backward of gradient penalties ~1.5x cheaper.
    if not any(isinstance(m, nn.RNNBase) for m in module.modules()):
        yield
        return
    # Only the `enabled` switch: torch.backends.mkldnn.flags() also resets TF32 and warns about Intel GPUs.
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def _tile(value: Any, times: int, n: int) -> Any:
    if times == 1:
        return value
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value


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
        name: name of the term in the logs, ``xai/<name>``; defaults to the method.
        seed: seed of the penalty's random draws (Expected-Gradients references and path points).

    Examples:
        >>> import pytorch_lightning as pl
        >>> penalty = ExplanationPenalty(method="rrr", weight=10.0, mask_key="mask")
        >>> penalty.term_name, penalty.state_key
        ('rrr', "ExplanationPenalty{'name': 'rrr'}")
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
    ) -> None:
        super().__init__(weight=weight, schedule=schedule, warmup_steps=warmup_steps, name=name)
        if method not in _METHODS:
            raise XAIConfigurationError(f"ExplanationPenalty: method must be one of {_METHODS}, got {method!r}.")
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
        self.method: Method = method
        self.mask_key = mask_key
        self.mask = None if mask is None else torch.as_tensor(mask, dtype=torch.float)
        self.mask_sampler = mask_sampler
        self.cdep_variant: CDEPVariant = cdep_variant
        self.num_references = num_references
        self.norm: Norm = norm
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.reuses_step_forward = method in ("rrr", "input_x_gradient") and mask_sampler is None
        #: steps on which CDEP's decomposition doubled as the step's forward pass
        self.steps_sharing_forward = 0

    def default_name(self) -> str:
        return self.method

    @property
    def _where(self) -> str:
        return f"ExplanationPenalty(method={self.method!r}, name={self.term_name!r})"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if any(isinstance(m, nn.RNNBase) for m in pl_module.modules()):
            # The step's forward runs the fused oneDNN RNN, whose double backward is slow: a penalty forward
            # of its own on the native kernel is cheaper than reusing it.
            self.reuses_step_forward = False
        if self.method != "cdep" and getattr(pl_module, "_compiler_ctx", None):
            raise XAIConfigurationError(
                f"{self._where} differentiates input gradients (a double backward), which torch.compile does not "
                "support. Train without torch.compile, or use method='cdep'."
            )
        if self.method != "cdep":
            for path, module in pl_module.named_modules():
                attention = getattr(getattr(module, "config", None), "_attn_implementation", None)
                if attention in ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
                    raise XAIConfigurationError(
                        f"{self._where} needs a double backward through attention, but '{path or '<root>'}' uses "
                        f"attn_implementation={attention!r}, whose kernels have no double backward. Build the "
                        "model with attn_implementation='eager' (from_pretrained(..., attn_implementation='eager') "
                        "or config._attn_implementation = 'eager')."
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
                raise MaskShapeError(f"{self._where}, fixed mask: {error}") from None
        annotation = context.get(self.mask_key, self._where)
        try:
            mask, annotated = masks_from_annotations(annotation, inputs)
        except MaskShapeError as error:
            raise MaskShapeError(f"{self._where}, batch key {self.mask_key!r}: {error}") from None
        return mask, annotated, 1

    # ----------------------------------------------------------------- sharing the step's forward

    def prepare_step(self, pl_module: XAIMixin, context: StepContext) -> Callable[[], None] | None:
        """For CDEP, runs the user's ``self(x)`` through the decomposition and returns its total stream.

        When the network behaves the same in train and eval mode, the decomposition's total stream *is* the
        step's forward pass: the task loss and the penalty then share one forward and one backward, and
        CDEP costs one extra (relevant) stream instead of two.
        """
        if self.method != "cdep" or type(pl_module).xai_forward is not XAIMixin.xai_forward:
            return None
        inputs = context.data.get("input")
        if not isinstance(inputs, Tensor) or not _same_in_train_and_eval(pl_module):  # type: ignore[arg-type]
            return None
        mask, _, tiles = self._resolve_masks(context, inputs)
        if tiles != 1:
            return None
        key = (id(self), "decomposition")
        original_forward = pl_module.forward  # type: ignore[attr-defined]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if key in context.cache or len(args) != 1 or kwargs or args[0] is not inputs:
                return original_forward(*args, **kwargs)
            decomposition = decompose(
                pl_module,  # type: ignore[arg-type]
                inputs,
                mask,
                forward=pl_module.xai_forward,
            )
            context.cache[key] = decomposition
            return decomposition.total

        pl_module.forward = forward  # type: ignore[method-assign]

        def restore() -> None:
            if pl_module.__dict__.get("forward") is forward:
                del pl_module.forward
            else:  # another term wrapped ours: put the original back underneath it
                pl_module.forward = original_forward  # type: ignore[method-assign]

        return restore

    # ----------------------------------------------------------------- the term

    def compute_term(self, pl_module: XAIMixin, context: StepContext) -> Tensor:
        inputs = context.get("input", self._where)
        if not isinstance(inputs, Tensor):
            raise XAIConfigurationError(
                f"{self._where}: batch['input'] must be a tensor, got {type(inputs).__name__}; override xai_batch()."
            )
        needs_target = self.method in ("expected_gradients", "input_x_gradient") or self.cdep_variant == "text"
        target = context.get("target", self._where) if needs_target else context.data.get("target")
        mask, sample_weights, tiles = self._resolve_masks(context, inputs)
        if sample_weights is not None and not bool(sample_weights.any()):
            return inputs.new_zeros((), dtype=torch.float)  # no annotated sample in this batch
        n = inputs.shape[0]
        tiled_inputs = _tile(inputs.detach() if tiles > 1 else inputs, tiles, n)
        tiled_target = None if target is None else _tile(target, tiles, n)
        if self.method == "cdep":
            decomposition = context.cache.get((id(self), "decomposition"))
            if decomposition is None:
                decomposition = decompose(
                    pl_module,  # type: ignore[arg-type]
                    tiled_inputs if inputs.is_floating_point() else inputs.repeat(tiles, 1),
                    mask,
                    forward=pl_module.xai_forward,
                )
            else:
                self.steps_sharing_forward += 1
            return cdep_penalty(
                decomposition.relevant, decomposition.irrelevant, tiled_target, self.cdep_variant, sample_weights
            )

        forward: Callable[[Tensor], Tensor]
        if inputs.is_floating_point():
            explained = tiled_inputs
            forward = pl_module.xai_forward
        else:
            data = {k: _tile(v, tiles, n) for k, v in context.data.items()} if tiles > 1 else context.data
            explained = pl_module.xai_embed(_tile(inputs, tiles, n))
            forward = _from_embeddings(pl_module, data)

        with _batch_norm_in_eval(pl_module), _rnn_without_onednn(pl_module):  # type: ignore[arg-type]
            if self.method == "expected_gradients":
                if self.num_references > 1 and not inputs.is_floating_point():
                    data = {k: _tile(v, tiles * self.num_references, n) for k, v in context.data.items()}
                    forward = _from_embeddings(pl_module, data)
                return expected_gradients_penalty(
                    forward,
                    explained,
                    mask,
                    tiled_target,
                    self.num_references,
                    norm=self.norm,
                    sample_weights=sample_weights,
                    generator=self.generator,
                )
            outputs = None
            if context.captured_output is not None and tiles == 1 and explained is inputs and inputs.requires_grad:
                outputs = context.captured_output
            if self.method == "rrr":
                return rrr_penalty(forward, explained, mask, outputs=outputs, sample_weights=sample_weights)
            return input_x_gradient_penalty(
                forward, explained, mask, tiled_target, outputs=outputs, norm=self.norm, sample_weights=sample_weights
            )

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        if self.mask_sampler is not None:
            state["mask_sampler"] = self.mask_sampler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
        if self.mask_sampler is not None and "mask_sampler" in state_dict:
            self.mask_sampler.load_state_dict(state_dict["mask_sampler"])


def _from_embeddings(pl_module: XAIMixin, data: Mapping[str, Any]) -> Callable[[Tensor], Tensor]:
    def forward(embeddings: Tensor) -> Tensor:
        return pl_module.xai_forward_from_embeddings(embeddings, data)

    return forward
