"""Differentiable explanation penalties: plain PyTorch functions that the callbacks add to the loss.

Every penalty is computed per sample and reduced with a mean over the *whole* batch (samples without an
annotation contribute zero), so a penalty on a batch equals the mean of the penalties on equal shards:
gradient accumulation and DDP give the same gradient as one large batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional._labels import class_labels
from lightning_xai.functional._layers import forward_with_activation, map_layout
from lightning_xai.functional._masks import broadcast_mask

Reduction = Literal["mean", "sum", "none"]
CDEPVariant = Literal["image", "text", "shift_invariant"]
Norm = Literal["l1", "l2"]
AblationMeasure = Literal["logits", "kl"]
Differentiation = Literal["double_backward", "finite_difference"]


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Scaled-dot-product attention on the math backend, the one SDPA kernel with a double backward.

    The flash and memory-efficient kernels of ``F.scaled_dot_product_attention`` (which ``nn.MultiheadAttention``,
    ``nn.TransformerEncoder`` and Hugging Face's ``sdpa`` attention call) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). Run every forward that an
    input-gradient penalty differentiates twice under this context.

    Examples:
        >>> from torch import nn
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> with math_attention():
        ...     penalty = rrr_penalty(lambda x: layer(x).mean(1), torch.randn(2, 3, 8), torch.ones(2, 3, 8))
        >>> penalty.backward()  # the double backward runs
    """
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def double_backward_kernels(module: nn.Module) -> Iterator[None]:
    """The kernels a double backward through ``module`` runs fastest on: math attention, PyTorch's native RNNs.

    Attention as :func:`math_attention`. oneDNN's fused CPU RNN kernel (the default for float32 ``nn.LSTM`` /
    ``nn.GRU`` on CPU) differentiates its own backward through a slow per-step path that zero-fills buffers; the
    native RNN makes the double backward of a gradient penalty about 1.5x cheaper. Only the
    ``torch.backends.mkldnn.enabled`` switch is touched, and only when ``module`` holds an RNN.

    Examples:
        >>> lstm = nn.LSTM(4, 3, batch_first=True)
        >>> with double_backward_kernels(lstm):
        ...     penalty = rrr_penalty(lambda x: lstm(x)[0][:, -1], torch.randn(2, 5, 4), torch.ones(2, 5, 4))
        >>> penalty.backward()
    """
    with math_attention():
        if not any(isinstance(m, nn.RNNBase) for m in module.modules()):
            yield
            return
        # torch.backends.mkldnn.flags() would also reset TF32 and warn about Intel GPUs
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            yield
        finally:
            torch.backends.mkldnn.enabled = previous


