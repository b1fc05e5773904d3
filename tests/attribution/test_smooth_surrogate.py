"""smooth_surrogate (a smoothed deep copy) and smoothed (the same replacements, in place, for a block)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_xai.attribution import LogSumExpPool1d, LogSumExpPool2d, smooth_surrogate, smoothed
from lightning_xai.errors import UnsupportedLayerError, XAIConfigurationError
from tests.helpers import SmallCNN


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def test_every_relu_and_max_pool_is_replaced_and_the_model_is_untouched():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    surrogate = smooth_surrogate(model, relu_beta=3.0, maxpool_tau=4.0)
    kinds = [type(m) for m in surrogate.features]
    assert kinds == [nn.Conv2d, nn.Softplus, LogSumExpPool2d, nn.Conv2d, nn.Softplus, LogSumExpPool2d]
    assert surrogate.features[1].beta == 3.0 and surrogate.features[2].tau == 4.0
    assert (surrogate.features[2].kernel_size, surrogate.features[2].stride) == (2, 2)
    assert [type(m) for m in model.features] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d] * 2
    # a copy: own parameters, equal values; the model's weights are the same as before
    assert all(p is not q for p, q in zip(model.parameters(), surrogate.parameters()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) and torch.equal(surrogate.state_dict()[key], value)
    assert not surrogate.training


def test_the_surrogate_tends_to_the_model_as_beta_and_tau_grow():
    model, x = _cnn(), _images()
    with torch.no_grad():
        expected = model(x)
        errors = [float((smooth_surrogate(model, s, s)(x) - expected).abs().max()) for s in (1.0, 10.0, 100.0, 1e4)]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > 10 * errors[-1] and errors[-1] < 1e-3
    # ReLU only, or max pooling only
    relu_only = smooth_surrogate(model, relu_beta=5.0, maxpool_tau=None)
    assert [type(m) for m in relu_only.features][1:3] == [nn.Softplus, nn.MaxPool2d]
    pool_only = smooth_surrogate(model, relu_beta=None, maxpool_tau=5.0)
    assert [type(m) for m in pool_only.features][1:3] == [nn.ReLU, LogSumExpPool2d]


def test_surrogate_gradients_are_smooth_where_relu_gradients_jump():
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.tensor([[-1e-3], [1e-3]], requires_grad=True)
    (exact,) = torch.autograd.grad(model(x).sum(), x)
    (smooth,) = torch.autograd.grad(smooth_surrogate(model, relu_beta=1.0, maxpool_tau=None)(x).sum(), x)
    assert exact.flatten().tolist() == [0.0, 1.0]  # ReLU's gradient jumps at 0
    torch.testing.assert_close(smooth.flatten(), torch.tensor([0.5, 0.5]), atol=1e-3, rtol=0)


def test_smoothed_swaps_in_place_shares_the_live_parameters_and_restores():
    model, x = _cnn(), _images()
    originals = list(model.features)
    reference = smooth_surrogate(model, 5.0, 5.0)
    with smoothed(model, relu_beta=5.0, maxpool_tau=5.0) as surrogate:
        assert surrogate is model and isinstance(model.features[1], nn.Softplus)
        output = model(x)
    assert list(model.features) == originals  # the same module objects are back
    torch.testing.assert_close(output, reference(x))
    # the graph built inside the block is valid after it, and its gradients reach the model's own parameters
    output.sum().backward()
    reference(x).sum().backward()
    for live, copied in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(live.grad, copied.grad)


def test_smoothed_restores_the_model_when_the_block_raises():
    model = _cnn()
    with pytest.raises(RuntimeError, match="inside"):
        with smoothed(model):
            raise RuntimeError("inside")
    assert isinstance(model.features[1], nn.ReLU) and isinstance(model.features[2], nn.MaxPool2d)


def test_hooks_training_mode_and_shared_modules_carry_over():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(2, 2), relu, nn.Linear(2, 2), relu, nn.MaxPool1d(2))
    model.train()
    seen = []
    handle = relu.register_forward_hook(lambda module, args, output: seen.append(type(module).__name__))
    with smoothed(model, relu_beta=2.0, maxpool_tau=2.0):
        assert model[1] is model[3]  # one module at two paths: one replacement
        assert isinstance(model[4], LogSumExpPool1d) and model[1].training
        model(torch.randn(3, 1, 2))
    assert seen == ["Softplus", "Softplus"]  # the ReLU's hook fired on its replacement
    handle.remove()
    model(torch.randn(3, 1, 2))
    assert seen == ["Softplus", "Softplus"]  # and the handle removed it


def test_a_model_without_relu_or_max_pool_modules_is_refused_with_the_fix():
    class FunctionalReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

        def forward(self, x):
            return torch.relu(self.linear(x))

    with pytest.raises(XAIConfigurationError, match=r"no module to smooth.*F\.relu.*SMOOTH_REPLACEMENTS"):
        smooth_surrogate(FunctionalReLU())
    with pytest.raises(XAIConfigurationError, match="nothing would be smoothed"):
        smooth_surrogate(_cnn(), relu_beta=None, maxpool_tau=None)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(XAIConfigurationError, match="relu_beta must be a finite number > 0"):
            smooth_surrogate(_cnn(), relu_beta=bad)


def test_kinked_modules_without_a_replacement_are_named_in_a_warning():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LeakyReLU(), nn.Linear(2, 2), nn.ReLU6())
    with pytest.warns(UserWarning, match=r"2 \(LeakyReLU\), 4 \(ReLU6\)"):
        surrogate = smooth_surrogate(model)
    assert isinstance(surrogate[1], nn.Softplus) and isinstance(surrogate[2], nn.LeakyReLU)


def test_max_pooling_that_returns_indices_is_refused():
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    with pytest.raises(UnsupportedLayerError, match=r"module '1'.*return_indices=True.*maxpool_tau=None"):
        smooth_surrogate(model)
    assert isinstance(smooth_surrogate(model, maxpool_tau=None)[1], nn.MaxPool2d)
