"""Infidelity and max-sensitivity: equality with Captum, known answers, torchmetrics behaviour."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from torch import nn

from lightning_xai.errors import XAIConfigurationError
from lightning_xai.functional.robustness import gaussian_perturbation, infidelity, sensitivity_max
from lightning_xai.metrics.infidelity import Infidelity
from lightning_xai.metrics.sensitivity_max import SensitivityMax

matplotlib.use("Agg")
pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
RTOL = 1e-5


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
    ).eval()


@pytest.fixture
def cnn_batch():
    model = small_cnn()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 3, 8, 8, generator=generator)
    target = torch.randint(0, 5, (6,), generator=generator)
    attributions = Saliency(model).attribute(inputs, target=target, abs=False)
    return model, inputs, target, attributions


def saliency_fn(model, inputs, target):
    return Saliency(model).attribute(inputs, target=target, abs=False)


def linear_model(n_features: int = 5) -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(n_features, 1, bias=True)


# ---------------------------------------------------------------- equality with Captum


@pytest.mark.parametrize("metric", ["infidelity", "sensitivity_max"])
def test_the_contiguous_layout_gives_captums_numbers_bit_for_bit(cnn_batch, metric):
    model, inputs, target, attributions = cnn_batch
    torch.manual_seed(5)
    if metric == "infidelity":
        perturb = gaussian_perturbation(0.3)
        expected = captum_infidelity(model, perturb, inputs, attributions, target=target)
        torch.manual_seed(5)
        ours = infidelity(model, perturb, inputs, attributions, target, memory_format="contiguous")
    else:
        expected = captum_sensitivity_max(Saliency(model).attribute, inputs, target=target)
        torch.manual_seed(5)
        ours = sensitivity_max(
            lambda x, t: Saliency(model).attribute(x, target=t), inputs, target, memory_format="contiguous"
        )
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("std", [0.003, 0.3])
def test_infidelity_equals_captum(cnn_batch, normalize, std):
    model, inputs, target, attributions = cnn_batch
    perturb = gaussian_perturbation(std)
    torch.manual_seed(11)
    expected = captum_infidelity(model, perturb, inputs, attributions, target=target, normalize=normalize)
    torch.manual_seed(11)
    ours = infidelity(model, perturb, inputs, attributions, target, normalize=normalize)
    assert ours.shape == (6,)
    if std == 0.3:
        assert expected.abs().min() > 1e-6  # a non-trivial comparison
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-12)


def test_infidelity_equals_captum_with_int_target_and_other_sample_count(cnn_batch):
    model, inputs, _, attributions = cnn_batch
    perturb = gaussian_perturbation(0.1)
    torch.manual_seed(5)
    expected = captum_infidelity(model, perturb, inputs, attributions, target=2, n_perturb_samples=7)
    torch.manual_seed(5)
    ours = infidelity(model, perturb, inputs, attributions, 2, n_perturb_samples=7)
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients"])
def test_sensitivity_max_equals_captum(cnn_batch, method):
    model, inputs, target, _ = cnn_batch
    if method == "saliency":
        explainer, kwargs = Saliency(model), {}
    else:
        explainer, kwargs = IntegratedGradients(model), {"n_steps": 8}
    torch.manual_seed(7)
    expected = captum_sensitivity_max(explainer.attribute, inputs, target=target, **kwargs)
    torch.manual_seed(7)
    ours = sensitivity_max(lambda x, t: explainer.attribute(x, target=t, **kwargs), inputs, target)
    assert ours.shape == (6,)
    assert expected.max() > 0.01  # a non-trivial comparison
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-12)


def test_sensitivity_max_equals_captum_with_radius_and_norm(cnn_batch):
    model, inputs, target, _ = cnn_batch
    explainer = Saliency(model)
    torch.manual_seed(8)
    expected = captum_sensitivity_max(
        explainer.attribute, inputs, perturb_radius=0.2, n_perturb_samples=4, norm_ord=1, target=target
    )
    torch.manual_seed(8)
    ours = sensitivity_max(
        lambda x, t: explainer.attribute(x, target=t),
        inputs,
        target,
        perturb_radius=0.2,
        n_perturb_samples=4,
        norm_ord=1,
    )
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-12)


# ---------------------------------------------------------------- chunking contract


@pytest.mark.parametrize(("chunk", "expected"), [(None, [6, 54]), (20, [6, 20, 20, 14]), ("auto", [6, 54])])
def test_infidelity_runs_the_model_once_on_inputs_and_on_perturbations_in_chunks(cnn_batch, chunk, expected):
    model, inputs, target, attributions = cnn_batch
    batch_sizes = []
    handle = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    infidelity(model, None, inputs, attributions, target, n_perturb_samples=9, max_examples_per_batch=chunk)
    handle.remove()
    assert sorted(batch_sizes) == sorted(expected)


@pytest.mark.parametrize(("chunk", "expected"), [(None, [6, 18]), (4, [6, 4, 4, 4, 4, 2]), ("auto", [6, 18])])
def test_sensitivity_max_explains_inputs_once_and_perturbations_in_chunks(cnn_batch, chunk, expected):
    model, inputs, target, _ = cnn_batch
    calls = []

    def explain(x, t):
        calls.append((x.shape[0], t.tolist()))
        return saliency_fn(model, x, t)

    sensitivity_max(explain, inputs, target, n_perturb_samples=3, max_examples_per_batch=chunk)
    assert [n for n, _ in calls] == expected
    # Captum's layout: the samples of one example are adjacent rows
    assert sum((t for _, t in calls[1:]), []) == target.repeat_interleave(3).tolist()


@pytest.mark.parametrize("chunk", [1, 5, 7, 128, None])
def test_chunk_size_does_not_change_the_values(cnn_batch, chunk):
    model, inputs, target, attributions = cnn_batch
    torch.manual_seed(0)
    reference = captum_infidelity(model, gaussian_perturbation(0.1), inputs, attributions, target=target)
    torch.manual_seed(0)
    ours = infidelity(model, gaussian_perturbation(0.1), inputs, attributions, target, max_examples_per_batch=chunk)
    torch.testing.assert_close(ours, reference, rtol=RTOL, atol=1e-7)
    saliency = Saliency(model)
    torch.manual_seed(0)
    reference = captum_sensitivity_max(saliency.attribute, inputs, target=target, n_perturb_samples=4)
    torch.manual_seed(0)
    ours = sensitivity_max(
        lambda x, t: saliency.attribute(x, target=t), inputs, target, n_perturb_samples=4, max_examples_per_batch=chunk
    )
    torch.testing.assert_close(ours, reference, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("chunk", [0, -3, "all", 2.5, True])
def test_invalid_chunk_size_is_named(chunk):
    model = linear_model()
    inputs = torch.randn(2, 5)
    with pytest.raises(XAIConfigurationError, match="max_examples_per_batch"):
        infidelity(model, None, inputs, inputs, max_examples_per_batch=chunk)
    with pytest.raises(XAIConfigurationError, match="max_examples_per_batch"):
        sensitivity_max(lambda x, t: x, inputs, max_examples_per_batch=chunk)


# ---------------------------------------------------------------- known answers


def test_infidelity_of_exact_linear_attributions_is_zero():
    model = linear_model()
    inputs = torch.randn(4, 5)
    attributions = model.weight.detach().expand(4, 5)  # f(x) - f(x - I) = w.I exactly
    values = infidelity(model, gaussian_perturbation(0.5), inputs, attributions)
    torch.testing.assert_close(values, torch.zeros(4), rtol=0, atol=1e-10)
    # Captum's normalized form beta^2 a^2 - 2 beta ab + b^2 cancels large terms: float32 round-off remains
    values = infidelity(model, gaussian_perturbation(0.5), inputs, attributions, normalize=True)
    torch.testing.assert_close(values, torch.zeros(4), rtol=0, atol=1e-6)


def test_infidelity_known_value_with_fixed_perturbation():
    model = linear_model()
    w = model.weight.detach()[0]
    inputs = torch.randn(3, 5)

    def ones(x):  # I = 1 everywhere: f(x) - f(x - 1) = sum(w)
        return torch.ones_like(x), x - 1

    zero_attr = infidelity(model, ones, inputs, torch.zeros(3, 5), n_perturb_samples=4)
    torch.testing.assert_close(zero_attr, w.sum().pow(2).expand(3), rtol=1e-5, atol=0)
    doubled = infidelity(model, ones, inputs, 2 * w.expand(3, 5), n_perturb_samples=4)
    torch.testing.assert_close(doubled, w.sum().pow(2).expand(3), rtol=1e-5, atol=0)
    # normalize=True is invariant to the scale of the attributions: 2w is rescaled to w, infidelity 0
    normalized = infidelity(model, ones, inputs, 2 * w.expand(3, 5), normalize=True, n_perturb_samples=4)
    torch.testing.assert_close(normalized, torch.zeros(3), rtol=0, atol=1e-5)


def test_sensitivity_of_constant_explanation_is_zero():
    inputs = torch.randn(4, 3, 8, 8)
    values = sensitivity_max(lambda x, t: torch.ones_like(x), inputs, perturb_radius=0.5)
    torch.testing.assert_close(values, torch.zeros(4), rtol=0, atol=0)


def test_sensitivity_known_value_of_identity_explanation():
    inputs = torch.randn(4, 10, dtype=torch.float64)

    def perturb(x):  # the shift only depends on the sample index j, as x is repeat_interleaved
        scale = torch.tensor([0.1, 0.3, 0.2], dtype=x.dtype).repeat(x.shape[0] // 3)
        return x + scale[:, None]

    values = sensitivity_max(lambda x, t: x, inputs, n_perturb_samples=3, perturb_fn=perturb)
    expected = 0.3 * 10**0.5 / inputs.norm(dim=1)
    torch.testing.assert_close(values, expected)
    # a zero explanation norm is replaced by 1 (Captum): the value is the largest noise norm
    zero = sensitivity_max(lambda x, t: x, torch.zeros(2, 10), n_perturb_samples=3, perturb_fn=perturb)
    torch.testing.assert_close(zero, torch.full((2,), 0.3 * 10**0.5))


# ---------------------------------------------------------------- torchmetrics classes


def test_infidelity_metric_over_two_updates_equals_mean_of_functional(cnn_batch):
    model, inputs, target, attributions = cnn_batch
    metric = Infidelity(n_perturb_samples=5, noise_std=0.2, normalize=True, seed=123)
    metric.update(inputs[:4], attributions[:4], target[:4], model=model)
    metric.update(inputs[4:], attributions[4:], target[4:], model=model)

    perturb = gaussian_perturbation(0.2, generator=torch.Generator().manual_seed(123))
    first = infidelity(model, perturb, inputs[:4], attributions[:4], target[:4], 5, normalize=True)
    second = infidelity(model, perturb, inputs[4:], attributions[4:], target[4:], 5, normalize=True)
    expected = torch.cat([first, second]).mean()
    assert expected > 1e-6
    torch.testing.assert_close(metric.compute(), expected)
    # reset re-seeds: the same updates give the same value again
    value = metric.compute()
    metric.reset()
    metric.update(inputs[:4], attributions[:4], target[:4], model=model)
    metric.update(inputs[4:], attributions[4:], target[4:], model=model)
    torch.testing.assert_close(metric.compute(), value)


def test_sensitivity_metric_over_two_updates_equals_mean_of_functional(cnn_batch):
    model, inputs, target, attributions = cnn_batch
    metric = SensitivityMax(n_perturb_samples=4, perturb_radius=0.1, seed=9)
    metric.update(inputs[:2], attributions[:2], target[:2], model=model, explain_fn=saliency_fn)
    metric.update(inputs[2:], attributions[2:], target[2:], model=model, explain_fn=saliency_fn)

    generator = torch.Generator().manual_seed(9)
    explain = lambda x, t: saliency_fn(model, x, t)  # noqa: E731
    first = sensitivity_max(explain, inputs[:2], target[:2], 0.1, 4, generator=generator)
    second = sensitivity_max(explain, inputs[2:], target[2:], 0.1, 4, generator=generator)
    expected = torch.cat([first, second]).mean()
    assert expected > 0.01
    torch.testing.assert_close(metric.compute(), expected)


def test_sensitivity_metric_works_under_inference_mode(cnn_batch):
    model, inputs, target, attributions = cnn_batch
    reference = SensitivityMax(seed=0)
    reference.update(inputs, attributions, target, model=model, explain_fn=saliency_fn)
    metric = SensitivityMax(seed=0)
    with torch.inference_mode():
        batch = inputs.clone()
        metric.update(batch, attributions, target.clone(), model=model, explain_fn=saliency_fn)
    torch.testing.assert_close(metric.compute(), reference.compute())


def test_missing_arguments_raise():
    inputs = torch.randn(2, 5)
    with pytest.raises(XAIConfigurationError, match=r"Infidelity.update needs \['model'\]"):
        Infidelity().update(inputs, inputs)
    with pytest.raises(XAIConfigurationError, match=r"SensitivityMax.update needs \['explain_fn'\]"):
        SensitivityMax().update(inputs, inputs, model=linear_model())
    with pytest.raises(XAIConfigurationError, match=r"needs \['model', 'explain_fn'\]"):
        SensitivityMax().update(inputs, inputs)


def test_configuration_errors():
    model = linear_model()
    inputs = torch.randn(2, 5)
    with pytest.raises(XAIConfigurationError, match="same shape"):
        infidelity(model, None, inputs, torch.zeros(2, 4))
    with pytest.raises(XAIConfigurationError, match="generator= only seeds"):
        infidelity(model, gaussian_perturbation(), inputs, inputs, generator=torch.Generator())
    with pytest.raises(XAIConfigurationError, match="pass target="):
        infidelity(nn.Linear(5, 3), None, inputs, inputs)
    with pytest.raises(XAIConfigurationError, match=r"shape \(2,\)"):
        infidelity(nn.Linear(5, 3), None, inputs, inputs, target=torch.tensor([0, 1, 2]))
    with pytest.raises(XAIConfigurationError, match="n_perturb_samples"):
        sensitivity_max(lambda x, t: x, inputs, n_perturb_samples=0)


@pytest.mark.parametrize("metric_class", [Infidelity, SensitivityMax])
def test_distributed_merge_equals_single_instance(cnn_batch, metric_class):
    model, inputs, target, attributions = cnn_batch
    kwargs = {"n_perturb_samples": 3}
    arguments = {"model": model, "explain_fn": saliency_fn}
    halves = [slice(0, 2), slice(2, 6)]

    single = metric_class(**kwargs)
    torch.manual_seed(0)  # no seed: both setups draw the same stream of the global generator
    for half in halves:
        single.update(inputs[half], attributions[half], target[half], **arguments)

    ranks = [metric_class(**kwargs), metric_class(**kwargs)]
    torch.manual_seed(0)
    for rank, half in zip(ranks, halves):
        rank.update(inputs[half], attributions[half], target[half], **arguments)

    summed = ranks[0].sum_value + ranks[1].sum_value, ranks[0].count + ranks[1].count
    ranks[0].merge_state(ranks[1])
    assert int(ranks[0].count) == 6
    torch.testing.assert_close(ranks[0].compute(), single.compute())
    torch.testing.assert_close(summed[0] / summed[1], single.compute())


@pytest.mark.parametrize("metric_class", [Infidelity, SensitivityMax])
def test_metric_flags_and_plot(cnn_batch, metric_class):
    model, inputs, target, attributions = cnn_batch
    metric = metric_class(n_perturb_samples=2, seed=0)
    assert metric.higher_is_better is False and metric.is_differentiable is False
    values = []
    for _ in range(3):
        metric.update(inputs, attributions, target, model=model, explain_fn=saliency_fn)
        values.append(metric.compute())
    figure, axis = metric.plot(values)
    assert figure is not None and len(axis.lines) >= 1
    figure, axis = metric.plot()
    assert figure is not None


def test_sensitivity_reuses_the_callers_explanation_with_one_call_fewer():
    from captum.attr import Saliency

    from lightning_xai.metrics import SensitivityMax

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, target = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    calls = []

    def explain(explained_model, inputs, explained_target):
        calls.append(inputs.shape[0])
        return Saliency(explained_model).attribute(inputs, target=explained_target)

    attributions = Saliency(model).attribute(x, target=target)
    values = {}
    for reuse in (True, False):
        calls.clear()
        metric = SensitivityMax(seed=3, reuse_attributions=reuse)  # off by default: Captum recomputes
        metric.update(x, attributions, target, model=model, explain_fn=explain)
        values[reuse] = (metric.compute().item(), list(calls))
    assert values[True][0] == values[False][0]
    assert values[True][1] == [50] and values[False][1] == [5, 50]


# ---------------------------------------------------------------- memory layout of the perturbed images


class _ViewingCNN(nn.Module):
    """Flattens its activations with .view, which channels-last activations refuse."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.linear = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        features = torch.relu(self.conv(x))
        return self.linear(features.view(features.shape[0], -1))