def _widen(values: Tensor) -> Tensor:
    """Half-precision values (bf16/fp16 autocast) are reduced in float32; float64 stays float64."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values


def _reduce(per_sample: Tensor, sample_weights: Tensor | None, reduction: Reduction) -> Tensor:
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.dtype)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise XAIConfigurationError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")


def _norm(values: Tensor, norm: Norm) -> Tensor:
    if norm == "l2":
        return values.pow(2)
    if norm == "l1":
        return values.abs()
    raise XAIConfigurationError(f"norm must be 'l1' or 'l2', got {norm!r}.")


def _per_sample_sum(values: Tensor) -> Tensor:
    return values.flatten(1).sum(1)


def cdep_penalty(
    relevant: Tensor,
    irrelevant: Tensor,
    target: Tensor | None = None,
    variant: CDEPVariant = "image",
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """CDEP penalty (Rieger et al., ICML 2020) on a contextual decomposition of the logits.

    Variants:
        * ``"image"``: ``mean_k sigmoid(rel_k - irrel_k)`` over classes, as in the paper's image
          experiments (ColorMNIST, ISIC): the masked part must not dominate any logit.
        * ``"text"``: ``softplus(rel_y - irrel_y)`` on the true class ``y`` (needs ``target``).
        * ``"shift_invariant"``: ``KL(softmax(rel + irrel) || softmax(irrel))``, how much the prediction
          changes when the masked part is removed. The paper's variants can be lowered by shifting every
          logit by the same amount, which changes no prediction; this one is zero exactly when the masked
          part adds the same amount to every class, i.e. does not influence the prediction.

    Args:
        relevant: ``(N, K)`` contribution of the masked features to the logits.
        irrelevant: ``(N, K)`` contribution of everything else.
        target: ``(N,)`` true classes (``"text"`` variant).
        variant: one of the above.
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.

    Examples:
        >>> rel = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
        >>> irrel = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
        >>> cdep_penalty(rel, irrel, reduction="none")
        tensor([0.5000, 0.5000])
        >>> cdep_penalty(rel, irrel, variant="shift_invariant", reduction="none")
        tensor([0.0000, 0.6031])
    """
    if relevant.shape != irrelevant.shape:
        raise XAIConfigurationError(
            f"relevant {tuple(relevant.shape)} and irrelevant {tuple(irrelevant.shape)} must have one shape."
        )
    relevant, irrelevant = _widen(relevant), _widen(irrelevant)
    if relevant.dim() == 1:
        relevant, irrelevant = relevant.unsqueeze(1), irrelevant.unsqueeze(1)
    if variant == "image":
        per_sample = torch.sigmoid(relevant - irrelevant).flatten(1).mean(1)
    elif variant == "text":
        if target is None:
            raise XAIConfigurationError("cdep_penalty(variant='text') needs the true classes in `target`.")
        index = class_labels(target, relevant.shape[1], "the target classes").view(-1, 1).to(relevant.device)
        per_sample = F.softplus(relevant.gather(1, index) - irrelevant.gather(1, index)).squeeze(1)
    elif variant == "shift_invariant":
        log_full = F.log_softmax(relevant + irrelevant, dim=1)
        log_without = F.log_softmax(irrelevant, dim=1)
        per_sample = (log_full.exp() * (log_full - log_without)).sum(1)
    else:
        raise XAIConfigurationError(
            f"cdep_penalty variant must be 'image', 'text' or 'shift_invariant', got {variant!r}."
        )
    return _reduce(per_sample, sample_weights, reduction)


def _input_gradient(outputs: Tensor, inputs: Tensor) -> Tensor:
    (gradient,) = torch.autograd.grad(outputs, inputs, create_graph=True)
    return gradient


def _forward_with_grad(forward: Callable[[Tensor], Tensor] | None, inputs: Tensor, outputs: Tensor | None) -> Tensor:
    if outputs is not None:
        if not inputs.requires_grad:
            raise XAIConfigurationError(
                "`outputs` were given but `inputs` does not require grad: pass outputs computed from inputs "
                "with requires_grad=True, or pass `forward` and no outputs."
            )
        return outputs
    if forward is None:
        raise XAIConfigurationError("give either `forward` or `outputs` computed from `inputs`.")
    return forward(inputs)


def _as_leaf(inputs: Tensor) -> Tensor:
    if inputs.requires_grad:
        return inputs
    return inputs.detach().requires_grad_(True)


# ------------------------------------------------------------------------ input-gradient penalties, two ways

#: A score maps logits to one value per row; the penalties take its input gradient.
Score = Callable[[Tensor], Tensor]


def _summed_log_probabilities(logits: Tensor) -> Tensor:
    return F.log_softmax(_widen(logits), dim=-1).reshape(logits.shape[0], -1).sum(1)


def _target_score(logits: Tensor, target: Tensor | None) -> Score:
    """``log p_y`` per row, with the classes fixed now: the shifted forward of a finite difference explains the
    same class even where its argmax would change."""
    if target is None:
        target = logits.detach().argmax(-1)
    index = class_labels(target, logits.shape[-1], "the target classes").view(-1, 1).to(logits.device)
    return lambda values: F.log_softmax(_widen(values), dim=-1).gather(-1, index).reshape(values.shape[0], -1).sum(1)


#: ``||eps_i v_i|| = FINITE_DIFFERENCE_STEP * ||x_i||``: the shift of each row, relative to the row (measured on
#: a CNN, an MLP and an LSTM in float32: see benchmarks/finite_difference_agreement.py)
FINITE_DIFFERENCE_STEP = 1e-3


@dataclass(frozen=True)
class _Randomness:
    """The random state before a forward, so that a second forward draws the same dropout masks."""

    cpu: Tensor
    cuda: Tensor | None
    devices: list[torch.device]

    @classmethod
    def capture(cls, device: torch.device) -> _Randomness:
        on_cuda = device.type == "cuda"
        return cls(
            torch.get_rng_state(), torch.cuda.get_rng_state(device) if on_cuda else None, [device] if on_cuda else []
        )

    @contextlib.contextmanager
    def replaying(self) -> Any:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.devices[0])
            yield


def _record_relu(function: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    gate = x.detach() > 0  # before an in-place ReLU overwrites x
    return function(x, *args, **kwargs), gate


def _replay_relu(gate: Tensor, function: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    inplace = kwargs.get("inplace", False) or getattr(function, "__name__", "").endswith("_")
    return x.mul_(gate) if inplace else x * gate


def _record_max_pool(function: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
    wanted = kwargs.pop("return_indices", False)
    pooled, indices = function(x, *args, return_indices=True, **kwargs)
    return ((pooled, indices) if wanted else pooled), indices


def _replay_max_pool(indices: Tensor, function: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Any:
    # the indices count positions in each (sample, channel) plane of the input
    lead = x.dim() - _POOLED_DIMS[function]
    pooled = x.flatten(lead).gather(lead, indices.flatten(lead)).view(indices.shape)
    return (pooled, indices) if kwargs.get("return_indices", False) else pooled


_RELUS = (F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
_POOLED_DIMS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
#: the piecewise-linear ops whose branch a finite difference keeps: (record, replay) by function
_BRANCHING_OPS: dict[Any, tuple[Callable[..., Any], Callable[..., Any]]] = {
    **{function: (_record_relu, _replay_relu) for function in _RELUS},
    **{function: (_record_max_pool, _replay_max_pool) for function in _POOLED_DIMS},
}


class Branches(TorchFunctionMode):
    """Records the branch of each ReLU (its gate) and max pooling (its argmax) in one forward, and replays them in
    the next: the shifted forward of a finite difference then stays on the linear piece of the forward it
    differs from, as the double backward does (which sees ReLU and max pooling as linear around ``x``).

    Without it a ReLU whose pre-activation crosses zero between the two forwards adds its whole gradient divided
    by the step, and on the demo CNN (batch 64) the finite difference's cosine to the exact gradient is 0.1 at every
    step size. Other kinks (``abs``, ``clamp``, leaky or clipped ReLUs, ``max`` over a dimension) are not
    replayed. A forward whose ops change between the two runs raises an error.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> branches = Branches()
        >>> with branches:
        ...     _ = net(torch.ones(1, 2))
        >>> with branches.replaying():
        ...     shifted = net(torch.full((1, 2), 1.01))
        >>> len(branches.records)
        1
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[Tensor] = []
        self._position: int | None = None

    @contextlib.contextmanager
    def replaying(self) -> Any:
        self._position = 0
        try:
            with self:
                yield
        finally:
            self._position = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        rule = _BRANCHING_OPS.get(func)
        if rule is None or not args or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        record, replay = rule
        if self._position is None:
            output, branch = record(func, *args, **kwargs)
            self.records.append(branch)
            return output
        position, self._position = self._position, self._position + 1
        if position >= len(self.records) or self.records[position].shape[0] != args[0].shape[0]:
            raise XAIConfigurationError(
                "differentiation='finite_difference': the shifted forward ran other ReLUs / max poolings than the "
                "forward it differs from; the model's control flow depends on its input values. Use "
                "differentiation='double_backward'."
            )
        return replay(self.records[position], func, *args, **kwargs)


