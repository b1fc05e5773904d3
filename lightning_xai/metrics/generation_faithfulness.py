"""Faithfulness of attributions of generated text, as a metric: one class, the kernel chosen from a table."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import generation as kernels


@dataclass(frozen=True)
class _Kernel:
    fn: Callable[..., Tensor]
    higher_is_better: bool
    #: the kernel perturbs the prompt's interpretable embedding space (needs the embedding layer)
    embedding_space: bool = False


#: metric name -> its kernel in :mod:`lightning_xai.functional.generation` and its direction
KERNELS: dict[str, _Kernel] = {
    "comprehensiveness": _Kernel(kernels.generation_comprehensiveness, True),
    "sufficiency": _Kernel(kernels.generation_sufficiency, False),
    "log_odds": _Kernel(kernels.generation_log_odds, False),
    "deletion_auc": _Kernel(kernels.generation_deletion_auc, False),
    "insertion_auc": _Kernel(kernels.generation_insertion_auc, True),
    "infidelity": _Kernel(kernels.generation_infidelity, False, embedding_space=True),
    "sensitivity_max": _Kernel(kernels.generation_sensitivity_max, False, embedding_space=True),
}


class GenerationFaithfulness(Metric):
    """A faithfulness metric of attributions of a causal LM's generations, averaged over prompts.

    ``metric`` names a kernel of :mod:`lightning_xai.functional.generation` (the table ``KERNELS``):
    comprehensiveness and sufficiency of the target's log-probability (nats), the log-odds change, deletion and
    insertion AUC of the target tokens' geometric-mean probability, and infidelity and max-sensitivity in the
    prompt's interpretable embedding space. ``(T, F)`` per-output-token attributions give the per-token variant of
    the first five.

    States are the sum of per-prompt scores and the number of prompts (reduced with ``sum``, exact under DDP).

    Args:
        metric: a name of ``KERNELS``.
        seed: seed of the embedding-space perturbations, combined with each prompt's token ids: a prompt meets
            the same perturbations every epoch and on whichever DDP rank; None draws from torch's global generator.
        kwargs: the kernel's options (``fractions``, ``steps``, ``n_perturb_samples``, ...), then
            :class:`torchmetrics.Metric`'s.

    Examples:
        >>> copy = nn.Sequential(nn.Embedding(8, 8))  # the next token copies the current one
        >>> with torch.no_grad():
        ...     _ = copy[0].weight.copy_(10 * torch.eye(8))
        >>> prompt = kernels.PromptFeatures(torch.tensor([1, 2, 3]), baseline_id=0)
        >>> metric = GenerationFaithfulness("comprehensiveness", fractions=(0.34,))
        >>> metric.update(copy, [prompt], [torch.tensor([3])], [torch.tensor([0.0, 0.0, 1.0])])
        >>> bool(metric.compute() > 9)
        True
    """

    is_differentiable = False
    full_state_update = False

    score_sum: Tensor
    total: Tensor

    def __init__(self, metric: str = "comprehensiveness", seed: int | None = 0, **kwargs: Any) -> None:
        if metric not in KERNELS:
            raise XAIConfigurationError(f"GenerationFaithfulness(metric={metric!r}): choose one of {sorted(KERNELS)}.")
        kernel_parameters = inspect.signature(KERNELS[metric].fn).parameters
        metric_options = {key: kwargs.pop(key) for key in list(kwargs) if key in kernel_parameters}
        super().__init__(**kwargs)
        self.metric = metric
        self.kernel = KERNELS[metric]
        self.options = metric_options
        self.seed = seed
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        model: nn.Module,
        prompts: Sequence[kernels.PromptFeatures],
        targets: Sequence[Tensor],
        attributions: Sequence[Tensor],
        *,
        embedding: nn.Module | None = None,
        explain_fn: Callable[[nn.Module, Tensor], Tensor] | None = None,
    ) -> None:
        """Adds the scores of a list of prompts.

        Args:
            model: the causal LM (in eval mode).
            prompts: the prompts as :class:`~lightning_xai.functional.generation.PromptFeatures`.
            targets: the target ids per prompt.
            attributions: ``(F,)`` or ``(T, F)`` attributions per prompt.
            embedding: the model's input embedding layer (infidelity, max-sensitivity).
            explain_fn: the attribution method in the interpretable embedding space (max-sensitivity).

        Raises:
            XAIConfigurationError: a missing ``embedding`` / ``explain_fn``, or arguments the kernel rejects.
        """
        if self.kernel.embedding_space:
            if embedding is None or (self.metric == "sensitivity_max" and explain_fn is None):
                raise XAIConfigurationError(
                    f"GenerationFaithfulness({self.metric!r}).update needs embedding= (the model's input embedding "
                    "layer)" + (" and explain_fn=" if self.metric == "sensitivity_max" else "") + "."
                )
            sequence = [a.reshape(-1, a.shape[-1]).sum(0) if a.dim() == 2 else a for a in attributions]
            scores = kernels.InterpolatedPrompts(model, embedding, prompts, targets)
            # the explanation at the unperturbed prompt comes from explain_fn too: in the embedding space
            # Gradient x Activation is Input x Gradient, not the attribution passed in
            first = explain_fn if self.metric == "sensitivity_max" else sequence
            values = self.kernel.fn(scores, first, seed=self.seed, **self.options)
        else:
            values = self.kernel.fn(model, prompts, targets, attributions, **self.options)
        self.score_sum += values.double().sum().to(self.score_sum)
        self.total += values.numel()

    def compute(self) -> Tensor:
        """The mean score over every prompt counted."""
        return self.score_sum / self.total
