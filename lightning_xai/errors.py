"""Exceptions raised by ``lightning_xai``.

Every message says what was wrong, where (module path, batch key, shape) and how to fix it.
"""

from __future__ import annotations


class XAIError(Exception):
    """Base class of every error raised by ``lightning_xai``."""


class UnsupportedLayerError(XAIError, NotImplementedError):
    """A model contains a layer or operation that an attribution engine has no rule for."""


class MaskShapeError(XAIError, ValueError):
    """A mask cannot be broadcast onto the input it explains."""


class MissingBatchKeyError(XAIError, KeyError):
    """A callback asked the batch for a key it does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class MissingMixinError(XAIError, TypeError):
    """A loss-term callback was attached to a LightningModule that does not subclass ``XAIMixin``."""


class XAIConfigurationError(XAIError, ValueError):
    """A callback or module is configured in a way that cannot work."""


class GroupValueError(XAIError, ValueError):
    """A protected attribute holds a value outside the range its callback or metric was configured with."""


class MaskValueError(XAIError, ValueError):
    """A mask holds a NaN or a weight outside ``[0, 1]``."""


class LabelValueError(XAIError, ValueError):
    """A class label (a target, a concept label) is not an integer class of its range."""


class UnevenPaddingError(XAIError, ValueError):
    """A strided layer pads its input on one side only at the training input size (``SpatialBiasMonitor``, strict)."""
