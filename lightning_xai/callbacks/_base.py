"""The base classes of lightning_xai's callbacks: what every callback does the same way, written once.

* :class:`XAICallback`: one ``name`` for the log keys and the ``state_key``, the set-up housekeeping (the gloo
  clean-up, the ``XAIMixin`` check, both early in ``setup``) and a handle list of the hooks it installs.
* :class:`EpochMetricCallback`: measures the model on the batches of ``validate`` (inside ``fit`` too) and
  ``test`` and logs at the end of each epoch. It skips the sanity check, keeps the ``every_n_epochs`` cadence,
  logs test results under ``test/`` keys, and renders pictures inside a guard that never stops training.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, Literal

from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_xai._contract import HookHandles, check_name, is_compiled
from lightning_xai._lightning import Callback, LightningModule, Trainer, rank_zero_warn
from lightning_xai.callbacks._distributed import destroy_gloo_group_at_exit
from lightning_xai.errors import MissingMixinError, XAIConfigurationError
from lightning_xai.mixin import XAIMixin

Stage = Literal["validate", "test"]

#: the prefix of log keys per stage: validation (inside fit or validate()) logs plain keys
STAGE_PREFIXES: dict[str, str] = {"validate": "", "test": "test/"}


class XAICallback(Callback):
    """Base class of every lightning_xai callback.

    Args:
        name: the callback's name in its log keys and in its ``state_key``; two callbacks of one class on a
            trainer need distinct names (Lightning refuses duplicate state keys).
    """

    #: the callback reads batches or adds loss terms through :class:`~lightning_xai.XAIMixin`
    requires_mixin: ClassVar[bool] = False
    #: what the callback does with the mixin, for the error of a module without it
    mixin_use: ClassVar[str] = "reads batches through XAIMixin"

    def __init__(self, name: str | None = None) -> None:
        super().__init__()
        self._name = None if name is None else check_name(name, "name", type(self).__name__)
        #: hooks on the model installed by the callback, removed by :meth:`remove_hooks`
        self.hooks = HookHandles()

    @property
    def name(self) -> str:
        return self._name or self.default_name()

    def default_name(self) -> str:
        return type(self).__name__.lower()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    @property
    def where(self) -> str:
        """How errors and warnings name this callback."""
        return f"{type(self).__name__}(name={self.name!r})"

    def remove_hooks(self) -> None:
        self.hooks.remove()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        destroy_gloo_group_at_exit()
        if self.requires_mixin and not isinstance(pl_module, XAIMixin):
            raise MissingMixinError(
                f"{self.where} {self.mixin_use}, but {type(pl_module).__name__} does not subclass XAIMixin. Fix: "
                f"`class {type(pl_module).__name__}(XAIMixin, LightningModule): ...` (from lightning_xai import "
                "XAIMixin)."
            )

    def refuse_compiled(self, pl_module: LightningModule, what: str) -> None:
        """Raises in ``setup`` when ``pl_module`` is compiled: dynamo skips forward hooks added after compilation.

        ``torch._dynamo.config.skip_nnmodule_hook_guards`` (on by default) lets a compiled forward ignore hooks
        registered later, so a callback that reads a submodule's output through a hook would see nothing.
        """
        if is_compiled(pl_module):
            raise XAIConfigurationError(
                f"{self.where} reads {what} through a forward hook, and {type(pl_module).__name__} runs through "
                "torch.compile, whose compiled forward does not run hooks added after compilation. Train the "
                "uncompiled module (compile a copy for inference)."
            )

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.remove_hooks()


def renamed_arguments(owner: str, renames: dict[str, str], **given: Any) -> dict[str, Any]:
    """The deprecated arguments given (not ``None``), each warned about with the name of its successor."""
    given = {key: value for key, value in given.items() if value is not None}
    for key in given:
        warnings.warn(f"{owner}: {key}= is deprecated; use {renames[key]}.", DeprecationWarning, stacklevel=4)
    return given


def picture_cadence(owner: str, value: int, **old: Any) -> int:
    """``pictures_every_n_epochs``, or what the deprecated ``log_images`` / ``*_every_n_epochs`` arguments gave."""
    renames = dict.fromkeys(("images_every_n_epochs", "plot_every_n_epochs"), "pictures_every_n_epochs=")
    renames["log_images"] = "pictures_every_n_epochs=0 for no pictures"
    given = renamed_arguments(owner, renames, **old)
    if given.get("log_images") is False:
        return 0
    return int(next((given[key] for key in ("images_every_n_epochs", "plot_every_n_epochs") if key in given), value))


class EpochMetricCallback(XAICallback):
    """Measures the model on validation and test batches and logs the results at the end of each epoch.

    Subclasses implement :meth:`epoch_start`, :meth:`batch_start`, :meth:`batch_end` (any of them) and
    :meth:`epoch_end`, which logs through :meth:`log_values` and draws pictures through :meth:`log_pictures`.
    The base calls them in ``fit``'s validation, in ``trainer.validate()`` and in ``trainer.test()``, skips the
    sanity check, and computes only every ``every_n_epochs`` epochs of ``fit``. Hooks a subclass adds to
    :attr:`hooks` in :meth:`batch_start` are removed after the batch.

    Keys are ``<log_prefix>/<key>`` in validation and ``test/<log_prefix>/<key>`` under ``trainer.test()``.

    Args:
        name: the callback's name (part of its log keys and its ``state_key``).
        every_n_epochs: compute every this many epochs of ``fit`` (``validate()`` and ``test()`` always compute).
        pictures_every_n_epochs: log pictures on the first computation and then every this many; 0 never.
            ``test()`` logs them whenever this is not 0.
    """

    def __init__(self, name: str | None = None, every_n_epochs: int = 1, pictures_every_n_epochs: int = 1) -> None:
        super().__init__(name=name)
        if every_n_epochs < 1 or pictures_every_n_epochs < 0:
            raise XAIConfigurationError(
                f"{type(self).__name__}: every_n_epochs must be >= 1 and pictures_every_n_epochs >= 0, got "
                f"{every_n_epochs} and {pictures_every_n_epochs}."
            )
        self.every_n_epochs = int(every_n_epochs)
        self.pictures_every_n_epochs = int(pictures_every_n_epochs)
        #: fit/validate computations so far (test computations are not counted)
        self.epochs_computed = 0
        self.last_values: dict[str, float] = {}
        #: a dataset a subclass draws its probe set from instead of the stage's loader (``dataset=``)
        self.dataset: Dataset | None = None
        self._stage: Stage | None = None

    @property
    def log_prefix(self) -> str:
        """The first part of every key this callback logs."""
        return self.name

    def key(self, key: str, stage: Stage | None = None) -> str:
        """The full log key of ``key`` in ``stage`` (the running stage by default)."""
        return f"{STAGE_PREFIXES[stage or self._stage or 'validate']}{self.log_prefix}/{key}"

    # ----------------------------------------------------------------- what subclasses implement

    def epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """Before the first batch of a computed epoch."""

    def batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        """Before a batch of a computed epoch; may add hooks to :attr:`hooks`."""

    def batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        """After a batch of a computed epoch (its hooks are removed already)."""

    def epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        """After the last batch of a computed epoch: compute and log."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the shared machinery

    def computes(self, trainer: Trainer) -> bool:
        """Whether this epoch is measured: never in the sanity check, every ``every_n_epochs`` epochs of fit."""
        if trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def log_values(self, pl_module: LightningModule, values: dict[str, Any], stage: Stage) -> None:
        """Logs every finite value under :meth:`key` and keeps them all in :attr:`last_values`."""
        numbers = {key: float(value) for key, value in values.items()}
        for key, value in numbers.items():
            if math.isfinite(value):
                pl_module.log(self.key(key, stage), value, on_epoch=True, sync_dist=False)
        self.last_values = numbers

    def pictures_due(self, trainer: Trainer, stage: Stage) -> bool:
        """Whether pictures go out after this computation: rank 0 with a logger, on the picture cadence."""
        if self.pictures_every_n_epochs == 0 or not trainer.is_global_zero or not trainer.loggers:
            return False
        return stage == "test" or (self.epochs_computed - 1) % self.pictures_every_n_epochs == 0

    def probe_loader(
        self,
        trainer: Trainer,
        stage: Stage,
        batch_size: int,
        dataset: Dataset | None = None,
        collate_fn: Any = None,
    ) -> Any:
        """The loader a probe set is drawn from: ``dataset`` (default: :attr:`dataset`) in batches of
        ``batch_size``, or else the first validation (test) loader of the trainer, already sharded over DDP ranks."""
        dataset = self.dataset if dataset is None else dataset
        if dataset is not None:
            return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
        loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            which = "test" if stage == "test" else "validation"
            raise XAIConfigurationError(
                f"{self.where} draws its probe set from the {which} loader, and there is none: give one to the "
                "Trainer, or pass dataset= to the callback."
            )
        return loader

    def log_pictures(self, trainer: Trainer, render: Any, *args: Any) -> None:
        """Runs ``render(trainer, *args)``, which renders and logs pictures; a failure there only warns."""
        try:
            render(trainer, *args)
        except Exception as error:  # noqa: BLE001 - a picture must never stop training
            rank_zero_warn(
                f"{self.where}: rendering or logging its pictures failed with {type(error).__name__}: {error}. "
                "Training goes on; the values were logged.",
                category=UserWarning,
            )

    def _epoch_start(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        self._stage = stage
        if self.computes(trainer):
            self.epoch_start(trainer, pl_module, stage)

    def _batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        self.remove_hooks()
        if self.computes(trainer):
            self.batch_start(trainer, pl_module, batch, stage)

    def _batch_end(self, trainer: Trainer, pl_module: LightningModule, batch: Any, stage: Stage) -> None:
        self.remove_hooks()
        if self.computes(trainer):
            self.batch_end(trainer, pl_module, batch, stage)

    def _epoch_end(self, trainer: Trainer, pl_module: LightningModule, stage: Stage) -> None:
        if not self.computes(trainer):
            return
        if stage != "test":
            self.epochs_computed += 1
        self.epoch_end(trainer, pl_module, stage)

    # ----------------------------------------------------------------- Lightning hooks

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "validate")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, batch, "validate")

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, batch, "validate")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "validate")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Without a validation loop the validation hooks never run: a given probe dataset is measured here instead.
        if self.dataset is not None and not trainer.val_dataloaders:
            self._epoch_end(trainer, pl_module, "validate")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "test")

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(trainer, pl_module, batch, "test")

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, batch, "test")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    # ----------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"epochs_computed": self.epochs_computed, "last_values": dict(self.last_values)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # "epochs_logged": FairnessMetrics checkpoints of 0.1.0
        self.epochs_computed = int(state_dict.get("epochs_computed", state_dict.get("epochs_logged", 0)))
        self.last_values = dict(state_dict.get("last_values", {}))
