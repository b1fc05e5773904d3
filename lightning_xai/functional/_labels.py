"""Class labels: integer classes in range, never a float silently truncated or an index error from deep inside."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_xai.errors import LabelValueError


def class_labels(
    values: Tensor,
    num_classes: int | None = None,
    what: str = "the labels",
    ignore_index: int | None = None,
) -> Tensor:
    """``values`` as a ``long`` tensor of classes in ``[0, num_classes)`` (``ignore_index`` allowed too).

    A float label such as 0.7 (a probability, a soft label) would be truncated to class 0 by ``.long()``, and a
    class outside the range ends in an index error far from its cause: both raise :class:`LabelValueError`
    naming ``what``, the offending value and the range.

    Examples:
        >>> class_labels(torch.tensor([0.0, 1.0, 2.0]), 3)
        tensor([0, 1, 2])
        >>> class_labels(torch.tensor([1, -100]), 2, ignore_index=-100)
        tensor([   1, -100])
    """
    values = torch.as_tensor(values)
    if values.is_floating_point():
        integral = torch.isfinite(values) & (values == values.round())
        if not bool(integral.all()):
            bad = values[~integral].flatten()[0].item()
            raise LabelValueError(
                f"{what} must be integer classes, but one is {bad:g}; pass class indices (argmax soft labels, or "
                "threshold probabilities, before they reach the batch)."
            )
    labels = values.long()
    if labels.numel() == 0 or num_classes is None and ignore_index is None:
        if labels.numel() and int(labels.min()) < 0:
            raise LabelValueError(f"{what} must be classes >= 0, but one is {int(labels.min())}.")
        return labels
    counted = labels if ignore_index is None else labels[labels != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or (num_classes is not None and int(counted.max()) >= num_classes)):
        bad = int(counted.min()) if int(counted.min()) < 0 else int(counted.max())
        allowed = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        extra = f" (or {ignore_index} for no label)" if ignore_index is not None else ""
        raise LabelValueError(
            f"{what} must be classes in {allowed}{extra}, but one is {bad}; check the labels, or the number of "
            "classes the callback was given."
        )
    return labels
