"""What NeuronMonitor and SpatialBiasMonitor cost, as a share of a training epoch of the models of their examples.

1. NeuronMonitor on both convolutions of ``examples/sst_tx_ray.py``'s text CNN, trained on 6,920 synthetic
   sentences of SST's size (random token ids over a 16k vocabulary, 4-40 tokens: the cost does not depend on
   the words), validating on 872: the default monitor (512 probe sentences from the validation loader, max-1,
   pictures every 5 computations) and the example's three monitors (top-1, max-1, labels).
2. SpatialBiasMonitor (defaults: every conv layer, 256 probe images, pictures every epoch) on
   ``examples/mind_the_pad.py``'s strided CNN, 32 px canvases.

A monitor's time is what it spends measuring (``on_train_start``'s reference measurement and every computed
epoch's measurement and pictures), summed over ``--epochs`` epochs and divided by the time of the same epochs trained
without it. Each figure is the minimum over ``--repeats`` runs in one process.

    python benchmarks/monitor_cost.py [--repeats 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from mind_the_pad import CanvasDigits, StridedCNN  # noqa: E402
from sst_tx_ray import MONITORS, TextCNN  # noqa: E402

from lightning_xai.callbacks import NeuronMonitor, SpatialBiasMonitor  # noqa: E402
from lightning_xai.datasets import SSTShortcut  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")

VOCABULARY = 16_000


class Sentences(Dataset):
    """Random sentences with the SST collate's keys."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 41, (size,), generator=generator)
        self.samples = [
            {
                "input_ids": torch.randint(2, VOCABULARY, (int(n),), generator=generator),
                "labels": torch.tensor(i % 2),
                "mask": None,
            }
            for i, n in enumerate(lengths)
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.samples[index]


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = SSTShortcut.collate(samples)
    return {"input_ids": batch["input_ids"], "labels": batch["labels"], "valid": batch["input_ids"] != 0}


def timed(monitor: pl.Callback) -> pl.Callback:
    """``monitor`` with its measuring methods wrapped to add their time up in ``monitor.seconds``."""
    monitor.seconds = 0.0
    for method in ("on_train_start", "epoch_end"):
        inner = getattr(monitor, method)

        def run(*args: Any, inner: Any = inner) -> None:
            started = time.perf_counter()
            inner(*args)
            monitor.seconds += time.perf_counter() - started

        setattr(monitor, method, run)
    return monitor


def _fit(model: pl.LightningModule, callbacks: list, train: DataLoader, val: DataLoader, epochs: int) -> float:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger("/tmp/monitor_cost"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(model, train, val)
    return time.perf_counter() - started


def _share(make_model, make_monitors, train, val, epochs: int, repeats: int) -> tuple[float, float]:
    """(monitor seconds / training seconds without it, seconds of one epoch without it), minimum over repeats."""
    shares, epoch_seconds = [], []
    for _ in range(repeats):
        torch.manual_seed(0)
        vanilla = _fit(make_model(), [], train, val, epochs)
        monitors = [timed(monitor) for monitor in make_monitors()]
        torch.manual_seed(0)
        _fit(make_model(), monitors, train, val, epochs)
        shares.append(sum(monitor.seconds for monitor in monitors) / vanilla)
        epoch_seconds.append(vanilla / epochs)
    return min(shares), min(epoch_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    train = DataLoader(Sentences(6920, 0), batch_size=50, shuffle=True, collate_fn=_collate)
    val = DataLoader(Sentences(872, 1), batch_size=512, collate_fn=_collate)
    layers = ["conv3", "conv5"]

    def text_cnn() -> TextCNN:
        return TextCNN(VOCABULARY)

    def example_monitors() -> list[NeuronMonitor]:
        return [
            NeuronMonitor(layers, valid_key="valid", name=name, pictures_every_n_epochs=5, **options)
            for name, options in MONITORS.items()
        ]

    cases = {
        "NeuronMonitor, defaults (512 probe sentences, max-1)": (
            text_cnn,
            lambda: [NeuronMonitor(layers, ignore_index=0)],
            train,
            val,
        ),
        "NeuronMonitor x 3, the example's (top-1, max-1, labels)": (text_cnn, example_monitors, train, val),
        "SpatialBiasMonitor, defaults (256 probe images)": (
            lambda: StridedCNN(),
            lambda: [SpatialBiasMonitor()],
            DataLoader(CanvasDigits("train", 32, copies=4), batch_size=128, shuffle=True),
            DataLoader(CanvasDigits("val", 32), batch_size=512),
        ),
    }
    print(f"minimum over {args.repeats} runs of {args.epochs} epochs; share = the monitor's time / training time")
    for name, (model, monitors, train_loader, val_loader) in cases.items():
        share, epoch = _share(model, monitors, train_loader, val_loader, args.epochs, args.repeats)
        print(f"{name:58s} {100 * share:5.1f} % of a {epoch:.2f} s epoch")


if __name__ == "__main__":
    main()
