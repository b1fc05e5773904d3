"""Intersectional cells, dependence estimators and fairness rates: references, invariants, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    demographic_parity_ratio,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from scipy.stats import chi2_contingency
from sklearn.metrics import accuracy_score, mutual_info_score

from lightning_xai.errors import GroupValueError, XAIConfigurationError
from lightning_xai.functional.fairness import (
    cell_confusion_counts,
    cell_statistics,
    dependence_from_statistics,
    difference_interval,
    fairness_report,
    intersectional_cells,
    mutual_information_penalty,
    parity_gap_floor,
    rate_gap,
    running_statistics,
    wilson_interval,
)


def random_batch(n: int, classes: int = 3, num_values=(2, 3), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, classes, generator=g, dtype=torch.float64), dim=1)
    groups = torch.stack([torch.randint(0, k, (n,), generator=g) for k in num_values], dim=1)
    target = torch.randint(0, classes, (n,), generator=g)
    return probs, groups, target


# ---------------------------------------------------------------- cells and statistics


def test_cells_are_mixed_radix_with_the_last_attribute_fastest():
    groups = torch.tensor([[a, b, c] for a in range(2) for b in range(3) for c in range(4)])
    assert intersectional_cells(groups, [2, 3, 4]).tolist() == list(range(24))


def test_out_of_range_value_names_the_attribute_and_the_fix():
    with pytest.raises(GroupValueError, match=r"'race' has the value 5, outside \[0, 5\)"):
        intersectional_cells(torch.tensor([[0, 5]]), [2, 5], names=["sex", "race"])
    with pytest.raises(GroupValueError, match=r"shape \(N, 2\)"):
        intersectional_cells(torch.zeros(4, 3, dtype=torch.long), [2, 5])
    with pytest.raises(GroupValueError, match="integer codes"):
        intersectional_cells(torch.tensor([[0.5, 1.0]]), [2, 5])


def test_cell_statistics_equal_a_loop():
    probs, groups, target = random_batch(50)
    cells = intersectional_cells(groups, [2, 3])
    sums, counts = cell_statistics(probs, cells, 6, target)
    for y in range(3):
        for s in range(6):
            rows = (cells == s) & (target == y)
            torch.testing.assert_close(sums[y, s], probs[rows].sum(0))
            assert counts[y, s].item() == rows.sum().item()


# ---------------------------------------------------------------- estimators against references


def test_plugin_mi_of_hard_predictions_equals_sklearn_mutual_info_score():
    _, groups, _ = random_batch(400, seed=1)
    cells = intersectional_cells(groups, [2, 3])
    decisions = (cells % 3 + torch.randint(0, 2, (400,), generator=torch.Generator().manual_seed(2))) % 3
    one_hot = torch.nn.functional.one_hot(decisions, 3).double()
    ours = mutual_information_penalty(one_hot, groups, [2, 3])
    assert ours.item() == pytest.approx(mutual_info_score(cells.numpy(), decisions.numpy()), rel=1e-10)


def test_plugin_mi_equals_the_prejudice_remover_index_over_n():
    # Kamishima et al. (2012): PI = sum_i sum_y M[y|x_i,s_i] ln(Pr[y|s_i] / Pr[y]), with
    # Pr[y|s] the mean prediction in group s and Pr[y] the overall mean prediction.
    probs, groups, _ = random_batch(300, classes=2, seed=3)
    cells = intersectional_cells(groups, [2, 3]).tolist()
    p = probs.numpy()
    overall = p.mean(0)
    by_group = {s: p[[i for i, c in enumerate(cells) if c == s]].mean(0) for s in set(cells)}
    prejudice_index = sum(
        p[i, y] * math.log(by_group[cells[i]][y] / overall[y]) for i in range(len(cells)) for y in range(2)
    )
    ours = mutual_information_penalty(probs, groups, [2, 3])
    assert ours.item() == pytest.approx(prejudice_index / len(cells), rel=1e-10)


def test_chi2_of_hard_predictions_equals_the_chi_square_statistic_over_n():
    _, groups, _ = random_batch(500, seed=4)
    cells = intersectional_cells(groups, [2, 3])
    decisions = (cells + torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(5))) % 3
    table = np.zeros((6, 3))
    np.add.at(table, (cells.numpy(), decisions.numpy()), 1)
    statistic = chi2_contingency(table, correction=False).statistic
    one_hot = torch.nn.functional.one_hot(decisions, 3).double()
    ours = mutual_information_penalty(one_hot, groups, [2, 3], estimator="chi2")
    assert ours.item() == pytest.approx(statistic / 500, rel=1e-10)


def test_hsic_equals_the_biased_kernel_estimator_with_linear_and_delta_kernels():
    probs, groups, _ = random_batch(120, seed=6)
    cells = intersectional_cells(groups, [2, 3])
    n = 120
    k = probs @ probs.T  # linear kernel on the predictions
    indicator = torch.nn.functional.one_hot(cells, 6).double()
    ell = indicator @ indicator.T  # delta kernel on the cells
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    hsic = torch.trace(k @ h @ ell @ h) / n**2
    ours = mutual_information_penalty(probs, groups, [2, 3], estimator="hsic")
    assert ours.item() == pytest.approx(hsic.item(), rel=1e-10)


def test_conditional_form_is_the_class_weighted_mean_of_per_class_estimates():
    probs, groups, target = random_batch(600, seed=7)
    ours = mutual_information_penalty(probs, groups, [2, 3], target, conditional_on_target=True)
    expected = sum(
        (target == y).double().mean() * mutual_information_penalty(probs[target == y], groups[target == y], [2, 3])
        for y in range(3)
    )
    assert ours.item() == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("estimator", ["plugin", "chi2", "hsic"])
def test_zero_when_every_cell_has_the_same_rates(estimator):
    # each cell holds the same multiset of predictions, in different orders and cell sizes
    g = torch.Generator().manual_seed(8)
    base = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), 1)
    probs = torch.cat([base.repeat(k, 1)[torch.randperm(5 * k, generator=g)] for k in (1, 2, 3, 1, 4, 2)])
    groups = torch.cat([torch.full((5 * k,), s) for s, k in enumerate((1, 2, 3, 1, 4, 2))])
    groups = torch.stack([groups // 3, groups % 3], dim=1)
    value = mutual_information_penalty(probs, groups, [2, 3], estimator=estimator)
    assert abs(value.item()) < 1e-15


@pytest.mark.parametrize("estimator", ["plugin", "chi2", "hsic"])
def test_gradient_matches_finite_differences(estimator):
    probs, groups, target = random_batch(40, seed=9)
    logits = torch.log(probs).clone().requires_grad_(True)

    def objective(z):
        return mutual_information_penalty(
            torch.softmax(z, 1), groups, [2, 3], target, estimator=estimator, conditional_on_target=True
        )

    assert torch.autograd.gradcheck(objective, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ["plugin", "chi2", "hsic"])
def test_the_gradient_passes_gradcheck_with_left_out_cells_and_empty_strata(estimator):
    # the masks of left-out cells and of an empty stratum must not leak into the gradient
    g = torch.Generator().manual_seed(3)
    sums = torch.rand(3, 6, 2, generator=g, dtype=torch.float64) * 4
    counts = torch.tensor(
        [[4.0, 1.0, 5.0, 0.0, 3.0, 6.0], [2.0, 2.0, 7.0, 3.0, 1.0, 4.0], [0.0] * 6], dtype=torch.float64
    )
    sums[:, :, 0] = sums[:, :, 0].clamp_max(counts)
    sums[2] = 0.0  # an empty stratum
    sums.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: dependence_from_statistics(s, counts, estimator, min_cell_count=2.0), (sums,), eps=1e-7, atol=1e-6
    )


# ---------------------------------------------------------------- edge cases: no NaN, no crash


@pytest.mark.parametrize("estimator", ["plugin", "chi2", "hsic"])
def test_missing_cells_single_cells_and_saturated_predictions_give_finite_values_and_gradients(estimator):
    logits = torch.tensor([[30.0, -30.0], [-30.0, 30.0], [30.0, -30.0]], requires_grad=True)  # probs 0 and 1
    cases = {
        "cells missing": torch.tensor([[0, 0], [0, 0], [1, 4]]),
        "one cell": torch.tensor([[1, 2], [1, 2], [1, 2]]),
    }
    for groups in cases.values():
        value = mutual_information_penalty(torch.softmax(logits, 1), groups, [2, 5], estimator=estimator)
        (gradient,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(gradient).all()
    one_cell = mutual_information_penalty(torch.softmax(logits, 1), cases["one cell"], [2, 5], estimator=estimator)
    assert one_cell.item() == 0.0
    # one true class only, conditional form: the other strata are empty and drop out
    value = mutual_information_penalty(
        torch.softmax(logits, 1), cases["cells missing"], [2, 5], torch.zeros(3), conditional_on_target=True
    )
    assert torch.isfinite(value)
    empty = mutual_information_penalty(torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), [2, 5])
    assert empty.item() == 0.0


def test_min_cell_count_leaves_small_cells_out():
    probs = torch.tensor([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4 + [[0.5, 0.5]])
    groups = torch.tensor([0] * 4 + [1] * 4 + [2])
    full = mutual_information_penalty(probs, groups, [3])
    without_small = mutual_information_penalty(probs, groups, [3], min_cell_count=2)
    assert without_small.item() == pytest.approx(mutual_information_penalty(probs[:8], groups[:8], [3]).item())
    assert without_small.item() != pytest.approx(full.item())


def test_bad_estimator_and_missing_target_are_named():
    probs, groups, _ = random_batch(10)
    with pytest.raises(XAIConfigurationError, match="estimator must be one of"):
        mutual_information_penalty(probs, groups, [2, 3], estimator="kde")
    with pytest.raises(XAIConfigurationError, match="needs target="):
        mutual_information_penalty(probs, groups, [2, 3], conditional_on_target=True)


# ---------------------------------------------------------------- small-sample bias and running statistics


def _independent_stream(batches: int, batch_size: int, seed: int):
    """Predictions independent of 10 cells: the true mutual information is 0."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        probs = torch.distributions.Beta(2.0, 5.0).sample((batch_size,))
        groups = torch.stack(
            [torch.randint(0, 2, (batch_size,), generator=g), torch.randint(0, 5, (batch_size,), generator=g)], 1
        )
        yield torch.stack([1 - probs, probs], 1).double(), groups


