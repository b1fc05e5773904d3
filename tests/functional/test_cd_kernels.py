"""The bias split of contextual decomposition: the hand-written backward, the compiled kernel and its fallback."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from lightning_xai.attribution import decompose, set_cd_kernel
from lightning_xai.functional.contextual_decomposition import Decomposition, add_constant, relevant_share, tie_share

cd_kernels = importlib.import_module("lightning_xai.functional.contextual_decomposition")

SHAPES = [((3, 4, 5, 5), (4, 1, 1)), ((3, 6), (6,)), ((3, 4, 7), (4, 1))]


def _autograd_split(relevant, total, constant, tie):
    """The split written out in torch operations, differentiated by autograd: the reference."""
    share = relevant_share(relevant, total - relevant)
    if tie is not None:
        dead = (relevant.abs() + (total - relevant).abs()) == 0
        share = torch.where(dead, tie.view(-1, *[1] * (relevant.dim() - 1)), share)
    return relevant + share * constant


def _streams(shape, constant_shape, dtype):
    generator = torch.Generator().manual_seed(0)
    relevant = torch.randn(*shape, dtype=dtype, generator=generator)
    total = torch.randn(*shape, dtype=dtype, generator=generator)
    relevant[:, 0], total[:, 0] = 0, 0  # units where both parts are zero: the tie rule
    constant = torch.randn(*constant_shape, dtype=dtype, generator=generator)
    return [t.requires_grad_() for t in (relevant, total, constant)]


@pytest.fixture
def kernel_mode():
    yield set_cd_kernel
    set_cd_kernel("eager")


@pytest.mark.parametrize("tie", [None, torch.tensor([0.0, 1.0, 0.0])], ids=["no_tie", "tie"])
@pytest.mark.parametrize(("shape", "constant_shape"), SHAPES)
def test_the_hand_written_backward_passes_gradcheck(shape, constant_shape, tie, kernel_mode):
    kernel_mode("eager")
    streams = _streams(shape, constant_shape, torch.double)

    def split(relevant, total, constant):
        if tie is None:
            return add_constant(Decomposition(relevant, total), constant).relevant
        with tie_share(tie.double()):
            return add_constant(Decomposition(relevant, total), constant).relevant

    assert torch.autograd.gradcheck(split, streams)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("tie", [None, torch.tensor([0.0, 1.0, 0.0])], ids=["no_tie", "tie"])
@pytest.mark.parametrize(("shape", "constant_shape"), SHAPES)
def test_each_kernel_matches_the_autograd_split(shape, constant_shape, tie, mode, kernel_mode):
    kernel_mode(mode)
    relevant, total, constant = _streams(shape, constant_shape, torch.float32)
    upstream = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    if tie is None:
        ours = add_constant(Decomposition(relevant, total), constant)
    else:
        with tie_share(tie):
            ours = add_constant(Decomposition(relevant, total), constant)
    reference = _autograd_split(relevant, total, constant, tie)
    torch.testing.assert_close(ours.relevant, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.total, total + constant)
    got = torch.autograd.grad((ours.relevant * upstream).sum(), (relevant, total, constant))
    expected = torch.autograd.grad((reference * upstream).sum(), (relevant, total, constant))
    for ours_grad, reference_grad in zip(got, expected):
        torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-5)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)
    )


def test_the_compiled_kernel_gives_the_eager_decomposition_and_parameter_gradients(kernel_mode):
    model, x = _cnn(), torch.rand(6, 3, 16, 16)
    mask = torch.zeros(6, 16, 16)
    mask[:, :8] = 1
    results = {}
    for mode in ("eager", "compiled"):
        kernel_mode(mode)
        model.zero_grad()
        output = decompose(model, x, mask)
        (output.relevant.pow(2).sum() + output.total.sum()).backward()
        results[mode] = (output.relevant.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-5, atol=1e-6)
    for compiled_grad, eager_grad in zip(results["compiled"][1], results["eager"][1]):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-5)


def test_auto_compiles_only_large_activations(kernel_mode):
    kernel_mode("auto")
    small = torch.zeros(2, 4, 4)
    large = torch.zeros(cd_kernels.SPLIT_KERNELS.min_numel)
    eager_pair = (cd_kernels._split_forward, cd_kernels._split_backward)
    assert cd_kernels.SPLIT_KERNELS.for_activation(small) == eager_pair
    assert cd_kernels.SPLIT_KERNELS.for_activation(large) != eager_pair


def test_a_kernel_that_fails_to_compile_falls_back_to_eager_with_one_warning(kernel_mode, monkeypatch):
    kernels = cd_kernels._SplitKernels("compiled")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_compiled", (broken, broken))
    monkeypatch.setattr(cd_kernels, "SPLIT_KERNELS", kernels)
    relevant, total, constant = _streams((3, 4, 5, 5), (4, 1, 1), torch.float32)
    with pytest.warns(RuntimeWarning, match="could not compile its fused bias-split kernel"):
        ours = add_constant(Decomposition(relevant, total), constant)
    torch.testing.assert_close(ours.relevant, _autograd_split(relevant, total, constant, None), rtol=1e-5, atol=1e-6)
    assert kernels.for_activation(relevant) == (cd_kernels._split_forward, cd_kernels._split_backward)


def test_an_unknown_kernel_mode_is_refused():
    with pytest.raises(ValueError, match="one of \\('auto', 'compiled', 'eager'\\)"):
        set_cd_kernel("fast")
