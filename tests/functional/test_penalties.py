import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_xai.attribution import contextual_decomposition
from lightning_xai.errors import MaskShapeError, XAIConfigurationError
from lightning_xai.functional import (
    cdep_penalty,
    expected_gradients_penalty,
    input_x_gradient_penalty,
    rrr_penalty,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small_cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 4)).double()


def _penalties(model, x, mask, target):
    return {
        "cdep_image": lambda: cdep_penalty(*contextual_decomposition(model, x, mask)),
        "cdep_text": lambda: cdep_penalty(*contextual_decomposition(model, x, mask), target=target, variant="text"),
        "cdep_shift": lambda: cdep_penalty(*contextual_decomposition(model, x, mask), variant="shift_invariant"),
        "rrr": lambda: rrr_penalty(model, x, mask),
        "input_x_gradient": lambda: input_x_gradient_penalty(model, x, mask, target),
        "expected_gradients": lambda: expected_gradients_penalty(
            model, x, mask, target, num_references=2, generator=torch.Generator().manual_seed(3)
        ),
    }


@pytest.mark.parametrize(
    "name", ["cdep_image", "cdep_text", "cdep_shift", "rrr", "input_x_gradient", "expected_gradients"]
)
def test_penalty_gradients_match_finite_differences(name):
    model = _small_cnn()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    mask = (torch.rand(3, 6, 6) > 0.5).double()
    target = torch.tensor([0, 2, 1])
    bias = model[4].bias
    weight = model[0].weight

    def penalty_of(conv_weight, linear_bias):
        saved_weight, saved_bias = model[0].weight, model[4].bias
        del model[0].weight, model[4].bias
        model[0].weight, model[4].bias = conv_weight, linear_bias
        try:
            return _penalties(model, x, mask, target)[name]()
        finally:
            del model[0].weight, model[4].bias
            model[0].weight, model[4].bias = saved_weight, saved_bias

    inputs = (weight.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(penalty_of, inputs, eps=1e-6, atol=1e-5)


def test_cdep_values_by_hand():
    rel = torch.tensor([[1.0, -1.0]])
    irrel = torch.tensor([[0.0, 1.0]])
    expected_image = (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(-2.0))) / 2
    assert cdep_penalty(rel, irrel).item() == pytest.approx(expected_image.item())
    assert cdep_penalty(rel, irrel, torch.tensor([1]), variant="text").item() == pytest.approx(
        F.softplus(torch.tensor(-2.0)).item()
    )


def test_shift_invariant_variant_ignores_logit_shifts_and_paper_variant_does_not():
    rel, irrel = torch.randn(5, 4), torch.randn(5, 4)
    shift = torch.randn(5, 1) * 3
    shifted_rel = rel + shift
    assert torch.allclose(
        cdep_penalty(rel, irrel, variant="shift_invariant", reduction="none"),
        cdep_penalty(shifted_rel, irrel, variant="shift_invariant", reduction="none"),
        atol=1e-6,
    )
    assert not torch.allclose(cdep_penalty(rel, irrel), cdep_penalty(shifted_rel, irrel))
    # zero exactly when the masked part adds the same to every class
    assert cdep_penalty(shift.expand(5, 4), irrel, variant="shift_invariant").item() == pytest.approx(0.0, abs=1e-6)