def test_plugin_estimate_of_an_independent_model_has_a_floor_that_grows_as_cells_shrink():
    torch.manual_seed(0)
    floors = {}
    for batch_size in (32, 128, 1024):
        values = [mutual_information_penalty(p, g, [2, 5]).item() for p, g in _independent_stream(40, batch_size, 1)]
        floors[batch_size] = float(np.mean(values))
    # roughly inversely proportional to the batch size (about 4 examples per cell at 32)
    assert floors[32] > 3 * floors[128] > 9 * floors[1024] > 0
    assert floors[32] > 0.01


def test_running_statistics_lower_the_floor_of_small_batches():
    torch.manual_seed(0)
    per_batch, running = [], []
    sums_state = counts_state = None
    for probs, groups in _independent_stream(200, 32, 2):
        cells = intersectional_cells(groups, [2, 5])
        sums, counts = cell_statistics(probs, cells, 10)
        per_batch.append(dependence_from_statistics(sums, counts).item())
        sums_state = running_statistics(sums_state, sums, 0.95).detach()
        counts_state = running_statistics(counts_state, counts, 0.95).detach()
        running.append(dependence_from_statistics(sums_state, counts_state).item())
    # after a burn-in, the running estimate sits far below the per-batch floor
    assert np.mean(running[100:]) < 0.2 * np.mean(per_batch[100:])


