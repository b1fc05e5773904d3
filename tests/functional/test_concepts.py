"""Gradient reversal, pooling, effect estimators and the fresh probe on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.concepts import (
    ate_ground_truth,
    conexp,
    gradient_reversal,
    linear_probe_accuracy,
    pool,
    prediction_distance,
    treate,
)


@pytest.mark.parametrize("coefficient", [0.0, 0.3, 1.0, 5.0])
def test_gradient_reversal_is_identity_forward_and_flips_the_gradient_exactly(coefficient):
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = gradient_reversal(x, coefficient)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    torch.testing.assert_close(grad, -coefficient * upstream, rtol=0, atol=0)


def test_pooling_modes():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, "mean", mask), torch.stack([hidden[0, 0], hidden[1].mean(0)]))
    torch.testing.assert_close(pool(hidden, "cls"), hidden[:, 0])
    assert pool(hidden, "none") is hidden
    maps = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(pool(maps, "mean"), maps.mean((2, 3)))


def test_distances_on_hand_computed_probabilities():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    assert prediction_distance(p, q, "tv").item() == pytest.approx(0.4)
    assert prediction_distance(p, q, "class", class_index=2).item() == pytest.approx(0.2)
    assert prediction_distance(p, q, "l2").item() == pytest.approx(math.sqrt(0.16 + 0.04 + 0.04))


def test_treate_and_ate_are_mean_distances_with_normal_intervals():
    original = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    counterfactual = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    distances = torch.tensor([0.2, 0.0, 0.1, 0.0], dtype=torch.float64)
    estimate = treate(original, counterfactual)
    assert estimate.value == pytest.approx(0.075)
    half = 1.959963984540054 * distances.std().item() / 2
    assert (estimate.low, estimate.high) == pytest.approx((0.075 - half, 0.075 + half))
    assert ate_ground_truth(original, counterfactual).value == pytest.approx(0.075)


@pytest.mark.parametrize("distance", ["tv", "class", "l2"])
def test_flip_contrast_recovers_the_ground_truth_when_the_counterfactual_classifier_sees_the_mixture(distance):
    # Bayes classifiers: O sees the concept, CF predicts the prevalence-weighted mixture of both values
    g = torch.Generator().manual_seed(0)
    n = 2000
    concept = (torch.rand(n, generator=g) < 0.3).long()  # imbalanced: removal moves C=1 rows 70 % of the way
    # p_O(x | C=0) and p_O(x | C=1)
    p_if = [torch.softmax(torch.randn(n, 4, generator=g, dtype=torch.float64), 1) for _ in range(2)]
    pi1 = concept.double().mean()
    p_o = torch.where(concept[:, None] == 1, p_if[1], p_if[0])
    p_twin = torch.where(concept[:, None] == 1, p_if[0], p_if[1])
    p_cf = pi1 * p_if[1] + (1 - pi1) * p_if[0]
    ate = ate_ground_truth(p_o, p_twin, distance)
    flipped = treate(p_o, p_cf, distance, concept=concept, contrast="flip")
    assert flipped.value == pytest.approx(ate.value, rel=1e-9)
    removal = treate(p_o, p_cf, distance)
    per_example = prediction_distance(p_o, p_twin, distance) * torch.where(concept == 1, 1 - pi1, pi1)
    assert removal.value == pytest.approx(per_example.mean().item(), rel=1e-9) and removal.value < 0.75 * ate.value
    given = treate(p_o, p_cf, distance, concept=concept, contrast="flip", prevalence=[0.5, 0.5])
    assert given.value == pytest.approx(2 * removal.value, rel=1e-9)


def test_flip_contrast_errors_name_the_concept():
    p = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    with pytest.raises(XAIConfigurationError, match="needs the concept"):
        treate(p, p, contrast="flip")
    with pytest.raises(XAIConfigurationError, match="binary"):
        treate(p, p, concept=torch.tensor([0, 2]), contrast="flip")
    with pytest.raises(XAIConfigurationError, match="both values must occur"):
        treate(p, p, concept=torch.tensor([1, 1]), contrast="flip")
    with pytest.raises(XAIConfigurationError, match="contrast"):
        treate(p, p, contrast="swap")


def test_conexp_is_the_difference_of_group_means():
    probs = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])
    concept = torch.tensor([1, 1, 0, 0, 0])
    estimate = conexp(probs, concept, distance="class")
    assert estimate.value == pytest.approx(0.7 - 0.2)
    welch = math.sqrt(torch.tensor([0.8, 0.6]).var().item() / 2 + torch.tensor([0.1, 0.3, 0.2]).var().item() / 3)
    assert estimate.high == pytest.approx(0.5 + 1.959963984540054 * welch, rel=1e-5)
    assert math.isnan(conexp(probs, torch.ones(5)).value)  # one group only


def test_confounding_fools_conexp_but_not_the_ground_truth():
    # the prediction depends on a confounder z only; the concept correlates with z but has no effect
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 2, (4000,), generator=g)
    concept = torch.where(torch.rand(4000, generator=g) < 0.9, z, 1 - z)
    p = 0.2 + 0.6 * z.double()
    probs = torch.stack([1 - p, p], 1)
    assert conexp(probs, concept, distance="class").value > 0.4
    assert ate_ground_truth(probs, probs, distance="class").value == 0.0  # swapping the concept changes nothing


def test_fresh_probe_finds_a_linear_concept_and_not_noise():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (600,), generator=g)
    informative = torch.randn(600, 8, generator=g)
    informative[:, 3] += 2.0 * labels
    accuracy, majority = linear_probe_accuracy(informative, labels)
    assert accuracy > 0.8
    noise_accuracy, majority = linear_probe_accuracy(torch.randn(600, 8, generator=g), labels)
    assert abs(noise_accuracy - majority) < 0.07
