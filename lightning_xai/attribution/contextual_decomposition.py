"""Contextual decomposition (CD) of a model's output into the contribution of a masked input part and the rest.

The model is traced with ``torch.fx`` so that functional calls, residual additions and concatenations in
``forward`` are seen, then interpreted node by node with the rules of
:mod:`lightning_xai.attribution._cd_rules`. Each decomposed activation is carried as two streams (the
relevant part and the ordinary activation), so the cost is about two forward passes and the result is
differentiable with respect to the parameters, as CDEP needs inside the training loss.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_xai._contract import eval_mode
from lightning_xai.attribution._cd_rules import (
    TokenIds,
    contains,
    find_callable_rule,
    find_method_rule,
    find_module_rule,
    has_decomposition,
)
from lightning_xai.errors import MaskShapeError, UnsupportedLayerError, XAIError
from lightning_xai.functional._masks import broadcast_mask, check_mask_values
from lightning_xai.functional.contextual_decomposition import CD_KERNELS, Decomposition, tie_share
from lightning_xai.functional.robustness import MemoryFormat, resolve_memory_format

_MAX_EXTRA_ARGS = 4


def _trace_failure(model: nn.Module, error: Exception) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    message = (
        f"contextual_decomposition could not trace {type(model).__name__}.forward with torch.fx: "
        f"{type(error).__name__}: {first}. "
    )
    if "control flow" in str(error) or "iterated" in str(error):
        message += (
            "The forward branches or loops on a tensor's value, which fx cannot trace (it traces with placeholder "
            "values). "
        )
    else:
        message += (
            "fx traces forward with placeholder values: code that needs real values there (a Python number from "
            "a tensor, a non-torch function called on one, a shape used as a Python int) fails. "
        )
    return message + (
        "Move that code into a submodule and register a rule for the submodule with "
        "lightning_xai.attribution.register_cd_rule (modules with a rule are not traced into)."
    )


def _uncompiled_forward(module: nn.Module) -> Callable[..., Any]:
    """The module's own Python ``forward``, past ``torch.compile`` wrappers (CD interprets the plain graph)."""
    context = getattr(module, "_compiler_ctx", None)  # Lightning's Trainer.fit(torch.compile(model))
    if context and "original_forward" in context:
        return context["original_forward"]
    original = getattr(module, "_orig_mod", None)  # a torch.compile'd submodule (OptimizedModule)
    if isinstance(original, nn.Module):
        return original.forward
    return module.forward


class _CDTracer(fx.Tracer):
    """Stops at modules that have a rule (an LSTM, a BatchNorm) and traces into everything else."""

    # buffers become graph values too: `self.idx.expand(x.size(0), -1)` mixes a buffer with traced sizes
    proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if find_module_rule(module) is not None:
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # Trace into a module's own forward, not its __call__: forward hooks (a user's, a concept head's) would
        # receive Proxies, and a compiled call (model.compile(), torch.compile) cannot be traced.
        return super().call_module(m, _uncompiled_forward(m), args, kwargs)


