"""The rule registry of contextual decomposition: one rule per module type, function or tensor method.

A rule receives the module (for module rules), the call's arguments with :class:`Decomposition` values
where the activation depends on the masked input, and returns the decomposed output. Users add rules
for their own layers with :func:`register_cd_rule`.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_xai.errors import UnsupportedLayerError
from lightning_xai.functional.contextual_decomposition import (
    Decomposition,
    add_constant,
    decompose_affine,
    decompose_clip,
    decompose_elementwise,
    decompose_lstm_layer,
    decompose_max_pool,
    decompose_product,
    max_pool_indices,
    relevant_share,
)

Rule = Callable[..., Any]

_MODULE_RULES: dict[type[nn.Module], Rule] = {}
_CALLABLE_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


@dataclass
class TokenIds:
    """Integer token ids with a mask over token positions; an embedding lookup turns them into a decomposition."""

    ids: Tensor
    mask: Tensor


def register_cd_rule(*targets: type[nn.Module] | Callable | str) -> Callable[[Rule], Rule]:
    """Registers a contextual-decomposition rule for module types, functions or tensor method names.

    A module rule is called as ``rule(module, *args, **kwargs)``; a function or method rule as
    ``rule(*args, **kwargs)``. Arguments that depend on the masked input arrive as
    :class:`~lightning_xai.functional.contextual_decomposition.Decomposition`; the rule returns one (or a
    tuple containing them). Modules with a registered rule are not traced into.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_xai.attribution import contextual_decomposition, register_cd_rule
        >>> from lightning_xai.functional.contextual_decomposition import Decomposition
        >>> class Square(nn.Module):
        ...     def forward(self, x):
        ...         return x * x
        >>> @register_cd_rule(Square)
        ... def _square(module, x):
        ...     return Decomposition(x.relevant * x.relevant, x.total * x.total)
        >>> rel, irrel = contextual_decomposition(nn.Sequential(Square()), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
        >>> rel, irrel
        (tensor([[1., 0.]]), tensor([[0., 1.]]))
    """

    def decorator(rule: Rule) -> Rule:
        for target in targets:
            if isinstance(target, str):
                _METHOD_RULES[target] = rule
            elif isinstance(target, type) and issubclass(target, nn.Module):
                _MODULE_RULES[target] = rule
            else:
                _CALLABLE_RULES[target] = rule
        return rule

    return decorator


def find_module_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``: its own type's, or a parent class's when ``forward`` is inherited unchanged."""
    module_type = type(module)
    if module_type in _MODULE_RULES:
        return _MODULE_RULES[module_type]
    for parent in module_type.__mro__[1:]:
        if parent in _MODULE_RULES and module_type.forward is parent.forward:
            return _MODULE_RULES[parent]
    return None


def find_callable_rule(target: Any) -> Rule | None:
    try:
        return _CALLABLE_RULES.get(target)
    except TypeError:  # unhashable callables never have rules
        return None


def find_method_rule(name: str) -> Rule | None:
    return _METHOD_RULES.get(name)


def contains(value: Any, kind: type) -> bool:
    """Whether ``value`` or anything nested in its lists, tuples and dicts is a ``kind``."""
    if isinstance(value, kind):
        return True
    if isinstance(value, (list, tuple)):
        return any(contains(v, kind) for v in value)
    if isinstance(value, dict):
        return any(contains(v, kind) for v in value.values())
    return False


def has_decomposition(value: Any) -> bool:
    return contains(value, Decomposition)


def _as_decomposition(value: Any, like: Decomposition) -> Decomposition:
    # A constant joining a decomposed activation (a tensor in torch.cat) has no relevant or irrelevant
    # magnitude of its own: like a bias on a dead unit, it is split by the sample's tie share.
    if isinstance(value, Decomposition):
        return value
    total = torch.as_tensor(value, dtype=like.total.dtype, device=like.total.device)
    nothing = torch.zeros_like(total)
    return Decomposition(relevant_share(nothing, nothing) * total, total)


# --------------------------------------------------------------------------------------------- affine


@register_cd_rule(nn.Linear)
def _linear_module(module: nn.Linear, x: Decomposition) -> Decomposition:
    return decompose_affine(
        x, lambda t: F.linear(t, module.weight), module.bias, lambda t: F.linear(t, module.weight, module.bias)
    )


@register_cd_rule(F.linear)
def _linear_function(x: Decomposition, weight: Tensor, bias: Tensor | None = None) -> Decomposition:
    if isinstance(weight, Decomposition):
        raise UnsupportedLayerError("a linear layer whose weight depends on the masked input")
    return decompose_affine(x, lambda t: F.linear(t, weight), bias, lambda t: F.linear(t, weight, bias))


def _conv_bias(bias: Tensor | None, spatial_dims: int) -> Tensor | None:
    return None if bias is None else bias.view(-1, *([1] * spatial_dims))


@register_cd_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Decomposition) -> Decomposition:
    spatial_dims = len(module.kernel_size)
    return decompose_affine(
        x,
        lambda t: module._conv_forward(t, module.weight, None),
        _conv_bias(module.bias, spatial_dims),
        lambda t: module._conv_forward(t, module.weight, module.bias),
    )


