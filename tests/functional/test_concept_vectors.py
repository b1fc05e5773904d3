"""Concept activation vectors, the ClArC projection and the RR-ClArC penalty, against planted directions and hand
computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.concept_vectors import (
    CAV_METHODS,
    RRCLARC_CRITERIA,
    clarc_projection,
    concept_strength,
    fit_cav,
    pooled_features,
    rrclarc_penalty,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny double backwards: one thread is ~100x faster than two when another process holds a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


def _planted(n: int = 2000, channels: int = 16, seed: int = 0, strength: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(channels, generator=g)
    direction = direction / direction.norm()
    labels = torch.randint(0, 2, (n,), generator=g)
    features = torch.randn(n, channels, generator=g) + strength * labels[:, None].float() * direction
    return features, labels, direction


# ------------------------------------------------------------------------------------------------ features


def test_pooled_features_take_the_maximum_over_positions_of_each_channel():
    maps = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(pooled_features(maps), maps.flatten(2).max(2).values)
    sequences = torch.randn(3, 7, 4)  # (N, T, D): the channels are last
    torch.testing.assert_close(pooled_features(sequences), sequences.max(1).values)
    conv1d = torch.randn(3, 4, 7)  # (N, C, L) of a Conv1d
    torch.testing.assert_close(pooled_features(conv1d, channel_dim=1), conv1d.max(2).values)
    flat = torch.randn(3, 4)
    assert torch.equal(pooled_features(flat), flat)
    with pytest.raises(XAIConfigurationError, match="sample dimension"):
        pooled_features(maps, channel_dim=0)


def test_concept_strength_is_the_dot_product_with_the_vector():
    features = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    assert concept_strength(features, torch.tensor([0.0, 1.0, 0.0])).tolist() == [2.0, 0.0]
    with pytest.raises(XAIConfigurationError, match=r"\(N, C\) features and a \(C,\) vector"):
        concept_strength(features, torch.ones(2))


# ------------------------------------------------------------------------------------------------ fitting


def test_the_signal_cav_recovers_a_planted_direction():
    features, labels, direction = _planted()
    cav = fit_cav(features, labels)
    assert cav.shape == (16,) and cav.dtype == features.dtype
    assert float(cav.norm()) == pytest.approx(1.0, abs=1e-6)
    assert _cosine(cav, direction) > 0.99
    # the artifact's side: artifact samples score higher along the vector than clean ones
    strengths = concept_strength(features, cav)
    assert float(strengths[labels == 1].mean() - strengths[labels == 0].mean()) == pytest.approx(2.0, abs=0.15)


def test_the_signal_cav_is_the_covariance_over_the_label_variance():
    features, labels, _ = _planted(n=50, channels=3, seed=1)
    y = labels.double()
    x = features.double()
    expected = ((x - x.mean(0)) * (y - y.mean())[:, None]).mean(0) / y.var(unbiased=False)
    torch.testing.assert_close(fit_cav(features, labels.bool()), (expected / expected.norm()).float())


@pytest.mark.parametrize("method", ["svm", "logistic", "ridge"])
def test_the_scikit_learn_fitters_agree_in_direction_with_the_signal(method):
    features, labels, direction = _planted(n=800)
    cav = fit_cav(features, labels, method=method)
    assert float(cav.norm()) == pytest.approx(1.0, abs=1e-6)
    # with isotropic noise every linear separator points along the planted pattern
    assert _cosine(cav, fit_cav(features, labels)) > 0.97
    assert _cosine(cav, direction) > 0.97


def test_the_signal_pattern_differs_from_a_filter_under_correlated_noise():
    # Haufe et al.: a distractor shared by two features makes a classifier's weights (a filter) cancel it, while
    # the signal vector is the pattern the artifact adds. R2R prefers the signal vector for this reason.
    g = torch.Generator().manual_seed(0)
    n = 2000
    labels = torch.randint(0, 2, (n,), generator=g).float()
    distractor = 3.0 * torch.randn(n, generator=g)
    features = torch.stack([labels + distractor, distractor], dim=1) + 0.1 * torch.randn(n, 2, generator=g)
    pattern = torch.tensor([1.0, 0.0])
    assert _cosine(fit_cav(features, labels), pattern) > 0.99
    assert _cosine(fit_cav(features, labels, method="ridge"), pattern) < 0.9


def test_fit_cav_rejects_what_cannot_be_fitted():
    features = torch.randn(6, 3)
    with pytest.raises(XAIConfigurationError, match="with and without the artifact"):
        fit_cav(features, torch.ones(6))
    with pytest.raises(XAIConfigurationError, match="6 feature rows but 5 artifact labels"):
        fit_cav(features, torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(XAIConfigurationError, match="method must be one of"):
        fit_cav(features, torch.tensor([0, 1, 0, 1, 0, 1]), method="lda")  # type: ignore[arg-type]
    with pytest.raises(XAIConfigurationError, match="booleans or 0/1"):
        fit_cav(features, torch.tensor([0, 2, 0, 1, 0, 1]))
    same = torch.ones(4, 3)
    with pytest.raises(XAIConfigurationError, match="do not differ"):
        fit_cav(same, torch.tensor([0, 1, 0, 1]))
    assert set(CAV_METHODS) == {"signal", "svm", "logistic", "ridge"}


# ------------------------------------------------------------------------------------------------ projection


@pytest.mark.parametrize("shape", [(8, 5, 4, 3), (8, 6, 5), (8, 5)])
def test_the_projection_gives_every_sample_the_chosen_strength(shape):
    g = torch.Generator().manual_seed(0)
    activation = torch.randn(shape, generator=g, dtype=torch.float64)
    channels = shape[1] if len(shape) != 3 else shape[2]
    cav = torch.randn(channels, generator=g, dtype=torch.float64)
    unit = cav / cav.norm()
    for vector in (unit, 3.0 * cav):  # exact for any length: the shift is divided by v . v
        projected = clarc_projection(activation, vector, strength=1.7)
        strengths = concept_strength(pooled_features(projected), vector)
        torch.testing.assert_close(strengths, torch.full((shape[0],), 1.7, dtype=torch.float64), atol=1e-12, rtol=0)
    # only the component along v moves, by the same amount at every position
    change = clarc_projection(activation, unit, strength=-0.3) - activation
    per_position = change.movedim(2 if len(shape) == 3 else 1, -1).reshape(-1, channels)
    residual = per_position - (per_position @ unit)[:, None] * unit
    assert float(residual.abs().max()) < 1e-12
    along = (per_position @ unit).reshape(shape[0], -1)
    torch.testing.assert_close(along, along[:, :1].expand_as(along))


def test_the_projection_keeps_float32_within_rounding_and_checks_the_channels():
    activation = torch.randn(4, 3, 2, 2)
    cav = torch.tensor([0.6, 0.0, 0.8])
    strengths = concept_strength(pooled_features(clarc_projection(activation, cav, 0.25)), cav)
    torch.testing.assert_close(strengths, torch.full((4,), 0.25), atol=1e-6, rtol=0)
    with pytest.raises(XAIConfigurationError, match="has 3 channels in dim 1"):
        clarc_projection(activation, torch.ones(4), 0.0)
    with pytest.raises(XAIConfigurationError, match="is zero"):
        clarc_projection(activation, torch.zeros(3), 0.0)


# ------------------------------------------------------------------------------------------------ RR-ClArC


class _ConvToLinear(nn.Module):
    """logits = W mean_positions(conv(x)) + b: the gradient at the conv output is known in closed form."""

    def __init__(self, channels: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def _closed_form(model: _ConvToLinear, x, cav, criterion, target=None, signs=None):
    """``(v . mean_p dc/da_p)^2`` per sample: dc/da_p = W^T dc/dz / P, the same at every position."""
    with torch.no_grad():
        logits = model(x)
        weight = model.head.weight  # (K, C)
        positions = x.shape[2] * x.shape[3]
        if criterion == "all_logits":
            dz = torch.ones_like(logits)
        elif criterion == "all_logits_random":
            dz = signs
        elif criterion == "max_logit":
            dz = F.one_hot(logits.argmax(1), logits.shape[1]).to(logits)
        elif criterion == "target_logit":
            dz = F.one_hot(target, logits.shape[1]).to(logits)
        else:  # logprobs: d/dz mean_k log softmax_k = 1/K - softmax
            dz = 1.0 / logits.shape[1] - logits.softmax(1)
        gradient = dz @ weight / positions  # (N, C): already the mean over positions
        return (gradient @ cav).pow(2)


@pytest.mark.parametrize("criterion", sorted(RRCLARC_CRITERIA))
def test_each_criterion_gives_the_closed_form_penalty(criterion):
    torch.manual_seed(0)
    model = _ConvToLinear().double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 2, 0])
    cav = torch.tensor([0.48, 0.6, 0.64], dtype=torch.float64)  # unit length
    signs = None
    if criterion == "all_logits_random":
        generator = torch.Generator().manual_seed(11)
        signs = (torch.randint(0, 2, (5, 4), generator=generator) * 2 - 1).double()
    generator = torch.Generator().manual_seed(11)
    per_sample = rrclarc_penalty(
        model, x, model.conv, cav, criterion, target=target, generator=generator, reduction="none"
    )
    expected = _closed_form(model, x, cav, criterion, target, signs)
    torch.testing.assert_close(per_sample.detach(), expected, atol=1e-12, rtol=1e-9)
    mean = rrclarc_penalty(
        model, x, model.conv, cav, criterion, target=target, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(mean.detach(), expected.mean(), atol=1e-12, rtol=1e-9)


def test_the_random_signs_change_every_draw_and_follow_the_generator():
    torch.manual_seed(0)
    model = _ConvToLinear().double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    cav = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    first = rrclarc_penalty(model, x, model.conv, cav, generator=generator, reduction="none")
    second = rrclarc_penalty(model, x, model.conv, cav, generator=generator, reduction="none")
    again = rrclarc_penalty(model, x, model.conv, cav, generator=torch.Generator().manual_seed(3), reduction="none")
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


def test_sample_weights_and_reductions():
    torch.manual_seed(0)
    model = _ConvToLinear().double()
    x = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    cav = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    per_sample = rrclarc_penalty(model, x, model.conv, cav, "max_logit", reduction="none").detach()
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    weighted = rrclarc_penalty(model, x, model.conv, cav, "max_logit", sample_weights=weights, reduction="sum")
    torch.testing.assert_close(weighted.detach(), (per_sample * weights.double()).sum())


def test_the_penalty_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([2, 0])
    cav = torch.tensor([0.5, -0.5, 0.5, 0.5], dtype=torch.float64)
    names = [name for name, _ in model.named_parameters()]
    layer = model[2]

    for criterion in ("all_logits_random", "target_logit", "logprobs"):

        def penalty(*parameters, criterion=criterion):
            weights = dict(zip(names, parameters))
            return rrclarc_penalty(
                lambda inputs: functional_call(model, weights, (inputs,)),
                x,
                layer,
                cav,
                criterion,
                target=target,
                generator=torch.Generator().manual_seed(5),
            )

        parameters = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
        assert torch.autograd.gradcheck(penalty, parameters, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_rrclarc_penalty_rejects_bad_arguments():
    model = _ConvToLinear()
    x = torch.randn(2, 1, 3, 3)
    with pytest.raises(XAIConfigurationError, match="criterion must be one of"):
        rrclarc_penalty(model, x, model.conv, torch.ones(3), criterion="mean_logit")  # type: ignore[arg-type]
    with pytest.raises(XAIConfigurationError, match="needs the true classes"):
        rrclarc_penalty(model, x, model.conv, torch.ones(3), criterion="target_logit")
    with pytest.raises(XAIConfigurationError, match="has 3 channels in dim 1"):
        rrclarc_penalty(model, x, model.conv, torch.ones(5))
    with pytest.raises(XAIConfigurationError, match="did not run"):
        rrclarc_penalty(model, x, nn.Linear(2, 2), torch.ones(3))
    with torch.no_grad(), pytest.raises(XAIConfigurationError, match="gradients are disabled"):
        rrclarc_penalty(model, x, model.conv, torch.ones(3))


def test_with_the_layers_below_frozen_the_penalty_trains_the_layers_above():
    torch.manual_seed(0)
    model = _ConvToLinear().double()
    model.conv.requires_grad_(False)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    cav = torch.tensor([0.48, 0.6, 0.64], dtype=torch.float64)
    penalty = rrclarc_penalty(model, x, model.conv, cav, "all_logits", reduction="none")
    torch.testing.assert_close(penalty.detach(), _closed_form(model, x, cav, "all_logits"), atol=1e-12, rtol=1e-9)
    (gradient,) = torch.autograd.grad(penalty.mean(), model.head.weight)
    # d/dW (v . W^T 1 / P)^2 = 2 (v . W^T 1 / P) / P * 1 v^T
    scale = float((model.head.weight.detach().sum(0) @ cav) / 16)
    torch.testing.assert_close(gradient, 2 * scale / 16 * torch.ones(4, 1, dtype=torch.float64) * cav)