def test_running_statistics_value_is_the_average_and_gradient_is_the_batchs():
    current = torch.tensor([1.0, 3.0], requires_grad=True)
    mixed = running_statistics(torch.tensor([5.0, 5.0]), current, 0.9)
    torch.testing.assert_close(mixed.detach(), torch.tensor([4.6, 4.8]))
    (mixed * torch.tensor([2.0, 3.0])).sum().backward()
    torch.testing.assert_close(current.grad, torch.tensor([2.0, 3.0]))
    assert running_statistics(None, current, 0.9) is current


# ---------------------------------------------------------------- fairness rates against fairlearn


def _labelled(n: int, seed: int):
    rng = np.random.default_rng(seed)
    sex, race = rng.integers(0, 2, n), rng.integers(0, 3, n)
    y_true = rng.integers(0, 2, n)
    y_pred = (rng.random(n) < 0.2 + 0.15 * sex + 0.1 * race).astype(int)
    return y_true, y_pred, sex, race


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fairness_report_equals_fairlearn(seed):
    y_true, y_pred, sex, race = _labelled(700, seed)
    cells = intersectional_cells(torch.tensor(np.stack([sex, race], 1)), [2, 3])
    report = fairness_report(cell_confusion_counts(torch.tensor(y_pred), torch.tensor(y_true), cells, 6))
    features = {"sex": sex, "race": race}
    frame = MetricFrame(
        metrics={
            "pos_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
            "accuracy": accuracy_score,
        },
        y_true=y_true,
        y_pred=y_pred,
        sensitive_features=features,
    )
    by_cell = frame.by_group.reset_index()
    for _, row in by_cell.iterrows():
        cell = int(row["sex"]) * 3 + int(row["race"])
        for name in ("pos_rate", "tpr", "fpr", "accuracy"):
            assert report[name][cell].item() == pytest.approx(row[name], abs=1e-12)
    kwargs = dict(sensitive_features=features)
    assert report["dp_diff"].item() == pytest.approx(demographic_parity_difference(y_true, y_pred, **kwargs), abs=1e-12)
    assert report["dp_ratio"].item() == pytest.approx(demographic_parity_ratio(y_true, y_pred, **kwargs), abs=1e-12)
    assert report["eo_diff"].item() == pytest.approx(equalized_odds_difference(y_true, y_pred, **kwargs), abs=1e-12)
    assert report["eo_diff_mean"].item() == pytest.approx(
        equalized_odds_difference(y_true, y_pred, agg="mean", **kwargs), abs=1e-12
    )
    assert report["worst_cell_accuracy"].item() == pytest.approx(frame.group_min()["accuracy"], abs=1e-12)


