"""A structured, score-driven pruning method in the shape Lightning's ``ModelPruning`` accepts.

``ModelPruning(pruning_fn=...)`` takes a string or a ``torch.nn.utils.prune.BasePruningMethod`` *class*, which it
runs through ``prune.global_unstructured`` on the concatenation of every pruned parameter. The class built here
ignores the weight values it is given and zeroes whole output rows (neurons) of each parameter, the lowest-scored
``amount`` of each layer's neurons, by the scores a :class:`~lightning_xai.callbacks.NeuronMonitor` measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_xai._lightning import rank_zero_warn
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.neurons import lowest_scored

ScoreOf = Callable[[nn.Module], Tensor | None]


def neuron_pruning_method(
    score_of: ScoreOf, parameters: Sequence[tuple[nn.Module, str]], where: str
) -> type[prune.BasePruningMethod]:
    """A ``BasePruningMethod`` subclass that prunes the rows of ``parameters`` with the lowest ``score_of(module)``.

    ``parameters`` must be ModelPruning's ``parameters_to_prune`` in its order: ``global_unstructured`` hands the
    method one flat vector of them all, and the layout is how the method maps neuron rows back onto it.
    """
    layout = [(module, name) for module, name in parameters]

    def _current_masks() -> list[Tensor]:
        return [
            getattr(module, f"{name}_mask", torch.ones_like(getattr(module, name))).flatten() for module, name in layout
        ]

    class NeuronPruning(prune.BasePruningMethod):
        # ModelPruning runs BasePruningMethod classes through the global *unstructured* path only; the mask this
        # method returns is structured nonetheless (whole rows).
        PRUNING_TYPE = "unstructured"

        def __init__(self, amount: float | int) -> None:
            self.amount = amount

        def compute_mask(self, t: Tensor, default_mask: Tensor) -> Tensor:
            rows = []
            for module, name in layout:
                weight = getattr(module, name)
                mask = torch.ones_like(weight)
                scores = score_of(module)
                if scores is None:
                    rank_zero_warn(
                        f"{where}: no neuron scores yet (the monitor has not measured a validation epoch); nothing "
                        "is pruned this time.",
                        category=UserWarning,
                    )
                elif scores.numel() != weight.shape[0]:
                    raise XAIConfigurationError(
                        f"{where}: {type(module).__name__}.{name} has {weight.shape[0]} output rows but the monitored "
                        f"layer {scores.numel()} neurons; prune the parameter whose rows are the layer's neurons."
                    )
                else:
                    mask[lowest_scored(scores, self.amount).to(mask.device)] = 0
                rows.append(mask.flatten())
            full = torch.cat(rows)
            # The container passes only the entries still unpruned after an earlier round (t[mask == 1]).
            remaining = torch.cat(_current_masks()).to(full.device) == 1
            if remaining.sum() != t.numel():
                raise XAIConfigurationError(
                    f"{where}: ModelPruning pruned {t.numel()} values, but the parameters the method was built for "
                    f"have {int(remaining.sum())} unpruned ones; pass the same parameters_to_prune to both."
                )
            return full[remaining].to(default_mask) * default_mask

    NeuronPruning.__name__ = NeuronPruning.__qualname__ = "NeuronPruning"
    return NeuronPruning