def test_rrr_matches_closed_form_on_logistic_model():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    mask = torch.tensor([1.0, 0.0, 1.0])
    # d/dx sum_k log softmax_k = W^T (1 - 2 p) for two classes, because sum_k d log p_k / dz = 1 - K p
    p = torch.softmax(model(x), dim=1)
    gradient = (1 - 2 * p) @ model.weight
    expected = ((gradient * mask) ** 2).sum(1).mean()
    assert rrr_penalty(model, x, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_expected_gradients_matches_explicit_loop():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    references = x[torch.tensor([5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 0])]
    generator = torch.Generator().manual_seed(7)
    value = expected_gradients_penalty(
        model, x, mask, target, num_references=2, references=references, generator=generator, reduction="none"
    )
    alphas = torch.rand(12, 1, generator=torch.Generator().manual_seed(7))
    expected = []
    for i in range(6):
        attributions = []
        for k in range(2):
            ref, alpha = references[k * 6 + i], alphas[k * 6 + i]
            point = (ref + alpha * (x[i] - ref)).requires_grad_(True)
            log_p = F.log_softmax(model(point.unsqueeze(0)), dim=1)[0, target[i]]
            (grad,) = torch.autograd.grad(log_p, point)
            attributions.append((x[i] - ref) * grad)
        expected.append(((torch.stack(attributions).mean(0) * mask) ** 2).sum())
    torch.testing.assert_close(value, torch.stack(expected), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["rrr", "input_x_gradient", "cdep"])
def test_mean_over_equal_shards_equals_mean_over_batch(method):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, target = torch.randn(8, 5), torch.randint(0, 3, (8,))
    mask = (torch.rand(8, 5) > 0.5).float()
    weights = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1])

    def value(rows):
        if method == "cdep":
            return cdep_penalty(*contextual_decomposition(model, x[rows], mask[rows]), sample_weights=weights[rows])
        if method == "rrr":
            return rrr_penalty(model, x[rows], mask[rows], sample_weights=weights[rows])
        return input_x_gradient_penalty(model, x[rows], mask[rows], target[rows], sample_weights=weights[rows])

    full = value(slice(0, 8))
    halves = (value(slice(0, 4)) + value(slice(4, 8))) / 2
    assert full.item() == pytest.approx(halves.item(), rel=1e-5)


def test_unannotated_samples_contribute_zero():
    model = nn.Linear(4, 3)
    x = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    per_sample = rrr_penalty(model, x, mask, sample_weights=torch.tensor([1.0, 0.0, 1.0]), reduction="none")
    assert per_sample[1].item() == 0.0 and per_sample[0].item() > 0


def test_penalty_on_token_embeddings_uses_position_masks():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 2)
    ids = torch.randint(0, 10, (2, 5))
    embeddings = embedding(ids)
    mask = torch.zeros(2, 5)
    mask[0, 1] = 1
    per_sample = rrr_penalty(lambda e: head(e.mean(1)), embeddings, mask, reduction="none")
    assert per_sample[0].item() > 0 and per_sample[1].item() == 0.0
    per_sample.sum().backward()
    assert embedding.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_bad_arguments_raise_clear_errors():
    model = nn.Linear(4, 3)
    with pytest.raises(MaskShapeError, match=r"\(2, 3\)"):
        rrr_penalty(model, torch.randn(2, 4), torch.ones(2, 3))
    with pytest.raises(XAIConfigurationError, match="variant"):
        cdep_penalty(torch.zeros(2, 3), torch.zeros(2, 3), variant="nope")
    with pytest.raises(XAIConfigurationError, match="target"):
        cdep_penalty(torch.zeros(2, 3), torch.zeros(2, 3), variant="text")
    with pytest.raises(XAIConfigurationError, match="requires_grad"):
        rrr_penalty(None, torch.randn(2, 4), torch.ones(2, 4), outputs=torch.randn(2, 3))
    with pytest.raises(XAIConfigurationError, match="references must have shape"):
        expected_gradients_penalty(model, torch.randn(2, 4), torch.ones(2, 4), references=torch.randn(3, 4))


def test_reused_outputs_give_the_same_rrr_as_a_fresh_forward():
    model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 3))
    x = torch.randn(5, 4).requires_grad_(True)
    mask = (torch.rand(5, 4) > 0.5).float()
    reused = rrr_penalty(None, x, mask, outputs=model(x))
    fresh = rrr_penalty(model, x.detach(), mask)
    assert reused.item() == pytest.approx(fresh.item(), rel=1e-6)