def test_fairness_report_leaves_undefined_rates_out_of_the_gaps():
    # cell 2 has no examples, cell 1 no positives: its tpr is undefined (fairlearn would count it as 0)
    confusion = torch.tensor([[3, 1, 1, 3], [4, 2, 0, 0], [0, 0, 0, 0]])
    report = fairness_report(confusion)
    assert math.isnan(report["pos_rate"][2]) and math.isnan(report["tpr"][1])
    assert report["dp_diff"].item() == pytest.approx(0.5 - 2 / 6)
    assert report["tpr_diff"].item() == 0.0
    assert report["fpr_diff"].item() == pytest.approx(2 / 6 - 1 / 4)
    assert report["count"].tolist() == [8, 6, 0]


def test_confusion_counts_refuse_non_binary_labels():
    with pytest.raises(XAIConfigurationError, match="binary"):
        cell_confusion_counts(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([0, 0]), 1)


# ---------------------------------------------------------------- rate gaps and confidence intervals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rate_gap_of_one_hot_decisions_equals_fairlearns_dp_and_eo_differences(seed):
    y_true, y_pred, sex, race = _labelled(700, seed)
    cells = intersectional_cells(torch.tensor(np.stack([sex, race], 1)), [2, 3])
    decisions = torch.nn.functional.one_hot(torch.tensor(y_pred), 2).double()
    features = {"sex": sex, "race": race}
    dp = rate_gap(*cell_statistics(decisions, cells, 6))
    eo = rate_gap(*cell_statistics(decisions, cells, 6, torch.tensor(y_true), 2))
    assert dp.item() == pytest.approx(demographic_parity_difference(y_true, y_pred, sensitive_features=features))
    assert eo.item() == pytest.approx(equalized_odds_difference(y_true, y_pred, sensitive_features=features))
    assert dependence_from_statistics(*cell_statistics(decisions, cells, 6), estimator="rate_gap") == dp