class _ForwardAdapter(nn.Module):
    """Gives fx a fixed-arity ``forward`` around any callable (``model`` or ``module.xai_forward``)."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any] | None, num_extra: int) -> None:
        super().__init__()
        self.model = model
        self._forward_name = None if forward is None else forward.__name__
        self.num_extra = num_extra

    def forward(self, inputs: Any, a0: Any = None, a1: Any = None, a2: Any = None, a3: Any = None) -> Any:
        extra = (a0, a1, a2, a3)[: self.num_extra]
        target = self.model if self._forward_name is None else getattr(self.model, self._forward_name)
        return target(inputs, *extra)


_TRACE_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple, fx.GraphModule]] = weakref.WeakKeyDictionary()


def _traced(model: nn.Module, forward: Callable[..., Any] | None, num_extra: int) -> fx.GraphModule:
    key = (None if forward is None else forward.__name__, num_extra)
    per_model = _TRACE_CACHE.setdefault(model, {})
    if key not in per_model:
        adapter = _ForwardAdapter(model, forward, num_extra)
        try:
            graph = _CDTracer().trace(adapter)
        except Exception as error:  # fx raises many kinds of errors on what it cannot trace
            raise UnsupportedLayerError(_trace_failure(model, error)) from error
        graph_module = fx.GraphModule(adapter, graph)
        # values the output does not need (a dict entry beside the logits, a detached copy) have no rule to meet
        graph_module.graph.eliminate_dead_code(is_impure_node=_mutates)
        graph_module.recompile()
        per_model[key] = graph_module
    return per_model[key]


def _mutates(node: fx.Node) -> bool:
    # in-place tensor methods (x.add_(y)) change a value without using their result: never drop them
    return node.is_impure() or (node.op == "call_method" and str(node.target).endswith("_"))


def returns_single_tensor(model: nn.Module) -> bool:
    """Whether ``model``'s forward returns one value rather than a dict or a tuple (per its fx trace).

    The decomposition of ``xai_forward`` can then stand in for the module's own forward. ``False`` when the
    forward cannot be traced.
    """
    try:
        graph_module = _traced(model, None, 0)
    except UnsupportedLayerError:
        return False
    output = next(node for node in graph_module.graph.nodes if node.op == "output")
    return isinstance(output.args[0], fx.Node)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack)[-1] if stack else ""
    return path.removeprefix("model.").removeprefix("model") or "<root>"


class _CDInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        # our errors name the node and the module path; fx's own appendix points at its internal log tooling
        self.extra_traceback = False

    def run_node(self, node: fx.Node) -> Any:
        try:
            return self._run_node(node)
        except XAIError:
            raise
        except Exception as error:  # a rule or an op meeting a value the trace did not foresee
            raise UnsupportedLayerError(_failure(node, error)) from error

    def _run_node(self, node: fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr", "output"):
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if not (has_decomposition(args) or has_decomposition(kwargs) or _has_token_ids(args)):
            return super().run_node(node)
        if node.op == "call_module":
            module = self.fetch_attr(node.target)
            rule = find_module_rule(module)
            what = f"module {type(module).__name__}"
            where = str(node.target).removeprefix("model.")
            if rule is not None:
                return self._apply(rule, (module, *args), kwargs, what, where)
        elif node.op == "call_method":
            rule = find_method_rule(node.target)
            what, where = f"tensor method .{node.target}()", _module_path(node)
        else:
            rule = find_callable_rule(node.target)
            what = f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
            where = _module_path(node)
        if rule is None:
            if _has_token_ids(args) and not has_decomposition(args):
                # Token ids used for something other than an embedding (a padding mask): plain values.
                args = _unwrap_token_ids(args)
                kwargs = _unwrap_token_ids(kwargs)
                return getattr(self, node.op)(node.target, args, kwargs)
            raise UnsupportedLayerError(
                f"contextual decomposition has no rule for {what} at '{where}' (fx node '{node.name}'). "
                "Register one with lightning_xai.attribution.register_cd_rule, or replace the layer with "
                "a supported one (see the list in the contextual_decomposition docs)."
            )
        return self._apply(rule, args, kwargs, what, _module_path(node))

    @staticmethod
    def _apply(rule: Callable, args: tuple, kwargs: dict, what: str, where: str) -> Any:
        try:
            return rule(*args, **kwargs)
        except UnsupportedLayerError as error:
            if " at '" in str(error):
                raise
            raise UnsupportedLayerError(
                f"contextual decomposition does not support {error} ({what} at '{where}')."
            ) from None


def _failure(node: fx.Node, error: Exception) -> str:
    """Why interpreting ``node`` failed, in terms of the user's forward rather than fx internals."""
    args, _ = node.args, node.kwargs
    message = (
        f"contextual decomposition failed at '{_module_path(node)}' (fx node '{node.name}', {node.op} "
        f"{getattr(node.target, '__name__', node.target)}): {type(error).__name__}: {str(error).splitlines()[0]}. "
        "The decomposition runs the graph torch.fx recorded while tracing forward with placeholder values, so a "
        "Python branch on a value or a type (if x.sum() > 0, isinstance(output, tuple)) stays as tracing saw it. "
    )
    if any(isinstance(arg, fx.Node) and arg.op == "call_module" for arg in args):
        message += (
            "Here an output of a module with a rule is used as it came out of tracing; a module such as nn.LSTM "
            "returns a tuple, so unpack it unconditionally (out, state = self.lstm(x)) instead of testing its type. "
        )
    return message + (
        "Otherwise move the code into a submodule and register a rule for it with "
        "lightning_xai.attribution.register_cd_rule."
    )