def _double_backward(
    shifted_forward: Callable[[Tensor], Tensor] | None,
    points: Tensor,
    logits: Tensor,
    score: Score,
    penalty_of: Callable[[Tensor], Tensor],
) -> Tensor:
    (gradient,) = torch.autograd.grad(score(logits).sum(), points, create_graph=True)
    return penalty_of(gradient)


def _finite_difference(
    shifted_forward: Callable[[Tensor], Tensor] | None,
    points: Tensor,
    logits: Tensor,
    score: Score,
    penalty_of: Callable[[Tensor], Tensor],
) -> Tensor:
    """The exact penalty as value, and as theta-gradient a one-sided finite difference along ``v = dP/dg``.

    With ``g = d s / dx`` and ``v`` the detached derivative of the per-sample penalty ``P(g)``,
    ``d P / d theta = d/d theta (g . v) = d/d eps d s(x + eps v) / d theta`` at ``eps = 0`` (mixed partials
    commute), so ``(s(x + eps v) - s(x)) / eps`` has the penalty's parameter gradient up to ``O(eps)``; one
    first-order input gradient and one forward more, and no ``create_graph``. ``x`` stays attached: where it
    depends on the parameters (token embeddings), the difference also carries ``dP/dx dx/dtheta``. The shifted
    forward replays the first one's dropout masks and ReLU / max-pooling branches (:class:`Branches`).
    """
    if shifted_forward is None:
        raise XAIConfigurationError(
            "differentiation='finite_difference' runs the model once more at shifted inputs: pass `forward`."
        )
    if logits.dtype in (torch.float16, torch.bfloat16):
        raise XAIConfigurationError(
            f"differentiation='finite_difference' takes a difference of two {logits.dtype} forwards, which rounding "
            "swamps: train in 32-bit precision, or use differentiation='double_backward' under half-precision "
            "autocast."
        )
    scores = score(logits)
    # retain_graph: the difference backpropagates through this forward (and the task loss may share it)
    (gradient,) = torch.autograd.grad(scores.sum(), points, retain_graph=True)
    probe = gradient.detach().requires_grad_(True)
    (direction,) = torch.autograd.grad(penalty_of(probe).sum(), probe, retain_graph=True)
    rows = points.shape[0]
    scale = points.detach().reshape(rows, -1).norm(dim=1)
    length = direction.reshape(rows, -1).norm(dim=1)
    # a row without penalty (v = 0) gets any step: its shifted forward equals its forward
    step = torch.where(length > 0, FINITE_DIFFERENCE_STEP * torch.where(scale > 0, scale, 1.0) / length, 1.0)
    # A leaf (pixels) carries no parameter: a shifted forward from it detached skips the input gradient of the
    # first layer in the backward (on the demo CNN its 3-channel convolution's backward is the costliest op)
    base = points if points.grad_fn is not None else points.detach()
    shifted = base + step.view(-1, *[1] * (points.dim() - 1)) * direction
    difference = (score(shifted_forward(shifted)) - scores) / step.to(scores.dtype)
    # the value keeps the paths that do not go through g (Input x Gradient's x factor on embeddings)
    value = penalty_of(gradient.detach())
    surrogate = difference.view(-1, value.shape[0]).sum(0)
    return value + surrogate - surrogate.detach()


@dataclass(frozen=True)
class _Differentiation:
    kernel: Callable[..., Tensor]
    #: builds a double backward (``create_graph``): no torch.compile, no fused attention kernels
    double_backward: bool
    #: runs the model a second time at shifted inputs, replaying the first forward's randomness and branches
    shifts: bool


#: how an input-gradient penalty gets its parameter gradient
DIFFERENTIATIONS: dict[str, _Differentiation] = {
    "double_backward": _Differentiation(_double_backward, double_backward=True, shifts=False),
    "finite_difference": _Differentiation(_finite_difference, double_backward=False, shifts=True),
}


def _differentiation(differentiation: str, where: str) -> _Differentiation:
    if differentiation not in DIFFERENTIATIONS:
        raise XAIConfigurationError(
            f"{where}: differentiation must be one of {tuple(DIFFERENTIATIONS)}, got {differentiation!r}."
        )
    return DIFFERENTIATIONS[differentiation]


