"""The documentation site builds with ``mkdocs build --strict`` and its API page renders the public names."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install -e .[docs])",
)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"

    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    assert "ExplanationPenalty" in api
    assert "contextual_decomposition" in api
    for anchor in (
        "lightning_xai.XAIMixin",
        "lightning_xai.callbacks.ExplanationPenalty",
        "lightning_xai.callbacks.LossTerm",
        "lightning_xai.attribution.register_cd_rule",
        "lightning_xai.functional.cdep_penalty",
        "lightning_xai.functional.rrr_penalty",
        "lightning_xai.functional.expected_gradients_penalty",
        "lightning_xai.functional.input_x_gradient_penalty",
        "lightning_xai.masks.OccupancyMaskSampler",
        "lightning_xai.masks.spans_to_mask",
        "lightning_xai.datasets.ColorDigits",
        "lightning_xai.datasets.DecoyDigits",
        "lightning_xai.errors.MissingBatchKeyError",
        "lightning_xai.errors.UnsupportedLayerError",
    ):
        assert f'id="{anchor}"' in api, f"the API page does not render {anchor}"
    # Doctests are rendered as code, not as Markdown block quotes.
    assert "<blockquote>" not in api

    penalty_page = (site / "callbacks" / "explanation_penalty" / "index.html").read_text(encoding="utf-8")
    assert "lightning_xai.callbacks.ExplanationPenalty" in penalty_page  # the YAML snippet is included
    for page in ("index.html", "getting-started/index.html", "contracts/index.html", "datasets/index.html"):
        assert (site / page).is_file(), f"{page} was not built"
    assert (site / "contextual-decomposition" / "index.html").is_file()
