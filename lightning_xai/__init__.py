"""lightning_xai: explanations as part of training in PyTorch Lightning.

Subclass :class:`XAIMixin` next to your ``LightningModule`` and add callbacks from
:mod:`lightning_xai.callbacks`; the penalties join the loss inside your own training loop.
"""

from lightning_xai.mixin import XAIMixin

__version__ = "0.1.0"
__all__ = ["XAIMixin", "__version__"]