def _recorded_forward(
    variant: _Differentiation,
    forward: Callable[[Tensor], Tensor] | None,
    inputs: Tensor,
    outputs: Tensor | None,
    branches: Branches | None,
) -> tuple[Tensor, Callable[[Tensor], Tensor] | None]:
    """The logits at ``inputs`` and the forward at shifted inputs that replays their randomness and branches."""
    if not variant.shifts or forward is None:
        return _forward_with_grad(forward, inputs, outputs), forward
    if outputs is not None:
        # the caller ran that forward: its branches, when recorded, are all there is to replay
        logits = _forward_with_grad(forward, inputs, outputs)
        randomness = None
    else:
        randomness = _Randomness.capture(inputs.device)
        branches = Branches()
        with branches:
            logits = forward(inputs)

    def shifted_forward(shifted: Tensor) -> Tensor:
        with contextlib.ExitStack() as stack:
            if randomness is not None:
                stack.enter_context(randomness.replaying())
            if branches is not None:
                stack.enter_context(branches.replaying())
            return forward(shifted)

    return logits, shifted_forward


def rrr_penalty(
    forward: Callable[[Tensor], Tensor] | None,
    inputs: Tensor,
    mask: Tensor,
    outputs: Tensor | None = None,
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    differentiation: Differentiation = "double_backward",
    branches: Branches | None = None,
) -> Tensor:
    """Right for the Right Reasons penalty (Ross et al., 2017).

    ``sum_d (mask_d * d/dx_d sum_k log p_k(x))^2`` per sample: the input gradient of the summed
    log-probabilities must vanish inside the mask. Costs one double backward, or with
    ``differentiation="finite_difference"`` a first-order input gradient and one forward more (see
    :data:`DIFFERENTIATIONS`): the same value, and a parameter gradient within about 1e-3 of the exact one.

    Args:
        forward: maps inputs to logits; not needed when ``outputs`` are given.
        inputs: ``(N, ...)`` float inputs (images, or token embeddings for text).
        mask: 1 on forbidden features; any shape :func:`~lightning_xai.functional._masks.broadcast_mask`
            accepts (``(N, T)`` for embeddings ``(N, T, E)``).
        outputs: logits already computed from ``inputs`` (which must require grad); saves a forward pass.
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.
        differentiation: ``"double_backward"`` (exact; ``create_graph``) or ``"finite_difference"`` (the exact
            value, a finite-difference parameter gradient; no double backward, so it works with ``torch.compile``
            and fused attention kernels; needs ``forward``).
        branches: with ``outputs`` and ``"finite_difference"``, the :class:`Branches` recorded while computing
            ``outputs`` (``with branches: outputs = forward(inputs)``), so the shifted forward replays them; the
            outputs' forward must then also draw no dropout.

    Examples:
        >>> model = torch.nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]))
        ...     _ = model.bias.zero_()
        >>> x = torch.zeros(1, 3)
        >>> rrr_penalty(model, x, torch.tensor([[1.0, 0.0, 0.0]]))  # d/dx0 (log p0 + log p1) = -2 tanh(0)
        tensor(0., grad_fn=<MeanBackward0>)
        >>> rrr_penalty(model, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
        tensor(2.3201, grad_fn=<MeanBackward0>)
        >>> fd = rrr_penalty(model, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
        ...                  differentiation="finite_difference")
        >>> round(fd.item(), 4)  # the same value
        2.3201
        >>> fd.backward()  # and a first-order backward
        >>> round(model.weight.grad[0, 0].item(), 2)  # the double backward's: 3.5995
        3.6
    """
    variant = _differentiation(differentiation, "rrr_penalty")
    inputs = inputs if outputs is not None else _as_leaf(inputs)
    logits, shifted_forward = _recorded_forward(variant, forward, inputs, outputs, branches)

    def penalty_of(gradient: Tensor) -> Tensor:
        return _per_sample_sum(_widen(gradient * broadcast_mask(mask, gradient).to(gradient.dtype)).pow(2))

    per_sample = variant.kernel(shifted_forward, inputs, logits, _summed_log_probabilities, penalty_of)
    return _reduce(per_sample, sample_weights, reduction)


def input_x_gradient_penalty(
    forward: Callable[[Tensor], Tensor] | None,
    inputs: Tensor,
    mask: Tensor,
    target: Tensor | None = None,
    outputs: Tensor | None = None,
    norm: Norm = "l2",
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    differentiation: Differentiation = "double_backward",
    branches: Branches | None = None,
) -> Tensor:
    """Penalty on the Input x Gradient attribution of the target class inside the mask.

    ``sum_d |mask_d * x_d * d log p_y / dx_d|^p`` per sample (``p`` = 2 for ``"l2"``, 1 for ``"l1"``). One double
    backward, or one forward more with ``differentiation="finite_difference"`` (see :func:`rrr_penalty`).

    Args:
        forward: maps inputs to logits; not needed when ``outputs`` are given.
        inputs: ``(N, ...)`` float inputs.
        mask: 1 on forbidden features.
        target: ``(N,)`` classes to explain; the predicted class when ``None``.
        outputs: logits computed from ``inputs`` (which must require grad).
        norm: ``"l2"`` or ``"l1"``.
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.
        differentiation: ``"double_backward"`` or ``"finite_difference"`` (see :func:`rrr_penalty`).
        branches: the :class:`Branches` of the forward of ``outputs`` (see :func:`rrr_penalty`).

    Examples:
        >>> model = torch.nn.Linear(2, 2)
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> input_x_gradient_penalty(model, x, torch.tensor([[0.0, 0.0]]), target=torch.tensor([0]))
        tensor(0., grad_fn=<MeanBackward0>)
        >>> exact = input_x_gradient_penalty(model, x, torch.tensor([[1.0, 0.0]]), target=torch.tensor([0]))
        >>> fd = input_x_gradient_penalty(model, x, torch.tensor([[1.0, 0.0]]), target=torch.tensor([0]),
        ...                               differentiation="finite_difference")
        >>> bool(torch.isclose(fd, exact))
        True
    """
    variant = _differentiation(differentiation, "input_x_gradient_penalty")
    if norm not in ("l1", "l2"):
        raise XAIConfigurationError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    inputs = inputs if outputs is not None else _as_leaf(inputs)
    logits, shifted_forward = _recorded_forward(variant, forward, inputs, outputs, branches)

    def penalty_of(gradient: Tensor) -> Tensor:
        mask_ = broadcast_mask(mask, gradient).to(gradient.dtype)
        return _per_sample_sum(_norm(_widen(inputs * gradient * mask_), norm))

    per_sample = variant.kernel(shifted_forward, inputs, logits, _target_score(logits, target), penalty_of)
    return _reduce(per_sample, sample_weights, reduction)


