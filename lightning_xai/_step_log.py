"""``log_each_step``: ``LightningModule.log`` for keys logged on every training step, at the cost of a tensor update.

``self.log`` re-checks its arguments and then moves the stored result's state to the value's device, which
walks (and deep-copies) the result's metadata: about 0.5 ms of CPU per call, whatever the value. A loss term
logs two keys every step, so on a small model that is most of the term's cost (the Adult MLP's step is
1.4 ms). The first call of a key in an epoch therefore goes through ``self.log``, which registers (or resets
and moves back to the device) the key's result in the loop's result collection; later calls in that epoch
feed the value to the registered result, which is where ``self.log`` ends too. Step values, ``sync_dist``,
epoch means, the progress bar and the logger's cadence therefore all stay Lightning's own.

No Lightning package is imported: the result collection is reached through the trainer, and anything
unexpected there (another Lightning version, a key logged with other arguments) takes the ``self.log`` path.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["log_each_step"]


def log_each_step(
    module: Any,
    name: str,
    value: Tensor,
    *,
    on_step: bool,
    on_epoch: bool = True,
    prog_bar: bool = False,
    sync_dist: bool = True,
    batch_size: int | None = None,
) -> None:
    """``module.log(name, value, ...)`` with the same effect, but past the first call of the epoch no re-checks.

    ``value`` is a detached floating-point scalar tensor.

    Examples:
        Outside a Trainer it is ``self.log``, which warns and does nothing:

        >>> import warnings
        >>> import pytorch_lightning as pl
        >>> import torch
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     log_each_step(pl.LightningModule(), "xai/total", torch.tensor(1.0), on_step=True)
        >>> "not registered on the model yet" in str(caught[0].message)
        True
    """
    result = _registered_result(module, name, value, on_step, on_epoch, prog_bar)
    if result is None:
        module.log(
            name,
            value,
            on_step=on_step,
            on_epoch=on_epoch,
            prog_bar=prog_bar,
            sync_dist=sync_dist,
            batch_size=batch_size,
        )
        return
    results, key, metric = result
    # what _ResultCollection.log does after its checks and the device move
    results.update_metrics(key, value, results._extract_batch_size(metric, batch_size, metric.meta))


def _registered_result(
    module: Any, name: str, value: Tensor, on_step: bool, on_epoch: bool, prog_bar: bool
) -> tuple[Any, str, Any] | None:
    """The loop's result collection, the storage key and the result of ``name``, when a plain update is
    exactly what ``self.log`` would do; ``None`` otherwise."""
    trainer = getattr(module, "_trainer", None)
    fx = getattr(module, "_current_fx_name", None)
    try:
        results = trainer._results  # type: ignore[union-attr]
        if fx is None or results is None or trainer._logger_connector.should_reset_tensors(fx):  # type: ignore[union-attr]
            return None  # the first log of an epoch resets the epoch's tensors: self.log does that
        key = f"{fx}.{name}" if results.dataloader_idx is None else f"{fx}.{name}.{results.dataloader_idx}"
        metric = results.get(key)
        if metric is None or not metric.is_tensor:
            return None
        meta = metric.meta
        # (sync_dist is stored as "sync_dist and distributed"; a key logged with other arguments fails in self.log)
        same_call = (meta.on_step, meta.on_epoch, meta.prog_bar) == (on_step, on_epoch, prog_bar)
        # the loop moves its results to the CPU at epoch end; self.log moves them back
        if not same_call or metric.value.device != value.device or not hasattr(results, "update_metrics"):
            return None
    except AttributeError:  # another Lightning: its own path
        return None
    return results, key, metric
