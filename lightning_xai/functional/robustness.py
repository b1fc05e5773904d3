"""Robustness metrics of attributions: infidelity and max-sensitivity, vectorized over perturbation samples.

Both kernels follow Captum's :func:`captum.metrics.infidelity` and :func:`captum.metrics.sensitivity_max`
exactly (Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019): the batch of
perturbed inputs is laid out as Captum lays it out (``inputs.repeat_interleave(n_perturb_samples, 0)``: all
samples of example 0, then all samples of example 1, ...), and the default perturbations draw from the same
random stream, so with the same seed (or the same ``perturb_fn``) the values are the same as Captum's.

The ``N * n_perturb_samples`` perturbed inputs are drawn in one call and go through the model (or the
explanation) in row chunks of ``max_examples_per_batch``. Captum's default sends them all at once; on a CPU
that is slower than chunks of about a hundred rows that stay in cache (``benchmarks/metrics_speed.py``: about
1.4x on the demo CNN), so the default (``"auto"``) is :data:`CPU_CHUNK_ROWS` rows on CPU and everything at
once on accelerators. Unlike Captum's chunks, ours never repeat the unperturbed forward or explanation.
Inputs are single tensors ``(N, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_xai.errors import XAIConfigurationError

Target = int | Sequence[int] | Tensor | None
PerturbFn = Callable[[Tensor], tuple[Tensor, Tensor]]
SensitivityPerturbFn = Callable[[Tensor], Tensor]
ChunkRows = int | str | None

CPU_CHUNK_ROWS = 128
"""Rows per model call under ``max_examples_per_batch="auto"`` on CPU (best of 32-640 on the demo CNN)."""


def _chunk_rows(max_examples_per_batch: ChunkRows, total_rows: int, device: torch.device, where: str) -> int:
    """How many perturbed rows go through the model or the explanation per call."""
    if max_examples_per_batch is None:
        return max(total_rows, 1)
    if max_examples_per_batch == "auto":
        return CPU_CHUNK_ROWS if device.type == "cpu" else max(total_rows, 1)
    if isinstance(max_examples_per_batch, bool) or not isinstance(max_examples_per_batch, int):
        raise XAIConfigurationError(
            f"{where}: max_examples_per_batch must be a positive int, 'auto' or None, got {max_examples_per_batch!r}."
        )
    if max_examples_per_batch < 1:
        raise XAIConfigurationError(
            f"{where}: max_examples_per_batch must be >= 1, got {max_examples_per_batch}; pass None to send all "
            "perturbed inputs at once."
        )
    return max_examples_per_batch


#: memory layouts a batch of perturbed images can take on its way into the model, by name
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MemoryFormat = str
"""``"auto"``, or a key of :data:`MEMORY_FORMATS`."""


def check_memory_format(memory_format: MemoryFormat, where: str) -> None:
    """Raises :class:`XAIConfigurationError` unless ``memory_format`` is ``"auto"`` or in :data:`MEMORY_FORMATS`."""
    if memory_format != "auto" and memory_format not in MEMORY_FORMATS:
        raise XAIConfigurationError(
            f"{where}: memory_format must be 'auto' or one of {sorted(MEMORY_FORMATS)}, got {memory_format!r}."
        )


def resolve_memory_format(memory_format: MemoryFormat, like: Tensor, where: str) -> torch.memory_format:
    """The layout ``memory_format`` names for inputs like ``like``: ``"auto"`` is channels last for 4-D floating
    inputs on CPU (images, which oneDNN's convolutions read without a reorder) and contiguous otherwise."""
    check_memory_format(memory_format, where)
    if memory_format == "auto":
        images_on_cpu = like.dim() == 4 and like.is_floating_point() and like.device.type == "cpu"
        return torch.channels_last if images_on_cpu else torch.contiguous_format
    if memory_format == "channels_last" and like.dim() != 4:
        raise XAIConfigurationError(
            f"{where}: memory_format='channels_last' needs 4-D (N, C, H, W) inputs, got shape {tuple(like.shape)}; "
            "use 'auto' or 'contiguous'."
        )
    return MEMORY_FORMATS[memory_format]


class _ChunkLayout:
    """Runs the model (or the explanation) on perturbed chunks in one memory layout, for one metric call.

    oneDNN's CPU convolutions read channels-last images without the reorder they make of contiguous ones: the demo
    CNN's forward is about 2x faster on them, a small ResNet's 1.4x (``benchmarks/metrics_speed.py``). The values
    agree with the contiguous layout's to rounding (about 1e-6 relative), not bit for bit, so ``"contiguous"``
    gives Captum's exact numbers. ``"auto"`` takes channels last for 4-D floating inputs on CPU and goes back to
    the contiguous layout for the rest of the call when the first chunk fails in it (a model that ``view``s its
    activations needs contiguous ones); a model that fails in both layouts raises its own error.
    """

    def __init__(self, memory_format: MemoryFormat, like: Tensor, where: str) -> None:
        self.format = resolve_memory_format(memory_format, like, where)
        self.falls_back = memory_format == "auto"
        self._tried = False

    def __call__(self, fn: Callable[..., Tensor], batch: Tensor, *args: Any) -> Tensor:
        if self.format is torch.contiguous_format:
            return fn(batch, *args)
        first, self._tried = not self._tried, True
        try:
            return fn(batch.contiguous(memory_format=self.format), *args)
        except RuntimeError:
            if not (first and self.falls_back):
                raise
            self.format = torch.contiguous_format
            return fn(batch, *args)


def gaussian_perturbation(std: float = 0.003, generator: torch.Generator | None = None) -> PerturbFn:
    """The default perturbation of :func:`infidelity`: Gaussian noise ``I ~ N(0, std^2)``, ``x -> x - I``.

    This is the perturbation of Captum's ``infidelity`` docstring example (there drawn with NumPy), suited
    to *local* attributions (saliency, gradients). For it, ``f(x) - f(x - I) ~ I^T grad f(x)``.

    Args:
        std: standard deviation of the noise.
        generator: random generator to draw from; ``None`` uses torch's global generator (seed it with
            ``torch.manual_seed``). Noise is drawn on the generator's device, or on the inputs' device when
            ``generator`` is ``None``, in the inputs' floating dtype.

    Returns:
        ``perturb_fn(inputs) -> (perturbations, perturbed_inputs)``, Captum's contract for ``perturb_func``.

    Examples:
        >>> import torch
        >>> perturb = gaussian_perturbation(std=0.1, generator=torch.Generator().manual_seed(0))
        >>> x = torch.ones(2, 3)
        >>> noise, perturbed = perturb(x)
        >>> torch.equal(perturbed, x - noise), noise.shape
        (True, torch.Size([2, 3]))
    """
    if std < 0:
        raise XAIConfigurationError(f"gaussian_perturbation: std must be >= 0, got {std}; pass a non-negative std.")

    def perturb_fn(inputs: Tensor) -> tuple[Tensor, Tensor]:
        dtype = inputs.dtype if inputs.is_floating_point() else torch.float32
        device = generator.device if generator is not None else inputs.device
        noise = torch.randn(inputs.shape, generator=generator, device=device, dtype=dtype).mul_(std)
        noise = noise.to(inputs.device)
        return noise, inputs - noise

    return perturb_fn


def _uniform_perturbation(radius: float, generator: torch.Generator | None) -> SensitivityPerturbFn:
    """Captum's ``default_perturb_func``: ``x + U(-radius, radius)``, drawn in float32 (on CPU without a generator)."""

    def perturb_fn(inputs: Tensor) -> Tensor:
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.empty(inputs.shape, dtype=torch.float32, device=device).uniform_(
            -radius, radius, generator=generator
        )
        return inputs + noise.to(inputs.device)

    return perturb_fn


def _as_target(target: Target, batch_size: int, device: torch.device, where: str) -> Tensor | None:
    """``None`` or an ``(N,)`` long tensor of classes."""
    if target is None:
        return None
    target = torch.as_tensor(target, device=device).long()
    if target.numel() == 1:
        return target.reshape(1).expand(batch_size)
    if target.dim() != 1 or target.shape[0] != batch_size:
        raise XAIConfigurationError(
            f"{where}: target must be an int or have shape ({batch_size},) to match the inputs, got shape "
            f"{tuple(target.shape)}; pass one class per example."
        )
    return target


def _select(output: Tensor, target: Tensor | None, where: str) -> Tensor:
    """One scalar per example: ``output[i, target[i]]``, or the output itself when it is already scalar."""
    if target is None:
        if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
            return output.reshape(-1)
        raise XAIConfigurationError(
            f"{where}: the forward function returned shape {tuple(output.shape)}, more than one value per example; "
            "pass target= (the explained class of each example)."
        )
    if output.dim() != 2:
        raise XAIConfigurationError(
            f"{where}: with a target the forward function must return (N, classes) logits, got shape "
            f"{tuple(output.shape)}; wrap it so that it returns one row per example."
        )
    return output.gather(1, target.unsqueeze(1)).squeeze(1)


def _check_samples(n_perturb_samples: int, where: str) -> None:
    if n_perturb_samples < 1:
        raise XAIConfigurationError(f"{where}: n_perturb_samples must be >= 1, got {n_perturb_samples}.")


def _single(value: Tensor | tuple[Tensor, ...], what: str, where: str) -> Tensor:
    """Accept Captum-style one-element tuples from user perturbation functions."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise XAIConfigurationError(
                f"{where}: the perturbation function returned {len(value)} {what} tensors; only single-tensor "
                "inputs are supported here, return one tensor."
            )
        value = value[0]
    return value


def infidelity(
    forward_fn: Callable[[Tensor], Tensor],
    perturb_fn: PerturbFn | None,
    inputs: Tensor,
    attributions: Tensor,
    target: Target = None,
    n_perturb_samples: int = 10,
    normalize: bool = False,
    generator: torch.Generator | None = None,
    max_examples_per_batch: ChunkRows = "auto",
    memory_format: MemoryFormat = "auto",
) -> Tensor:
    """Explanation infidelity: ``E_I[(I^T attr - (f(x) - f(x - I)))^2]`` per example, as Captum computes it.

    ``perturb_fn`` is called once on the ``(N * n_perturb_samples, ...)`` batch
    ``inputs.repeat_interleave(n_perturb_samples, 0)``; ``forward_fn`` runs once on ``inputs`` and on that
    perturbed batch in chunks of ``max_examples_per_batch`` rows. The expectation is the mean over the
    ``n_perturb_samples`` draws. Runs under ``torch.no_grad``.

    With ``normalize=True`` the attributions are first rescaled by the least-squares factor
    ``beta = E[I^T attr (f(x) - f(x - I))] / E[(I^T attr)^2]`` (per example), which makes the value invariant
    to a constant scaling of the attributions; like Captum, this is computed from the expanded square
    ``beta^2 E[a^2] - 2 beta E[ab] + E[b^2]``.

    Args:
        forward_fn: maps ``(M, ...)`` inputs to ``(M, classes)`` logits (or ``(M,)``/``(M, 1)`` scores).
        perturb_fn: ``perturb_fn(inputs) -> (perturbations, perturbed_inputs)`` (Captum's contract); ``None``
            uses :func:`gaussian_perturbation` with ``std=0.003`` and ``generator``.
        inputs: ``(N, ...)`` explained inputs.
        attributions: ``(N, ...)`` attributions, same shape as ``inputs``.
        target: explained class per example: an int, or ``(N,)``; ``None`` if ``forward_fn`` returns one
            score per example.
        n_perturb_samples: perturbations per example.
        normalize: rescale the attributions by the optimal ``beta`` first (scale-invariant infidelity).
        generator: random generator of the default perturbation. A custom ``perturb_fn`` draws its own noise:
            pass the generator to it (e.g. ``gaussian_perturbation(std, generator=g)``) instead.
        max_examples_per_batch: perturbed rows per ``forward_fn`` call; ``"auto"``: :data:`CPU_CHUNK_ROWS` on
            CPU, all at once elsewhere; ``None``: all at once. The value does not depend on it.
        memory_format: the layout the inputs and their perturbations go into ``forward_fn`` in: ``"auto"``
            (channels last for images on CPU, where oneDNN's convolutions are about 1.4-2x faster on them; the
            contiguous layout for a model that fails on them), ``"channels_last"`` or ``"contiguous"`` (Captum's
            numbers bit for bit; ``"auto"`` agrees with them to rounding).

    Returns:
        ``(N,)`` infidelity per example (lower is better).

    Raises:
        XAIConfigurationError: shapes of ``inputs`` and ``attributions`` differ, the perturbation function
            returns wrong shapes, ``target`` is missing for multi-class outputs, or ``generator`` is given with a
            custom ``perturb_fn``.

    Examples:
        For a linear model and attributions equal to its weights, ``I^T w = f(x) - f(x - I)`` exactly:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(4, 3)
        >>> x = torch.randn(2, 4)
        >>> target = torch.tensor([0, 2])
        >>> attributions = model.weight[target].detach()
        >>> values = infidelity(model, None, x, attributions, target, generator=torch.Generator().manual_seed(0))
        >>> values.shape, bool(values.abs().max() < 1e-10)
        (torch.Size([2]), True)
    """
    where = "lightning_xai.functional.infidelity"
    _check_samples(n_perturb_samples, where)
    if inputs.shape != attributions.shape:
        raise XAIConfigurationError(
            f"{where}: inputs {tuple(inputs.shape)} and attributions {tuple(attributions.shape)} must have the "
            "same shape; pass one attribution per input feature."
        )
    if perturb_fn is None:
        perturb_fn = gaussian_perturbation(0.003, generator=generator)
    elif generator is not None:
        raise XAIConfigurationError(
            f"{where}: generator= only seeds the default perturbation, but a perturb_fn was given; let the "
            "perturb_fn draw from the generator (e.g. gaussian_perturbation(std, generator=g)) and pass "
            "generator=None."
        )
    batch_size = inputs.shape[0]
    with torch.no_grad():
        targets = _as_target(target, batch_size, inputs.device, where)
        expanded = inputs.repeat_interleave(n_perturb_samples, dim=0)
        perturbations, perturbed = perturb_fn(expanded)
        perturbations = _single(perturbations, "perturbation", where)
        perturbed = _single(perturbed, "perturbed-input", where)
        if perturbations.shape != expanded.shape or perturbed.shape != expanded.shape:
            raise XAIConfigurationError(
                f"{where}: perturb_fn got inputs of shape {tuple(expanded.shape)} and returned perturbations "
                f"{tuple(perturbations.shape)} and perturbed inputs {tuple(perturbed.shape)}; both must have the "
                "input's shape."
            )
        expanded_targets = None if targets is None else targets.repeat_interleave(n_perturb_samples)
        rows = _chunk_rows(max_examples_per_batch, perturbed.shape[0], perturbed.device, where)
        layout = _ChunkLayout(memory_format, inputs, where)
        perturbed_out = torch.cat(
            [
                _select(
                    layout(forward_fn, perturbed[start : start + rows]),
                    None if expanded_targets is None else expanded_targets[start : start + rows],
                    where,
                )
                for start in range(0, perturbed.shape[0], rows)
            ]
        )
        out = _select(layout(forward_fn, inputs), targets, where)  # in the perturbations' layout: f(x) - f(x - I)
        # b = f(x) - f(x - I), a = I^T attr, both (N, n_perturb_samples)
        fwd_diffs = (out.repeat_interleave(n_perturb_samples) - perturbed_out).view(batch_size, n_perturb_samples)
        attr_dots = (
            (perturbations.reshape(batch_size, n_perturb_samples, -1) * attributions.reshape(batch_size, 1, -1))
            .sum(-1)
            .to(fwd_diffs.dtype)
        )
        if normalize:
            a2 = attr_dots.pow(2).sum(-1)
            ab = (attr_dots * fwd_diffs).sum(-1)
            b2 = fwd_diffs.pow(2).sum(-1)
            beta = ab / torch.where(a2 != 0, a2, torch.ones_like(a2))
            values = beta * beta * a2 - 2 * beta * ab + b2
        else:
            values = (attr_dots - fwd_diffs).pow(2).sum(-1)
        return values / n_perturb_samples


def sensitivity_max(
    explain_fn: Callable[[Tensor, Tensor | None], Tensor],
    inputs: Tensor,
    target: Target = None,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    norm_ord: str | float = "fro",
    generator: torch.Generator | None = None,
    *,
    perturb_fn: SensitivityPerturbFn | None = None,
    explanations: Tensor | None = None,
    max_examples_per_batch: ChunkRows = "auto",
    memory_format: MemoryFormat = "auto",
) -> Tensor:
    """Max-sensitivity: ``max_j ||e(x_j) - e(x)|| / ||e(x)||`` over perturbed ``x_j``, as Captum computes it.

    ``explain_fn`` is called as given (it may need gradients: it is not wrapped in ``no_grad``): once on
    ``inputs``, then on the ``(N * n_perturb_samples, ...)`` batch of perturbed inputs
    ``perturb(inputs.repeat_interleave(n_perturb_samples, 0))`` (drawn at once) with the targets repeated
    alike, in chunks of ``max_examples_per_batch`` rows. A zero
    ``||e(x)||`` is replaced by 1, as in Captum.

    Args:
        explain_fn: ``explain_fn(inputs, target) -> attributions`` of the inputs' shape; ``target`` is ``None``
            or an ``(M,)`` long tensor aligned with ``inputs``.
        inputs: ``(N, ...)`` explained inputs.
        target: explained class per example: an int or ``(N,)``; ``None`` passes ``None`` on.
        perturb_radius: half-width of the default uniform noise ``U(-r, r)`` (Captum's
            ``default_perturb_func``: drawn in float32 on the CPU, or on ``generator``'s device).
        n_perturb_samples: perturbations per example.
        norm_ord: ``p`` of :func:`torch.norm` (``"fro"``: Euclidean norm of the flattened attributions).
        generator: random generator of the default perturbation; ``None`` uses torch's global one.
        perturb_fn: optional ``perturb_fn(inputs) -> perturbed_inputs`` replacing the uniform noise.
        explanations: ``explain_fn(inputs, target)`` when the caller already has it (one call fewer).
        max_examples_per_batch: perturbed rows per ``explain_fn`` call; ``"auto"``: :data:`CPU_CHUNK_ROWS` on
            CPU, all at once elsewhere; ``None``: all at once. The value does not depend on it.
        memory_format: the layout the inputs and the perturbed inputs go into ``explain_fn`` in, as for
            :func:`infidelity`; ``"contiguous"`` gives Captum's numbers bit for bit.

    Returns:
        ``(N,)`` max-sensitivity per example (lower is better).

    Raises:
        XAIConfigurationError: ``explain_fn`` or ``perturb_fn`` returns the wrong shape, or ``generator`` is
            given with a custom ``perturb_fn``.

    Examples:
        Gradients of a linear model do not depend on the input, so their sensitivity is 0:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(4, 3)
        >>> def gradient(x, target):
        ...     x = x.detach().requires_grad_(True)
        ...     with torch.enable_grad():
        ...         (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
        ...     return grad
        >>> x = torch.randn(2, 4)
        >>> sensitivity_max(gradient, x, target=torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
        tensor([0., 0.])
    """
    where = "lightning_xai.functional.sensitivity_max"
    _check_samples(n_perturb_samples, where)
    if perturb_fn is None:
        perturb_fn = _uniform_perturbation(perturb_radius, generator)
    elif generator is not None:
        raise XAIConfigurationError(
            f"{where}: generator= only seeds the default uniform perturbation, but a perturb_fn was given; let the "
            "perturb_fn draw from its own generator and pass generator=None."
        )
    batch_size = inputs.shape[0]
    targets = _as_target(target, batch_size, inputs.device, where)
    layout = _ChunkLayout(memory_format, inputs, where)
    # The caller's explanation of the unperturbed inputs saves one explain_fn call; deterministic explainers
    # draw no random numbers, so the perturbations (and the result) stay those of Captum.
    if explanations is None:
        explanations = layout(explain_fn, inputs, targets)
    if explanations.shape[0] != batch_size:
        raise XAIConfigurationError(
            f"{where}: explain_fn returned shape {tuple(explanations.shape)} for inputs {tuple(inputs.shape)}; it "
            "must return one attribution row per input."
        )
    with torch.no_grad():
        perturbed = _single(perturb_fn(inputs.repeat_interleave(n_perturb_samples, dim=0)), "perturbed-input", where)
    expanded_targets = None if targets is None else targets.repeat_interleave(n_perturb_samples)
    explanations = explanations.detach().reshape(batch_size, -1)
    with torch.no_grad():
        base_norm = torch.norm(explanations, p=norm_ord, dim=-1)
        base_norm = torch.where(base_norm == 0.0, torch.ones_like(base_norm), base_norm)
    total_rows = perturbed.shape[0]
    rows = _chunk_rows(max_examples_per_batch, total_rows, perturbed.device, where)
    sensitivities = []
    for start in range(0, total_rows, rows):
        stop = min(start + rows, total_rows)
        chunk_targets = None if expanded_targets is None else expanded_targets[start:stop]
        perturbed_explanations = layout(explain_fn, perturbed[start:stop], chunk_targets).detach()
        with torch.no_grad():
            if perturbed_explanations.numel() != (stop - start) * explanations.shape[-1]:
                raise XAIConfigurationError(
                    f"{where}: explain_fn returned shape {tuple(perturbed_explanations.shape)} for perturbed inputs "
                    f"{tuple(perturbed[start:stop].shape)}; it must return attributions of the same size for every "
                    "input."
                )
            owners = torch.arange(start, stop, device=explanations.device) // n_perturb_samples
            differences = explanations[owners] - perturbed_explanations.reshape(stop - start, -1)
            sensitivities.append(torch.norm(differences, p=norm_ord, dim=-1) / base_norm[owners])
    with torch.no_grad():
        return torch.cat(sensitivities).view(batch_size, n_perturb_samples).max(dim=1).values
