"""The bias split of contextual decomposition: the hand-written backward, the compiled kernel and its fallback."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_xai.attribution import decompose, set_cd_kernel
from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.contextual_decomposition import Decomposition, add_constant, relevant_share, tie_share

cd_kernels = importlib.import_module("lightning_xai.functional.contextual_decomposition")
cd_attribution = importlib.import_module("lightning_xai.attribution.contextual_decomposition")

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


@pytest.mark.parametrize("name", sorted(cd_kernels.EAGER_KERNELS))
def test_auto_compiles_only_large_activations(name, kernel_mode):
    kernel_mode("auto")
    small = torch.zeros(2, 4, 4)
    large = torch.zeros(cd_kernels.CD_KERNELS.min_numel)
    assert cd_kernels.CD_KERNELS.for_work(name, small.numel()) is cd_kernels.EAGER_KERNELS[name]
    assert cd_kernels.CD_KERNELS.for_work(name, large.numel()) is not cd_kernels.EAGER_KERNELS[name]


def test_a_kernel_that_fails_to_compile_falls_back_to_eager_with_one_warning(kernel_mode, monkeypatch):
    kernels = cd_kernels._FusedKernels("compiled")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(kernels, "_compiled", dict.fromkeys(cd_kernels.EAGER_KERNELS, broken))
    monkeypatch.setattr(cd_kernels, "CD_KERNELS", kernels)
    relevant, total, constant = _streams((3, 4, 5, 5), (4, 1, 1), torch.float32)
    with pytest.warns(RuntimeWarning, match="could not compile its fused elementwise kernels") as caught:
        ours = add_constant(Decomposition(relevant, total), constant)
        clipped = cd_kernels.decompose_clip(ours)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    torch.testing.assert_close(ours.relevant, _autograd_split(relevant, total, constant, None), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clipped.relevant, ours.relevant.clamp_min(0))
    for name, eager in cd_kernels.EAGER_KERNELS.items():
        assert kernels.for_work(name, relevant.numel()) is eager


def test_an_unknown_kernel_mode_is_refused():
    with pytest.raises(ValueError, match="one of \\('auto', 'compiled', 'eager'\\)"):
        set_cd_kernel("fast")


# ------------------------------------------------------------------ what the decomposition keeps for backward


@pytest.mark.parametrize(("upper", "reference"), [(float("inf"), torch.relu), (6.0, nn.functional.relu6)])
def test_the_clip_rule_gives_the_elementwise_rule_and_its_gradients(upper, reference):
    generator = torch.Generator().manual_seed(0)
    relevant = (4 * torch.randn(4, 3, 8, dtype=torch.double, generator=generator)).requires_grad_()
    total = (4 * torch.randn(4, 3, 8, dtype=torch.double, generator=generator)).requires_grad_()
    clipped = cd_kernels.decompose_clip(Decomposition(relevant, total), upper)
    expected = cd_kernels.decompose_elementwise(Decomposition(relevant, total), reference, clips=True)
    torch.testing.assert_close(clipped.relevant, expected.relevant)
    torch.testing.assert_close(clipped.total, expected.total)
    assert clipped.order is total
    weights = torch.randn(2, 4, 3, 8, dtype=torch.double, generator=generator)
    ours = torch.autograd.grad((clipped.relevant * weights[0] + clipped.total * weights[1]).sum(), (relevant, total))
    theirs = torch.autograd.grad(
        (expected.relevant * weights[0] + expected.total * weights[1]).sum(), (relevant, total)
    )
    for mine, reference_grad in zip(ours, theirs):
        torch.testing.assert_close(mine, reference_grad)
    assert torch.autograd.gradcheck(
        lambda r, t: cd_kernels.decompose_clip(Decomposition(r, t), upper).relevant, (relevant, total)
    )


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (3, 1), (3, 2)], ids=["disjoint", "overlapping", "strided"])
def test_the_max_pool_rule_adds_the_gradients_of_positions_read_twice(kernel, stride, layout):
    generator = torch.Generator().manual_seed(0)
    relevant = torch.randn(2, 3, 9, 9, dtype=torch.double, generator=generator).contiguous(memory_format=layout)
    total = torch.randn(2, 3, 9, 9, dtype=torch.double, generator=generator).contiguous(memory_format=layout)
    relevant.requires_grad_(), total.requires_grad_()

    def pool(t):
        return nn.functional.max_pool2d(t, kernel, stride, return_indices=True)

    pooled = cd_kernels.decompose_max_pool(Decomposition(relevant, total), pool)
    indices = pool(total)[1].flatten(2)
    expected = relevant.flatten(2).gather(2, indices).view_as(pooled.relevant)
    torch.testing.assert_close(pooled.relevant, expected)
    weights = torch.randn_like(expected)
    (ours,) = torch.autograd.grad((pooled.relevant * weights).sum(), relevant)
    (theirs,) = torch.autograd.grad((expected * weights).sum(), relevant)
    torch.testing.assert_close(ours, theirs)
    # the pooled parts and the gradient keep the layout, so the layers around the pooling keep theirs
    assert pooled.relevant.is_contiguous(memory_format=layout) and ours.is_contiguous(memory_format=layout)
    assert torch.autograd.gradcheck(
        lambda r: cd_kernels.decompose_max_pool(Decomposition(r, total), pool).relevant, (relevant,)
    )


def _saved_bytes(loss_of):
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6])
def test_a_cdep_step_keeps_under_twice_a_vanilla_steps_memory_for_backward(activation, kernel_mode):
    # conv - clip - max pool, twice, then dense layers (the demo CNN): the bias split keeps both pre-activations,
    # the clip keeps only a byte mask of the relevant part and the pooling only its positions. Autograd's own
    # ReLU and gather kept each stream's clipped activation as well (2.8x a vanilla step).
    kernel_mode("eager")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), activation(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), activation(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), activation(), nn.Linear(32, 10),
    )  # fmt: skip
    x = torch.rand(16, 3, 28, 28)
    mask = (torch.rand(16, 1, 28, 28) > 0.9).float()
    vanilla = _saved_bytes(lambda: model(x).square().mean())

    def cdep():
        decomposition = decompose(model, x, mask)
        return decomposition.total.square().mean() + decomposition.relevant.square().mean()

    assert _saved_bytes(cdep) / vanilla < 2.0


def test_the_compiled_lstm_step_gives_the_eager_decomposition_and_parameter_gradients(kernel_mode):
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True)
    inputs = torch.randn(3, 7, 6)
    mask = torch.zeros(3, 7, 1)
    mask[:, 2:4] = 1
    results = {}
    for mode in ("eager", "compiled"):
        kernel_mode(mode)
        lstm.zero_grad()
        parts = cd_kernels.decompose_lstm_layer(
            inputs * mask, inputs * (1 - mask), lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
        )
        (parts[0].pow(2).sum() + parts[1].sum() + parts[4].sum()).backward()
        results[mode] = ([part.detach() for part in parts], [p.grad.clone() for p in lstm.parameters()])
    for compiled, eager in zip(results["compiled"][0], results["eager"][0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(results["compiled"][1], results["eager"][1]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    total = lstm(inputs)[0]
    torch.testing.assert_close(
        results["compiled"][0][0] + results["compiled"][0][1], total.detach(), atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------------------------- memory layout


class _ConvInputLayouts(TorchFunctionMode):
    """Records whether each convolution's input is channels last."""

    def __init__(self):
        super().__init__()
        self.channels_last = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (nn.functional.conv2d, torch.conv2d):
            inputs = args[0]
            self.channels_last.append(
                inputs.is_contiguous(memory_format=torch.channels_last) and not inputs.is_contiguous()
            )
        return func(*args, **(kwargs or {}))


