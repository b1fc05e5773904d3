"""Every ready LightningCLI snippet in ``callbacks/*.yaml`` loads, builds its callbacks and trains, under the
LightningCLI of ``pytorch_lightning`` and of ``lightning.pytorch``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_xai import XAIMixin
from lightning_xai.callbacks import LossTerm
from tests.helpers import bind

pytest.importorskip("jsonargparse")

REPO_ROOT = Path(__file__).resolve().parents[1]
YAML_FILES = sorted((REPO_ROOT / "callbacks").glob("*.yaml"))


class _RandomDictDataset(Dataset):
    """Random 1x6x6 images with labels, a mask over the left half and protected attributes ``sex``, ``race``."""

    def __init__(self, size: int = 16) -> None:
        generator = torch.Generator().manual_seed(0)
        self.inputs = torch.rand(size, 1, 6, 6, generator=generator)
        self.targets = torch.randint(0, 3, (size,), generator=generator)
        self.masks = torch.zeros(size, 1, 6, 6)
        self.masks[..., :3] = 1.0
        self.sex = torch.randint(0, 2, (size,), generator=generator)
        self.race = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input": self.inputs[index],
            "target": self.targets[index],
            "mask": self.masks[index],
            "sex": self.sex[index],
            "race": self.race[index],
        }


class TinyDataModuleBody:
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_RandomDictDataset(), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_RandomDictDataset(), batch_size=self.batch_size)


class TinyModelBody(XAIMixin):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["input"]), batch["target"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


LM_WORDS = [
    "The",
    "capital",
    "of",
    "France",
    "is",
    "Paris",
    "works",
    "as",
    "a",
    "Alice",
    "Bob",
    "Maria",
    "Chen",
    "nurse",
]


class TinyCausalLMBody:
    """A LightningModule holding a tiny GPT-2 as ``model`` and its tokenizer, for the snippets that explain LMs."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_xai.datasets import word_tokenizer
        from tests.helpers import tiny_gpt2

        self.tokenizer = word_tokenizer(LM_WORDS)
        self.model = tiny_gpt2(self.tokenizer).train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class TinyTextDataModuleBody:
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        ids = torch.randint(3, 3 + len(LM_WORDS), (8, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader([{"input_ids": row} for row in ids], batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


#: snippets whose callbacks explain a causal LM train a tiny GPT-2 instead of the CNN
LM_SNIPPETS = {"generation_attribution_report.yaml"}


def _declared_callbacks(yaml_path: Path) -> list[dict[str, Any]]:
    config = yaml.safe_load(yaml_path.read_text())
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _resolve(class_path: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)


def _build_cli(package: ModuleType, yaml_path: Path, *extra_args: str) -> Any:
    cli = importlib.import_module(f"{package.__name__}.cli")
    language = yaml_path.name in LM_SNIPPETS
    return cli.LightningCLI(
        bind(TinyCausalLMBody if language else TinyModelBody, package),
        bind(TinyTextDataModuleBody if language else TinyDataModuleBody, package, "LightningDataModule"),
        run=False,
        save_config_callback=None,
        seed_everything_default=0,
        args=[
            "--config",
            str(yaml_path),
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.accelerator=cpu",
            *extra_args,
        ],
    )


def test_there_are_yaml_snippets() -> None:
    assert YAML_FILES, "callbacks/ holds no *.yaml snippet"


@pytest.mark.parametrize("yaml_path", YAML_FILES, ids=[p.name for p in YAML_FILES])
def test_yaml_builds_the_declared_callbacks(
    yaml_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_package: ModuleType
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # pytest's own arguments are not the CLI's
    declared = _declared_callbacks(yaml_path)
    assert declared, f"{yaml_path.name} declares no trainer.callbacks"
    cli = _build_cli(lightning_package, yaml_path)
    for entry in declared:
        cls = _resolve(entry["class_path"])
        instances = [cb for cb in cli.trainer.callbacks if isinstance(cb, cls)]
        assert instances, (
            f"{yaml_path.name}: no {cls.__name__} among {[type(c).__name__ for c in cli.trainer.callbacks]}"
        )
        init_args = entry.get("init_args") or {}
        matching = [cb for cb in instances if all(getattr(cb, k) == v for k, v in init_args.items())]
        assert matching, (
            f"{yaml_path.name}: no {cls.__name__} with {init_args}; got "
            f"{[{k: getattr(cb, k, '<missing>') for k in init_args} for cb in instances]}"
        )


@pytest.mark.parametrize("yaml_path", YAML_FILES, ids=[p.name for p in YAML_FILES])
def test_yaml_trains_and_logs_its_terms(
    yaml_path: Path, monkeypatch: pytest.MonkeyPatch, lightning_package: ModuleType
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli = _build_cli(lightning_package, yaml_path, "--trainer.max_steps=2")
    assert isinstance(cli.trainer, lightning_package.Trainer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    terms = [cb for cb in cli.trainer.callbacks if isinstance(cb, LossTerm)]
    for term in terms:
        logged = [key for key in metrics if key.startswith(f"xai/{term.term_name}")]
        assert logged, f"{yaml_path.name}: xai/{term.term_name} was not logged; logged keys: {sorted(metrics)}"
        assert all(torch.isfinite(metrics[key]).all() for key in logged)
    if terms:
        assert any(key.startswith("xai/total") for key in metrics)
        assert all(term.steps_seen == 2 for term in terms)
    for callback in cli.trainer.callbacks:
        if type(callback).__name__ == "FairnessMetrics":
            assert torch.isfinite(metrics[f"{callback.name}/dp_diff"])
        if type(callback).__name__ == "GenerationAttributionReport":
            assert torch.isfinite(metrics["llm/feature_ablation/comprehensiveness"])
        if type(callback).__name__ == "ConceptEffect":
            assert 0.0 <= metrics[f"concept/{callback.name}/probe_accuracy"] <= 1.0
