"""LogSumExp pooling: max pooling's windows, its limits in tau, and finite, softmax-shaped gradients."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import lse_pool1d, lse_pool2d

WINDOWS = [
    (k, s, p, d, c)
    for k, s, p, d, c in itertools.product([1, 2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True])
    if p <= k // 2
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode"), WINDOWS)
def test_large_tau_is_max_pooling_with_the_same_windows(kernel, stride, padding, dilation, ceil_mode):
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    expected = F.max_pool2d(x, kernel, **options)
    pooled = lse_pool2d(x, kernel, tau=1e7, **options)
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)
    expected_1d = F.max_pool1d(x[0], kernel, **options)
    torch.testing.assert_close(lse_pool1d(x[0], kernel, 1e7, **options), expected_1d, atol=1e-6, rtol=0)


def test_lse_lies_between_max_and_max_plus_log_k_over_tau_and_tends_to_max():
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    maximum = F.max_pool2d(x, 2)
    gaps = []
    for tau in (0.5, 2.0, 10.0, 100.0):
        gap = lse_pool2d(x, 2, tau=tau) - maximum
        assert bool((gap >= -1e-12).all()) and bool((gap <= math.log(4) / tau + 1e-12).all())
        gaps.append(float(gap.max()))
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.014


def test_small_tau_is_the_mean_plus_log_k_over_tau():
    # tau^-1 log(k mean exp(tau z)) = log(k)/tau + mean(z) + tau var(z)/2 + O(tau^2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tau = 1e-3
    shifted = lse_pool2d(x, 3, tau=tau) - math.log(9) / tau
    mean = F.avg_pool2d(x, 3)
    windows = F.unfold(x.flatten(0, 1)[:, None], 3, stride=3)  # (N*C, 9, L)
    variance = windows.var(1, unbiased=False).view_as(mean)
    torch.testing.assert_close(shifted, mean + tau * variance / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), [(2, 2, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2)])
def test_equals_logsumexp_over_the_unfolded_windows(kernel, stride, padding, dilation):
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tau = 3.0
    padded = F.pad(x, [padding] * 4, value=-math.inf)
    windows = F.unfold(padded.flatten(0, 1)[:, None], kernel, dilation=dilation, stride=stride)  # (N*C, k*k, L)
    expected = torch.logsumexp(tau * windows, dim=1) / tau
    pooled = lse_pool2d(x, kernel, tau=tau, stride=stride, padding=padding, dilation=dilation)
    torch.testing.assert_close(pooled.flatten(0, 1).flatten(1), expected)


def test_gradients_are_finite_softmax_weights_even_for_large_inputs():
    x = (1e4 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    pooled = lse_pool2d(x, 2, tau=10.0)
    assert bool(pooled.isfinite().all())
    (gradient,) = torch.autograd.grad(pooled.sum(), x)
    assert bool(gradient.isfinite().all()) and bool((gradient >= 0).all())
    # non-overlapping windows: each window's gradient is a softmax, summing to one
    torch.testing.assert_close(F.avg_pool2d(gradient, 2) * 4, torch.ones_like(pooled))


@pytest.mark.parametrize(
    "window",
    [
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),  # overlapping windows
        dict(kernel_size=2, padding=1, ceil_mode=True),  # tiled windows, the fast path
    ],
)
def test_first_and_second_derivatives_pass_gradcheck_with_padding(window):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)

    def pool(z):
        return lse_pool2d(z, tau=2.0, **window)

    assert torch.autograd.gradcheck(pool, (x,))
    assert torch.autograd.gradgradcheck(pool, (x,))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(kernel_size=2, tau=0.0), "tau must be a finite number > 0"),
        (dict(kernel_size=2, tau=math.inf), "tau must be a finite number > 0"),
        (dict(kernel_size=2, padding=2), "at most half the kernel size"),
        (dict(kernel_size=20), "too small for kernel"),
        (dict(kernel_size=(2, 2, 2)), "kernel_size needs 1 or 2 values"),
    ],
)
def test_bad_arguments_name_what_is_wrong(arguments, message):
    with pytest.raises(XAIConfigurationError, match=message):
        lse_pool2d(torch.zeros(1, 1, 4, 4), **arguments)


def test_wrong_input_rank_and_dtype_are_refused():
    with pytest.raises(XAIConfigurationError, match="3-d .* or 4-d"):
        lse_pool2d(torch.zeros(4, 4), 2)
    with pytest.raises(XAIConfigurationError, match="floating-point"):
        lse_pool1d(torch.zeros(1, 1, 4, dtype=torch.long), 2)