def _demo_like_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def _decomposition_and_gradients(model, memory_format):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 28, 28, generator=generator) * (torch.rand(8, 1, 28, 28, generator=generator) > 0.6)
    mask = (torch.rand(8, 1, 28, 28, generator=generator) > 0.8).float()
    layouts = _ConvInputLayouts()
    with layouts:
        decomposition = decompose(model, x, mask, memory_format=memory_format)
    loss = decomposition.total.logsumexp(1).mean() + decomposition.relevant.square().mean()
    gradients = torch.autograd.grad(loss, list(model.parameters()))
    return decomposition, gradients, layouts.channels_last


def test_auto_decomposes_images_on_cpu_channels_last_with_the_contiguous_numbers(kernel_mode):
    kernel_mode("eager")
    model = _demo_like_cnn()
    auto, auto_gradients, auto_layouts = _decomposition_and_gradients(model, "auto")
    exact, exact_gradients, exact_layouts = _decomposition_and_gradients(model, "contiguous")
    # both streams of both convolutions, through the bias splits, clips and poolings in between
    assert auto_layouts == [True] * 4 and exact_layouts == [False] * 4
    torch.testing.assert_close(auto.relevant, exact.relevant, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(auto.total, exact.total, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(auto_gradients, exact_gradients):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


class _ViewingCNN(nn.Module):
    """Flattens with ``view``, which a channels-last activation does not allow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        hidden = torch.relu(self.conv(x))
        return self.head(hidden.view(hidden.shape[0], -1))


def test_a_model_that_views_its_activations_is_decomposed_contiguously():
    model = _ViewingCNN()
    x, mask = torch.rand(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    exact = decompose(model, x, mask, memory_format="contiguous")
    with pytest.raises(RuntimeError, match="view"):
        decompose(model, x, mask, memory_format="channels_last")
    auto = decompose(model, x, mask)
    torch.testing.assert_close(auto.total, exact.total)
    assert model in cd_attribution._CONTIGUOUS_ONLY  # the next steps do not try again


def test_a_bad_memory_format_is_refused_with_the_choices():
    model = _demo_like_cnn()
    with pytest.raises(XAIConfigurationError, match=r"memory_format must be 'auto' or one of \['channels_last'"):
        decompose(model, torch.rand(1, 3, 28, 28), torch.ones(1, 1, 28, 28), memory_format="nhwc")
    with pytest.raises(XAIConfigurationError, match="needs 4-D"):
        decompose(nn.Linear(4, 2), torch.rand(3, 4), torch.ones(3, 4), memory_format="channels_last")
