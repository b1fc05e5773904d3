"""The one place that names Lightning's classes: from ``lightning.pytorch``, ``pytorch_lightning``, or both.

Users write ``import lightning as L`` or ``import pytorch_lightning as pl``; the two packages ship separate
copies of the same classes, and each Trainer checks callbacks, loggers and LightningCLI types against its own
copy. torchmetrics avoids the question by importing neither; finetuning-scheduler picks one package when it is
installed. Callbacks cannot import neither (Lightning finds them by type), and a choice made at install time
breaks environments that hold both. So the callbacks' base class here derives from the ``Callback`` of every
installed package: one object is a callback of whichever Trainer receives it, and LightningCLI of either
package accepts the YAML snippets. Loggers are matched against the classes of every installed package.

Nothing outside this module imports a Lightning package, so the library runs with either one installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lightning_utilities.core.rank_zero as _rank_zero
from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn

__all__ = [
    "PACKAGES",
    "Callback",
    "Trainer",
    "LightningModule",
    "logger_types",
    "rank_zero_info",
    "rank_zero_warn",
]

# import names; pytorch_lightning last, see _shared_state below
_CANDIDATES = ("lightning.pytorch", "pytorch_lightning")
# Both packages set these globals of lightning_utilities when imported (the logger of rank-zero messages, the
# category of deprecations), and the last import wins: importing the second package here would re-route the
# messages of the user's Trainer to the other package's logger, past a `logging.getLogger("pytorch_lightning")`
# the user configured. The package the user imported first keeps them; if none was, pytorch_lightning's do.
_SHARED_STATE = ("log", "rank_zero_deprecation_category")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # "lightning.pytorch" when "lightning" itself is missing
        return False


def _import_packages() -> tuple[ModuleType, ...]:
    already = _rank_zero.log.name != _rank_zero.__name__  # a Lightning package has set the shared state
    before = {name: getattr(_rank_zero, name) for name in _SHARED_STATE if hasattr(_rank_zero, name)}
    packages = tuple(importlib.import_module(name) for name in _CANDIDATES if _installed(name))
    if already:
        for name, value in before.items():
            setattr(_rank_zero, name, value)
    return packages


#: the installed Lightning packages
PACKAGES: tuple[ModuleType, ...] = _import_packages()
if not PACKAGES:
    raise ImportError(
        "lightning_xai's callbacks and loggers need PyTorch Lightning, and neither `lightning` nor "
        "`pytorch_lightning` is installed. Install the one you use: `pip install lightning` or "
        "`pip install pytorch-lightning` (or `pip install 'lightning-xai[lightning]'`)."
    )

if TYPE_CHECKING:
    from pytorch_lightning import LightningModule, Trainer
    from pytorch_lightning.callbacks import Callback
else:
    # A class statement with every installed package's Callback as a base: `isinstance(callback, Callback)` then
    # holds for the Trainer and LightningCLI of each package. The bases define the same hooks.
    Callback = type("Callback", tuple(package.Callback for package in PACKAGES), {"__module__": __name__})
    Callback.__doc__ = "Lightning's ``Callback`` of every installed Lightning package (see lightning_xai._lightning)."
    Trainer = Any
    LightningModule = Any


def logger_types(name: str) -> tuple[type, ...]:
    """The logger class ``name`` (``"CSVLogger"``) of every installed package that has it.

    Examples:
        >>> len(logger_types("CSVLogger")) == len(PACKAGES)
        True
    """
    classes = []
    for package in PACKAGES:
        loggers = importlib.import_module(f"{package.__name__}.loggers")
        cls = getattr(loggers, name, None)
        if isinstance(cls, type):
            classes.append(cls)
    return tuple(classes)
