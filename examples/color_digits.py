"""ColorDigits: can an explanation penalty make a CNN ignore colour? (the CDEP ColorMNIST experiment)

Training digits are coloured by class; validation and test digits get the reversed colour ``9 - y``, so a
model that learned colour instead of shape scores near 0 %. The same CNN is trained without a penalty and
with CDEP, RRR and Expected Gradients, over several seeds; the script prints the reversed-colour test
accuracy per method, writes CSV logs (and TensorBoard logs when tensorboard is installed) and a PNG of input
heatmaps per method.

Run ``make demo`` or ``python examples/color_digits.py --help``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import time
import warnings
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_xai import XAIMixin  # noqa: E402
from lightning_xai.attribution import attribute  # noqa: E402
from lightning_xai.callbacks import ExplanationPenalty  # noqa: E402
from lightning_xai.datasets import ColorDigits  # noqa: E402
from lightning_xai.masks import OccupancyMaskSampler  # noqa: E402
from lightning_xai.metrics import RegionAttributionMass  # noqa: E402

# The demo prints its own progress and table; Lightning's per-run banners would bury them.
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")

# Lightning's TensorBoardLogger needs tensorboard (or tensorboardX); the CSV logs are always written
TENSORBOARD = any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))
METHODS = ("vanilla", "cdep", "rrr", "expected_gradients")
DEFAULT_WEIGHTS = {"cdep": 1000.0, "rrr": 1000.0, "expected_gradients": 1000.0}


class ColorCNN(XAIMixin, pl.LightningModule):
    """Two convolutions and two dense layers, as in the CDEP ColorMNIST experiment."""

    def __init__(self, image_size: int = 28, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, 20, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * (image_size // 4) ** 2, 100), nn.ReLU(), nn.Linear(100, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/reversed_colour_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/reversed_colour_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class _EpochProgress(pl.Callback):
    def __init__(self, progress: Progress, task: int) -> None:
        self.progress, self.task = progress, task

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.progress.advance(self.task)


# Rows: luminance (1,1,1)/sqrt(3) and two chromatic axes orthogonal to it (an orthonormal opponent-colour basis).
_OPPONENT = torch.tensor(
    [[1 / 3**0.5, 1 / 3**0.5, 1 / 3**0.5], [1 / 2**0.5, -1 / 2**0.5, 0.0], [1 / 6**0.5, 1 / 6**0.5, -2 / 6**0.5]]
)


class _OpponentColourInput(nn.Module):
    """The CNN read from opponent-colour coordinates, so that attributions separate brightness from colour."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, opponent: torch.Tensor) -> torch.Tensor:
        return self.model(torch.einsum("kc,nkhw->nchw", _OPPONENT, opponent))


class ColourAttributionMass(pl.Callback):
    """Logs ``attr/colour_mass``: the share of Integrated-Gradients attribution that lies on colour.

    Each pixel's RGB is rotated into a luminance axis and two chromatic axes; the attributions of the
    rotated input then split into brightness (shape) and colour, and RegionAttributionMass with a mask on
    the chromatic channels gives the share on colour. A model that reads colour scores high.
    """

    def __init__(self, probe: torch.Tensor, targets: torch.Tensor) -> None:
        self.probe = torch.einsum("kc,nchw->nkhw", _OPPONENT, probe)
        self.targets = targets
        self.mask = torch.tensor([0.0, 1.0, 1.0]).view(1, 3, 1, 1)
        self.curve: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        mass = RegionAttributionMass()
        with torch.inference_mode(False), torch.enable_grad():
            pl_module.eval()
            model = _OpponentColourInput(pl_module)
            attributions = attribute("integrated_gradients", model, self.probe.clone(), self.targets, n_steps=8)
            mass.update(self.probe, attributions.detach(), self.targets, mask=self.mask)
        value = float(mass.compute())
        self.curve.append(value)
        pl_module.log("attr/colour_mass", value)


def _loaders(image_size: int, batch_size: int, seed: int):
    train, val, test = (ColorDigits(split, image_size=image_size) for split in ("train", "val", "test"))
    generator = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(train.images, train.targets), batch_size, shuffle=True, generator=generator),
        DataLoader(TensorDataset(val.images, val.targets), 256),
        DataLoader(TensorDataset(test.images, test.targets), 256),
        train,
        test,
    )


def _penalty(method: str, weight: float, occupancy: torch.Tensor, num_masks: int, seed: int) -> ExplanationPenalty:
    # Every method is told the same thing: no single pixel (with its colour) may explain the prediction.
    sampler = OccupancyMaskSampler(num_masks=num_masks, occupancy=occupancy, seed=seed)
    return ExplanationPenalty(method=method, weight=weight, mask_sampler=sampler, seed=seed)