def _has_token_ids(value: Any) -> bool:
    return contains(value, TokenIds)


def _unwrap_token_ids(value: Any) -> Any:
    if isinstance(value, TokenIds):
        return value.ids
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap_token_ids(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap_token_ids(v) for k, v in value.items()}
    return value


def contextual_decomposition(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    additional_forward_args: tuple[Any, ...] = (),
    forward: Callable[..., Any] | None = None,
    memory_format: MemoryFormat = "auto",
) -> tuple[Tensor, Tensor]:
    """Splits the model's output into the contribution of the masked input part and of everything else.

    ``relevant + irrelevant`` equals the output of the model in eval mode. The model's train/eval state is
    restored afterwards, and the result is differentiable with respect to the parameters.

    Args:
        model: the network. Traced once with ``torch.fx`` (the trace is cached per model and forward).
        inputs: a float tensor, or integer token ids of shape ``(N, T)`` whose embedding lookup is split by
            a mask over token positions.
        mask: 1 (or any weight in ``[0, 1]``) on the features whose contribution is wanted; see
            :func:`broadcast_mask` for the accepted shapes. For token ids: ``(N, T)``, or per-sample token spans
            ``[[(start, end), ...] or None, ...]`` as the callback takes them.
        additional_forward_args: further positional arguments of ``forward`` (lengths, attention masks);
            at most four. They are treated as constants.
        forward: a method of ``model`` to decompose instead of ``model.forward`` (``model.xai_forward``).
        memory_format: the layout the two streams run in. ``"auto"`` (the default) decomposes 4-D floating inputs
            on CPU channels last, where oneDNN's convolutions and ATen's max pooling skip their reorders (CDEP on
            the demo CNN: 1.3x faster per step, see docs: "Speed"), and anything else as it comes; a model that
            fails in channels last (a ``.view`` of its activations) is decomposed contiguously from then on.
            ``"contiguous"`` keeps the input's layout, whose numbers the channels-last ones match to float32
            rounding; ``"channels_last"`` forces it.

    Returns:
        ``(relevant, irrelevant)``, each shaped like the model's output.

    Raises:
        UnsupportedLayerError: the model uses a layer or operation without a rule; the message names the
            module path and the operation.
        MaskShapeError: the mask does not fit the inputs.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 10))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> mask = torch.zeros(2, 8, 8); mask[:, :4] = 1
        >>> relevant, irrelevant = contextual_decomposition(model, x, mask)
        >>> torch.allclose(relevant + irrelevant, model(x), atol=1e-5)
        True
    """
    output = decompose(model, inputs, mask, additional_forward_args, forward, memory_format)
    return output.relevant, output.irrelevant


def decompose(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    additional_forward_args: tuple[Any, ...] = (),
    forward: Callable[..., Any] | None = None,
    memory_format: MemoryFormat = "auto",
) -> Decomposition:
    """Like :func:`contextual_decomposition`, but returns the two streams: the relevant part and the output.

    The ``total`` stream is the model's (eval-mode) output itself, so it can stand in for the forward
    pass: CDEP uses it as the step's logits when the network behaves the same in train and eval mode.
    """
    layout = resolve_memory_format(memory_format, inputs, "decompose")
    if memory_format == "auto" and model in _CONTIGUOUS_ONLY:
        layout = torch.contiguous_format
    if layout is torch.channels_last:
        try:
            return _decompose(model, inputs.contiguous(memory_format=layout), mask, additional_forward_args, forward)
        except RuntimeError:
            if memory_format != "auto":
                raise
            _CONTIGUOUS_ONLY[model] = True  # a model that views its activations: not again
    return _decompose(model, inputs, mask, additional_forward_args, forward)


