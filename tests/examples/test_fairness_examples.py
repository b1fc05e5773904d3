"""The Adult fairness example and the frontier benchmark run end to end on a small synthetic Adult table."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import adult_fairness  # noqa: E402
import fairness_frontier  # noqa: E402

from tests.datasets.test_adult import synthetic_adult  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_adult_example_chooses_on_validation_and_reports_test_numbers_from_the_callback(tmp_path):
    data = synthetic_adult(tmp_path)
    results = adult_fairness.main(
        [
            "--data",
            str(data),
            "--epochs",
            "2",
            "--seeds",
            "1",
            "--settings",
            "0.05",
            "0.2",
            "--dp-target",
            "1.0",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert set(results["validation"]) == {0.0, 0.05, 0.2}
    chosen = results["chosen"]["setting"]
    # the best validation accuracy among the settings that meet the (here: any) target
    assert results["validation"][chosen]["accuracy"] == max(results["validation"][s]["accuracy"] for s in (0.05, 0.2))
    for key in ("accuracy", "dp_diff", "dp_diff_low", "dp_diff_high", "eo_diff"):
        assert math.isfinite(results["test_chosen"][key]) and math.isfinite(results["test_unregularized"][key])
    assert (
        results["test_chosen"]["dp_diff_low"]
        <= results["test_chosen"]["dp_diff"]
        <= results["test_chosen"]["dp_diff_high"]
    )
    assert (tmp_path / "out" / "validation_tradeoff.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore")
def test_frontier_benchmark_selects_each_method_on_validation(tmp_path):
    data = synthetic_adult(tmp_path, n=900)
    out = tmp_path / "frontier"
    text = fairness_frontier.main(
        [
            "--data",
            str(data),
            "--protocols",
            "cells4",
            "ffb_sex",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--methods",
            "constraint_dp",
            "mi",
            "expgrad_dp",
            "threshold_dp",
            "--dp-target",
            "1.0",
            "--output-dir",
            str(out),
        ]
    )
    for protocol in ("cells4", "ffb_sex"):
        points = json.loads((out / f"frontier_{protocol}.json").read_text())
        assert {p["method"] for p in points} == {"mlp", "constraint_dp", "mi", "expgrad_dp", "threshold_dp"}
        assert (out / f"frontier_{protocol}.png").stat().st_size > 0
    # with a target every setting meets, each method's row is its best-validation-accuracy setting
    cells4 = [p for p in json.loads((out / "frontier_cells4.json").read_text()) if p["method"] == "mi"]
    best = max(cells4, key=lambda p: p["val_accuracy"])["setting"]
    assert f"| MI regularizer (plug-in) | DP ≤ 1 | {best:g} |" in text
    # FFB's protocol removes sex from the inputs
    assert fairness_frontier.ffb_sex(fairness_frontier.AdultIncome(data)).inputs.shape[1] == (
        fairness_frontier.AdultIncome(data).inputs.shape[1] - 2
    )