def ablation_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    mask: Tensor,
    outputs: Tensor | None = None,
    baseline: Tensor | float = 0.0,
    measure: AblationMeasure = "logits",
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """How much the prediction changes when the masked features are removed: zero when they do not matter.

    The masked features are replaced by ``baseline`` (zero: a blank pixel, a zero embedding) and the model runs
    once more. ``measure="logits"`` penalizes ``sum_k (d_k - mean_j d_j)^2`` with ``d = f(x) - f(x_ablated)``,
    the change of the logits up to a shift common to all classes (a shift changes no prediction);
    ``measure="kl"`` penalizes ``KL(p(x) || p(x_ablated))``.

    Unlike a contextual decomposition, the change counts everything the masked features do, including what
    they do through products with the other features (an LSTM's gates, attention): CDEP's decomposition gives
    those products to the unmasked part, and a model trained against it learns to act through them (see the
    ExplanationPenalty docs). Costs one forward and one backward more than the task loss.

    Args:
        forward: maps inputs to logits.
        inputs: ``(N, ...)`` float inputs (or token embeddings ``(N, T, E)``).
        mask: 1 on the features to remove; any shape :func:`~lightning_xai.functional._masks.broadcast_mask`
            accepts (``(N, T)`` for embeddings).
        outputs: ``forward(inputs)`` when already computed (the step's own logits); saves a forward.
        baseline: what replaces the masked features (a number or a tensor broadcasting to ``inputs``).
        measure: ``"logits"`` or ``"kl"``.
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.

    Examples:
        >>> model = torch.nn.Linear(3, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 2.0]]))
        >>> x = torch.tensor([[1.0, 1.0, 1.0]])
        >>> ablation_penalty(model, x, torch.tensor([[0.0, 1.0, 0.0]]))  # feature 1 is unused
        tensor(0., grad_fn=<MeanBackward0>)
        >>> ablation_penalty(model, x, torch.tensor([[1.0, 0.0, 0.0]]))  # d = (1, -1): centred (1, -1)
        tensor(2., grad_fn=<MeanBackward0>)
    """
    if measure not in ("logits", "kl"):
        raise XAIConfigurationError(f"ablation_penalty: measure must be 'logits' or 'kl', got {measure!r}.")
    mask = broadcast_mask(mask, inputs).to(inputs.dtype)
    full = _widen(outputs if outputs is not None else forward(inputs))
    ablated = _widen(
        forward(inputs * (1 - mask) + torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device) * mask)
    )
    if measure == "logits":
        change = full - ablated
        per_sample = _per_sample_sum((change - change.mean(-1, keepdim=True)).pow(2))
    else:
        log_full, log_ablated = F.log_softmax(full, dim=-1), F.log_softmax(ablated, dim=-1)
        per_sample = _per_sample_sum(log_full.exp() * (log_full - log_ablated))
    return _reduce(per_sample, sample_weights, reduction)


def other_samples(samples: int, rows: int, draws: int, generator: torch.Generator | None = None) -> Tensor:
    """Reference indices for Expected Gradients: ``draws * rows`` indices, each uniform over the samples other
    than its row's own sample ``row % samples`` (rows may repeat the samples, as a tiled batch does).

    Examples:
        >>> index = other_samples(3, 3, 100, torch.Generator().manual_seed(0)).view(100, 3)
        >>> bool((index != torch.arange(3)).all()), sorted(index[:, 0].unique().tolist())
        (True, [1, 2])
    """
    if samples < 2:
        raise XAIConfigurationError(
            "expected_gradients_penalty draws each sample's references from the other samples of the batch, and a "
            "batch of one has none: pass references= (e.g. earlier inputs), or use a batch of at least 2."
        )
    own = torch.arange(rows).repeat(draws) % samples
    return (own + 1 + torch.randint(0, samples - 1, own.shape, generator=generator)) % samples