def _conv_function(conv: Callable, spatial_dims: int) -> Rule:
    def rule(x: Decomposition, weight: Tensor, bias: Tensor | None = None, *args: Any, **kwargs: Any) -> Decomposition:
        return decompose_affine(
            x,
            lambda t: conv(t, weight, None, *args, **kwargs),
            _conv_bias(bias, spatial_dims),
            lambda t: conv(t, weight, bias, *args, **kwargs),
        )

    return rule


for _conv, _dims in ((F.conv1d, 1), (F.conv2d, 2), (F.conv3d, 3)):
    register_cd_rule(_conv)(_conv_function(_conv, _dims))


@register_cd_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Decomposition) -> Decomposition:
    if module.running_mean is None or module.running_var is None:
        raise UnsupportedLayerError(
            "BatchNorm without running statistics (track_running_stats=False) normalises with batch "
            "statistics even in eval mode, which is not an affine map of one sample"
        )
    shape = (1, -1) + (1,) * (x.total.dim() - 2)
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    return decompose_affine(x, lambda t: t * scale.view(shape), shift.view(shape))


@register_cd_rule(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, x: Decomposition) -> Decomposition:
    # The normalising scale is read from the total activation and treated as a constant, which makes
    # centring and scaling a linear map of each stream (as in CD for transformers, Hsu et al. 2023).
    dims = tuple(range(-len(module.normalized_shape), 0))
    inverse_std = torch.rsqrt(x.total.var(dim=dims, keepdim=True, unbiased=False) + module.eps)

    def normalise(t: Tensor) -> Tensor:
        centred = (t - t.mean(dim=dims, keepdim=True)) * inverse_std
        return centred * module.weight if module.weight is not None else centred

    return decompose_affine(x, normalise, module.bias)


# --------------------------------------------------------------------------------------- nonlinear


def _elementwise_module(fn_from_module: Callable[[nn.Module], Callable[[Tensor], Tensor]]) -> Rule:
    def rule(module: nn.Module, x: Decomposition) -> Decomposition:
        return decompose_elementwise(x, fn_from_module(module))

    return rule


#: the clipping nonlinearities, ``clamp(x, 0, upper)``, by their upper bound (see decompose_clip)
_CLIP_UPPER: dict[Any, float] = {
    nn.ReLU: math.inf,
    nn.ReLU6: 6.0,
    F.relu: math.inf,
    torch.relu: math.inf,
    "relu": math.inf,
    F.relu6: 6.0,
}


def _clip_rule(upper: float) -> Rule:
    def rule(*args: Any, **kwargs: Any) -> Decomposition:
        # a module rule gets (module, x), a function rule (x, inplace=...); never write into a stream another
        # node still reads, so `inplace` is ignored
        x = next(arg for arg in args if isinstance(arg, Decomposition))
        return decompose_clip(x, upper)

    return rule


for _clip, _upper in _CLIP_UPPER.items():
    register_cd_rule(_clip)(_clip_rule(_upper))
