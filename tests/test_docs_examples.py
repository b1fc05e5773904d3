"""Every Python example of the README and the docs runs as written, under ``import lightning as L`` and, with the
import swapped, under ``import pytorch_lightning as L``.

Examples on one page run in order in one namespace (later ones use what earlier ones defined), seeded with the
objects a page refers to without defining them (``model``, ``inputs``, ``trainer``, ...). Training runs are capped
at two batches per loop and two epochs: the code paths run unchanged, quickly.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from lightning_xai import XAIMixin
from lightning_xai.attribution import methods as attribution_methods
from lightning_xai.datasets import DecoyDigits
from tests.helpers import SmallCNNBody, bind

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
SKIPPED = {  # (page, index of the python block): why it cannot run here
    ("docs/metrics.md", 0): "a call signature, not code",
    ("docs/datasets.md", 5): "reads the UCI Adult CSV from the user's path",
    ("docs/datasets.md", 6): "reads the SST trees from the user's path",
    ("docs/callbacks/explanation_penalty.md", 6): "imports the user's own project",
}
# the import lines of the docs (lightning) and their pytorch_lightning counterparts
SWAPS = (("import lightning as L", "import pytorch_lightning as L"), ("lightning.pytorch", "pytorch_lightning"))


class DocsCNNBody(SmallCNNBody):
    """The ``model`` the docs refer to: a DecoyDigits CNN with a validation step."""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))


def _blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return [textwrap.dedent(m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def _context(package: ModuleType, tmp_path: Path) -> dict:
    torch.manual_seed(0)
    train, val = DecoyDigits("train"), DecoyDigits("val")
    return {
        "torch": torch,
        "nn": nn,
        "F": F,
        "np": np,
        "XAIMixin": XAIMixin,
        "L": sys.modules[package.__name__.split(".")[0]],
        "model": bind(DocsCNNBody, package)(channels=1, size=12),
        "inputs": torch.rand(4, 1, 12, 12),
        "target": torch.randint(0, 10, (4,)),
        "images": torch.rand(2, 1, 12, 12),
        "attributions": torch.randn(2, 1, 12, 12),
        "image": np.zeros((8, 8, 3), dtype=np.uint8),
        "html": "<b>film</b>",
        "trainer": package.Trainer(logger=package.loggers.CSVLogger(tmp_path), enable_progress_bar=False),
        "train_loader": DataLoader(Subset(train, range(32)), batch_size=16),
        "val_loader": DataLoader(Subset(val, range(32)), batch_size=16),
        "tokenizer": SimpleNamespace(convert_ids_to_tokens=lambda ids: [str(i) for i in ids]),
        "logits": torch.randn(8, 2, requires_grad=True),
        "y": torch.randint(0, 2, (8,)),
        "sex": torch.randint(0, 2, (8,)),
        "race": torch.randint(0, 5, (8,)),
    }


@pytest.fixture
def short_training(lightning_package, monkeypatch):
    """Caps every Trainer the examples build at two batches per loop and two epochs."""
    original = lightning_package.Trainer.__init__

    def init(self, *args, **kwargs):
        kwargs["max_epochs"] = min(kwargs.get("max_epochs") or 2, 2)
        for loop in ("train", "val", "test"):
            kwargs.setdefault(f"limit_{loop}_batches", 2)
        kwargs.setdefault("enable_progress_bar", False)
        original(self, *args, **kwargs)

    monkeypatch.setattr(lightning_package.Trainer, "__init__", init)
    monkeypatch.setattr(attribution_methods, "_METHODS", dict(attribution_methods._METHODS))  # registered there
    return lightning_package


@pytest.mark.parametrize("page", PAGES)
def test_every_example_of_the_page_runs(page, short_training, tmp_path, monkeypatch):
    blocks = _blocks(page)
    if not blocks:
        pytest.skip(f"{page} has no Python example")
    monkeypatch.chdir(tmp_path)  # examples write logs into the working directory
    monkeypatch.setattr(sys, "argv", ["example", "1"])  # scripts that read an epoch count get 1
    namespace = {"__name__": "__main__", **_context(short_training, tmp_path)}
    for index, code in enumerate(blocks):
        if (page, index) in SKIPPED:
            continue
        if short_training.__name__ == "pytorch_lightning":
            for lightning, pytorch_lightning in SWAPS:
                code = code.replace(lightning, pytorch_lightning)
        try:
            exec(compile(code, f"{page}[{index}]", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page}, Python example {index} failed:\n{code}") from error
