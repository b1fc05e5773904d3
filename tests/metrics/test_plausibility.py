"""Plausibility kernels and metrics: region mass, rationale average precision, confidence indication."""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torch import nn

from lightning_xai.errors import MaskShapeError, XAIConfigurationError
from lightning_xai.functional.plausibility import (
    confidence_features,
    confidence_indication,
    confidence_indication_from_statistics,
    confidence_indication_statistics,
    rationale_average_precision,
    region_attribution_mass,
)
from lightning_xai.metrics.confidence_indication import ConfidenceIndication
from lightning_xai.metrics.rationale_agreement import RationaleAgreement
from lightning_xai.metrics.region_attribution_mass import RegionAttributionMass

matplotlib.use("Agg")


# ---------------------------------------------------------------- region attribution mass


def test_all_mass_inside_the_mask_gives_one_and_outside_gives_zero():
    torch.manual_seed(0)
    mask = torch.zeros(4, 5, 5)
    mask[:, 1:3, 2:4] = 1
    a = torch.randn(4, 3, 5, 5)
    inside = a * mask[:, None]
    outside = a * (1 - mask[:, None])
    torch.testing.assert_close(region_attribution_mass(inside, mask), torch.ones(4))  # (N, H, W) mask on (N, C, H, W)
    torch.testing.assert_close(region_attribution_mass(outside, mask), torch.zeros(4))
    torch.testing.assert_close(region_attribution_mass(torch.zeros(4, 3, 5, 5), mask), torch.zeros(4))


def test_region_mass_uses_absolute_values_and_shared_masks():
    a = torch.tensor([[2.0, -2.0, 4.0, 0.0], [1.0, 1.0, -1.0, 1.0]])
    shared = torch.tensor([0, 1, 1, 0])  # one mask for every sample
    torch.testing.assert_close(region_attribution_mass(a, shared), torch.tensor([0.75, 0.5]))
    soft = torch.tensor([0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(region_attribution_mass(a, soft), torch.tensor([0.125, 0.125]))


def test_region_mass_metric_skips_samples_without_a_region_and_merges_exactly():
    torch.manual_seed(1)
    a = torch.randn(10, 2, 4, 4)
    mask = (torch.rand(10, 4, 4) > 0.6).float()
    mask[3] = 0
    whole = RegionAttributionMass()
    whole.update(a, a, mask=mask)
    expected = region_attribution_mass(a, mask)[torch.arange(10) != 3].double().mean()
    torch.testing.assert_close(whole.compute(), expected)
    first, second = RegionAttributionMass(), RegionAttributionMass()
    first.update(a[:6], a[:6], mask=mask[:6])
    second.update(a[6:], a[6:], mask=mask[6:])
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), whole.compute())
    assert whole.higher_is_better is False and whole.is_differentiable is False
    fig, ax = whole.plot()
    assert fig is not None


def test_wrong_mask_shape_raises_mask_shape_error():
    a = torch.randn(3, 2, 4, 4)
    with pytest.raises(MaskShapeError, match=r"\(3, 5, 5\)"):
        region_attribution_mass(a, torch.ones(3, 5, 5))
    with pytest.raises(MaskShapeError):
        RegionAttributionMass().update(a, a, mask=torch.ones(3, 5, 5))
    with pytest.raises(MaskShapeError):
        RationaleAgreement().update(a, a, mask=torch.ones(2, 5, 5))
    with pytest.raises(MaskShapeError):
        rationale_average_precision(a, torch.ones(3, 3))


def test_missing_mask_raises_configuration_error():
    a = torch.randn(3, 4)
    with pytest.raises(XAIConfigurationError, match="mask"):
        RegionAttributionMass().update(a, a)
    with pytest.raises(XAIConfigurationError, match="mask"):
        RationaleAgreement().update(a, a, torch.tensor([0, 1, 0]))


# ---------------------------------------------------------------- rationale average precision


def test_perfect_ranking_gives_average_precision_one():
    rationale = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1]])
    scores = rationale * 10.0 + torch.rand(2, 6)  # every rationale feature above every other
    torch.testing.assert_close(rationale_average_precision(scores, rationale), torch.ones(2))
    worst = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    # rationale ranked last: precisions 1/3 and 2/4 at the two recall steps
    assert rationale_average_precision(worst, torch.tensor([[1, 1, 0, 0]])).item() == pytest.approx((1 / 3 + 2 / 4) / 2)


@pytest.mark.parametrize("absolute", [False, True])
def test_average_precision_equals_sklearn_per_sample_with_ties(absolute):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(-3, 4, (40, 3, 5), generator=generator).float()  # many ties
    scores[0] = 1.0  # all tied
    rationale = torch.rand(40, 3, 5, generator=generator) > 0.6
    rationale[1] = True  # all positive
    rationale[2, 0, 0] = True
    got = rationale_average_precision(scores, rationale, absolute=absolute)
    flat_scores = scores.abs().flatten(1) if absolute else scores.flatten(1)
    for i in range(40):
        expected = average_precision_score(rationale[i].flatten().numpy(), flat_scores[i].numpy())
        assert got[i].item() == pytest.approx(expected, abs=1e-6), i


