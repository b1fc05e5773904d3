"""The common interface of attribution-quality metrics.

Every metric is a :class:`torchmetrics.Metric` whose ``update`` takes the same keyword arguments, so
that :class:`~lightning_xai.callbacks.AttributionMetrics` can feed any of them:

``update(inputs, attributions, target=None, *, model=None, explain_fn=None, mask=None)``

* ``inputs``: ``(N, ...)`` the explained inputs (images, features, or token embeddings);
* ``attributions``: ``(N, ...)`` attributions of the same shape as ``inputs``;
* ``target``: ``(N,)`` the explained classes;
* ``model``: a module mapping ``inputs`` to logits (needed by metrics that re-run the model);
* ``explain_fn``: ``explain_fn(model, inputs, target) -> attributions`` (needed by metrics that
  re-explain: sensitivity, randomization);
* ``mask``: a region mask over features (forbidden region or human rationale), any shape that
  :func:`~lightning_xai.functional._masks.broadcast_mask` accepts.

A metric names what it needs in ``requires``; missing arguments raise ``XAIConfigurationError``.
States are sufficient statistics reduced with ``sum``, so values are exact under DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError

ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


class AttributionMetric(Metric):
    """Base class: checks the shared ``update`` arguments named in ``requires``."""

    requires: tuple[str, ...] = ()
    full_state_update = False

    def _check_required(self, **arguments: Any) -> None:
        missing = [name for name in self.requires if arguments.get(name) is None]
        if missing:
            raise XAIConfigurationError(
                f"{type(self).__name__}.update needs {missing} (it requires {list(self.requires)}); pass them as "
                "keyword arguments."
            )