def expected_gradients_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    mask: Tensor,
    target: Tensor | None = None,
    num_references: int = 1,
    references: Tensor | None = None,
    norm: Norm = "l2",
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
    differentiation: Differentiation = "double_backward",
) -> Tensor:
    """Attribution-prior penalty on Expected Gradients (Erion et al., 2021) inside the mask.

    ``phi = (x - x') * grad f_y(x' + alpha (x - x'))`` with references ``x'`` drawn from the *other* samples of
    the batch (a sample drawn as its own reference has ``x - x' = 0`` and no attribution at all) and
    ``alpha ~ U(0, 1)``, averaged over ``num_references`` draws; the penalty is
    ``sum_d |mask_d * phi_d|^p`` per sample. All draws go through the network as one batch of
    ``num_references * N`` samples: one forward and one double backward, no per-sample loop; with
    ``differentiation="finite_difference"`` a second forward of the path points instead of the double backward
    (see :func:`rrr_penalty`).

    Args:
        forward: maps a batch of inputs to logits. For ``num_references > 1`` it must accept
            ``num_references * N`` samples.
        inputs: ``(N, ...)`` float inputs.
        mask: 1 on forbidden features.
        target: ``(N,)`` classes to explain; the predicted class at each path point when ``None``.
        num_references: ``k``, the number of reference draws per sample.
        references: ``(k * N, ...)`` references to use instead of drawing them from the batch; needed for a batch
            of one sample, which has no other sample to draw.
        norm: ``"l2"`` or ``"l1"``.
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.
        generator: random generator for the references and the path positions.
        differentiation: ``"double_backward"`` or ``"finite_difference"`` (see :func:`rrr_penalty`).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> x = torch.randn(8, 4)
        >>> no_mask = expected_gradients_penalty(model, x, torch.zeros(8, 4), target=torch.zeros(8, dtype=torch.long))
        >>> no_mask.item()
        0.0
    """
    variant = _differentiation(differentiation, "expected_gradients_penalty")
    if num_references < 1:
        raise XAIConfigurationError(f"num_references must be >= 1, got {num_references}.")
    if norm not in ("l1", "l2"):
        raise XAIConfigurationError(f"norm must be 'l1' or 'l2', got {norm!r}.")
    n = inputs.shape[0]
    data = inputs.detach()
    repeated = data.repeat(num_references, *([1] * (data.dim() - 1)))
    if references is None:
        references = data[other_samples(n, n, num_references, generator).to(data.device)]
    elif references.shape != repeated.shape:
        raise XAIConfigurationError(
            f"references must have shape {tuple(repeated.shape)} (num_references * N, ...), "
            f"got {tuple(references.shape)}."
        )
    alpha_shape = (repeated.shape[0],) + (1,) * (data.dim() - 1)
    alpha = torch.rand(alpha_shape, generator=generator, device="cpu").to(device=data.device, dtype=data.dtype)
    difference = repeated - references
    path_points = (references + alpha * difference).requires_grad_(True)
    repeated_target = None if target is None else target.repeat(num_references)
    logits, shifted_forward = _recorded_forward(variant, forward, path_points, None, None)

    def penalty_of(gradient: Tensor) -> Tensor:
        attribution = (difference * gradient).view(num_references, n, *data.shape[1:]).mean(0)
        return _per_sample_sum(
            _norm(_widen(attribution * broadcast_mask(mask, attribution).to(attribution.dtype)), norm)
        )

    per_sample = variant.kernel(
        shifted_forward, path_points, logits, _target_score(logits, repeated_target), penalty_of
    )
    return _reduce(per_sample, sample_weights, reduction)


# ------------------------------------------------------------------------ Grad-CAM penalties (RRR-G, HINT)

#: how a layer output lays out channels and positions: (channel dim, position dims) by layout
_LAYOUTS: dict[str, Callable[[int], tuple[int, tuple[int, ...]]]] = {
    "channels_first": lambda dim: (1, tuple(range(2, dim))),
    "channels_last": lambda dim: (dim - 1, tuple(range(1, dim - 1))),
}
Layout = Literal["channels_first", "channels_last"]


def gradcam_map(
    logits: Tensor,
    activation: Tensor,
    target: Tensor | None = None,
    layout: Layout = "channels_first",
    normalize: bool = True,
) -> Tensor:
    """A differentiable Grad-CAM map (Selvaraju et al., 2017) of ``target``'s raw logit at a layer.

    ``cam = sum_c mean_positions(d logit_y / d a_c) * a_c`` over the layer output ``a`` (``(N, C, H, W)`` or
    ``(N, C, L)`` with ``layout="channels_first"``, ``(N, T, D)`` for a recurrent or transformer layer with
    ``"channels_last"``), without the ReLU, as the XIL typology computes it for RRR-G and HINT. The channel
    weights stay in the graph (create_graph), so a penalty on the map has its exact gradient. ``normalize``
    scales each sample's map to ``[0, 1]`` (min-max over positions).

    Returns:
        ``(N, *positions)``: ``(N, H, W)``, ``(N, L)`` or ``(N, T)``.

    Examples:
        >>> a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)  # one channel, 2 x 2
        >>> logits = torch.stack([a.sum(), -a.sum()]).view(1, 2)
        >>> gradcam_map(logits, a, torch.tensor([0]), normalize=False)  # weight 1 on the channel
        tensor([[[1., 2.],
                 [3., 4.]]], grad_fn=<SumBackward1>)
    """
    if layout not in _LAYOUTS:
        raise XAIConfigurationError(f"gradcam_map: layout must be one of {tuple(_LAYOUTS)}, got {layout!r}.")
    channel, positions = _LAYOUTS[layout](activation.dim())
    if not positions:
        raise XAIConfigurationError(
            f"gradcam_map: the layer output {tuple(activation.shape)} has no spatial or token positions; Grad-CAM "
            "needs a convolution's (N, C, H, W) / (N, C, L) or a sequence layer's (N, T, D) output."
        )
    if target is None:
        target = logits.detach().argmax(-1)
    target = class_labels(target, logits.shape[-1], "the Grad-CAM classes").view(-1, 1).to(logits.device)
    score = logits.gather(-1, target).sum()
    (gradient,) = torch.autograd.grad(score, activation, create_graph=True)
    weights = gradient.mean(positions, keepdim=True)
    cam = _widen(weights * activation).sum(channel)
    if not normalize:
        return cam
    flat = cam.flatten(1)
    low = flat.min(1, keepdim=True).values
    spread = flat.max(1, keepdim=True).values - low
    return ((flat - low) / (spread + 1e-8)).view_as(cam)