def test_average_precision_equals_sklearn_on_continuous_scores_and_token_masks():
    generator = torch.Generator().manual_seed(4)
    scores = torch.randn(16, 9, 3, generator=generator, dtype=torch.float64)  # (N, T, E) embeddings
    rationale = torch.rand(16, 9, generator=generator) > 0.5  # a (N, T) token rationale
    rationale[:, 0] = True
    got = rationale_average_precision(scores, rationale)
    labels = rationale[:, :, None].expand(16, 9, 3).flatten(1)
    for i in range(16):
        expected = average_precision_score(labels[i].numpy(), scores[i].flatten().numpy())
        assert got[i].item() == pytest.approx(expected, abs=1e-12)


def test_sample_without_rationale_scores_zero_like_sklearn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = average_precision_score([0, 0, 0], [0.1, 0.2, 0.3])
    got = rationale_average_precision(torch.tensor([[0.1, 0.2, 0.3]]), torch.zeros(1, 3))
    assert got.item() == expected == 0.0


def test_rationale_agreement_metric_skips_samples_without_rationale_and_merges_exactly():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(12, 8, generator=generator)
    rationale = (torch.rand(12, 8, generator=generator) > 0.5).long()
    rationale[0] = 0
    rationale[1:, 0] = 1
    whole = RationaleAgreement()
    whole.update(a, a, mask=rationale)
    expected = rationale_average_precision(a, rationale)[1:].double().mean()  # 11 samples with a rationale
    torch.testing.assert_close(whole.compute(), expected)
    first, second = RationaleAgreement(), RationaleAgreement()
    first.update(a[:5], a[:5], mask=rationale[:5])
    second.update(a[5:], a[5:], mask=rationale[5:])
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), whole.compute())
    absolute = RationaleAgreement(absolute=True)
    absolute.update(a, a, mask=rationale)
    torch.testing.assert_close(absolute.compute(), rationale_average_precision(a.abs(), rationale)[1:].double().mean())
    assert whole.higher_is_better is True and whole.is_differentiable is False
    fig, ax = whole.plot()
    assert fig is not None


# ---------------------------------------------------------------- confidence indication


class LinearConfidence(nn.Module):
    """A two-class model whose predicted-class probability is exactly ``0.6 + 0.1 max - 0.05 mean + 0.08 std``
    of its input (so attributions = inputs give an exact linear relation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = confidence_features(x).double()
        p = 0.6 + features @ torch.tensor([0.1, -0.05, 0.08], dtype=torch.float64)
        return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def bounded_inputs(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 4, generator=generator, dtype=torch.float64)  # keeps p in (0.55, 0.8)


def test_confidence_indication_is_zero_for_an_exactly_linear_confidence():
    x = bounded_inputs(50, 6)
    metric = ConfidenceIndication()
    metric.update(x, x, model=LinearConfidence())
    assert metric.compute().item() < 1e-7
    assert metric.higher_is_better is False and metric.is_differentiable is False


def test_confidence_indication_equals_numpy_least_squares_and_merges_exactly():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, a = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    probabilities = torch.softmax(model(x), 1).max(1).values.detach()
    design = np.column_stack([np.ones(40), confidence_features(a).numpy()])
    _, residual, _, _ = np.linalg.lstsq(design, probabilities.numpy(), rcond=None)
    expected = np.sqrt(residual[0] / 40)

    whole = ConfidenceIndication()
    whole.update(x, a, model=model)
    assert whole.compute().item() == pytest.approx(expected, rel=1e-6)
    assert confidence_indication(a, probabilities).item() == pytest.approx(expected, rel=1e-6)

    first, second = ConfidenceIndication(), ConfidenceIndication()
    first.update(x[:15], a[:15], model=model)
    second.update(x[15:], a[15:], model=model)
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), whole.compute())
    for name in ("xtx", "xty", "yty", "n"):
        torch.testing.assert_close(getattr(first, name), getattr(whole, name))
    fig, ax = whole.plot()
    assert fig is not None


def test_confidence_indication_handles_collinear_features():
    # two features per sample: max = mean + std, the design matrix is singular
    a = torch.tensor([[1.0, 2.0], [0.0, 3.0], [2.0, 2.0], [4.0, 1.0], [0.5, 0.0]], dtype=torch.float64)
    p = 0.5 + 0.05 * a.max(1).values
    value = confidence_indication_from_statistics(*confidence_indication_statistics(confidence_features(a), p))
    assert torch.isfinite(value) and value.item() < 1e-7
    # a constant probability is fitted by the intercept alone
    assert confidence_indication(torch.ones(6, 4), torch.full((6,), 0.7)).item() < 1e-7


def test_confidence_indication_requires_a_model():
    x = torch.randn(3, 4)
    with pytest.raises(XAIConfigurationError, match="model"):
        ConfidenceIndication().update(x, x, torch.tensor([0, 1, 0]))
