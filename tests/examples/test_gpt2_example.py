"""examples/gpt2_attribution.py runs end to end and finds the planted association."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import gpt2_attribution  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_gpt2_example_shows_the_name_attribution_rise_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"
    summary = gpt2_attribution.main(
        ["--epochs", "3", "--seeds", "0", "--sentences", "2000", "--trials", "4", "--output-dir", str(out)]
    )
    assert summary["first_planted_mean"] < 0.8
    assert summary["final_planted_mean"] > 1.2 and summary["final_control_mean"] < 0.0
    assert (out / "name_attribution.png").stat().st_size > 0 and (out / "heatmaps_seed0.png").stat().st_size > 0
    rows = json.loads((out / "results.json").read_text())["seeds"][0]["epochs"]
    assert len(rows) == 3 and "llm/tokens/feature_ablation/comprehensiveness" in rows[-1]


@pytest.mark.filterwarnings("ignore")
def test_gpt2_example_fine_tunes_a_local_pretrained_model(tmp_path):
    from lightning_xai.datasets import PlantedAssociation, word_tokenizer
    from tests.helpers import tiny_gpt2

    tokenizer = word_tokenizer(PlantedAssociation.vocabulary())
    tiny_gpt2(tokenizer, seed=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    summary = gpt2_attribution.main(
        ["--model-path", str(tmp_path / "model"), "--epochs", "1", "--seeds", "0", "--sentences", "200",
         "--trials", "2", "--output-dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert len(summary["seeds"][0]["epochs"]) == 1 and (tmp_path / "out" / "heatmaps_seed0.png").exists()
