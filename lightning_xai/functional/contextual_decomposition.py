"""Contextual decomposition kernels: how one operation splits its output into relevant and irrelevant parts.

A decomposition is carried as two streams, ``relevant`` and ``total`` (the ordinary activation); the
irrelevant part is ``total - relevant``. Carrying the total instead of the irrelevant part makes
additivity exact by construction and makes the *relevant-first* rule for elementwise nonlinearities
one call per stream: ``relevant' = f(relevant)`` and ``total' = f(total)``, so
``irrelevant' = f(relevant + irrelevant) - f(relevant)`` as in CD (Murdoch et al. 2018) and CDEP
(Rieger et al. 2020).

Constants (biases, the offset ``f(0)`` of a nonlinearity) are split between the two parts in proportion
to ``|relevant|`` and ``|irrelevant|`` of the activation they are added to. Where both parts are exactly
zero (a dead ReLU patch) that proportion is undefined; the constant then goes to the irrelevant part, unless
the whole sample is masked (see :func:`tie_share`): a zero mask keeps the relevant part exactly zero and a full
mask keeps the irrelevant part exactly zero.

Everything here is pure torch, batched and differentiable with respect to the parameters.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F


@dataclass
class Decomposition:
    """The relevant part of an activation and the activation itself.

    Args:
        relevant: contribution of the masked input features.
        total: the activation of the ordinary forward pass (``relevant + irrelevant``).
        order: what a max pooling right after this activation ranks positions by, when ``total`` has ties that a
            clipping nonlinearity made (the pre-activation of a ReLU, whose zeros all tie); ``None``: ``total``.
    """

    relevant: Tensor
    total: Tensor
    order: Tensor | None = None

    @property
    def irrelevant(self) -> Tensor:
        """The contribution of everything else: the unmasked features and the biases they own."""
        return self.total - self.relevant

    def map(self, fn: Callable[[Tensor], Tensor]) -> Decomposition:
        """Applies an operation that is linear without offset (reshape, pooling, indexing) to both streams."""
        return Decomposition(fn(self.relevant), fn(self.total))


_TIE_SHARE: ContextVar[Tensor | None] = ContextVar("cd_tie_share", default=None)


@contextmanager
def tie_share(share: Tensor) -> Iterator[None]:
    """Sets, per sample, the share of a constant that the relevant part gets where both parts are zero.

    :func:`~lightning_xai.attribution.contextual_decomposition` sets it to 1 for a sample whose whole input is
    masked and to 0 otherwise. Applied to activations whose first dimension is the batch.
    """
    token = _TIE_SHARE.set(share)
    try:
        yield
    finally:
        _TIE_SHARE.reset(token)


def relevant_share(relevant: Tensor, irrelevant: Tensor) -> Tensor:
    """Fraction ``|relevant| / (|relevant| + |irrelevant|)`` that decides who owns an added constant.

    Where both parts are zero the share is the sample's :func:`tie_share` (0 outside of one).

    Examples:
        >>> relevant_share(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 2.0, 0.0]))
        tensor([0.2500, 0.0000, 0.0000])
        >>> with tie_share(torch.tensor([0.5])):
        ...     relevant_share(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([[0.5000, 0.5000]])
    """
    magnitude = relevant.abs()
    denominator = magnitude + irrelevant.abs()
    if denominator.dtype == torch.float16:  # 1e-12 underflows in half precision
        magnitude, denominator = magnitude.float(), denominator.float()
    share = magnitude / denominator.clamp_min(1e-12)
    tie = _TIE_SHARE.get()
    if tie is not None and share.dim() >= 1 and share.shape[0] == tie.shape[0]:
        tie = tie.to(share.dtype).view(-1, *([1] * (share.dim() - 1)))
        share = torch.where(denominator > 0, share, tie)
    return share.to(relevant.dtype)


def _tie_for(like: Tensor) -> Tensor | None:
    """The current :func:`tie_share`, shaped to broadcast against ``like``; ``None`` when it is zero for all."""
    tie = _TIE_SHARE.get()
    if tie is None or like.dim() < 1 or like.shape[0] != tie.shape[0] or not bool(tie.any()):
        return None
    return tie.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _split_forward(relevant: Tensor, total: Tensor, constant: Tensor, tie: Tensor) -> Tensor:
    # streams (N, C, L), constant (1, C, 1), tie (N, 1, 1): one layout for every layer, so one compiled kernel.
    # `total` already includes the constant (the layer added its bias itself), so irrelevant = total - c - relevant
    magnitude = relevant.abs()
    denominator = (total - constant - relevant).abs() + magnitude
    share = torch.where(denominator > 0, magnitude / denominator.clamp_min(1e-12), tie)
    return relevant + share * constant


def _split_backward(
    relevant: Tensor, total: Tensor, constant: Tensor, tie: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    # with D = |r| + |i| and s = |r| / D: ds/dr = (sgn(r) |i| + sgn(i) |r|) / D^2, ds/dt = -sgn(i) |r| / D^2 and
    # ds/dc = -ds/dt; where D = 0 both signs are 0, so the gradient through the share vanishes like torch.where's
    irrelevant = total - constant - relevant
    magnitude = relevant.abs()
    denominator = irrelevant.abs() + magnitude
    clamped = denominator.clamp_min(1e-12)
    share = magnitude / clamped
    scaled = grad * constant / clamped
    grad_total = -scaled * share * torch.sign(irrelevant)
    grad_relevant = grad + scaled * torch.sign(relevant) * (1 - share) - grad_total
    grad_constant = (grad * torch.where(denominator > 0, share, tie) - grad_total).sum((0, 2), keepdim=True)
    return grad_relevant, grad_total, grad_constant


def _clamp(x: Tensor, upper: float) -> Tensor:
    return x.clamp_min(0) if math.isinf(upper) else x.clamp(0, upper)


def _passes(x: Tensor, upper: float) -> Tensor:
    """Where ``clamp(x, 0, upper)`` passes its gradient (strictly inside the interval, as autograd's ReLU)."""
    inside = x > 0
    return inside if math.isinf(upper) else inside & (x < upper)


def _clip_forward(x: Tensor, upper: float) -> tuple[Tensor, Tensor]:
    return _clamp(x, upper), _passes(x, upper)


def _gate_activations(pre_activations: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """The sigmoid of the i, f and o gates and the tanh of the candidate g in one call: ``tanh(z) = 2 sigmoid(2 z) -
    1``, with ``scale`` 2 and ``shift`` -1 on g's columns and 1 and 0 elsewhere."""
    return torch.addcmul(shift, torch.sigmoid(pre_activations * scale), scale)


def _lstm_step(
    projected: Tensor,
    hidden_state: Tensor,
    rel_c: Tensor,
    irr_c: Tensor,
    weight_hh: Tensor,
    bias: Tensor,
    bias_activation: Tensor,
    scale: Tensor,
    shift: Tensor,
    share: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One time step of Murdoch's LSTM decomposition: the streams' hidden states ``(2, N, H)`` and cell parts.

    The first step gets zero cell parts (adding their zero products changes no value), so that one compiled graph
    serves every step."""
    bias_i, bias_f, bias_g, _ = bias_activation.chunk(4)
    bias_product = bias_i * bias_g  # the same at every step and for every sample
    gates = projected + F.linear(hidden_state, weight_hh)  # (2, N, 4H)
    rel, irr = gates[0], gates[1]
    # fn(a + c), fn(b + c), fn(a + b + c) for a = relevant, b = irrelevant, c = bias (fn(c) is bias_activation)
    evaluated = _gate_activations(torch.stack([rel, irr, rel + irr]) + bias, scale, shift)
    with_rel, with_irr, with_all = evaluated.unbind(0)
    # Shapley values; grouped so that a zero relevant input gives an exactly zero relevant part
    rel_part = 0.5 * ((with_rel - bias_activation) + (with_all - with_irr))
    irr_part = 0.5 * ((with_irr - bias_activation) + (with_all - with_rel))
    i_rel, f_rel, g_rel, _ = rel_part.chunk(4, dim=1)
    i_irr, f_irr, g_irr, _ = irr_part.chunk(4, dim=1)
    _, f_all, g_all, output_gate = with_all.chunk(4, dim=1)
    new_rel_c = i_rel * (g_rel + bias_g) + bias_i * g_rel + share * bias_product + (f_rel + bias_f) * rel_c
    new_irr_c = i_irr * g_all + (i_rel + bias_i) * g_irr + (1 - share) * bias_product + f_all * irr_c + f_irr * rel_c
    tanh_rel, tanh_irr, tanh_all = torch.tanh(torch.stack([new_rel_c, new_irr_c, new_rel_c + new_irr_c])).unbind(0)
    split = torch.stack([tanh_rel + (tanh_all - tanh_irr), tanh_irr + (tanh_all - tanh_rel)])
    return output_gate * split * 0.5, new_rel_c, new_irr_c


#: the decomposition's kernels, by name: what torch.compile fuses (an LSTM step's thirty operations into one kernel
#: forward and one backward, 1.6x faster at SST's size). The clips stay eager: their two passes take about 3 ms at
#: 4 M elements, inductor's CPU kernel writing the byte mask took 38 ms.
EAGER_KERNELS: dict[str, Callable[..., Any]] = {
    "split_forward": _split_forward,
    "split_backward": _split_backward,
    "lstm_step": _lstm_step,
}


class _FusedKernels:
    """The decomposition's kernels (:data:`EAGER_KERNELS`), eager or fused by ``torch.compile`` into one pass each
    forward and backward.

    The bias split is about eight elementwise operations on a full-size activation, forward and again backward;
    in eager mode each allocates a temporary, and on CPU those temporaries (over the allocator's threshold) are
    returned to the system and faulted back in every step, which made CDEP's cost grow faster than the batch.
    One fused kernel reads the two streams and writes one result. Compiling takes seconds once per process
    (then inductor's disk cache), so ``"auto"`` compiles only for work of at least ``min_numel`` elements.
    """

    modes = ("auto", "compiled", "eager")

    def __init__(self, mode: str = "auto", min_numel: int = 1 << 16) -> None:
        self.mode = "auto"
        self.set_mode(mode)
        self.min_numel = min_numel
        self._compiled: dict[str, Callable[..., Any]] = {}
        self._failed = False

    def set_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"the CD kernel mode must be one of {self.modes}, got {mode!r}.")
        self.mode = mode

    def for_work(self, name: str, numel: int) -> Callable[..., Any]:
        """The kernel ``name`` for a call that processes ``numel`` elements (over all its calls, for a kernel run
        once per time step): compiled or eager."""
        wanted = self.mode == "compiled" or (self.mode == "auto" and numel >= self.min_numel)
        if wanted and not self._failed and not torch.compiler.is_compiling():
            if name not in self._compiled:
                self._compiled[name] = torch.compile(EAGER_KERNELS[name], dynamic=True, fullgraph=True)
            return self._compiled[name]
        return EAGER_KERNELS[name]

    def fall_back(self, error: Exception) -> None:
        self._failed = True
        warnings.warn(
            f"contextual decomposition could not compile its fused elementwise kernels ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); it runs the eager kernels instead (same values, "
            "slower). A C++ compiler (or Triton on CUDA) is what torch.compile needs; "
            "lightning_xai.attribution.set_cd_kernel('eager') silences this.",
            RuntimeWarning,
            stacklevel=2,
        )


CD_KERNELS = _FusedKernels(os.environ.get("LIGHTNING_XAI_CD_KERNEL", "auto"))


def _run_kernel(name: str, numel: int, *args: Any) -> Any:
    kernel = CD_KERNELS.for_work(name, numel)
    if kernel is EAGER_KERNELS[name]:
        return kernel(*args)
    try:
        return kernel(*args)
    except Exception as error:  # inductor failing to build (no compiler) must not stop training
        CD_KERNELS.fall_back(error)
        return EAGER_KERNELS[name](*args)


class _SplitConstant(torch.autograd.Function):
    """``relevant + share(relevant, total - constant - relevant) * constant`` for a per-channel constant (a bias)
    already added to ``total``.

    The streams arrive as ``(N, C, L)`` and the constant as ``(1, C, 1)``, so that one compiled kernel serves every
    layer. Saves only the two streams it was given (autograd would save about eight temporaries per layer).
    """

    @staticmethod
    def forward(ctx: Any, relevant: Tensor, total: Tensor, constant: Tensor, tie: Tensor) -> Tensor:
        ctx.save_for_backward(relevant, total, constant, tie)
        return _run_kernel("split_forward", relevant.numel(), relevant, total, constant, tie)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        relevant, total, constant, tie = ctx.saved_tensors
        grad_relevant, grad_total, grad_constant = _run_kernel(
            "split_backward", relevant.numel(), relevant, total, constant, tie, _laid_out_like(grad, relevant)
        )
        return grad_relevant, grad_total, grad_constant, None


def _laid_out_like(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` with the strides of ``like`` (the streams of a channels-last activation): elementwise kernels on
    operands of one layout run at memory speed, on mixed layouts strided."""
    if tensor.stride() == like.stride():
        return tensor
    return torch.empty_like(like).copy_(tensor)


def _channel_layout(constant: Tensor, like: Tensor) -> int | None:
    """The number of channels when ``constant`` is a per-channel bias of ``like`` (``(C,)`` or ``(C, 1, ..)``)."""
    if like.dim() < 2 or constant.dim() > like.dim() - 1 or constant.dim() == 0:
        return None
    if constant.dim() == like.dim() - 1 and constant.shape[1:].numel() == 1 and constant.shape[0] == like.shape[1]:
        return constant.shape[0]
    if constant.dim() == 1 and like.dim() == 2 and constant.shape[0] == like.shape[1]:
        return constant.shape[0]
    return None


def add_constant(value: Decomposition, constant: Tensor | float) -> Decomposition:
    """Adds a constant (a bias) and splits it in proportion to the magnitudes of the two parts.

    Examples:
        >>> d = add_constant(Decomposition(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0])), 4.0)
        >>> d.relevant, d.total
        (tensor([3., 0.]), tensor([6., 5.]))
    """
    return _split_added_constant(value.relevant, value.total + constant, constant)


def _split_added_constant(relevant: Tensor, total: Tensor, constant: Tensor | float) -> Decomposition:
    """The decomposition after a constant was added: ``total`` includes it, ``relevant`` does not yet."""
    channels = _channel_layout(constant, relevant) if isinstance(constant, Tensor) else None
    # half precision keeps the widened generic path: 1e-12 underflows in float16
    if channels is None or relevant.dtype == torch.float16 or relevant.shape != total.shape:
        share = relevant_share(relevant, total - constant - relevant)
        return Decomposition(relevant + share * constant, total)
    n = relevant.shape[0]
    tie = _tie_for(relevant)
    tie = relevant.new_zeros(n, 1, 1) if tie is None else tie.reshape(n, 1, 1)
    layout = (n, channels, -1)
    split = _SplitConstant.apply(
        relevant.reshape(layout), total.reshape(layout), constant.to(relevant.dtype).reshape(1, channels, 1), tie
    )
    return Decomposition(split.view_as(relevant), total)


def decompose_affine(
    value: Decomposition,
    linear: Callable[[Tensor], Tensor],
    bias: Tensor | None,
    biased: Callable[[Tensor], Tensor] | None = None,
) -> Decomposition:
    """An affine layer ``linear(x) + bias``: the linear map is applied to each stream, the bias is split.

    Args:
        value: the input decomposition.
        linear: the layer without its bias (``F.linear(x, W)``, ``conv(x, W, None)``, a BatchNorm scale).
        bias: the bias, already shaped to broadcast against the output, or ``None``.
        biased: the layer with its bias (``F.linear(x, W, b)``), for the total stream: the bias is added inside the
            layer's own kernel instead of in a separate pass over the activation.
    """
    relevant = linear(value.relevant)
    if bias is None:
        return Decomposition(relevant, linear(value.total))
    total = biased(value.total) if biased is not None else linear(value.total) + bias
    return _split_added_constant(relevant, total, bias)


def decompose_elementwise(value: Decomposition, fn: Callable[[Tensor], Tensor], clips: bool = False) -> Decomposition:
    """Relevant-first split of an elementwise nonlinearity ``fn``.

    ``relevant' = fn(relevant) - fn(0)`` and ``total' = fn(total)``; the offset ``fn(0)`` (0.5 for a
    sigmoid, log 2 for a softplus) is a constant and is split like a bias.

    ``clips``: ``fn`` is non-decreasing and flat where it clips (ReLU, ReLU6). The result then keeps the
    pre-activation as its :attr:`~Decomposition.order`, so that a max pooling after ``fn`` reads both parts where
    a max pooling before it would: ``fn`` and max pooling commute, and so does the decomposition, instead of
    depending on which of ReLU's tied zeros the pooling happens to pick in a window that is negative everywhere.

    Examples:
        >>> d = decompose_elementwise(Decomposition(torch.tensor([1.0, -1.0]), torch.tensor([3.0, 2.0])), torch.relu)
        >>> d.relevant, d.irrelevant
        (tensor([1., 0.]), tensor([2., 2.]))
    """
    relevant = fn(value.relevant)
    total = fn(value.total)
    offset = fn(torch.zeros((), dtype=value.total.dtype, device=value.total.device))
    if bool(offset != 0):
        share = relevant_share(value.relevant, value.irrelevant)
        relevant = relevant - offset + share * offset
    order = (value.total if value.order is None else value.order) if clips else None
    return Decomposition(relevant, total, order)


class _ClipStream(torch.autograd.Function):
    """``clamp(x, 0, upper)`` on one stream, keeping for backward its input or a one-byte mask, never its output.

    Autograd's ReLU keeps its output, a full-size tensor per stream per layer. The total stream's input is the
    pre-activation that the preceding bias split keeps already (the same storage, so keeping it here costs
    nothing), and the relevant stream's pass pattern fits in one byte per element.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, upper: float, keep_input: bool) -> Tensor:
        ctx.upper, ctx.keep_input = upper, keep_input
        if keep_input:
            ctx.save_for_backward(x)
            return _clamp(x, upper)
        clipped, passes = _clip_forward(x, upper)
        ctx.save_for_backward(passes)
        return clipped

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (saved,) = ctx.saved_tensors
        if not ctx.keep_input:
            return torch.where(saved, grad, 0), None, None
        if math.isinf(ctx.upper):  # autograd's own ReLU backward, one pass that reads the input
            return torch.ops.aten.threshold_backward(grad, saved, 0), None, None
        return torch.ops.aten.hardtanh_backward(grad, saved, 0, ctx.upper), None, None


def _clip_stream(x: Tensor, upper: float, keep_input: bool) -> Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _clamp(x, upper)
    return _ClipStream.apply(x, upper, keep_input)


def decompose_clip(value: Decomposition, upper: float = math.inf) -> Decomposition:
    """A ReLU (``upper=inf``) or ReLU6 (``upper=6``): :func:`decompose_elementwise` of ``clamp(x, 0, upper)`` with
    ``clips=True``, the same values and gradients, keeping a quarter of the memory for backward.

    Examples:
        >>> d = decompose_clip(Decomposition(torch.tensor([1.0, -1.0, 7.0]), torch.tensor([3.0, 2.0, 8.0])), 6.0)
        >>> d.relevant, d.total
        (tensor([1., 0., 6.]), tensor([3., 2., 6.]))
    """
    relevant = _clip_stream(value.relevant, upper, keep_input=False)
    total = _clip_stream(value.total, upper, keep_input=True)
    return Decomposition(relevant, total, value.total if value.order is None else value.order)


def decompose_max_pool(
    value: Decomposition, pool_with_indices: Callable[[Tensor], tuple[Tensor, Tensor]]
) -> Decomposition:
    """Max pooling: both parts are read at the positions where the *total* activation is maximal (ranked by
    :attr:`Decomposition.order` when a ReLU left ties there, see :func:`decompose_elementwise`).

    Args:
        value: the input decomposition, shaped ``(N, C, *spatial)``.
        pool_with_indices: the pooling called with ``return_indices=True`` (any kernel, stride, padding,
            dilation or ceil mode: the indices address the flattened input positions).
    """
    indices = max_pool_indices(value, pool_with_indices)
    flat = indices.flatten(2)
    relevant = _gather_positions(value.relevant.flatten(2), flat).view_as(indices)
    total = _gather_positions(value.total.flatten(2), flat).view_as(indices)
    return Decomposition(relevant, total)


class _GatherPositions(torch.autograd.Function):
    """``source.gather(2, index)`` keeping only the index for backward.

    Autograd's gather keeps its source as well, a full-size activation per stream that nothing else needs once
    the clipping nonlinearity before the pooling keeps only its pass mask (:func:`decompose_clip`).
    """

    @staticmethod
    def forward(ctx: Any, source: Tensor, index: Tensor) -> Tensor:
        n, channels, length = ctx.shape = source.shape
        ctx.channels_last = source.stride() == (channels * length, 1, channels) and not source.is_contiguous()
        ctx.save_for_backward(index)
        return _gather(source, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (index,) = ctx.saved_tensors
        # overlapping windows (stride < kernel) read a position more than once, so the gradients add up; the
        # gradient keeps the source's layout (channels last) for the kernels before the pooling
        n, channels, length = ctx.shape
        zeros = grad.new_zeros(n, length, channels).transpose(1, 2) if ctx.channels_last else grad.new_zeros(ctx.shape)
        return zeros.scatter_add_(2, index, grad), None


def _gather(source: Tensor, index: Tensor) -> Tensor:
    """``source.gather(2, index)``, laid out as ``index`` (channels last stays channels last for the next layer)."""
    if index.is_contiguous():
        return source.gather(2, index)
    return torch.gather(source, 2, index, out=torch.empty_like(index, dtype=source.dtype))


def _gather_positions(source: Tensor, index: Tensor) -> Tensor:
    if not (torch.is_grad_enabled() and source.requires_grad):
        return _gather(source, index)
    return _GatherPositions.apply(source, index)


def max_pool_indices(value: Decomposition, pool_with_indices: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """The flattened input positions a max pooling of ``value`` reads (by its order, else its total)."""
    with torch.no_grad():  # only the positions are used: no graph, nothing kept for backward
        return pool_with_indices(value.total if value.order is None else value.order)[1]


def decompose_product(left: Decomposition, right: Decomposition) -> Decomposition:
    """Product of two decomposed activations: only relevant times relevant is relevant.

    Interactions between the masked part and anything else are assigned to the irrelevant part, the
    same relevant-first convention as for nonlinearities.
    """
    return Decomposition(left.relevant * right.relevant, left.total * right.total)


def _project_both(relevant: Tensor, irrelevant: Tensor, weight: Tensor) -> Tensor:
    """``W x_rel`` and ``W x_irr`` stacked; one matrix product when the mask is per position (token spans).

    With a 0/1 mask over positions, ``x_rel`` is ``x`` with whole rows zeroed, and the projection commutes
    with that: project ``x`` once and zero the same rows. Checked exactly; otherwise both are projected.
    """
    total = relevant + irrelevant
    kept = (relevant != 0).any(-1, keepdim=True)
    if torch.equal(relevant, total * kept):
        projected = F.linear(total, weight)
        relevant_projected = projected * kept
        return torch.stack([relevant_projected, projected - relevant_projected])
    return F.linear(torch.stack([relevant, irrelevant]), weight)


def decompose_lstm_layer(
    relevant_input: Tensor,
    irrelevant_input: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Contextual decomposition of one direction of one LSTM layer (Murdoch et al. 2018).

    Batched over samples; the loop runs over time steps only. Gate pre-activations are split into
    relevant, irrelevant and bias terms and each gate is linearised by Shapley values over those three.
    The product of the input and candidate gates' bias terms belongs to the relevant part in
    proportion to how much of the current input is relevant (all of it inside a masked token span, none
    outside, as in the original), so a full mask gives everything to the relevant part.

    All four gates are evaluated in one stacked call per step (tanh as ``2 sigmoid(2z) - 1``), and the step is
    one of the CD kernels (:func:`~lightning_xai.attribution.set_cd_kernel`): ``torch.compile`` fuses its thirty
    operations into one kernel forward and one backward when the sequence is large enough.

    Args:
        relevant_input: ``(N, T, input_size)`` relevant part of the input sequence (batch first).
        irrelevant_input: ``(N, T, input_size)`` irrelevant part.
        weight_ih: ``(4H, input_size)``, gates in PyTorch order i, f, g, o.
        weight_hh: ``(4H, H)``.
        bias: ``(4H,)`` (``bias_ih + bias_hh``) or ``None``.
        reverse: run the sequence backwards (the reverse direction of a bidirectional LSTM).

    Returns:
        ``(relevant_h, irrelevant_h, relevant_h_last, irrelevant_h_last, relevant_c_last,
        irrelevant_c_last)`` with sequences shaped ``(N, T, H)`` and final states ``(N, H)``.
    """
    n, steps, _ = relevant_input.shape
    hidden = weight_hh.shape[1]
    dtype, device = relevant_input.dtype, relevant_input.device
    if bias is None:
        bias = torch.zeros(4 * hidden, dtype=dtype, device=device)
    # The input projections do not depend on the recurrence: one matrix product for all steps.
    # Unbound once: indexing a step inside the loop would make the backward zero-fill a full-size
    # gradient for every step.
    projected = _project_both(relevant_input, irrelevant_input, weight_ih).unbind(2)  # T x (2, N, 4H)
    share = relevant_share(relevant_input.abs().sum(-1), irrelevant_input.abs().sum(-1)).unsqueeze(-1).unbind(1)
    shift = torch.zeros(4 * hidden, dtype=dtype, device=device)
    shift[2 * hidden : 3 * hidden] = -1.0  # the candidate gate's columns
    scale = 1.0 - shift
    bias_activation = _gate_activations(bias, scale, shift)

    hidden_state = torch.zeros(2, n, hidden, dtype=dtype, device=device)  # (relevant, irrelevant)
    rel_c = torch.zeros(n, hidden, dtype=dtype, device=device)
    irr_c = torch.zeros_like(rel_c)
    outputs: list[Tensor] = []
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    work = steps * n * 4 * hidden  # what the kernel choice weighs: all steps', since one compilation serves them
    for t in order:
        hidden_state, rel_c, irr_c = _run_kernel(
            "lstm_step", work, projected[t], hidden_state, rel_c, irr_c, weight_hh, bias, bias_activation, scale,
            shift, share[t],
        )  # fmt: skip
        outputs.append(hidden_state)
    if reverse:
        outputs.reverse()
    sequence = torch.stack(outputs, dim=2)  # (2, N, T, H)
    return sequence[0], sequence[1], hidden_state[0], hidden_state[1], rel_c, irr_c
