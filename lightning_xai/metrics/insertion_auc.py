"""RISE insertion score as a metric: the prediction should recover as top-attributed features return."""

from __future__ import annotations

from lightning_xai.functional.faithfulness import insertion_auc
from lightning_xai.metrics._perturbation import CurveScore


class InsertionAUC(CurveScore):
    """Insertion AUC (Petsiuk et al., BMVC 2018) over batches; higher is better.

    The area under the target probability as features are inserted into the baseline in attribution order. See
    :func:`~lightning_xai.functional.faithfulness.insertion_auc`.

    States are the sum of per-sample scores and the number of samples (reduced with ``sum``, exact under DDP);
    ``compute`` returns their ratio, the mean over every sample seen.

    Args:
        steps: number of equal chunks of features; the curve has ``steps + 1`` points on [0, 1].
        baseline: the value of not yet inserted features (number or tensor broadcasting to the inputs).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per step.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> metric = InsertionAUC(steps=2)
        >>> metric.update(x, x, torch.tensor([1, 1]), model=model)
        >>> metric.compute()
        tensor(0.8035, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0
    kernel = staticmethod(insertion_auc)
