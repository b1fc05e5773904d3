"""Faithfulness kernels and metrics against hand-computed curves on linear models."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.faithfulness import (
    class_probability,
    comprehensiveness,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    sufficiency,
)
from lightning_xai.metrics.comprehensiveness import Comprehensiveness
from lightning_xai.metrics.deletion_auc import DeletionAUC
from lightning_xai.metrics.insertion_auc import InsertionAUC
from lightning_xai.metrics.sufficiency import Sufficiency

matplotlib.use("Agg")


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def sum_model(num_features: int, weights: torch.Tensor | None = None) -> nn.Module:
    """Two classes, logit difference ``w . x``: p_1(x) = sigmoid(w . x)."""
    w = torch.ones(num_features, dtype=torch.float64) if weights is None else weights.double()
    model = nn.Linear(num_features, 2, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1] = w
    return model


def hand_deletion_curve(values: list[float], steps: int, insert: bool) -> list[float]:
    """p_1 when the top ceil(i F / steps) features (by value) are deleted / inserted, for a sum model."""
    ordered = sorted(values, reverse=True)
    total, f = sum(values), len(values)
    curve = []
    for i in range(steps + 1):
        k = math.ceil(i * f / steps)
        top = sum(ordered[:k])
        curve.append(sigmoid(top if insert else total - top))
    return curve


def hand_trapezoid(curve: list[float]) -> float:
    steps = len(curve) - 1
    return sum((curve[i] + curve[i + 1]) / 2 / steps for i in range(steps))


@pytest.mark.parametrize("steps", [4, 3, 8])
def test_deletion_and_insertion_of_a_sum_model_follow_the_hand_computed_curve(steps):
    x = torch.tensor([[0.5, 2.0, 0.25, 1.5, 0.0, 1.0, 0.75, 0.1], [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 0.5, 0.5]]).double()
    model, target = sum_model(8), torch.tensor([1, 1])
    for insert, curve_fn, auc_fn in ((False, deletion_curve, deletion_auc), (True, insertion_curve, insertion_auc)):
        expected = torch.tensor([hand_deletion_curve(row.tolist(), steps, insert) for row in x]).double()
        # attributions = features: the exact contribution of every feature to the logit difference
        torch.testing.assert_close(curve_fn(model, x, x, target, steps=steps), expected)
        expected_auc = torch.tensor([hand_trapezoid(row.tolist()) for row in expected]).double()
        torch.testing.assert_close(auc_fn(model, x, x, target, steps=steps), expected_auc)


def test_deletion_auc_of_equal_features_in_closed_form():
    # F = steps = 4 features of 1: the curve is sigmoid(4), sigmoid(3), ..., sigmoid(0)
    x = torch.ones(1, 4, dtype=torch.float64)
    curve = [sigmoid(4 - i) for i in range(5)]
    auc = (curve[0] / 2 + curve[1] + curve[2] + curve[3] + curve[4] / 2) / 4
    assert deletion_auc(sum_model(4), x, x, torch.tensor([1]), steps=4).item() == pytest.approx(auc, abs=1e-12)
    insertion = [sigmoid(i) for i in range(5)]
    expected = (insertion[0] / 2 + sum(insertion[1:4]) + insertion[4] / 2) / 4
    assert insertion_auc(sum_model(4), x, x, torch.tensor([1]), steps=4).item() == pytest.approx(expected, abs=1e-12)


def test_auc_is_numpy_trapezoid_of_the_curve_on_an_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, a = torch.randn(5, 12).double(), torch.randn(5, 12).double()
    target = torch.tensor([0, 1, 2, 1, 0])
    for curve_fn, auc_fn in ((deletion_curve, deletion_auc), (insertion_curve, insertion_auc)):
        curve = curve_fn(model, x, a, target, steps=7).numpy()
        expected = np.trapezoid(curve, np.linspace(0, 1, 8), axis=1)
        np.testing.assert_allclose(auc_fn(model, x, a, target, steps=7).numpy(), expected, rtol=1e-12)
        # endpoints: the unperturbed input and the baseline
        full = class_probability(model, x, target).numpy()
        base = class_probability(model, torch.zeros_like(x), target).numpy()
        first, last = (full, base) if curve_fn is deletion_curve else (base, full)
        np.testing.assert_allclose(curve[:, 0], first, rtol=1e-12)
        np.testing.assert_allclose(curve[:, -1], last, rtol=1e-12)


def test_comprehensiveness_and_sufficiency_known_values_with_ceil_and_ties_by_index():
    # weights make the position matter; attributions all tie, so features go in index order
    w = torch.arange(1, 11, dtype=torch.float64) / 10
    model, x, target = sum_model(10, w), torch.ones(1, 10).double(), torch.tensor([1])
    a = torch.zeros(1, 10).double()
    full = sigmoid(5.5)
    # q = 0.1 -> k = 1 (index 0); q = 0.25 -> k = ceil(2.5) = 3 (indices 0, 1, 2); q = 0.07 -> k = 1 (not 8 / 100)
    removed = [sigmoid(5.5 - 0.1), sigmoid(5.5 - 0.6), sigmoid(5.5 - 0.1)]
    kept = [sigmoid(0.1), sigmoid(0.6), sigmoid(0.1)]
    fractions = (0.1, 0.25, 0.07)
    expected_c = sum(full - r for r in removed) / 3
    expected_s = sum(full - k for k in kept) / 3
    assert comprehensiveness(model, x, a, target, fractions).item() == pytest.approx(expected_c, abs=1e-12)
    assert sufficiency(model, x, a, target, fractions).item() == pytest.approx(expected_s, abs=1e-12)


def test_a_tensor_baseline_replaces_removed_features():
    x = torch.tensor([[3.0, 1.0, 2.0]]).double()
    baseline = torch.tensor([10.0, 20.0, 30.0]).double()
    model, target = sum_model(3), torch.tensor([1])
    # top-1/3 is feature 0 (3.0) -> replaced by 10: sum = 13
    value = comprehensiveness(model, x, x, target, fractions=(1 / 3,), baseline=baseline).item()
    assert value == pytest.approx(sigmoid(6.0) - sigmoid(13.0), abs=1e-12)
    # insertion starts at the baseline (sum 60), inserts feature 0, then 2, then 1
    curve = insertion_curve(model, x, x, target, steps=3, baseline=baseline)[0].tolist()
    assert curve == pytest.approx([sigmoid(60.0), sigmoid(53.0), sigmoid(25.0), sigmoid(6.0)], abs=1e-12)


def test_true_attribution_is_more_faithful_than_a_random_one_on_a_linear_model():
    torch.manual_seed(0)
    n, f = 128, 20
    w = torch.randn(f).double()
    model = sum_model(f, w)
    x = torch.randn(n, f).double()
    target = (x @ w > 0).long()
    sign = target.double() * 2 - 1  # the logit difference of the explained class is sign * w . x
    true = sign[:, None] * w * x
    random = torch.randn(n, f).double()
    assert comprehensiveness(model, x, true, target).mean() > comprehensiveness(model, x, random, target).mean() + 0.1
    assert sufficiency(model, x, true, target).mean() < sufficiency(model, x, random, target).mean() - 0.1
    assert deletion_auc(model, x, true, target).mean() < deletion_auc(model, x, random, target).mean() - 0.1
    assert insertion_auc(model, x, true, target).mean() > insertion_auc(model, x, random, target).mean() + 0.1


def test_chunked_forwards_and_image_shapes_give_the_same_scores():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    x, a, t = torch.randn(6, 3, 5, 5), torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
    default = deletion_auc(model, x, a, t, steps=5)
    assert calls == [6] * 6  # one forward per step
    calls.clear()
    chunked = deletion_auc(model, x, a, t, steps=5, batch_size=16)
    assert calls == [16, 16, 4]
    torch.testing.assert_close(default, chunked)
    torch.testing.assert_close(
        comprehensiveness(model, x, a, t), comprehensiveness(model, x, a, t, batch_size=7), rtol=1e-5, atol=1e-6
    )


def test_binary_single_logit_models_match_two_class_models():
    x = torch.tensor([[0.5, 2.0, -1.0], [1.0, -0.5, 0.25]]).double()
    two = sum_model(3)
    single = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        single.weight.fill_(1.0)
    for target in (torch.tensor([1, 1]), torch.tensor([0, 1])):
        torch.testing.assert_close(class_probability(single, x, target), class_probability(two, x, target))
        torch.testing.assert_close(deletion_auc(single, x, x, target, 3), deletion_auc(two, x, x, target, 3))


METRICS = [
    (Comprehensiveness, comprehensiveness, {"fractions": (0.1, 0.3)}, True),
    (Sufficiency, sufficiency, {"fractions": (0.1, 0.3)}, False),
    (DeletionAUC, deletion_auc, {"steps": 5}, False),
    (InsertionAUC, insertion_auc, {"steps": 5}, True),
]


@pytest.mark.parametrize(("metric_cls", "kernel", "kwargs", "higher"), METRICS)
def test_metric_is_the_mean_of_the_kernel_and_merges_exactly(metric_cls, kernel, kwargs, higher):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    x, a, t = torch.randn(9, 10), torch.randn(9, 10), torch.randint(0, 3, (9,))
    whole = metric_cls(**kwargs)
    whole.update(x, a, t, model=model)
    per_sample = kernel(model, x, a, t, **kwargs)
    assert whole.compute().item() == pytest.approx(per_sample.double().mean().item(), abs=1e-6)

    first, second = metric_cls(**kwargs), metric_cls(**kwargs)
    first.update(x[:4], a[:4], t[:4], model=model)
    second.update(x[4:], a[4:], t[4:], model=model)
    first.merge_state(second)
    torch.testing.assert_close(first.compute(), whole.compute())

    assert whole.higher_is_better is higher
    assert whole.is_differentiable is False and whole.full_state_update is False
    fig, ax = whole.plot()
    assert fig is not None and ax is not None


@pytest.mark.parametrize(("metric_cls", "kernel", "kwargs", "higher"), METRICS)
def test_metric_requires_model_and_target(metric_cls, kernel, kwargs, higher):
    model, x = nn.Linear(4, 2), torch.randn(3, 4)
    with pytest.raises(XAIConfigurationError, match="model"):
        metric_cls(**kwargs).update(x, x, torch.tensor([0, 1, 0]))
    with pytest.raises(XAIConfigurationError, match="target"):
        metric_cls(**kwargs).update(x, x, model=model)


def test_wrong_arguments_raise_configuration_errors():
    model, x, t = nn.Linear(4, 2), torch.randn(3, 4), torch.tensor([0, 1, 0])
    with pytest.raises(XAIConfigurationError, match="do not match inputs"):
        comprehensiveness(model, x, torch.randn(3, 5), t)
    with pytest.raises(XAIConfigurationError, match=r"\[0, 1\]"):
        Comprehensiveness(fractions=(0.5, 1.5))
    with pytest.raises(XAIConfigurationError, match="steps"):
        DeletionAUC(steps=0)
    with pytest.raises(XAIConfigurationError, match="one class index per sample"):
        deletion_auc(model, x, x, torch.tensor([0, 1]))


def test_feature_dims_remove_whole_tokens():
    from lightning_xai.functional import comprehensiveness as token_comprehensiveness

    class FirstToken(torch.nn.Module):
        def forward(self, embeddings):  # logit of class 1: the sum of token 0's embedding
            score = embeddings[:, 0].sum(-1)
            return torch.stack([torch.zeros_like(score), score], dim=1)

    torch.manual_seed(0)
    embeddings = torch.rand(3, 4, 5) + 0.5  # (N, T, E), all positive
    attributions = torch.rand(3, 4, 5) * 0.01
    attributions[:, 0, 0] = 1.0  # only one element of token 0 stands out
    target = torch.ones(3, dtype=torch.long)
    model = FirstToken()
    p_full = torch.softmax(model(embeddings), 1)[:, 1]
    by_token = token_comprehensiveness(model, embeddings, attributions, target, fractions=(0.25,), feature_dims=(1,))
    # the top quarter of tokens is token 0, removed whole: the logit drops to 0, p(class 1) to 0.5
    torch.testing.assert_close(by_token, p_full - 0.5)
    by_element = token_comprehensiveness(model, embeddings, attributions, target, fractions=(0.25,))
    assert (by_element < by_token).all()  # 5 of 20 elements: only some of token 0 goes