register_cd_rule(nn.LeakyReLU)(_elementwise_module(lambda m: lambda t: F.leaky_relu(t, m.negative_slope)))
register_cd_rule(nn.ELU)(_elementwise_module(lambda m: lambda t: F.elu(t, m.alpha)))
register_cd_rule(nn.GELU)(_elementwise_module(lambda m: lambda t: F.gelu(t, approximate=m.approximate)))
register_cd_rule(nn.Tanh)(_elementwise_module(lambda m: torch.tanh))
register_cd_rule(nn.Sigmoid)(_elementwise_module(lambda m: torch.sigmoid))
register_cd_rule(nn.SiLU)(_elementwise_module(lambda m: F.silu))
register_cd_rule(nn.Softplus)(
    _elementwise_module(lambda m: lambda t: F.softplus(t, beta=m.beta, threshold=m.threshold))
)


def _elementwise_function(fn: Callable[..., Tensor]) -> Rule:
    def rule(x: Decomposition, *args: Any, **kwargs: Any) -> Decomposition:
        kwargs.pop("inplace", None)  # never write into a stream another node still reads
        return decompose_elementwise(x, lambda t: fn(t, *args, **kwargs))

    return rule


for _fn in (
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.softplus,
    F.sigmoid,
    F.tanh,
    torch.tanh,
    torch.sigmoid,
):
    register_cd_rule(_fn)(_elementwise_function(_fn))
for _name, _fn in (("tanh", torch.tanh), ("sigmoid", torch.sigmoid)):
    register_cd_rule(_name)(_elementwise_function(_fn))


@register_cd_rule(F.log_softmax, torch.log_softmax, "log_softmax")
def _log_softmax(x: Decomposition, dim: int | None = None, *args: Any, **kwargs: Any) -> Decomposition:
    # log_softmax(z) = z - logsumexp(z): the per-sample shift is a constant and is split like a bias.
    dim = -1 if dim is None else dim
    shift = torch.logsumexp(x.total, dim=dim, keepdim=True)
    return add_constant(x, -shift)


# ---------------------------------------------------------------------------------------- pooling


def _max_pool_module(module: nn.Module, x: Decomposition) -> Any:
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[x.total.dim() - 2]

    def pool_with_indices(t: Tensor) -> tuple[Tensor, Tensor]:
        return pool(
            t,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            ceil_mode=module.ceil_mode,
            return_indices=True,
        )

    if module.return_indices:
        return decompose_max_pool(x, pool_with_indices), max_pool_indices(x, pool_with_indices)
    return decompose_max_pool(x, pool_with_indices)


register_cd_rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)(_max_pool_module)


def _max_pool_function(pool: Callable) -> Rule:
    def rule(
        x: Decomposition,
        kernel_size: Any,
        stride: Any = None,
        padding: Any = 0,
        dilation: Any = 1,
        ceil_mode: bool = False,
        return_indices: bool = False,
    ) -> Any:
        def pool_with_indices(t: Tensor) -> tuple[Tensor, Tensor]:
            return pool(t, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)

        result = decompose_max_pool(x, pool_with_indices)
        return (result, max_pool_indices(x, pool_with_indices)) if return_indices else result

    return rule


for _pool in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
    register_cd_rule(_pool)(_max_pool_function(_pool))


def _adaptive_max_module(module: nn.Module, x: Decomposition) -> Decomposition:
    pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[x.total.dim() - 2]
    return decompose_max_pool(x, lambda t: pool(t, module.output_size, return_indices=True))


register_cd_rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)(_adaptive_max_module)


def _apply_module_to_both(module: nn.Module, x: Decomposition) -> Decomposition:
    return x.map(module)


# Linear maps without offset, and layers that are the identity in eval mode.
register_cd_rule(
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)(_apply_module_to_both)


def _apply_function_to_both(fn: Callable) -> Rule:
    def rule(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, Decomposition):  # indexing a tuple of decompositions (an LSTM's outputs)
            return fn(x, *args, **kwargs)
        if has_decomposition(args) or has_decomposition(kwargs):
            raise UnsupportedLayerError(f"{getattr(fn, '__name__', fn)} with several decomposed arguments")
        relevant = fn(x.relevant, *args, **kwargs)
        total = fn(x.total, *args, **kwargs)
        if isinstance(total, (tuple, list)):  # chunk, split, unbind
            return type(total)(Decomposition(r, t) for r, t in zip(relevant, total))
        return Decomposition(relevant, total)

    return rule


