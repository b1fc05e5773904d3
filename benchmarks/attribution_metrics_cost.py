"""What AttributionMetrics adds to an epoch of the ColorDigits demo, measured in one run.

Trains the demo CNN (28x28, batch 64, validation on the reversed-colour split) for a few epochs without
the callback, with its defaults and with lighter settings, for a vanilla and a CDEP run, and prints the
mean epoch time and the added share. The first epoch is a warm-up; the mean runs over the next ten, which
hold two of the defaults' picture epochs (one in five), so the figure is the cost averaged over picture
and plain epochs alike. Interference on a shared machine only ever slows a run down, so every
configuration runs in ``--rounds`` interleaved rounds and its fastest mean is kept.

    python benchmarks/attribution_metrics_cost.py [--epochs 11] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from color_digits import ColorCNN, _loaders, _penalty  # noqa: E402

from lightning_xai.callbacks import AttributionMetrics  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.durations: list[float] = []

    def on_train_epoch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.durations.append(time.perf_counter() - self._start)


def _mean_epoch(method: str, callback: AttributionMetrics | None, epochs: int, log_dir: str) -> float:
    pl.seed_everything(0, verbose=False)
    train_loader, val_loader, _, train_set, _ = _loaders(28, 64, 0)
    timer = _EpochTimer()
    # the attribution callback runs at validation end, before the timer stops
    callbacks: list[pl.Callback] = ([] if callback is None else [callback]) + [timer]
    if method == "cdep":
        callbacks.insert(0, _penalty("cdep", 1000.0, train_set.occupancy(), 1, 0))
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(log_dir),  # the demo's loggers receive the pictures: rendering them is part of the cost
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(ColorCNN(28), train_loader, val_loader)
    return statistics.fmean(timer.durations[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=11)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = {
        "defaults (input_x_gradient, 32 samples, comprehensiveness, pictures every 5th)": lambda: AttributionMetrics(),
        "defaults + sufficiency": lambda: AttributionMetrics(metrics=["comprehensiveness", "sufficiency"]),
        "defaults, pictures every epoch": lambda: AttributionMetrics(pictures_every_n_epochs=1),
        "integrated_gradients 32 steps, 256 samples, 3 metrics": lambda: AttributionMetrics(
            method="integrated_gradients",
            num_samples=256,
            metrics=["infidelity", "comprehensiveness", "sufficiency"],
            pictures_every_n_epochs=0,
        ),
    }
    fastest: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds):
            for method in ("vanilla", "cdep"):
                for label, make in {"none": lambda: None, **settings}.items():
                    if round_index and "256 samples" in label:
                        continue  # minutes per run, and far from the budget either way: one round is enough
                    seconds = _mean_epoch(method, make(), args.epochs, log_dir)
                    fastest[(method, label)] = min(seconds, fastest.get((method, label), float("inf")))
    table = Table(
        title=f"AttributionMetrics cost per ColorDigits epoch (fastest of {args.rounds} means of {args.epochs - 1} "
        "epochs, CPU)"
    )
    for column in ("training", "callback", "s / epoch", "added"):
        table.add_column(column, justify="left" if column in ("training", "callback") else "right", no_wrap=True)
    for method in ("vanilla", "cdep"):
        plain = fastest[(method, "none")]
        table.add_row(method, "none", f"{plain:.2f}", "")
        for label in settings:
            seconds = fastest[(method, label)]
            table.add_row("", label, f"{seconds:.2f}", f"{100 * (seconds - plain) / plain:+.0f} %")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
