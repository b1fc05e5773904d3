"""Sanity-check kernels (Adebayo et al., NeurIPS 2018): attributions must change when the model does.

* :func:`rank_correlation`: per-sample Spearman correlation of two attributions' magnitudes;
* :func:`randomize_top_layers`: a copy of a model whose top layers are re-initialised under a fixed seed.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lightning_xai.errors import XAIConfigurationError

__all__ = ["average_ranks", "parameterised_layers", "randomize_top_layers", "rank_correlation"]


def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks along the last dimension, tied values sharing their average rank (as ``scipy.stats.rankdata``).

    Examples:
        >>> average_ranks(torch.tensor([[10.0, 30.0, 20.0, 20.0]]))
        tensor([[1.0000, 4.0000, 2.5000, 2.5000]])
    """
    ordered = torch.sort(values, dim=-1).values.contiguous()
    values = values.contiguous()
    below = torch.searchsorted(ordered, values, side="left")
    up_to = torch.searchsorted(ordered, values, side="right")
    dtype = values.dtype if values.is_floating_point() else torch.float32
    return (below + up_to + 1).to(dtype) / 2


def rank_correlation(a: Tensor, b: Tensor, absolute: bool = True) -> Tensor:
    """Per-sample Spearman rank correlation of two attributions (of ``|a|`` and ``|b|`` by default).

    Features are the elements of one sample; ties get average ranks, so this equals
    ``scipy.stats.spearmanr(|a_i|, |b_i|)`` for every sample, NaN included for a constant sample.

    Args:
        a: ``(N, ...)`` attributions.
        b: ``(N, ...)`` attributions of the same shape.
        absolute: correlate magnitudes (the usual choice for randomization checks); False keeps signs.

    Returns:
        ``(N,)`` correlations in [-1, 1] (NaN where a sample's attribution is constant).

    Examples:
        >>> rank_correlation(torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[0.1, 0.2, 0.3]]))
        tensor([1.])
        >>> rank_correlation(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]))
        tensor([-1.])
    """
    if a.shape != b.shape:
        raise XAIConfigurationError(
            f"rank_correlation needs attributions of one shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    a, b = a.detach().flatten(1), b.detach().flatten(1)
    if absolute:
        a, b = a.abs(), b.abs()
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    ra, rb = average_ranks(a).to(dtype), average_ranks(b).to(dtype)
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / ((ra * ra).sum(1) * (rb * rb).sum(1)).sqrt()


def parameterised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules that own parameters, in registration order (input side first, output side last).

    Examples:
        >>> [name for name, _ in parameterised_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))]
        ['0', '2']
    """
    return [
        (name, module)
        for name, module in model.named_modules()
        if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None
    ]


def randomize_top_layers(model: nn.Module, num_layers: int, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with its top ``num_layers`` parameterised layers re-initialised.

    Layers are the leaf modules that own parameters, in module registration order; the top ones are the last
    registered (counted from the output). They are reset with their own ``reset_parameters()``, from the output
    down, under ``torch.manual_seed(seed)`` in a forked RNG (the caller's random state is untouched). Resetting
    from the output down makes the randomizations nested: the top layer gets the same weights for every
    ``num_layers``, as in the cascading test of Adebayo et al.

    Args:
        model: the trained model (left unchanged).
        num_layers: how many layers to re-initialise, from 0 (an identical copy) to all of them.
        seed: seed of the re-initialisation.

    Returns:
        The randomized copy, in the same training/eval mode and on the same device as ``model``.

    Raises:
        XAIConfigurationError: if ``num_layers`` is out of range or a layer to reset has no ``reset_parameters``.

    Examples:
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> copy = randomize_top_layers(model, 1)
        >>> torch.equal(copy[0].weight, model[0].weight), torch.equal(copy[2].weight, model[2].weight)
        (True, False)
    """
    layers = parameterised_layers(model)
    if not 0 <= int(num_layers) <= len(layers):
        raise XAIConfigurationError(
            f"num_layers={num_layers} is out of range: {type(model).__name__} has {len(layers)} parameterised "
            f"layers ({[name for name, _ in layers]}); pass 0..{len(layers)}."
        )
    chosen = layers[len(layers) - int(num_layers) :][::-1]
    for name, module in chosen:
        if not callable(getattr(module, "reset_parameters", None)):
            raise XAIConfigurationError(
                f"layer {name!r} ({type(module).__name__}) has parameters but no reset_parameters(); give it one, "
                "or randomize fewer layers."
            )
    randomized = copy.deepcopy(model)
    modules = dict(randomized.named_modules())
    devices = sorted({p.device.index or 0 for p in randomized.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for name, _ in chosen:
            modules[name].reset_parameters()
    return randomized
