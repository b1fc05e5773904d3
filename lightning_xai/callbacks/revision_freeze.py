"""RevisionFreeze: an explanation penalty revises only part of a trained model, the rest stays as it was."""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from lightning_xai._contract import named_submodule
from lightning_xai._lightning import LightningModule, Trainer, rank_zero_info, rank_zero_warn
from lightning_xai.callbacks._base import XAICallback
from lightning_xai.errors import XAIConfigurationError

#: normalization layers whose training mode changes what they compute or store (BatchNorm*, SyncBatchNorm,
#: InstanceNorm*); GroupNorm and LayerNorm behave alike in both modes
_MODAL_NORMS = (nn.modules.batchnorm._NormBase,)


def _paths(value: str | list[str] | tuple[str, ...] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    paths = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not paths or not all(isinstance(path, str) for path in paths):
        raise XAIConfigurationError(
            f"RevisionFreeze: {what} must be a submodule path or a non-empty list of them (e.g. 'fc' or "
            f"['layer4', 'fc']), got {value!r}."
        )
    return paths


class RevisionFreeze(XAICallback):
    """Freezes part of a trained model during ``fit``, so that a penalty revises only the rest.

    Reveal-to-Revise (Pahde et al., 2023) corrects a trained model by fine-tuning it with an explanation penalty
    while the layers below the corrected one stay frozen. This callback does that with any loss-term callback
    (:class:`~lightning_xai.callbacks.ExplanationPenalty`, ...). Give exactly one of:

    * ``trainable``: submodule paths that keep training; every other parameter is frozen.
    * ``frozen``: submodule paths whose parameters are frozen; the rest trains.
    * ``freeze_until``: a submodule path; everything up to **and including** it is frozen, in
      ``named_modules()`` order (a container's own parameters count at the container's place, before its
      children), and everything after it trains.

    In ``setup`` of ``fit`` (before Lightning builds the optimizers and wraps the model for DDP) the frozen
    parameters get ``requires_grad=False`` and their stale ``.grad`` is dropped; ``teardown`` (or
    ``on_exception``) sets ``requires_grad`` back to the values it had, so the model is left as it was. An
    optimizer built from all parameters still leaves the frozen ones bit-identical: ``torch.optim``
    optimizers skip parameters without a gradient, weight decay included. Parameters already frozen before
    ``fit`` stay frozen and are not counted as trainable. A parameter shared by a trainable and a frozen
    module trains with ``trainable`` and is frozen with ``frozen`` and ``freeze_until``.

    With ``norm_eval`` the frozen normalization layers with running statistics (``BatchNorm*``,
    ``SyncBatchNorm``, ``InstanceNorm*``) run in eval mode during training: they normalize with their stored
    statistics and never update them. The callback sets that at every train-epoch start and before every
    training batch (the first hook after a validation inside ``fit``), so a ``model.train()`` (an
    ``on_validation_model_train`` override) cannot undo it; ``teardown`` puts back the training mode they had
    in ``setup``. With ``norm_eval=False`` their affine parameters are frozen but their running statistics
    follow the new data.

    The configuration lives in the arguments; the checkpoint keeps the names of the frozen parameters, and
    resuming with a callback that freezes others warns.

    Args:
        trainable: submodule paths that keep training (``"fc"``, ``["layer4", "fc"]``).
        frozen: submodule paths to freeze.
        freeze_until: the last submodule that is frozen.
        norm_eval: keep the frozen normalization layers in eval mode.
        name: the callback's name (its ``state_key``).

    Attributes:
        trainable_parameter_count: elements of the parameters that train in the running ``fit`` (Lightning's
            "Trainable params").
        frozen_parameter_count: elements of the parameters this callback froze.
        frozen_parameter_names: the names of the parameters this callback froze.
        eval_norm_names: the names of the normalization layers it keeps in eval mode.

    Raises:
        XAIConfigurationError: in ``__init__`` unless exactly one of ``trainable``, ``frozen`` and
            ``freeze_until`` is given; in ``setup`` for a path the model lacks (the message lists its
            submodules), when nothing would be frozen or when no parameter would train.

    Examples:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        >>> freeze = RevisionFreeze(trainable="2")
        >>> freeze.setup(None, model, "fit")
        >>> freeze.frozen_parameter_names, freeze.trainable_parameter_count
        (['0.weight', '0.bias', '1.weight', '1.bias'], 18)
        >>> [p.requires_grad for p in model.parameters()]
        [False, False, False, False, True, True]
        >>> freeze.teardown(None, model, "fit")
        >>> all(p.requires_grad for p in model.parameters())
        True
    """

    def __init__(
        self,
        trainable: str | list[str] | None = None,
        frozen: str | list[str] | None = None,
        freeze_until: str | None = None,
        norm_eval: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        choices = {"trainable": trainable, "frozen": frozen, "freeze_until": freeze_until}
        given = [key for key, value in choices.items() if value is not None]
        if len(given) != 1:
            raise XAIConfigurationError(
                "RevisionFreeze: give exactly one of trainable= (the submodules that keep training), frozen= (the "
                f"submodules to freeze) and freeze_until= (freeze up to and including one submodule); got "
                f"{', '.join(given) if given else 'none'}."
            )
        if freeze_until is not None and not isinstance(freeze_until, str):
            raise XAIConfigurationError(
                f"RevisionFreeze: freeze_until must be one submodule path, got {freeze_until!r}."
            )
        self._trainable_paths = _paths(trainable, "trainable")
        self._frozen_paths = _paths(frozen, "frozen")
        self.trainable = trainable
        self.frozen = frozen
        self.freeze_until = freeze_until
        self.norm_eval = bool(norm_eval)
        self.trainable_parameter_count = 0
        self.frozen_parameter_count = 0
        self.frozen_parameter_names: list[str] = []
        self.eval_norm_names: list[str] = []
        # what setup changed, to undo: parameter -> requires_grad before; norm layer -> training mode before
        self._requires_grad: dict[nn.Parameter, bool] = {}
        self._norms: dict[nn.Module, bool] = {}

    def default_name(self) -> str:
        return "freeze"

    # ----------------------------------------------------------------- what is frozen

    def _frozen_modules(self, model: nn.Module) -> tuple[list[nn.Module], set[int]]:
        """The modules in the frozen region, and the ids of the parameters that must keep training."""
        where = self.where
        modules = [module for _, module in model.named_modules()]
        if self._trainable_paths is not None:
            kept = {id(m) for path in self._trainable_paths for m in named_submodule(model, path, where).modules()}
            kept_parameters = {
                id(p) for path in self._trainable_paths for p in named_submodule(model, path, where).parameters()
            }
            return [m for m in modules if id(m) not in kept], kept_parameters
        if self._frozen_paths is not None:
            frozen = {id(m) for path in self._frozen_paths for m in named_submodule(model, path, where).modules()}
            return [m for m in modules if id(m) in frozen], set()
        assert self.freeze_until is not None
        last = named_submodule(model, self.freeze_until, where)
        inside = {id(m) for m in last.modules()}
        position = next(i for i, m in enumerate(modules) if m is last)
        return [m for i, m in enumerate(modules) if i <= position or id(m) in inside], set()

    def _describe(self) -> str:
        if self._trainable_paths is not None:
            return f"trainable={list(self._trainable_paths)}"
        if self._frozen_paths is not None:
            return f"frozen={list(self._frozen_paths)}"
        return f"freeze_until={self.freeze_until!r}"

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._restore()  # a fit that ended without teardown leaves nothing behind
        frozen_modules, kept = self._frozen_modules(pl_module)
        frozen_ids = {id(p) for m in frozen_modules for p in m.parameters(recurse=False)} - kept
        names = {id(p): n for n, p in pl_module.named_parameters()}  # a shared parameter by its first name
        parameters = list(pl_module.parameters())
        to_freeze = [p for p in parameters if id(p) in frozen_ids and p.requires_grad]
        trains = [p for p in parameters if id(p) not in frozen_ids and p.requires_grad]
        if not to_freeze:
            raise XAIConfigurationError(
                f"{self.where} with {self._describe()} would freeze nothing in {type(pl_module).__name__}: the frozen "
                "part has no parameter that requires grad. Name submodules with parameters (the submodules are "
                f"{[n for n, _ in pl_module.named_modules() if n][:25]})."
            )
        if not trains:
            raise XAIConfigurationError(
                f"{self.where} with {self._describe()} would leave no parameter of {type(pl_module).__name__} to "
                "train. Keep at least one submodule with parameters out of the frozen part."
            )
        for parameter in to_freeze:
            self._requires_grad[parameter] = parameter.requires_grad
            parameter.requires_grad_(False)
            parameter.grad = None  # an optimizer steps a parameter that has a gradient, even a stale one
        self.frozen_parameter_names = [names[id(p)] for p in to_freeze]
        self.frozen_parameter_count = sum(p.numel() for p in to_freeze)
        self.trainable_parameter_count = sum(p.numel() for p in trains)
        module_names = {id(m): n for n, m in pl_module.named_modules()}
        norms = [m for m in frozen_modules if isinstance(m, _MODAL_NORMS)] if self.norm_eval else []
        self._norms = {m: m.training for m in norms}
        self.eval_norm_names = [module_names[id(m)] for m in norms]
        rank_zero_info(
            f"{self.where}: {self.trainable_parameter_count:,} parameters train, {self.frozen_parameter_count:,} in "
            f"{len(to_freeze)} tensors are frozen ({self._describe()}); {len(norms)} normalization layers run in "
            "eval mode."
        )

    def _hold_norms(self) -> None:
        for norm in self._norms:
            if norm.training:
                norm.eval()

    def _restore(self) -> None:
        for parameter, requires_grad in self._requires_grad.items():
            parameter.requires_grad_(requires_grad)
        for norm, training in self._norms.items():
            norm.train(training)
        self._requires_grad = {}
        self._norms = {}

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._hold_norms()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # the first hook after validation inside fit, which ends in model.train() or the captured modes
        self._hold_norms()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: undo here, so the model is left as it was
        self._restore()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self._restore()

    # ----------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen_parameter_names": list(self.frozen_parameter_names)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning loads callback states after setup: the running configuration is known already
        if "frozen_parameter_names" not in state_dict:
            return
        saved = list(state_dict["frozen_parameter_names"])
        if self._requires_grad and saved != self.frozen_parameter_names:
            rank_zero_warn(
                f"{self.where}: the checkpoint was trained with {len(saved)} frozen parameters, this run freezes "
                f"{len(self.frozen_parameter_names)} ({self._describe()}), not the same set. The parameters frozen now "
                "stay as the checkpoint has them.",
                category=UserWarning,
            )
