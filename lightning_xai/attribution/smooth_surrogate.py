"""Smooth surrogates: ReLU -> Softplus(beta) and MaxPool -> LogSumExp pooling(tau).

Kokhlikyan et al. (2021, "Investigating sanity checks for saliency maps with image and text classification")
explain a smoothed copy of a network: ``Softplus(z) = beta^-1 log(1 + exp(beta z))`` for ReLU and
``tau^-1 log sum exp(tau z)`` for max pooling. Both tend to the original as ``beta, tau -> inf``; their gradients
are continuous, so gradient explanations of the surrogate change smoothly with the input.

Two entry points, one table of replacements (:data:`SMOOTH_REPLACEMENTS`, module class -> factory, as zennit's
canonizers keep theirs):

* :func:`smooth_surrogate` returns a smoothed **deep copy**: an independent snapshot to analyse (explain, compare
  with the model). Training the model afterwards does not change it.
* :func:`smoothed` swaps the replacements into the model **in place** for the duration of a ``with`` block and
  puts the originals back on exit. Every forward inside the block runs the live parameters, so gradients of a
  loss computed there reach the model's own parameters: this is what a training-time penalty on the surrogate's
  gradients needs. A copy would go stale at the next optimizer step and would collect the gradients on its own
  parameters. Only parameter-free modules are swapped, so optimizers, DDP and checkpoints see no change; the
  autograd graph built inside the block stays valid after it.

Only **modules** are replaced: ``nn.ReLU`` (and subclasses), ``nn.MaxPool1d`` and ``nn.MaxPool2d``. Functional
calls in a ``forward`` (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.max_pool2d``) are not seen and stay
piecewise linear; use modules for them, or add a class to :data:`SMOOTH_REPLACEMENTS`. Other kinked modules
(``ReLU6``, ``LeakyReLU``, ``Hardtanh``, adaptive and 3-d max pooling, ...) are left in place with a warning.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from lightning_xai.errors import UnsupportedLayerError, XAIConfigurationError
from lightning_xai.functional.pooling import lse_pool1d, lse_pool2d

__all__ = [
    "SMOOTH_REPLACEMENTS",
    "LogSumExpPool1d",
    "LogSumExpPool2d",
    "SmoothOptions",
    "smooth_surrogate",
    "smoothed",
]


class _LogSumExpPoolNd(nn.Module):
    _pool: Callable[..., Tensor]

    def __init__(
        self,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] | None = None,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        ceil_mode: bool = False,
        tau: float = 10.0,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.dilation = dilation
        self.ceil_mode = ceil_mode
        self.tau = float(tau)

    @classmethod
    def from_max_pool(cls, pool: nn.modules.pooling._MaxPoolNd, tau: float) -> _LogSumExpPoolNd:
        """The LogSumExp pooling with ``pool``'s windows (kernel, stride, padding, dilation, ceil mode)."""
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode, tau)  # type: ignore[arg-type]

    def forward(self, input: Tensor) -> Tensor:
        return type(self)._pool(
            input, self.kernel_size, self.tau, self.stride, self.padding, self.dilation, self.ceil_mode
        )

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, ceil_mode={self.ceil_mode}, tau={self.tau:g}"
        )


class LogSumExpPool2d(_LogSumExpPoolNd):
    """``tau^-1 log sum exp(tau z)`` over the windows of ``nn.MaxPool2d`` with the same arguments.

    See :func:`lightning_xai.functional.lse_pool2d`.

    Example:
        >>> import torch
        >>> pool = LogSumExpPool2d.from_max_pool(nn.MaxPool2d(2), tau=100.0)
        >>> pool(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]))
        tensor([[[[3.]]]])
    """

    _pool = staticmethod(lse_pool2d)


class LogSumExpPool1d(_LogSumExpPoolNd):
    """``tau^-1 log sum exp(tau z)`` over the windows of ``nn.MaxPool1d`` with the same arguments.

    See :func:`lightning_xai.functional.lse_pool1d`.

    Example:
        >>> import torch
        >>> LogSumExpPool1d(2, tau=1.0)(torch.tensor([[[0.0, 0.0]]]))  # log 2
        tensor([[[0.6931]]])
    """

    _pool = staticmethod(lse_pool1d)