#: models that failed to decompose channels last under ``memory_format="auto"``
_CONTIGUOUS_ONLY: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _decompose(
    model: nn.Module,
    inputs: Tensor,
    mask: Tensor,
    additional_forward_args: tuple[Any, ...],
    forward: Callable[..., Any] | None,
) -> Decomposition:
    if len(additional_forward_args) > _MAX_EXTRA_ARGS:
        raise ValueError(
            f"contextual_decomposition takes at most {_MAX_EXTRA_ARGS} additional_forward_args, "
            f"got {len(additional_forward_args)}; bundle them into one object or wrap the model."
        )
    if forward is not None and getattr(forward, "__self__", model) is not model:
        raise ValueError("`forward` must be a method of `model` (e.g. model.xai_forward).")
    if inputs.is_floating_point():
        mask = broadcast_mask(mask, inputs).to(inputs.dtype)
        start: Any = Decomposition(inputs * mask, inputs)
        per_sample_dims = tuple(range(1, inputs.dim()))
        masked_mass = start.relevant.detach().abs().sum(per_sample_dims)
        input_share = masked_mass / inputs.detach().abs().sum(per_sample_dims).clamp_min(1e-12)
    else:
        if isinstance(mask, (list, tuple)) and not isinstance(mask, Tensor):  # token spans, as the callback takes
            from lightning_xai.masks import masks_from_annotations

            mask = masks_from_annotations(list(mask), inputs)[0]
        mask = check_mask_values(torch.as_tensor(mask, device=inputs.device))
        if mask.dim() == 1 and inputs.dim() == 2 and mask.shape[0] == inputs.shape[1]:
            mask = mask.expand_as(inputs)
        if mask.shape != inputs.shape:
            raise MaskShapeError(
                "give token spans [[(start, end), ...] or None per sample] (lightning_xai.masks.spans_to_mask) or "
                f"a mask over token positions of the token ids' shape {tuple(inputs.shape)}, "
                f"got {tuple(mask.shape)}."
            )
        start = TokenIds(inputs, mask.float())
        input_share = start.mask.mean(dim=tuple(range(1, mask.dim()))) if mask.dim() > 1 else start.mask
    graph_module = _traced(model, forward, len(additional_forward_args))
    padded = tuple(additional_forward_args) + (None,) * (_MAX_EXTRA_ARGS - len(additional_forward_args))
    # a constant added where both parts are zero goes to the irrelevant part unless the whole sample is
    # masked; splitting it by the masked share trained ColorDigits' CDEP worse (validation 17.7 vs 27.4 %)
    with eval_mode(model), tie_share((input_share >= 1.0).to(input_share.dtype)):
        output = _CDInterpreter(graph_module).run(start, *padded)
    if not isinstance(output, Decomposition):
        raise UnsupportedLayerError(
            f"contextual decomposition needs a single tensor output that depends on the input; "
            f"{type(model).__name__} returned {type(output).__name__}. Make `forward` (or xai_forward) "
            "return the logits."
        )
    return output


def set_cd_kernel(mode: str) -> None:
    """Chooses how contextual decomposition splits biases: ``"auto"`` (the default), ``"compiled"`` or ``"eager"``.

    The bias split (each bias shared by the relevant and irrelevant parts in proportion to their magnitudes) is a
    chain of elementwise operations on every biased layer's activation. ``"compiled"`` fuses it with
    ``torch.compile`` into one kernel forward and one backward (seconds to compile once per process, then
    inductor's disk cache), which brings CDEP to about its two-stream floor; ``"eager"`` runs it as a
    hand-written autograd function (same values, more memory traffic); ``"auto"`` compiles for activations of at
    least 65,536 elements and falls back to eager, with one warning, where compiling fails (no C++ compiler).
    The environment variable ``LIGHTNING_XAI_CD_KERNEL`` sets the starting mode.

    Examples:
        >>> set_cd_kernel("eager")
        >>> set_cd_kernel("auto")
        >>> set_cd_kernel("fast")
        Traceback (most recent call last):
        ...
        ValueError: the CD kernel mode must be one of ('auto', 'compiled', 'eager'), got 'fast'.
    """
    CD_KERNELS.set_mode(mode)
