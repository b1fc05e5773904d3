"""examples/smooth_surrogates.py in its smallest form: both parts run, and the directions it reports hold already."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import smooth_surrogates  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_quick_run_reports_the_directions_of_the_paper(tmp_path):
    results = smooth_surrogates.main(["--quick", "--output-dir", str(tmp_path)])
    (explanations,) = results["explanations"]  # one seed
    (chosen,) = results["strengths"]
    assert chosen["strength"] in smooth_surrogates.STRENGTHS
    # the choice is the smoothest strength within a point of the model's validation accuracy
    assert chosen["val_accuracy_by_strength"][chosen["strength"]] >= chosen["val_accuracy_model"] - 1.0
    for method in smooth_surrogates.explainers(1):
        # smoothing lowers max-sensitivity (measured at 2 epochs: 2-3x lower for every method)
        assert explanations[f"{method}/surrogate/sensitivity_max"] < explanations[f"{method}/model/sensitivity_max"]
        for metric in ("infidelity", "sensitivity_max", "sanity_top1", "sanity_top4"):
            assert explanations[f"{method}/model/{metric}"] >= 0
    # the input multiplier: global IG still resembles the trained model's maps after randomization (~0.99),
    # local IG does not (~0.2-0.4)
    for which in ("model", "surrogate"):
        assert explanations[f"ig_global/{which}/sanity_top4"] > 0.9
        assert explanations[f"ig_local/{which}/sanity_top4"] < 0.6
    assert set(results["rrr"]) == {"exact", "surrogate"}
    for result in results["rrr"].values():
        assert len(result["test"]) == 1 and all(0.0 <= value <= 100.0 for value in result["test"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["explanations"][0] == explanations
