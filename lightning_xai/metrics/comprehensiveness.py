"""ERASER comprehensiveness as a metric: the prediction should drop without the top-attributed features."""

from __future__ import annotations

from lightning_xai.functional.faithfulness import comprehensiveness
from lightning_xai.metrics._perturbation import FractionScore


class Comprehensiveness(FractionScore):
    """Comprehensiveness (DeYoung et al., ACL 2020) over batches; higher is better.

    The mean drop of the target probability when the top-q features are removed.
    See :func:`~lightning_xai.functional.faithfulness.comprehensiveness`.

    States are the sum of per-sample scores and the number of samples (reduced with ``sum``, exact under DDP);
    ``compute`` returns their ratio, the mean over every sample seen.

    Args:
        fractions: fractions ``q`` of the features (top ``ceil(q * F)`` per sample), the ERASER bins by default.
        baseline: the value of removed features (number or tensor broadcasting to the inputs).
        batch_size: rows per forward pass over all perturbed copies; None runs one forward per fraction.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        >>> x = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
        >>> metric = Comprehensiveness(fractions=(0.5,))
        >>> metric.update(x, x, torch.tensor([1, 1]), model=model)
        >>> metric.compute()
        tensor(0.2215, dtype=torch.float64)
    """

    higher_is_better = True
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0
    kernel = staticmethod(comprehensiveness)