def _positions_mask(mask: Tensor, inputs: Tensor) -> Tensor:
    """The input mask without its channels: ``(N, H, W)`` for images, ``(N, T)`` for tokens or embeddings."""
    if not inputs.is_floating_point():  # token ids (N, T): the mask is over positions already
        return broadcast_mask(mask, inputs.float()).float()
    mask = broadcast_mask(mask, inputs).to(_widen(inputs).dtype)
    mask = mask.expand_as(inputs)
    if inputs.dim() == 4:  # (N, C, H, W) images
        return mask.amax(1)
    if inputs.dim() == 3 and mask.shape[-1] == inputs.shape[-1]:  # (N, T, E) embeddings or (N, C, L) signals
        return mask.amax(-1)
    return mask


def _resample(values: Tensor, size: tuple[int, ...], mode: str) -> Tensor:
    """``(N, *positions)`` resampled to ``size`` (area when shrinking, ``mode`` when growing)."""
    if tuple(values.shape[1:]) == tuple(size):
        return values
    shrinking = all(s <= v for s, v in zip(size, values.shape[1:]))
    chosen = "area" if shrinking else mode
    if chosen == "bilinear" and len(size) == 1:
        chosen = "linear"
    resampled = F.interpolate(values.unsqueeze(1), size=size, mode=chosen)
    return resampled.squeeze(1)


def rrr_gradcam_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    mask: Tensor,
    layer: torch.nn.Module,
    layout: Layout | None = None,
    target: Tensor | None = None,
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """RRR-G (Schramowski et al., 2020; the XIL typology's RRR-G): Grad-CAM mass inside the mask.

    ``sum_positions (m * cam)^2`` per sample, with ``cam`` the min-max normalized :func:`gradcam_map` of the
    predicted class (``target=None``) at ``layer`` and ``m`` the mask resampled to the map (area averaging, so
    a mask smaller than the layer's stride still counts; the typology's bilinear resampling can miss it). The
    map is normalized per sample, so the penalty pushes the masked region to the map's minimum: it asks where
    the model looks, relative to the rest of the image, not how strongly. One forward, and a double backward
    from the logits down to ``layer`` only.

    Args:
        forward: maps inputs to logits.
        inputs: ``(N, ...)`` inputs (float features, or token ids when ``layer`` is inside the network).
        mask: 1 on forbidden features, in input space.
        layer: the module whose output is the map (the last convolution, an LSTM).
        layout: ``"channels_first"`` for convolutions, ``"channels_last"`` for ``(N, T, D)`` sequence outputs;
            ``None`` tells them apart by the layer's type (:func:`~lightning_xai.functional._layers.map_layout`).
        target: the classes to explain; the predicted class when ``None`` (RRR-G).
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32, 2))
        >>> x, mask = torch.randn(3, 1, 4, 4), torch.zeros(3, 1, 4, 4)
        >>> rrr_gradcam_penalty(net, x, mask, net[0]).item()  # nothing masked
        0.0
    """
    logits, activation = forward_with_activation(forward, inputs, layer, "rrr_gradcam_penalty")
    cam = gradcam_map(logits, activation, target, layout or map_layout(layer, activation))  # type: ignore[arg-type]
    region = _resample(_positions_mask(mask, inputs).to(cam.dtype), tuple(cam.shape[1:]), "bilinear")
    per_sample = _per_sample_sum((region * cam).pow(2))
    return _reduce(per_sample, sample_weights, reduction)


def hint_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    relevant: Tensor,
    layer: torch.nn.Module,
    target: Tensor,
    layout: Layout | None = None,
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """HINT (Selvaraju et al., 2019; as in the XIL typology): align Grad-CAM with the features that matter.

    ``sum_positions (cam_up - r)^2`` per sample: ``cam`` is the min-max normalized :func:`gradcam_map` of the
    true class at ``layer``, upsampled (nearest) to the input's positions, and ``r`` the *relevant* mask (1 where
    the model should look, e.g. the digit's pixels). Unlike RRR-style methods HINT rewards the right evidence
    instead of only forbidding the wrong one. One forward, and a double backward from the logits down to
    ``layer``.

    Args:
        forward: maps inputs to logits.
        inputs: ``(N, ...)`` inputs.
        relevant: 1 on the features the model should use, in input space (weights in ``[0, 1]``).
        layer: the module whose output is the map.
        target: ``(N,)`` true classes.
        layout: ``"channels_first"`` for convolutions, ``"channels_last"`` for ``(N, T, D)`` sequence outputs;
            ``None`` tells them apart by the layer's type (:func:`~lightning_xai.functional._layers.map_layout`).
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(32, 2))
        >>> x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 0])
        >>> value = hint_penalty(net, x, torch.ones(3, 1, 4, 4), net[0], y)
        >>> bool(0 <= value <= 16)  # at most every one of the 16 positions off by 1
        True
    """
    logits, activation = forward_with_activation(forward, inputs, layer, "hint_penalty")
    cam = gradcam_map(logits, activation, target, layout or map_layout(layer, activation))  # type: ignore[arg-type]
    region = _positions_mask(relevant, inputs).to(cam.dtype)
    upsampled = F.interpolate(cam.unsqueeze(1), size=tuple(region.shape[1:]), mode="nearest").squeeze(1)
    per_sample = _per_sample_sum((upsampled - region).pow(2))
    return _reduce(per_sample, sample_weights, reduction)


