"""ClArCProjection: projects an artifact out of (P-ClArC) or into (A-ClArC) a layer's activations."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn
from typing_extensions import override

from lightning_xai._lightning import LightningModule, Trainer
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.callbacks._concept_vector import ConceptVector, ConceptVectorArguments, first_loader
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._layers import layer_tensor
from lightning_xai.functional.concept_vectors import clarc_projection, replace_layer_tensor

Mode = Literal["p", "a"]

#: what each mode projects onto and when it acts
_MODES: dict[str, str] = {"p": "mu_clean", "a": "mu_artifact"}


class ClArCProjection(ConceptVectorArguments, XAICallback):
    """Class Artifact Compensation by projection (Anders et al., 2022; Pahde et al., 2023) at one layer.

    A forward hook on ``layer`` moves every sample along the unit concept vector ``v`` of an artifact to one fixed
    concept strength ``mu``:

    ``a' = a + (mu - v . maxpool(a)) v`` at every position (broadcast over ``H, W`` or ``T``),

    so that ``v . maxpool(a') = mu`` for every sample and the artifact's direction carries nothing downstream.

    * ``mode="p"`` (P-ClArC, no training): ``mu = mu_clean``, the mean strength of clean samples: the artifact is
      projected out. Acts in ``validate()``, ``test()``, ``predict()`` and the validation epochs of ``fit()``
      (not the sanity check); never in training steps.
    * ``mode="a"`` (A-ClArC): ``mu = mu_artifact``, the mean strength of artifact samples: the artifact is added
      to every training sample, so that fine-tuning learns to ignore it. Acts in the training batches of
      ``fit()`` only (not in its validation); evaluate the fine-tuned model as it is.

    The vector is given (``cav=``) or fitted from the masks under ``mask_key`` of the first ``cav_batches`` batches
    of a seeded shuffle of the loader's dataset (each sample with a non-empty mask against its clean version, the
    masked features set to 0; see :func:`~lightning_xai.functional.fit_cav`), with the model in eval mode:

    * mode ``"a"``: once, at the start of training, on the training loader (fit it on a model that has learnt
      the artifact, then fine-tune);
    * mode ``"p"``: inside ``fit()`` again at each validation epoch and at the end of training, on the training
      loader, so that it follows the model being trained (a given ``cav`` keeps its direction and only its
      means are measured again); in a standalone ``validate()``/``test()``/
      ``predict()`` from that stage's loader, unless a vector is known already (from an earlier ``fit()`` of
      this callback, a checkpoint, or :meth:`fit_cav` with a loader of your choice).

    The vector and both means live in :meth:`state_dict`; under DDP rank 0's are broadcast.

    Args:
        layer: the path of the layer (``None``: the last convolution, else the last recurrent layer).
        mode: ``"p"`` or ``"a"``.
        cav: a concept vector (one entry per channel; normalised to unit length) instead of fitting one.
        cav_method: ``"signal"`` (default), ``"svm"``, ``"logistic"`` or ``"ridge"``.
        mask_key: the batch key of the artifact masks.
        cav_batches: how many batches a fit reads at most.
        name: the callback's name (its ``state_key``); default ``"pclarc"`` or ``"aclarc"``.
        strength: the concept strength to project onto instead of the measured mean; with ``cav`` the callback
            needs no data at all.
        clean_token_id: the token that replaces masked positions of token-id inputs in the clean versions.
        channel_dim: the channel dimension of the layer's output (``None``: inferred).

    Examples:
        >>> projection = ClArCProjection(layer="features.3", mode="p", cav=[1.0, 0.0], strength=0.5)
        >>> projection.name, projection.cav, projection.strength
        ('pclarc', tensor([1., 0.]), 0.5)
    """

    def __init__(
        self,
        layer: str | None = None,
        mode: Mode = "p",
        cav: Tensor | list[float] | None = None,
        cav_method: str = "signal",
        mask_key: str = "mask",
        cav_batches: int = 20,
        name: str | None = None,
        strength: float | None = None,
        clean_token_id: int = 0,
        channel_dim: int | None = None,
    ) -> None:
        super().__init__(name=name)
        if mode not in _MODES:
            raise XAIConfigurationError(f"ClArCProjection: mode must be one of {tuple(_MODES)}, got {mode!r}.")
        self.mode: Mode = mode
        self.given_strength = None if strength is None else float(strength)
        self.concept = ConceptVector(
            self.where, layer, cav, cav_method, mask_key, cav_batches, clean_token_id, channel_dim
        )
        #: forward passes the projection changed since the callback was created (a diagnostic, not saved)
        self.projected_batches = 0

    def default_name(self) -> str:
        return f"{self.mode}clarc"

    @property
    def where(self) -> str:
        return f"ClArCProjection(mode={self.mode!r}, name={self.name!r})"

    @property
    def strength(self) -> float | None:
        """The concept strength the projection sets: the given one, else ``mu_clean`` (P) or ``mu_artifact`` (A)."""
        if self.given_strength is not None:
            return self.given_strength
        return getattr(self.concept, _MODES[self.mode])

    @property
    def active(self) -> bool:
        """Whether the hook is installed now."""
        return bool(self.hooks)

    # ----------------------------------------------------------------- the vector

    def fit_cav(self, pl_module: nn.Module, loader: Any, trainer: Trainer | None = None) -> None:
        """Fits the vector and the means on ``loader``'s first ``cav_batches`` batches (e.g. the training data
        before a standalone ``test()``); a given ``cav`` is kept and only the means are measured."""
        self.concept.setup(pl_module)
        self.concept.fit(pl_module, loader, trainer, source="fit_cav", direction=self.concept.source != "given")

    def _ensure(self, trainer: Trainer, pl_module: LightningModule, loaders: Any, source: str) -> None:
        self.concept.ensure(trainer, pl_module, loaders, source, need_means=self.given_strength is None)

    def _refit_on_train_data(self, trainer: Trainer, pl_module: LightningModule) -> None:
        given = self.concept.source == "given"
        if given and self.given_strength is not None:
            return  # nothing to measure
        # a given vector stays; its means are measured again on the model as it is now
        source = "given" if given else "train"
        self.concept.fit(pl_module, _train_loader(trainer, self.where), trainer, source=source, direction=not given)

    # ----------------------------------------------------------------- the hook

    def _install(self, pl_module: nn.Module) -> None:
        self.remove_hooks()
        strength = self.strength
        if strength is None or not self.concept.fitted:
            raise XAIConfigurationError(f"{self.where}: the concept vector or its strength is not known yet.")
        channel_dim = self.concept.channel_dim
        where = f"{self.where}, layer {self.layer!r}"

        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            activation = layer_tensor(output, where)
            try:
                projected = clarc_projection(activation, self.concept.on_device(activation), strength, channel_dim)
            except XAIConfigurationError as error:
                raise XAIConfigurationError(f"{where}: {error}") from None
            self.projected_batches += 1
            return replace_layer_tensor(output, projected, where)

        self.hooks.append(self.concept.module(pl_module).register_forward_hook(hook))

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.refuse_compiled(pl_module, "and replaces the layer's output")
        self.concept.setup(pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "a":
            self._ensure(trainer, pl_module, trainer.train_dataloader, "train")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.mode == "a":
            self._install(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.remove_hooks()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()
        if self.mode == "p":  # a later test() corrects the trained model
            self._refit_on_train_data(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()
        if self.mode != "p":
            return
        if trainer.state.fn == "fit":
            if trainer.sanity_checking:  # the training loader is not built yet: no projection here
                return
            self._refit_on_train_data(trainer, pl_module)
        else:
            self._ensure(trainer, pl_module, trainer.val_dataloaders, "validation")
        self._install(pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "p":
            self._ensure(trainer, pl_module, trainer.test_dataloaders, "test")
            self._install(pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "p":
            self._ensure(trainer, pl_module, trainer.predict_dataloaders, "predict")
            self._install(pl_module)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove_hooks()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.remove_hooks()

    # ----------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.concept.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.concept.load_state_dict(state_dict)


def _train_loader(trainer: Trainer, where: str) -> Any:
    loader = first_loader(trainer.train_dataloader)
    if loader is None:
        raise XAIConfigurationError(f"{where}: fit() has no training loader to fit the concept vector on.")
    return loader
