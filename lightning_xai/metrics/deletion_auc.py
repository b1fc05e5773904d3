"""RISE deletion score as a metric: the prediction should collapse as top-attributed features go."""

from __future__ import annotations

from lightning_xai.functional.faithfulness import deletion_auc
from lightning_xai.metrics._perturbation import CurveScore


class DeletionAUC(CurveScore):
    """Deletion AUC (Petsiuk et al., BMVC 2018) over batches; lower is better.

    The area under the target probability as features are deleted in attribution order.
    See :func:`~lightning_xai.functional.faithfulness.deletion_auc`.

    States are the sum of per-sample scores and the number of samples (reduced with ``sum``, exact under DDP);
    ``compute`` returns their ratio, the mean over every sample seen.

    Args:
        steps: number of equal chunks of features; the curve has ``steps + 1`` points on [0, 1].
        baseline: the value of deleted features (number or tensor broadcasting to the inputs).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per step.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> metric = DeletionAUC(steps=2)
        >>> metric.update(x, x, torch.tensor([1, 1]), model=model)
        >>> metric.compute()
        tensor(0.7287, dtype=torch.float64)
    """

    higher_is_better = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    kernel = staticmethod(deletion_auc)