def test_rate_gap_is_differentiable_leaves_small_cells_out_and_is_zero_for_one_cell():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.1, 0.9], [0.5, 0.5]], requires_grad=True)
    sums, counts = cell_statistics(probs, torch.tensor([0, 0, 1, 2]), 3)
    gap = rate_gap(sums, counts)
    assert gap.item() == pytest.approx(0.9 - 0.3)  # cell 1's positive rate minus cell 0's
    (gradient,) = torch.autograd.grad(gap, probs)
    # along p(positive) - p(negative): +1 for cell 1's row, -1/2 for each row of cell 0, nothing for cell 2 (the
    # two classes' gaps are equal, so which of them carries the gradient is a tie)
    assert (gradient[:, 1] - gradient[:, 0]).tolist() == pytest.approx([-0.5, -0.5, 1.0, 0.0])
    assert rate_gap(sums, counts, min_cell_count=2).item() == 0.0  # only cell 0 is left
    assert rate_gap(*cell_statistics(probs, torch.zeros(4, dtype=torch.long), 1)).item() == 0.0


def test_wilson_interval_equals_scipy_and_is_nan_for_an_empty_cell():
    from scipy.stats import binomtest

    successes, trials = torch.tensor([0, 5, 33, 50, 0]), torch.tensor([12, 50, 57, 50, 0])
    low, high = wilson_interval(successes, trials)
    for k, n, lo, hi in zip(successes.tolist(), trials.tolist(), low.tolist(), high.tolist()):
        if n == 0:
            assert math.isnan(lo) and math.isnan(hi)
            continue
        reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert (lo, hi) == pytest.approx((reference.low, reference.high), abs=1e-3)  # z = 1.96 vs the exact quantile
    low99, high99 = wilson_interval(successes, trials, z=2.576)
    assert bool((low99[:4] <= low[:4] + 1e-12).all() and (high99[:4] >= high[:4] - 1e-12).all())


def test_difference_interval_reproduces_newcombes_worked_example():
    # Newcombe (1998), Table II, example (a): 56/70 vs 48/80, method 10 gives 0.0524 to 0.3339
    k, n = torch.tensor([56, 48]), torch.tensor([70, 80])
    low, high = wilson_interval(k, n)
    rates = k / n
    d_low, d_high = difference_interval(rates[0], (low[0], high[0]), rates[1], (low[1], high[1]))
    assert (float(d_low), float(d_high)) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_parity_gap_floor_is_a_fair_models_expected_gap():
    # two cells: E|p1 - p2| of two binomial proportions, about sqrt(2 / pi) * sd(p1 - p2)
    n = torch.tensor([400, 100])
    expected = math.sqrt(2 / math.pi) * math.sqrt(0.3 * 0.7 * (1 / 400 + 1 / 100))
    assert parity_gap_floor(n, 0.3, draws=20000).item() == pytest.approx(expected, rel=0.03)
    # Adult's test cells of the 60/20/20 split (benchmarks/fairness_frontier.py): 10 cells vs the 4-cell grouping
    cells10 = torch.tensor([3835, 313, 39, 139, 33, 1729, 311, 23, 70, 22])
    cells4 = torch.tensor([3835, 524, 1729, 426])
    assert parity_gap_floor(cells10, 0.2).item() == pytest.approx(0.172, abs=0.01)
    assert parity_gap_floor(cells4, 0.2).item() == pytest.approx(0.029, abs=0.004)
    assert parity_gap_floor(cells4 * 4, 0.2) < parity_gap_floor(cells4, 0.2)  # more rows, less noise
    assert parity_gap_floor(torch.tensor([50, 0]), 0.2).item() == 0.0  # one non-empty cell: nothing to compare
    assert parity_gap_floor(cells4, 0.0).item() == 0.0
    assert parity_gap_floor(cells4, 0.2) == parity_gap_floor(cells4, 0.2)  # seeded