# ------------------------------------------------------------------------ Right for Better Reasons


def rbr_penalty(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    mask: Tensor,
    target: Tensor,
    parameters: list[Tensor],
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Right for Better Reasons (Shao et al., 2021; the XIL typology's formula): influence-function input gradients.

    With ``s = sum_theta d L / d theta`` (``L`` the summed cross-entropy, so each sample's term does not depend on
    the batch size), the influence of each input feature is ``i = d s / d x``; the penalty is
    ``sum_d (m_d * i_d * g_d)^2`` per sample with ``g = d/dx sum_k log p_k`` (RRR's input gradient). The product
    is small (the typology uses lambda = 1e5 on DecoyMNIST). Third-order: a gradient of a gradient of a gradient;
    the most expensive method here (about three times RRR).

    Args:
        forward: maps inputs to logits.
        inputs: ``(N, ...)`` float inputs (or token embeddings).
        mask: 1 on forbidden features.
        target: ``(N,)`` true classes.
        parameters: the trained parameters ``theta`` (those that require grad).
        sample_weights: ``(N,)`` weights, 0 for samples without an annotation.
        reduction: ``"mean"`` over the whole batch, ``"sum"`` or ``"none"``.

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> rbr_penalty(net, x, torch.zeros(5, 3), y, list(net.parameters())).item()
        0.0
    """
    if not parameters:
        raise XAIConfigurationError("rbr_penalty: no parameter requires grad; RBR differentiates the loss gradient.")
    inputs = _as_leaf(inputs)
    logits = forward(inputs)
    target = class_labels(target, logits.shape[-1], "the RBR targets").to(logits.device)
    loss = F.cross_entropy(_widen(logits), target, reduction="sum")
    parameter_gradients = torch.autograd.grad(loss, parameters, create_graph=True, allow_unused=True)
    summed = sum(g.sum() for g in parameter_gradients if g is not None)
    if not isinstance(summed, Tensor) or not summed.requires_grad:
        raise XAIConfigurationError("rbr_penalty: the loss does not depend on `parameters`.")
    (influence,) = torch.autograd.grad(summed, inputs, create_graph=True)
    right_reasons = _input_gradient(F.log_softmax(_widen(logits), dim=-1).sum(), inputs)
    mask = broadcast_mask(mask, inputs).to(_widen(right_reasons).dtype)
    per_sample = _per_sample_sum(_widen(mask * influence * right_reasons).pow(2))
    return _reduce(per_sample, sample_weights, reduction)


# ------------------------------------------------------------------------ counterexamples


def counterexample_inputs(
    inputs: Tensor,
    mask: Tensor,
    generator: torch.Generator | None = None,
    low: float | Tensor | None = None,
    high: float | Tensor | None = None,
) -> Tensor:
    """Copies of ``inputs`` with the masked features randomized (the XIL typology's counterexamples, CE).

    Float inputs get values uniform in ``[low, high]`` (default: the batch's range) inside the mask; token ids
    get tokens drawn from the batch's unmasked positions (so they are real, in-vocabulary tokens). A model trained
    on the copies with the original labels learns that the masked region carries no label information.

    Examples:
        >>> x = torch.zeros(2, 4)
        >>> out = counterexample_inputs(x, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]), low=5.0, high=6.0)
        >>> bool(5 <= out[0, 0] <= 6), out[0, 1:].tolist(), out[1].tolist()
        (True, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0])
        >>> ids = torch.tensor([[7, 8, 9]])
        >>> counterexample_inputs(ids, torch.tensor([[0.0, 1.0, 0.0]]))[0, 1].item() in (7, 9)
        True
    """
    data = inputs.detach()
    if not data.is_floating_point():
        chosen = broadcast_mask(mask, data.float()).expand(data.shape) > 0.5
        pool_of_tokens = data[~chosen]
        if pool_of_tokens.numel() == 0:
            pool_of_tokens = data.flatten()
        draws = torch.randint(0, pool_of_tokens.numel(), data.shape, generator=generator, device="cpu")
        return torch.where(chosen, pool_of_tokens[draws.to(data.device)], data)
    weights = broadcast_mask(mask, data).to(data.dtype)
    # the batch's range stays a tensor: reading it as a float would synchronise with the device every step
    low = data.amin() if low is None else low
    high = data.amax() if high is None else high
    noise = torch.rand(data.shape, generator=generator, device="cpu").to(device=data.device, dtype=data.dtype)
    return data * (1 - weights) + (low + (high - low) * noise) * weights


def counterexample_loss(
    forward: Callable[[Tensor], Tensor],
    counterexamples: Tensor,
    target: Tensor,
    sample_weights: Tensor | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross-entropy of the true classes on :func:`counterexample_inputs`: the CE method's extra loss.

    Examples:
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
        >>> round(counterexample_loss(model, torch.randn(4, 2), torch.tensor([0, 1, 0, 1])).item(), 4)  # log 2
        0.6931
    """
    logits = forward(counterexamples)
    target = class_labels(target, logits.shape[-1], "the counterexample targets").to(logits.device)
    per_sample = F.cross_entropy(_widen(logits), target, reduction="none")
    return _reduce(per_sample, sample_weights, reduction)