def _layouts_seen(model):
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    return seen


@pytest.mark.parametrize("metric", ["infidelity", "sensitivity_max"])
def test_auto_sends_images_on_cpu_channels_last_and_agrees_with_the_contiguous_layout(cnn_batch, metric):
    model, inputs, target, attributions = cnn_batch
    seen = _layouts_seen(model)
    values = {}
    for memory_format in ("auto", "contiguous"):
        seen.clear()
        torch.manual_seed(5)
        if metric == "infidelity":
            values[memory_format] = infidelity(
                model, gaussian_perturbation(0.3), inputs, attributions, target, memory_format=memory_format
            )
        else:
            values[memory_format] = sensitivity_max(
                lambda x, t: Saliency(model).attribute(x, target=t), inputs, target, memory_format=memory_format
            )
        assert set(seen) == {memory_format == "contiguous"}  # every call, unperturbed inputs included
    torch.testing.assert_close(values["auto"], values["contiguous"], rtol=RTOL, atol=1e-7)


def test_auto_keeps_inputs_that_are_not_images_contiguous():
    model = linear_model()
    seen = _layouts_seen(model)
    infidelity(model, None, torch.randn(4, 5), torch.randn(4, 5), generator=torch.Generator().manual_seed(0))
    assert seen and all(seen)


