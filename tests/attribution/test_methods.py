import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients, Saliency
from torch import nn

from lightning_xai.attribution import (
    attribute,
    available_attribution_methods,
    contextual_decomposition,
    split_integrated_gradients,
)
from lightning_xai.errors import XAIConfigurationError


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 16, 5)
    ).eval()


@pytest.mark.parametrize("method", available_attribution_methods())
def test_every_method_explains_a_cnn_with_input_shaped_finite_attributions(method):
    model, x, y = _cnn(), torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 4])
    options = {"n_samples": 16} if method in ("kernel_shap", "lime") else {}
    attributions = attribute(method, model, x, y, **options)
    assert attributions.shape == x.shape and torch.isfinite(attributions).all()
    assert attributions.abs().sum() > 0


def test_named_methods_are_captums():
    model, x, y = _cnn(), torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 4])
    torch.testing.assert_close(attribute("saliency", model, x, y), Saliency(model).attribute(x, target=y))
    torch.testing.assert_close(
        attribute("integrated_gradients", model, x, y, n_steps=16),
        IntegratedGradients(model).attribute(x, target=y, n_steps=16),
    )


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_right"])
def test_split_ig_left_plus_right_equals_plain_ig(method):
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    left, right, alpha = split_integrated_gradients(
        model, x, y, n_steps=40, method=method, return_parts=True, internal_batch_size=50
    )
    plain = IntegratedGradients(model).attribute(x, target=y, n_steps=40, method=method)
    torch.testing.assert_close(left + right, plain, atol=1e-6, rtol=1e-5)
    assert ((alpha > 0) & (alpha <= 1)).all()


def test_split_ig_stops_where_a_saturating_model_saturates():
    class Saturating(nn.Module):
        def forward(self, x):  # reaches 95 % of its change after ~15 % of the path from 0
            return torch.sigmoid(20 * x.sum(1, keepdim=True)) - 0.5

    x = torch.ones(2, 4)
    left, right, alpha = split_integrated_gradients(Saturating(), x, n_steps=64, psi=0.95, return_parts=True)
    assert (alpha < 0.2).all()
    # the left part carries the output change up to the split: psi of the total, within quadrature error
    assert left.sum(1).div(0.5).sub(0.95).abs().max() < 0.05
    assert right.abs().sum() > 0


def test_split_ig_without_output_change_keeps_everything_left():
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.zero_()
    left, right, alpha = split_integrated_gradients(model, torch.randn(2, 3), return_parts=True)
    assert right.abs().max() == 0 and (alpha == 1).all()


def test_cd_attribution_of_a_linear_model_sums_to_the_bias_free_logit():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4, bias=False))
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([1, 3])
    attributions = attribute("contextual_decomposition", model, x, y, patch_size=4)
    logits = model(x).gather(1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(attributions.flatten(1).sum(1), logits, atol=1e-5, rtol=1e-5)
    # each 4x4 patch carries the decomposition of exactly that patch
    patch = torch.zeros(1, 8, 8)
    patch[:, :4, :4] = 1
    relevant, _ = contextual_decomposition(model, x, patch.expand(2, 8, 8))
    torch.testing.assert_close(attributions[:, :, :4, :4].flatten(1).sum(1), relevant.gather(1, y.view(-1, 1))[:, 0])


class TextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, ids):
        return self.head(self.lstm(self.embedding(ids))[0][:, -1])


@pytest.mark.parametrize("method", available_attribution_methods(text=True))
def test_text_methods_give_embedding_shaped_token_attributions(method):
    model = TextModel()
    ids, y = torch.randint(1, 20, (3, 7)), torch.tensor([0, 1, 1])
    options = {"n_samples": 16} if method in ("kernel_shap", "lime") else {}
    attributions = attribute(method, model, ids, y, embedding_layer=model.embedding, **options)
    assert attributions.shape == (3, 7, 6) and torch.isfinite(attributions).all()


def test_text_integrated_gradients_is_captums_layer_ig_and_complete():
    model = TextModel()
    ids, y = torch.randint(1, 20, (2, 5)), torch.tensor([0, 1])
    ours = attribute("integrated_gradients", model, ids, y, embedding_layer=model.embedding, n_steps=200)
    theirs = LayerIntegratedGradients(model, model.embedding).attribute(
        ids, baselines=torch.zeros_like(ids), target=y, n_steps=200
    )
    torch.testing.assert_close(ours, theirs)
    change = (model(ids) - model(torch.zeros_like(ids))).gather(1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(ours.sum((1, 2)), change, atol=2e-3, rtol=1e-2)


def test_text_cd_scores_each_token_with_its_own_decomposition():
    model = TextModel()
    ids, y = torch.randint(1, 20, (2, 5)), torch.tensor([1, 0])
    scores = attribute("contextual_decomposition", model, ids, y, embedding_layer=model.embedding).sum(-1)
    mask = torch.zeros(2, 5)
    mask[:, 3] = 1
    relevant, _ = contextual_decomposition(model, ids, mask)
    torch.testing.assert_close(scores[:, 3], relevant.gather(1, y.view(-1, 1))[:, 0], atol=1e-5, rtol=1e-5)


def test_errors_name_the_fix():
    with pytest.raises(XAIConfigurationError, match="available"):
        attribute("gradcam++", _cnn(), torch.rand(1, 3, 8, 8), torch.tensor([0]))
    with pytest.raises(XAIConfigurationError, match="embedding_layer"):
        attribute("integrated_gradients", TextModel(), torch.randint(0, 20, (1, 4)), torch.tensor([0]))