@dataclass(frozen=True)
class SmoothOptions:
    """The smoothing strengths a factory of :data:`SMOOTH_REPLACEMENTS` reads; ``None`` keeps that kind as is."""

    relu_beta: float | None = 10.0
    maxpool_tau: float | None = 10.0

    @classmethod
    def from_mapping(cls, options: Mapping[str, float | None], where: str) -> SmoothOptions:
        """Options from a callback's ``surrogate={"relu_beta": ..., "maxpool_tau": ...}``, checked.

        Example:
            >>> SmoothOptions.from_mapping({"relu_beta": 5.0}, "here")
            SmoothOptions(relu_beta=5.0, maxpool_tau=10.0)
        """
        unknown = sorted(set(options) - {"relu_beta", "maxpool_tau"})
        if unknown:
            raise XAIConfigurationError(
                f"{where}: surrogate= takes the keys 'relu_beta' and 'maxpool_tau', got {unknown}; e.g. "
                'surrogate={"relu_beta": 10.0, "maxpool_tau": 10.0}.'
            )
        result = cls(**options)  # type: ignore[arg-type]
        _check_strength(result.relu_beta, "surrogate['relu_beta']", where)
        _check_strength(result.maxpool_tau, "surrogate['maxpool_tau']", where)
        return result


def _softplus(module: nn.Module, options: SmoothOptions) -> nn.Module | None:
    return None if options.relu_beta is None else nn.Softplus(beta=options.relu_beta)


def _lse_pool(cls: type[_LogSumExpPoolNd]) -> Callable[[nn.Module, SmoothOptions], nn.Module | None]:
    def factory(module: nn.Module, options: SmoothOptions) -> nn.Module | None:
        if options.maxpool_tau is None:
            return None
        if module.return_indices:  # type: ignore[union-attr]
            raise UnsupportedLayerError(
                f"{type(module).__name__}(return_indices=True) feeds its arg-max indices to a later layer "
                "(MaxUnpool), which LogSumExp pooling has no equivalent of; pass maxpool_tau=None to keep max "
                "pooling."
            )
        return cls.from_max_pool(module, options.maxpool_tau)  # type: ignore[arg-type]

    return factory


#: module class -> factory ``(module, options) -> replacement`` (``None``: keep it). Subclasses match through
#: their MRO; add an entry to smooth another module kind.
SMOOTH_REPLACEMENTS: dict[type[nn.Module], Callable[[nn.Module, SmoothOptions], nn.Module | None]] = {
    nn.ReLU: _softplus,
    nn.MaxPool1d: _lse_pool(LogSumExpPool1d),
    nn.MaxPool2d: _lse_pool(LogSumExpPool2d),
}

#: kinked modules without a replacement: left in place with a warning naming them
_LEFT_KINKED: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

# What a replacement takes over from the module it replaces: hooks stay attached (an activation capture on a
# ReLU's path then sees the Softplus output), by sharing the dictionaries, so a handle removes them from both.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _factory(module: nn.Module) -> Callable[[nn.Module, SmoothOptions], nn.Module | None] | None:
    for cls in type(module).__mro__:
        if cls in SMOOTH_REPLACEMENTS:
            return SMOOTH_REPLACEMENTS[cls]
    return None


