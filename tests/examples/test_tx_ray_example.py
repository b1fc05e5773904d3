"""The TX-Ray pruning example runs end to end on a small synthetic treebank whose sentiment sits in two words."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import sst_tx_ray  # noqa: E402

FILLER = [f"w{i}" for i in range(30)]


def _treebank(root: Path, sizes: dict[str, int]) -> None:
    rng = random.Random(0)
    for split, size in sizes.items():
        lines = []
        for i in range(size):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 6)
            words.insert(rng.randrange(7), "good" if positive else "bad")
            label = 4 if positive else 0
            lines.append(f"({label} " + " ".join(f"(2 {w})" for w in words) + ")")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.filterwarnings("ignore")
def test_quick_run_prunes_by_every_score_and_tx_ray_mass_beats_random(tmp_path):
    _treebank(tmp_path, {"train": 400, "dev": 100, "test": 100})
    result = sst_tx_ray.main(
        ["--quick", "--data", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--epochs", "4", "--filters", "8"]
    )
    (run,) = result["runs"]
    curves = run["curves"]
    assert sorted(curves) == sorted(sst_tx_ray.SCORES)
    unpruned = {name: curve[0] for name, curve in curves.items()}
    assert len({tuple(v) for v in unpruned.values()}) == 1  # 0 % pruned: every score leaves the same model
    assert unpruned["magnitude"][0] > 90.0  # the sentiment word is easy to find
    last = result["sparsities"].index(0.75)
    # TX-Ray's mass keeps the filters that carry the sentiment word: three quarters pruned cost less than at random
    assert curves["tx-ray mass, top-1"][last][0] > curves["random"][last][0] + 5.0
    assert curves["tx-ray mass, max-1"][last][0] > curves["random"][last][0] + 5.0
    for key in ("conv3/hellinger_reference", "conv5/dead_share", "conv3/length_shift"):
        assert f"neurons/top1/{key}" in run["monitor"]
    assert 0.0 < run["monitor"]["neurons/top1/conv3/hellinger_reference"] <= 1.0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sparsities"] == result["sparsities"] and (tmp_path / "out" / "pruning.png").exists()
