"""differentiation="finite_difference": the exact penalty value with a first-order, finite-difference gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import expected_gradients_penalty, input_x_gradient_penalty, rrr_penalty
from lightning_xai.functional.penalties import Branches

METHODS = ["rrr", "input_x_gradient", "expected_gradients"]


class TextLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 3)

    def from_embeddings(self, embeddings):
        return self.head(self.lstm(embeddings)[0][:, -1])


def _problem(kind, seed=0):
    """``(parameters, explained, forward, mask, target)``; ``explained()`` recomputes the (embedding) inputs."""
    torch.manual_seed(seed)
    if kind == "lstm":
        model = TextLSTM()
        ids = torch.randint(0, 50, (8, 9))
        mask = torch.zeros(8, 9)
        mask[:, 2:5] = 1
        return list(model.parameters()), lambda: model.embedding(ids), model.from_embeddings, mask, ids[:, 0] % 3
    if kind == "cnn":  # ReLU and max pooling: the finite difference replays their branches
        model = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )  # fmt: skip
        shape, classes = (8, 1, 12, 12), 10
    else:
        model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
        shape, classes = (8, 20), 4
    x = torch.randn(shape)
    mask = (torch.rand(shape) < 1 / 3).float()
    return list(model.parameters()), lambda: x, model, mask, torch.randint(0, classes, (8,))


def _penalty(method, forward, inputs, mask, target, differentiation, **kwargs):
    if method == "rrr":
        return rrr_penalty(forward, inputs, mask, differentiation=differentiation, **kwargs)
    if method == "input_x_gradient":
        return input_x_gradient_penalty(forward, inputs, mask, target, differentiation=differentiation, **kwargs)
    generator = torch.Generator().manual_seed(0)
    return expected_gradients_penalty(
        forward, inputs, mask, target, 2, generator=generator, differentiation=differentiation, **kwargs
    )


def _value_and_gradient(kind, method, differentiation, seed=0, **kwargs):
    parameters, explained, forward, mask, target = _problem(kind, seed)
    value = _penalty(method, forward, explained(), mask, target, differentiation, **kwargs)
    gradients = torch.autograd.grad(value.sum(), parameters, allow_unused=True)  # EG on text: no embedding grad
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(parameters, gradients)])
    return value.detach(), flat


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["cnn", "mlp", "lstm"])
@pytest.mark.parametrize("method", METHODS)
def test_value_is_exact_and_gradient_agrees_with_the_double_backward(method, kind, seed):
    exact_value, exact = _value_and_gradient(kind, method, "double_backward", seed)
    value, estimate = _value_and_gradient(kind, method, "finite_difference", seed)
    torch.testing.assert_close(value, exact_value, rtol=1e-5, atol=1e-7)
    assert exact.norm() > 0
    # measured worst case over these models: 1.3e-3 (benchmarks/finite_difference_agreement.py)
    assert F.cosine_similarity(estimate, exact, dim=0) > 0.9999
    assert (estimate - exact).norm() / exact.norm() < 5e-3


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_values_weights_and_l1_follow_the_exact_penalty(method):
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.5, 0.0, 1.0, 3.0])
    options = dict(sample_weights=weights, reduction="none")
    if method != "rrr":
        options["norm"] = "l1"
    exact_value, exact = _value_and_gradient("mlp", method, "double_backward", **options)
    value, estimate = _value_and_gradient("mlp", method, "finite_difference", **options)
    assert value.shape == (8,)
    torch.testing.assert_close(value, exact_value, rtol=1e-5, atol=1e-7)
    assert (estimate - exact).norm() / exact.norm() < 5e-3


def test_the_shifted_forward_replays_the_dropout_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 3))
    x, mask = torch.randn(16, 10), torch.zeros(16, 10)
    mask[:, :3] = 1
    gradients = {}
    for differentiation in ("double_backward", "finite_difference"):
        torch.manual_seed(1)  # one dropout mask for both
        value = rrr_penalty(model, x, mask, differentiation=differentiation)
        gradients[differentiation] = torch.cat([g.flatten() for g in torch.autograd.grad(value, model.parameters())])
    exact, estimate = gradients["double_backward"], gradients["finite_difference"]
    assert (estimate - exact).norm() / exact.norm() < 5e-3


def test_reused_outputs_replay_the_branches_recorded_with_them():
    parameters, explained, model, mask, _ = _problem("cnn")
    x = explained().requires_grad_(True)
    branches = Branches()
    with branches:
        outputs = model(x)
    assert len(branches.records) == 3  # two ReLUs, one max pooling
    value = rrr_penalty(model, x, mask, outputs=outputs, differentiation="finite_difference", branches=branches)
    estimate = torch.cat([g.flatten() for g in torch.autograd.grad(value, parameters)])
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(rrr_penalty(model, x, mask), parameters)])
    assert (estimate - exact).norm() / exact.norm() < 5e-3


def test_bad_differentiation_names_the_choices():
    model = nn.Linear(3, 2)
    for call in (
        lambda: rrr_penalty(model, torch.randn(2, 3), torch.ones(2, 3), differentiation="foo"),
        lambda: input_x_gradient_penalty(model, torch.randn(2, 3), torch.ones(2, 3), differentiation="foo"),
        lambda: expected_gradients_penalty(model, torch.randn(2, 3), torch.ones(2, 3), differentiation="foo"),
    ):
        with pytest.raises(XAIConfigurationError, match=r"differentiation must be one of.*double_backward.*finite"):
            call()


def test_finite_difference_needs_a_forward_and_refuses_half_precision():
    x = torch.randn(2, 3, requires_grad=True)
    model = nn.Linear(3, 2)
    with pytest.raises(XAIConfigurationError, match="pass `forward`"):
        rrr_penalty(None, x, torch.ones(2, 3), outputs=model(x), differentiation="finite_difference")
    with pytest.raises(XAIConfigurationError, match="32-bit precision"):
        rrr_penalty(model, x, torch.ones(2, 3), outputs=model(x).bfloat16(), differentiation="finite_difference")


def test_inplace_relu_and_pooling_with_indices_are_replayed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True))
    pool = nn.MaxPool2d(2, return_indices=True)
    x = torch.randn(2, 1, 9, 9)
    branches = Branches()
    with branches:
        first, indices = pool(net(x))
    with branches.replaying():
        again, replayed_indices = pool(net(x))
    torch.testing.assert_close(again, first)
    assert torch.equal(replayed_indices, indices)
