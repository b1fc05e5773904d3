"""Sanity-check kernels and the model-randomization metric."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from scipy.stats import ConstantInputWarning, rankdata, spearmanr
from torch import nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.sanity import (
    average_ranks,
    parameterised_layers,
    randomize_top_layers,
    rank_correlation,
)
from lightning_xai.metrics.randomization_sanity import RandomizationSanity

matplotlib.use("Agg")


def input_gradient(model: nn.Module, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    score = model(inputs).gather(1, target[:, None]).sum()
    return torch.autograd.grad(score, inputs)[0]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


# ---------------------------------------------------------------- Spearman


def test_average_ranks_equal_scipy_rankdata():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (6, 30), generator=generator).double()
    expected = np.stack([rankdata(row) for row in values.numpy()])
    np.testing.assert_allclose(average_ranks(values).numpy(), expected)


@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlation_equals_scipy_spearman_of_magnitudes(ties):
    generator = torch.Generator().manual_seed(1)
    if ties:
        a = torch.randint(-3, 4, (25, 2, 6), generator=generator).double()
        b = torch.randint(-3, 4, (25, 2, 6), generator=generator).double()
    else:
        a = torch.randn(25, 2, 6, generator=generator, dtype=torch.float64)
        b = a + 0.7 * torch.randn(25, 2, 6, generator=generator, dtype=torch.float64)
    got = rank_correlation(a, b)
    for i in range(25):
        expected = spearmanr(a[i].abs().flatten().numpy(), b[i].abs().flatten().numpy()).statistic
        assert got[i].item() == pytest.approx(expected, abs=1e-12), i
    signed = rank_correlation(a, b, absolute=False)
    for i in range(25):
        expected = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert signed[i].item() == pytest.approx(expected, abs=1e-12), i


def test_rank_correlation_of_a_constant_sample_is_nan_like_scipy():
    a = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 9.0]])
    got = rank_correlation(a, b)
    assert torch.isnan(got[0]) and got[1].item() == pytest.approx(1.0)
    with pytest.warns(ConstantInputWarning):
        assert np.isnan(spearmanr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).statistic)


# ---------------------------------------------------------------- randomize_top_layers


def test_an_identical_copy_keeps_gradients_and_a_randomized_top_layer_changes_them():
    model = mlp()
    x = torch.randn(64, 20)
    y = model(x).argmax(1)
    reference = input_gradient(model, x, y)

    same = randomize_top_layers(model, 0)
    assert same is not model
    torch.testing.assert_close(rank_correlation(reference, input_gradient(same, x, y)), torch.ones(64))

    randomized = randomize_top_layers(model, 1)
    correlation = rank_correlation(reference, input_gradient(randomized, x, y))
    assert correlation.mean() < 0.9
    # only the top layer changed
    for (name, original), (_, copied) in zip(model.named_parameters(), randomized.named_parameters()):
        assert torch.equal(original, copied) is (not name.startswith("4.")), name


def test_randomization_is_seeded_nested_and_leaves_the_model_and_rng_alone():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    one, again = randomize_top_layers(model, 1, seed=3), randomize_top_layers(model, 1, seed=3)
    two = randomize_top_layers(model, 2, seed=3)
    other = randomize_top_layers(model, 1, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(one[4].weight, again[4].weight)
    assert torch.equal(one[4].weight, two[4].weight)  # nested: the top layer is the same at every depth
    assert not torch.equal(two[2].weight, model[2].weight)
    assert torch.equal(two[0].weight, model[0].weight)
    assert not torch.equal(one[4].weight, other[4].weight)


def test_layers_are_parameterised_leaves_in_registration_order():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    )
    assert [name for name, _ in parameterised_layers(model)] == ["0", "1", "3.1"]


def test_randomize_errors_name_the_problem():
    with pytest.raises(XAIConfigurationError, match="has 3 parameterised layers"):
        randomize_top_layers(mlp(), 4)

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x * self.weight

    with pytest.raises(XAIConfigurationError, match="reset_parameters"):
        randomize_top_layers(nn.Sequential(nn.Linear(2, 2), Scale()), 1)


# ---------------------------------------------------------------- RandomizationSanity


def test_cascading_metric_equals_the_per_depth_correlations():
    model, x = mlp(), torch.randn(32, 20)
    y = model(x).argmax(1)
    reference = input_gradient(model, x, y)
    metric = RandomizationSanity()
    metric.update(x, reference, y, model=model, explain_fn=input_gradient)
    expected = torch.stack(
        [
            rank_correlation(reference, input_gradient(randomize_top_layers(model, depth), x, y)).double().mean()
            for depth in (1, 2, 3)
        ]
    )
    torch.testing.assert_close(metric.compute_per_depth(), expected)
    torch.testing.assert_close(metric.compute(), expected.mean())
    assert metric.compute() < 0.9
    assert metric.higher_is_better is False and metric.is_differentiable is False
    fig, ax = metric.plot()
    assert fig is not None


def test_non_cascading_metric_uses_only_the_requested_depth_and_predicted_classes():
    model, x = mlp(), torch.randn(16, 20)
    predicted = model(x).argmax(1)
    reference = input_gradient(model, x, predicted)
    metric = RandomizationSanity(cascading=False, num_layers=2)
    metric.update(x, reference, model=model, explain_fn=input_gradient)  # target None: the predicted class
    expected = rank_correlation(reference, input_gradient(randomize_top_layers(model, 2), x, predicted))
    assert metric.compute_per_depth().shape == (1,)
    torch.testing.assert_close(metric.compute(), expected.double().mean())
    limited = RandomizationSanity(num_layers=2)
    limited.update(x, reference, predicted, model=model, explain_fn=input_gradient)
    assert limited.compute_per_depth().shape == (2,)


def test_an_explanation_that_ignores_the_model_fails_the_check_with_correlation_one():
    model, x = mlp(), torch.randn(8, 20)
    metric = RandomizationSanity()
    metric.update(x, x, torch.zeros(8, dtype=torch.long), model=model, explain_fn=lambda m, inputs, t: inputs * 2)
    torch.testing.assert_close(metric.compute_per_depth(), torch.ones(3, dtype=torch.float64))


def test_metric_merges_exactly_and_works_under_inference_mode():
    model, x = mlp(), torch.randn(24, 20)
    y = model(x).argmax(1)
    reference = input_gradient(model, x, y)
    whole = RandomizationSanity(num_layers=3)
    whole.update(x, reference, y, model=model, explain_fn=input_gradient)
    first, second = RandomizationSanity(num_layers=3), RandomizationSanity(num_layers=3)
    with torch.inference_mode():  # as in trainer.validate()
        xi, ri, yi = x.clone(), reference.clone(), y.clone()
        first.update(xi[:10], ri[:10], yi[:10], model=model, explain_fn=input_gradient)
        second.update(xi[10:], ri[10:], yi[10:], model=model, explain_fn=input_gradient)
    first.merge_state(second)
    torch.testing.assert_close(first.compute_per_depth(), whole.compute_per_depth())
    torch.testing.assert_close(first.compute(), whole.compute())


def test_metric_requires_model_and_explain_fn_and_enough_layers():
    model, x = mlp(), torch.randn(4, 20)
    with pytest.raises(XAIConfigurationError, match="explain_fn"):
        RandomizationSanity().update(x, x, model=model)
    with pytest.raises(XAIConfigurationError, match="model"):
        RandomizationSanity().update(x, x, explain_fn=input_gradient)
    with pytest.raises(XAIConfigurationError, match="num_layers"):
        RandomizationSanity(num_layers=5).update(x, x, model=model, explain_fn=input_gradient)
    with pytest.raises(XAIConfigurationError, match="num_layers"):
        RandomizationSanity(num_layers=0)