def _check_strength(value: float | None, name: str, where: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise XAIConfigurationError(
            f"{where}: {name} must be a finite number > 0 (larger is closer to the original) or None to keep "
            f"those modules, got {value!r}."
        )


def _plan(model: nn.Module, options: SmoothOptions, where: str) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, child name, replacement)`` for every replaceable module, one replacement per module object."""
    _check_strength(options.relu_beta, "relu_beta", where)
    _check_strength(options.maxpool_tau, "maxpool_tau", where)
    if options.relu_beta is None and options.maxpool_tau is None:
        raise XAIConfigurationError(f"{where}: relu_beta and maxpool_tau are both None, so nothing would be smoothed.")
    replacements: dict[int, nn.Module | None] = {}
    plan: list[tuple[nn.Module, str, nn.Module]] = []
    kinked: list[str] = []
    for parent_path, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is None:
                continue
            path = f"{parent_path}.{name}" if parent_path else name
            factory = _factory(child)
            if factory is None:
                if isinstance(child, _LEFT_KINKED):
                    kinked.append(f"{path} ({type(child).__name__})")
                continue
            if id(child) not in replacements:
                try:
                    replacement = factory(child, options)
                except UnsupportedLayerError as error:
                    raise UnsupportedLayerError(f"{where}: module {path!r}: {error}") from None
                if replacement is not None:
                    replacement.train(child.training)
                    for attribute in _HOOK_DICTS:
                        if hasattr(child, attribute):
                            setattr(replacement, attribute, getattr(child, attribute))
                replacements[id(child)] = replacement
            replacement = replacements[id(child)]
            if replacement is not None:
                plan.append((parent, name, replacement))
    if not plan:
        kinds = [cls.__name__ for cls in SMOOTH_REPLACEMENTS]
        raise XAIConfigurationError(
            f"{where}: {type(model).__name__} has no module to smooth (looked for {kinds} with relu_beta="
            f"{options.relu_beta}, maxpool_tau={options.maxpool_tau}). Functional calls in forward (F.relu, "
            "torch.relu, F.max_pool2d) are not replaced: use nn.ReLU / nn.MaxPool2d modules, or register the "
            "module class in lightning_xai.attribution.smooth_surrogate.SMOOTH_REPLACEMENTS."
        )
    if kinked:
        warnings.warn(
            f"{where}: these modules are not smooth and have no replacement, so they stay as they are: "
            f"{', '.join(kinked)}. Add their class to SMOOTH_REPLACEMENTS to smooth them too.",
            stacklevel=3,
        )
    return plan


def smooth_surrogate(model: nn.Module, relu_beta: float | None = 10.0, maxpool_tau: float | None = 10.0) -> nn.Module:
    """A smoothed deep copy of ``model``: every ``nn.ReLU`` -> ``nn.Softplus(relu_beta)``, every ``nn.MaxPool1d`` /
    ``nn.MaxPool2d`` -> :class:`LogSumExpPool1d` / :class:`LogSumExpPool2d` with temperature ``maxpool_tau``.

    The copy has its own parameters (``model`` is untouched and later training does not reach the copy): use it
    to analyse a trained model. To train through the surrogate (a penalty on its gradients), use
    :func:`smoothed`, which runs the model's live parameters. Replaced modules keep their forward hooks and
    training mode. Only modules are replaced, not functional calls in ``forward`` (see the module docs).

    Args:
        model: the network (any ``nn.Module``).
        relu_beta: Softplus ``beta`` (> 0); larger is closer to ReLU. ``None`` keeps the ReLUs.
        maxpool_tau: LogSumExp temperature (> 0); larger is closer to max pooling. ``None`` keeps max pooling.

    Returns:
        The smoothed copy, on the device and in the mode of ``model``.

    Raises:
        XAIConfigurationError: a strength is not a positive finite number or ``None``, both are ``None``, or the
            model has no module to replace (e.g. it calls ``F.relu`` in ``forward``).
        UnsupportedLayerError: a max pooling returns its indices (``return_indices=True``).

    Warns:
        UserWarning: the model holds other kinked modules (``LeakyReLU``, ``ReLU6``, adaptive max pooling, ...)
            that stay as they are.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        >>> surrogate = smooth_surrogate(model, relu_beta=10.0, maxpool_tau=10.0)
        >>> surrogate[1]
        Softplus(beta=10.0, threshold=20.0)
        >>> surrogate[2]
        LogSumExpPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False, tau=10)
        >>> type(model[1]).__name__, surrogate[0].weight is model[0].weight
        ('ReLU', False)
    """
    surrogate = copy.deepcopy(model)
    for parent, name, replacement in _plan(surrogate, SmoothOptions(relu_beta, maxpool_tau), "smooth_surrogate"):
        parent._modules[name] = replacement
    return surrogate


@contextlib.contextmanager
def smoothed(model: nn.Module, relu_beta: float | None = 10.0, maxpool_tau: float | None = 10.0) -> Iterator[nn.Module]:
    """Inside the block, ``model`` itself is its smooth surrogate; the original modules return on exit.

    The replacements of :func:`smooth_surrogate` are swapped into ``model`` in place. Their modules have no
    parameters, so every forward inside the block uses the live parameters of ``model`` and gradients reach them:
    a loss on the surrogate's input gradients trains the model (this is how ``ExplanationPenalty(surrogate=...)``
    and ``AttributionMetrics(surrogate=...)`` use it). The graph of a forward run inside the block stays valid
    after it: ``backward`` may run later. Not thread-safe: another thread running ``model`` meanwhile sees the
    surrogate.

    Args:
        model: the network, changed only for the duration of the block.
        relu_beta: Softplus ``beta`` (> 0); ``None`` keeps the ReLUs.
        maxpool_tau: LogSumExp temperature (> 0); ``None`` keeps max pooling.

    Yields:
        ``model`` (smoothed).

    Raises:
        XAIConfigurationError: as :func:`smooth_surrogate`.
        UnsupportedLayerError: as :func:`smooth_surrogate`.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> x = torch.tensor([[1.0, -1.0]])
        >>> with smoothed(model, relu_beta=5.0) as surrogate:
        ...     loss = surrogate(x).sum()
        ...     type(model[1]).__name__
        'Softplus'
        >>> loss.backward()  # the gradient lands on the model's own parameters
        >>> type(model[1]).__name__, model[0].weight.grad is not None
        ('ReLU', True)
    """
    plan = _plan(model, SmoothOptions(relu_beta, maxpool_tau), "smoothed")
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in plan]
    for parent, name, replacement in plan:
        parent._modules[name] = replacement
    try:
        yield model
    finally:
        for parent, name, original in reversed(originals):
            parent._modules[name] = original