def _heatmaps(models: dict[str, ColorCNN], test: ColorDigits, path: Path, count: int = 6) -> None:
    """Integrated Gradients (Captum) of the true class, summed over colour channels, per method."""
    indices = torch.linspace(0, len(test) - 1, count).long()
    images, targets = test.images[indices], test.targets[indices]
    figure, axes = plt.subplots(len(models) + 1, count, figsize=(1.6 * count, 1.7 * (len(models) + 1)))
    for column in range(count):
        axes[0, column].imshow(images[column].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, column].set_title(f"digit {int(targets[column])}", fontsize=8)
    for row, (method, model) in enumerate(models.items(), start=1):
        model.eval()
        attributions = IntegratedGradients(model).attribute(images, target=targets, n_steps=32)
        heat = attributions.sum(1)
        with torch.no_grad():
            predictions = model(images).argmax(1)
        for column in range(count):
            limit = heat[column].abs().max().clamp_min(1e-12).item()
            axes[row, column].imshow(heat[column].numpy(), cmap="bwr", vmin=-limit, vmax=limit)
            axes[row, column].set_title(f"{method}: pred {int(predictions[column])}", fontsize=7)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("Reversed-colour test digits and Integrated Gradients (red +, blue -)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _mean_curve(runs: list[list[float]]) -> list[float]:
    return [statistics.mean(values) for values in zip(*runs)]


def _print_colour_mass(console: Console, curves: dict[str, list[list[float]]]) -> None:
    means = {method: _mean_curve(runs) for method, runs in curves.items() if runs}
    epochs = len(next(iter(means.values())))
    shown = sorted({0, epochs // 4, epochs // 2, 3 * epochs // 4, epochs - 1})
    table = Table(title="Attribution mass on colour (IG, training-colour probe; lower = less colour), mean over seeds")
    table.add_column("method", no_wrap=True)
    for epoch in shown:
        table.add_column(f"epoch {epoch + 1}", justify="right")
    for method, curve in means.items():
        table.add_row(method, *(f"{curve[epoch]:.3f}" for epoch in shown))
    console.print(table)


def _plot_colour_mass(curves: dict[str, list[list[float]]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for method, runs in curves.items():
        if runs:
            curve = _mean_curve(runs)
            axis.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=method)
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("attribution mass on colour")
    axis.set_title("RegionAttributionMass on the chromatic channels (mean over seeds)", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/color_digits"))
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-masks", type=int, default=1, help="single-pixel masks per sample and step")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    for method, weight in DEFAULT_WEIGHTS.items():
        parser.add_argument(f"--{method.replace('_', '-')}-weight", type=float, default=weight)
    args = parser.parse_args()
    console = Console(width=max(100, Console().width))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    accuracies: dict[str, list[float]] = {m: [] for m in args.methods}
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    first_models: dict[str, ColorCNN] = {}
    curves: dict[str, list[list[float]]] = {m: [] for m in args.methods}
    test_set = None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for seed in range(args.seeds):
            for method in args.methods:
                task = progress.add_task(f"{method:>18} seed {seed}", total=args.epochs)
                pl.seed_everything(seed, verbose=False)
                train_loader, val_loader, test_loader, train_set, test_set = _loaders(
                    args.image_size, args.batch_size, seed
                )
                colour_mass = ColourAttributionMass(train_set.images[:64], train_set.targets[:64])
                callbacks: list[pl.Callback] = [_EpochProgress(progress, task), colour_mass]
                if method != "vanilla":
                    weight = getattr(args, f"{method}_weight")
                    callbacks.append(_penalty(method, weight, train_set.occupancy(), args.num_masks, seed))
                name = f"{method}/seed{seed}"
                loggers: list[Logger] = [CSVLogger(args.output_dir / "csv", name=name, version="")]
                if TENSORBOARD:
                    loggers.append(TensorBoardLogger(args.output_dir / "tensorboard", name=name, version=""))
                model = ColorCNN(args.image_size)
                trainer = pl.Trainer(
                    max_epochs=args.epochs,
                    accelerator="cpu",
                    devices=1,
                    logger=loggers,
                    callbacks=callbacks,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    num_sanity_val_steps=0,
                    deterministic=True,
                )
                started = time.perf_counter()
                trainer.fit(model, train_loader, val_loader)
                result = trainer.test(model, test_loader, verbose=False)[0]
                seconds[method].append(time.perf_counter() - started)
                accuracies[method].append(100 * result["test/reversed_colour_acc"])
                first_models.setdefault(method, model)
                curves[method].append(colour_mass.curve)

    table = Table(title=f"ColorDigits {args.image_size}x{args.image_size}: reversed-colour test accuracy")
    for column in ("method", "accuracy %", "spread (std)", "per seed", "seconds / run"):
        table.add_column(column, justify="right" if column != "method" else "left", no_wrap=True)
    paper = {"vanilla": "0.0", "cdep": "25-31", "rrr": "0.4", "expected_gradients": "0.4"}
    for method in args.methods:
        values = accuracies[method]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        table.add_row(
            method,
            f"{statistics.mean(values):.1f}",
            f"{spread:.1f}",
            " ".join(f"{v:.1f}" for v in values),
            f"{statistics.mean(seconds[method]):.0f}",
        )
    console.print(table)
    console.print(
        "ColorMNIST in the CDEP paper (28x28, for reference): " + ", ".join(f"{m} {paper[m]} %" for m in args.methods)
    )
    _print_colour_mass(console, curves)
    _plot_colour_mass(curves, args.output_dir / "colour_mass.png")
    heatmap_path = args.output_dir / "heatmaps.png"
    _heatmaps(first_models, test_set, heatmap_path)
    logs = (
        f"{args.output_dir / 'tensorboard'} and {args.output_dir / 'csv'}" if TENSORBOARD else args.output_dir / "csv"
    )
    console.print(
        f"Heatmaps: {heatmap_path}\nLogs: {logs}"
        + ("" if TENSORBOARD else " (pip install tensorboard for TensorBoard logs)")
    )


if __name__ == "__main__":
    main()