@pytest.mark.parametrize("metric", ["infidelity", "sensitivity_max"])
def test_a_model_that_views_its_activations_falls_back_to_the_contiguous_layout_under_auto(metric):
    model = _ViewingCNN().eval()
    inputs, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    attributions = saliency_fn(model, inputs, target)
    seen = _layouts_seen(model)

    def run(memory_format):
        torch.manual_seed(5)
        if metric == "infidelity":
            return infidelity(
                model, gaussian_perturbation(0.3), inputs, attributions, target, 4, max_examples_per_batch=4,
                memory_format=memory_format,
            )  # fmt: skip
        return sensitivity_max(
            lambda x, t: saliency_fn(model, x, t), inputs, target, n_perturb_samples=4, max_examples_per_batch=4,
            memory_format=memory_format,
        )  # fmt: skip

    expected = run("contiguous")
    seen.clear()
    assert torch.equal(run("auto"), expected)
    assert seen.count(False) == 1  # one try in channels last, then contiguous for the rest of the call
    with pytest.raises(RuntimeError, match="view"):
        run("channels_last")


def test_an_unknown_memory_format_is_named():
    with pytest.raises(XAIConfigurationError, match="memory_format must be 'auto' or one of"):
        Infidelity(memory_format="nhwc")
    with pytest.raises(XAIConfigurationError, match="needs 4-D"):
        infidelity(linear_model(), None, torch.randn(2, 5), torch.randn(2, 5), memory_format="channels_last")
