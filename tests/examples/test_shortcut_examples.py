"""The two shortcut examples run end to end in their smallest form, and DecoyDigits' feedback masks are what the
XIL typology's protocol describes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import decoy_digits  # noqa: E402
import sst_decoy  # noqa: E402

from lightning_xai.datasets import DecoyDigits  # noqa: E402
from tests.datasets.test_sst import TREES  # noqa: E402


def test_feedback_masks_follow_the_typology_protocol():
    digits = DecoyDigits("val")
    correct, digit = decoy_digits.feedback_masks(digits, "correct")
    incomplete, half = decoy_digits.feedback_masks(digits, "incomplete")
    wrong, told = decoy_digits.feedback_masks(digits, "wrong")
    assert torch.equal(correct, digits.masks) and torch.equal(told, wrong)
    # incomplete: half of the 2x2 patch (one row), inside the true patch; HINT keeps the lower half of the digit
    assert (incomplete.flatten(1).sum(1) == 2).all() and bool((incomplete <= correct).all())
    assert bool((half <= digit).all()) and 0.3 < float(half.sum() / digit.sum()) < 0.7
    # wrong: a 2x4 border strip away from the decoy (the opposite top/bottom and left/right side)
    assert (wrong.flatten(1).sum(1) == 8).all() and not bool((wrong * correct).any())
    rows = wrong.amax((1, 3)).argmax(1)
    assert bool(((rows == 0) == (digits.corners >= 2)).all())


@pytest.mark.filterwarnings("ignore")
def test_decoy_digits_quick_run_covers_every_method_and_feedback(tmp_path):
    results = decoy_digits.main(["--quick", "--limit-batches", "0.25", "--output-dir", str(tmp_path)])
    methods = [*decoy_digits.METHODS, decoy_digits.CEILING]
    assert sorted(results["results"]) == sorted(f"{m}/{k}" for m in methods for k in decoy_digits.FEEDBACK)
    for values in results["results"].values():
        assert len(values) == 1 and all(0.0 <= v <= 100.0 for v in values)
    for (method, _), weight in results["chosen"].items():
        assert (weight is None) == (method not in decoy_digits.WEIGHT_GRIDS)
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert all(math.isfinite(run["val"]) for run in runs)


@pytest.mark.filterwarnings("ignore")
def test_sst_decoy_runs_on_a_small_treebank(tmp_path):
    for split in ("train", "dev", "test"):
        (tmp_path / f"{split}.txt").write_text("\n".join(TREES * 8) + "\n")
    out = tmp_path / "out"
    results = sst_decoy.main(
        ["--data", str(tmp_path), "--variant", "decoy", "--epochs", "1", "--seeds", "2", "--reliance-samples", "8"]
        + ["--methods", "vanilla", "ablation", "counterexamples", "no shortcut", "--output-dir", str(out)]
        + ["--grid", "ablation=1,10", "counterexamples=1"]
    )
    assert results["chosen"]["ablation"] in (1.0, 10.0) and results["chosen"]["vanilla"] is None
    assert len(results["runs"]) == 2 + 3 + 2 + 2  # two seeds each, plus the second ablation weight on seed 0
    assert (out / "attributions.png").is_file() and (out / "runs.json").is_file()