for _fn in (
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    torch.mean,
    torch.sum,
    torch.chunk,
    torch.split,
    torch.unbind,
    torch.narrow,
    torch.select,
    torch.flip,
    torch.roll,
    torch.movedim,
    torch.swapaxes,
    torch.t,
    operator.getitem,
    operator.neg,
    torch.neg,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.pixel_shuffle,
    F.pixel_unshuffle,
):
    register_cd_rule(_fn)(_apply_function_to_both(_fn))

_SHAPE_METHODS = (
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "expand",
    "expand_as",
    "repeat",
    "narrow",
    "select",
    "t",
    "mean",
    "sum",
    "chunk",
    "split",
    "unbind",
    "flip",
    "roll",
    "movedim",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type",
    "type_as",
    "neg",
    "__getitem__",
)


def _method_to_both(name: str) -> Rule:
    def rule(x: Decomposition, *args: Any, **kwargs: Any) -> Any:
        return _apply_function_to_both(lambda t, *a, **k: getattr(t, name)(*a, **k))(x, *args, **kwargs)

    return rule


for _name in _SHAPE_METHODS:
    register_cd_rule(_name)(_method_to_both(_name))


@register_cd_rule(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout_function(x: Decomposition, *args: Any, **kwargs: Any) -> Decomposition:
    # The decomposition explains the deterministic (eval-mode) network.
    return x


@register_cd_rule(F.pad)
def _pad(x: Decomposition, pad: Any, mode: str = "constant", value: float | None = None) -> Decomposition:
    if mode != "constant":
        raise UnsupportedLayerError(f"F.pad with mode={mode!r} (only constant padding is decomposed)")
    fill = 0.0 if value is None else value
    return Decomposition(F.pad(x.relevant, pad, value=0.0), F.pad(x.total, pad, value=fill))


# --------------------------------------------------------------------------------------- arithmetic


def _add(left: Any, right: Any, alpha: float = 1) -> Any:
    if alpha != 1:
        right = _multiply(right, alpha)
    if isinstance(left, Decomposition) and isinstance(right, Decomposition):
        return Decomposition(left.relevant + right.relevant, left.total + right.total)
    if isinstance(left, Decomposition):
        return add_constant(left, right)
    return add_constant(right, left)


def _subtract(left: Any, right: Any, alpha: float = 1) -> Any:
    return _add(left, _multiply(right, -alpha))


def _multiply(left: Any, right: Any) -> Any:
    if isinstance(left, Decomposition) and isinstance(right, Decomposition):
        return decompose_product(left, right)
    if isinstance(left, Decomposition):
        return Decomposition(left.relevant * right, left.total * right)
    if isinstance(right, Decomposition):
        return Decomposition(left * right.relevant, left * right.total)
    return left * right


def _divide(left: Any, right: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(right, Decomposition):
        raise UnsupportedLayerError("division by an activation that depends on the masked input")
    return Decomposition(left.relevant / right, left.total / right)


def _matmul(left: Any, right: Any) -> Any:
    if isinstance(left, Decomposition) and isinstance(right, Decomposition):
        return Decomposition(left.relevant @ right.relevant, left.total @ right.total)
    if isinstance(left, Decomposition):
        return Decomposition(left.relevant @ right, left.total @ right)
    return Decomposition(left @ right.relevant, left @ right.total)


register_cd_rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__")(_add)
register_cd_rule(operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__")(_subtract)
register_cd_rule("__rsub__", torch.rsub)(lambda left, right, alpha=1: _subtract(right, left, alpha))
register_cd_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__", "__rmul__")(_multiply)
register_cd_rule(operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__")(_divide)
register_cd_rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__")(_matmul)


def _concatenate(join: Callable) -> Rule:
    def rule(tensors: Any, dim: int = 0, *args: Any, **kwargs: Any) -> Decomposition:
        like = next(t for t in tensors if isinstance(t, Decomposition))
        parts = [_as_decomposition(t, like) for t in tensors]
        return Decomposition(
            join([p.relevant for p in parts], dim, *args, **kwargs),
            join([p.total for p in parts], dim, *args, **kwargs),
        )

    return rule


register_cd_rule(torch.cat, torch.concat, torch.concatenate)(_concatenate(torch.cat))
register_cd_rule(torch.stack)(_concatenate(torch.stack))


@register_cd_rule(builtins.getattr)
def _getattr(x: Any, name: str) -> Any:
    if isinstance(x, Decomposition):
        if name in ("shape", "dtype", "device", "ndim", "is_cuda"):
            return getattr(x.total, name)
        if name == "T":
            return x.map(lambda t: t.T)
        raise UnsupportedLayerError(f"attribute {name!r} of a decomposed activation")
    return getattr(x, name)


for _name in ("size", "dim", "numel", "get_device", "new_ones", "new_zeros", "new_full", "new_empty", "new_tensor"):
    register_cd_rule(_name)(lambda x, *args, _name=_name, **kwargs: getattr(x.total, _name)(*args, **kwargs))


# ---------------------------------------------------------------------------------------- sequences


@register_cd_rule(nn.Embedding)
def _embedding_module(module: nn.Embedding, ids: Any) -> Decomposition:
    if not isinstance(ids, TokenIds):
        raise UnsupportedLayerError("an embedding lookup of ids that depend on the masked input")
    embedded = module(ids.ids)
    return Decomposition(embedded * ids.mask.unsqueeze(-1).to(embedded.dtype), embedded)


@register_cd_rule(F.embedding)
def _embedding_function(ids: Any, weight: Tensor, *args: Any, **kwargs: Any) -> Decomposition:
    if not isinstance(ids, TokenIds):
        raise UnsupportedLayerError("an embedding lookup of ids that depend on the masked input")
    embedded = F.embedding(ids.ids, weight, *args, **kwargs)
    return Decomposition(embedded * ids.mask.unsqueeze(-1).to(embedded.dtype), embedded)


@register_cd_rule(nn.LSTM)
def _lstm(
    module: nn.LSTM, x: Decomposition, state: Any = None
) -> tuple[Decomposition, tuple[Decomposition, Decomposition]]:
    if state is not None:
        raise UnsupportedLayerError("an LSTM called with an explicit initial state (h0, c0); call it without one")
    if module.proj_size:
        raise UnsupportedLayerError("an LSTM with proj_size > 0")
    if x.total.dim() != 3:
        raise UnsupportedLayerError("an LSTM over an unbatched sequence (expected a 3-D input)")
    relevant, irrelevant = x.relevant, x.irrelevant
    if not module.batch_first:
        relevant, irrelevant = relevant.transpose(0, 1), irrelevant.transpose(0, 1)
    final_h: list[tuple[Tensor, Tensor]] = []
    final_c: list[tuple[Tensor, Tensor]] = []
    directions = 2 if module.bidirectional else 1
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            bias = None
            if module.bias:
                bias = getattr(module, f"bias_ih{suffix}") + getattr(module, f"bias_hh{suffix}")
            rel_seq, irr_seq, rel_h, irr_h, rel_c, irr_c = decompose_lstm_layer(
                relevant,
                irrelevant,
                getattr(module, f"weight_ih{suffix}"),
                getattr(module, f"weight_hh{suffix}"),
                bias,
                reverse=bool(direction),
            )
            outputs.append((rel_seq, irr_seq))
            final_h.append((rel_h, irr_h))
            final_c.append((rel_c, irr_c))
        relevant = torch.cat([o[0] for o in outputs], dim=-1)
        irrelevant = torch.cat([o[1] for o in outputs], dim=-1)
    if not module.batch_first:
        relevant, irrelevant = relevant.transpose(0, 1), irrelevant.transpose(0, 1)

    def stacked(states: list[tuple[Tensor, Tensor]]) -> Decomposition:
        rel = torch.stack([s[0] for s in states])
        return Decomposition(rel, rel + torch.stack([s[1] for s in states]))

    return Decomposition(relevant, relevant + irrelevant), (stacked(final_h), stacked(final_c))
