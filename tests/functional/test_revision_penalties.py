"""The XIL typology's penalties as functions: Grad-CAM maps against Captum, exact gradients against finite
differences, and the cases whose answer is known."""

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn
from torch.func import functional_call

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional import (
    counterexample_inputs,
    counterexample_loss,
    gradcam_map,
    hint_penalty,
    rbr_penalty,
    rrr_gradcam_penalty,
    rrr_penalty,
)
from lightning_xai.functional._layers import forward_with_activation, map_layout


def _cnn(dtype=torch.float32):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 3),
    )
    return net.to(dtype)


@pytest.mark.parametrize("layer_index", [0, 2])
def test_gradcam_map_equals_captum_layer_gradcam(layer_index):
    net = _cnn()
    x, target = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 1, 0])
    logits, activation = forward_with_activation(net, x, net[layer_index])
    ours = gradcam_map(logits, activation, target, normalize=False)
    captum = LayerGradCam(net, net[layer_index]).attribute(x, target=target, relu_attributions=False)
    torch.testing.assert_close(ours, captum.squeeze(1), rtol=1e-5, atol=1e-6)


def test_gradcam_map_of_a_sequence_layer_weights_features_by_their_mean_gradient():
    torch.manual_seed(0)
    lstm, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(x):
        return head(lstm(x)[0].mean(1))

    x = torch.randn(2, 5, 3)
    logits, hidden = forward_with_activation(forward, x, lstm)
    assert map_layout(lstm, hidden) == "channels_last"
    cam = gradcam_map(logits, hidden, torch.tensor([0, 1]), layout="channels_last", normalize=False)
    # logits are linear in the time-mean of the hidden states: d logit / d h_t = w_y / T at every step
    weights = head.weight[[0, 1]] / 5
    torch.testing.assert_close(cam, (hidden * weights[:, None, :]).sum(-1), rtol=1e-5, atol=1e-6)
    normalized = gradcam_map(logits, hidden, torch.tensor([0, 1]), layout="channels_last")
    assert normalized.amin(1).abs().max() < 1e-6 and (normalized.amax(1) - 1).abs().max() < 1e-5


def test_gradcam_refuses_a_layer_without_positions():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    logits, hidden = forward_with_activation(net, torch.randn(2, 3), net[1])
    with pytest.raises(XAIConfigurationError, match="no spatial or token positions"):
        gradcam_map(logits, hidden)


def _parameter_function(net, penalty):
    names = [name for name, _ in net.named_parameters()]

    def function(*values):
        return penalty(lambda inputs: functional_call(net, dict(zip(names, values)), (inputs,)))

    return function, tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())


def test_rrr_gradcam_gradient_matches_finite_differences():
    net = _cnn(torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    mask = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    mask[:, :, :2, :2] = 1
    layer = net[2]

    def penalty(forward):
        return rrr_gradcam_penalty(forward, x, mask, layer, target=torch.tensor([0, 1, 2]))

    function, parameters = _parameter_function(net, penalty)
    assert torch.autograd.gradcheck(function, parameters, eps=1e-6, atol=1e-5)


def test_hint_gradient_matches_finite_differences():
    net = _cnn(torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    relevant = (torch.rand(3, 1, 4, 4) > 0.5).double()

    def penalty(forward):
        return hint_penalty(forward, x, relevant, net[0], torch.tensor([0, 1, 2]))

    function, parameters = _parameter_function(net, penalty)
    assert torch.autograd.gradcheck(function, parameters, eps=1e-6, atol=1e-5)


def test_rbr_gradient_matches_finite_differences_and_its_definition():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    mask = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)

    # the definition, sample by sample: each sample's influence depends on its own loss only
    expected = []
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        logits = net(xi)
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(logits, y[i : i + 1]), list(net.parameters()), create_graph=True
        )
        (influence,) = torch.autograd.grad(sum(g.sum() for g in grads), xi, create_graph=True)
        (right,) = torch.autograd.grad(torch.log_softmax(logits, -1).sum(), xi, create_graph=True)
        expected.append(((mask[i] * influence * right) ** 2).sum())
    value = rbr_penalty(net, x, mask, y, list(net.parameters()))
    torch.testing.assert_close(value, torch.stack(expected).mean())

    function, parameters = _parameter_function(net, lambda forward: rbr_penalty(forward, x, mask, y, list(parameters)))
    assert torch.autograd.gradcheck(function, parameters, eps=1e-6, atol=1e-6)


def test_rrr_gradcam_is_zero_when_the_model_ignores_the_mask_and_positive_when_it_reads_it():
    # two channels: one lives outside the top-left quadrant, the other inside it; Grad-CAM weighs whole channels
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    quadrant = torch.zeros(1, 1, 4, 4)
    quadrant[..., :2, :2] = 1
    values = torch.rand(3, 1, 4, 4) + 0.5
    x = torch.cat([values * (1 - quadrant), values * quadrant], 1)
    mask = quadrant.expand(3, 1, 4, 4)

    def reads(channel):
        def forward(inputs):
            total = conv(inputs)[:, channel].sum((1, 2))
            return torch.stack([total, -total], 1)

        return forward

    # reading the outside channel leaves the quadrant at the map's minimum; reading the inside one puts it at 1
    assert rrr_gradcam_penalty(reads(0), x, mask, conv).item() < 1e-8
    assert rrr_gradcam_penalty(reads(1), x, mask, conv).item() > 1.0


def test_counterexamples_randomize_only_the_mask_and_keep_tokens_in_the_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 6, 6)
    mask = torch.zeros(64, 1, 6, 6)
    mask[:, :, :2, :2] = 1
    copies = counterexample_inputs(x, mask, g)
    assert torch.equal(copies[..., 2:, :], x[..., 2:, :]) and torch.equal(copies[..., :2, 2:], x[..., :2, 2:])
    inside = copies[..., :2, :2]
    assert x.min() <= inside.min() and inside.max() <= x.max() and inside.std() > 0.2  # uniform over the range
    ids = torch.randint(10, 20, (8, 5))
    spans = torch.zeros(8, 5)
    spans[:, 1] = 1
    swapped = counterexample_inputs(ids, spans, g)
    assert torch.equal(swapped[:, [0, 2, 3, 4]], ids[:, [0, 2, 3, 4]])
    assert set(swapped[:, 1].tolist()) <= set(ids[:, [0, 2, 3, 4]].flatten().tolist())
    assert counterexample_loss(nn.Linear(36, 2), copies.flatten(1), torch.zeros(64, dtype=torch.long)).item() > 0


def test_rbr_is_zero_outside_the_mask_like_rrr():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    nothing = torch.zeros(4, 3)
    assert rbr_penalty(net, x, nothing, y, list(net.parameters())).item() == 0.0
    assert rrr_penalty(net, x, nothing).item() == 0.0
    assert rbr_penalty(net, x, torch.ones(4, 3), y, list(net.parameters())).item() > 0
