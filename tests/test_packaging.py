"""What the library needs installed: either Lightning package alone, neither Rich nor TensorBoard, and examples
that run with the ``examples`` extra only. Packages are hidden from a subprocess, as on a machine without them."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDE = str(Path(__file__).with_name("_hide_packages.py"))
# what the examples extra does not install: everything else of dev, and the other Lightning package
NOT_IN_EXAMPLES_EXTRA = "lightning,tensorboard,tensorboardX,concept_erasure,mlflow,wandb,fairlearn,jsonargparse"


def _run(hidden: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, HIDE, hidden, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return result


def _readme_quick_start() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    # one epoch on a slice: the point here is which packages it imports
    return code.replace("max_epochs=5", "max_epochs=1, limit_train_batches=2, enable_progress_bar=False")


@pytest.mark.parametrize(
    ("hidden", "swap"),
    [("pytorch_lightning", None), ("lightning", ("import lightning as L", "import pytorch_lightning as L"))],
    ids=["only-lightning", "only-pytorch_lightning"],
)
def test_the_quick_start_runs_with_either_lightning_package_alone(hidden, swap):
    code = _readme_quick_start()
    if swap:
        code = code.replace(*swap)
    code += "\nimport sys\nprint('loaded:', sorted(m for m in ('pytorch_lightning', 'lightning') if m in sys.modules))"
    code += "\nfrom lightning_xai.callbacks import AttributionMetrics; from lightning_xai import loggers"
    result = _run(hidden, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = "['lightning']" if hidden == "pytorch_lightning" else "['pytorch_lightning']"
    assert f"loaded: {loaded}" in result.stdout


def test_without_any_lightning_package_the_mixin_imports_and_callbacks_name_the_fix():
    code = "import lightning_xai, lightning_xai.functional, lightning_xai.metrics\nimport lightning_xai.callbacks"
    result = _run("lightning,pytorch_lightning", "-c", code)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "pip install lightning" in result.stderr
    assert "lightning_xai.callbacks" in result.stderr  # the mixin, functional and metrics imported fine


def test_neither_rich_nor_a_lightning_package_is_a_hard_dependency():
    # rich installed switches every user's Trainer to RichProgressBar; the library never imports it
    required = importlib.metadata.requires("lightning-xai") or []
    unconditional = {re.split(r"[ <>=;\[]", r)[0].lower() for r in required if "extra ==" not in r}
    assert not unconditional & {"rich", "lightning", "pytorch-lightning", "tensorboard"}, unconditional
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "lightning_xai").rglob("*.py"))
    assert not re.search(r"^\s*(import|from) rich\b", sources, re.M)


def test_the_demo_runs_with_the_examples_extra_only(tmp_path):
    result = _run(
        NOT_IN_EXAMPLES_EXTRA,
        "examples/color_digits.py",
        *("--epochs", "1", "--seeds", "1", "--image-size", "8", "--methods", "vanilla", "cdep"),
        *("--output-dir", str(tmp_path)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pip install tensorboard" in result.stdout
    assert (tmp_path / "heatmaps.png").is_file() and (tmp_path / "csv").is_dir()
    assert not (tmp_path / "tensorboard").exists()


def test_the_causalm_example_runs_with_the_examples_extra_only():
    result = _run(
        NOT_IN_EXAMPLES_EXTRA,
        "examples/causalm.py",
        *("--size", "400", "--mlm-epochs", "1", "--cf-epochs", "2", "--task-epochs", "2", "--bias", "0.2"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEACE" not in result.stdout  # the concept-erasure baseline is left out without its package
    assert "TReATE" in result.stdout


@pytest.mark.parametrize(
    ("imports", "logger"),
    [
        ("import lightning_xai.callbacks; import pytorch_lightning", "pytorch_lightning"),
        ("import pytorch_lightning; import lightning_xai.callbacks", "pytorch_lightning"),
        ("import lightning; import lightning_xai.callbacks", "lightning.pytorch"),
    ],
)
def test_importing_both_packages_keeps_the_users_lightning_logger(imports, logger):
    # both packages point lightning_utilities' shared rank-zero logger at their own on import; the library's
    # import of the other one must not re-route the user's Trainer messages past their logging configuration
    code = f"{imports}\nfrom lightning_utilities.core import rank_zero\nprint('logger:', rank_zero.log.name)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"logger: {logger}.utilities.rank_zero" in result.stdout
