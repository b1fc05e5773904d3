"""Mind the Pad on a small-object task: the same strided CNN at an uneven size, an even size and with mirror padding.

Mind the Pad (Alsallakh et al., ICLR 2021) traces blind spots of CNNs to strided layers whose zero padding is used on
one side only. This script builds the paper's setting offline: an 8x8 sklearn digit pasted at a random position on
a blank canvas, classified by four stride-2 3x3 convolutions with padding 1 (each followed by batch norm and a
ReLU) and global average pooling. On a 32x32 canvas every stage is uneven (``(32 + 2 - 3) % 2 = 1``: the far
side's padding row is never read), on 33x33 every stage is even (33, 17, 9, 5);
:func:`~lightning_xai.functional.uneven_padding` confirms both. Three variants:

* ``zeros, 32``: zero padding at the uneven size (the common case, e.g. a ResNet at 224);
* ``zeros, 33``: zero padding at the even size (the paper's first fix);
* ``reflect, 32``: mirror padding at the uneven size (the paper's second fix).

Each variant trains on every seed; the kept epoch of a run is its best on the validation split, and the test split
is read once per run. Reported (mean ± std over seeds), on test digits:

* accuracy at random positions, and at every position (``--position-digits`` test digits per class at each): in
  the centre (touching no edge), at the near edges (row or column offset 0: top, left) and at the far edges (the
  last offset: bottom, right);
* :class:`~lightning_xai.callbacks.SpatialBiasMonitor`'s indices on 256 test images, averaged over the 4 layers:
  the left-right and top-bottom asymmetry of the mean ``|activation|`` maps and of the mean ``|w|`` kernels;
* the blind-spot map (:func:`~lightning_xai.functional.blind_spot_map`): one test digit per class swept over a
  blank canvas, the probability of its class per position, averaged over classes; its centre, near- and far-edge
  means.

Outputs: ``results.json``, ``blind_spots.png`` (blind-spot and accuracy-per-position maps, one column per variant,
averaged over seeds) and ``mean_maps_<variant>.png`` (the monitor's picture of seed 0) in ``--output-dir``.

Run ``python examples/mind_the_pad.py`` (about 2 minutes on one CPU thread; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_xai import XAIMixin
from lightning_xai.callbacks import SpatialBiasMonitor
from lightning_xai.datasets._digits import load_digits_tensors, split_indices
from lightning_xai.functional import blind_spot_map, uneven_padding
from lightning_xai.visualization import render_blind_spot_maps, render_mean_maps

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")
warnings.filterwarnings("ignore", message=r".*consume their zero padding on one side only.*")  # expected at 32

#: variant -> (padding mode, canvas size)
VARIANTS: dict[str, tuple[str, int]] = {
    "zeros, 32": ("zeros", 32),
    "zeros, 33": ("zeros", 33),
    "reflect, 32": ("reflect", 32),
}
DIGIT = 8
LAYERS = ("features.0", "features.3", "features.6", "features.9")


# ----------------------------------------------------------------------------------------------- data


class CanvasDigits(Dataset[dict[str, torch.Tensor]]):
    """sklearn's 8x8 digits of one split, each pasted ``copies`` times at a uniformly random position on a blank
    ``size x size`` canvas (seeded); ``position`` is the digit's top-left corner ``(row, column)``."""

    def __init__(self, split: str, size: int, copies: int = 1, seed: int = 0) -> None:
        images, targets = load_digits_tensors()
        chosen = split_indices(targets, split, seed=0, val_fraction=0.2, test_fraction=0.2).repeat(copies)
        generator = torch.Generator().manual_seed(seed)
        self.position = torch.randint(0, size - DIGIT + 1, (len(chosen), 2), generator=generator)
        self.images = paste(images[chosen], self.position, size)
        self.targets = targets[chosen]
        self.digits = images[chosen[: len(chosen) // copies]]
        self.digit_targets = self.targets[: len(chosen) // copies]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.images[i], "target": self.targets[i], "position": self.position[i]}


def paste(digits: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 1, size, size)`` blank canvases with ``digits[i]`` at top-left corner ``corners[i]``."""
    canvas = torch.zeros(len(digits), 1, size, size)
    for i, (row, column) in enumerate(corners.tolist()):
        canvas[i, 0, row : row + DIGIT, column : column + DIGIT] = digits[i]
    return canvas


# ----------------------------------------------------------------------------------------------- model


class StridedCNN(XAIMixin, pl.LightningModule):
    """Four stride-2 3x3 convolutions (padding 1, ``padding_mode``) with batch norm and ReLU, global average pooling
    and a linear head; Adam with a one-cycle learning rate."""

    def __init__(self, padding_mode: str = "zeros", width: int = 24, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        channels = [1, width, 2 * width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for cin, cout in zip(channels, channels[1:]):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, padding_mode=padding_mode)
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        accuracy = (self(batch["input"]).argmax(1) == batch["target"]).float().mean()
        self.log("val/acc", accuracy, on_epoch=True, batch_size=len(batch["target"]))

    def test_step(self, batch, batch_idx):
        accuracy = (self(batch["input"]).argmax(1) == batch["target"]).float().mean()
        self.log("test/acc", accuracy, on_epoch=True, batch_size=len(batch["target"]))

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class KeepBestOnValidation(pl.Callback):
    """Keeps the weights of the best validation accuracy (in memory) and restores them when fitting ends."""

    def __init__(self) -> None:
        self.best, self.epoch, self.state = -1.0, -1, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = float(trainer.callback_metrics["val/acc"])
        if not trainer.sanity_checking and accuracy > self.best:
            self.best, self.epoch, self.state = accuracy, trainer.current_epoch, copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


# ----------------------------------------------------------------------------------------------- measures


@torch.no_grad()
def position_accuracy(model: nn.Module, digits: Tensor, targets: Tensor, size: int) -> Tensor:
    """Accuracy of the digits at every position: ``(size - 7, size - 7)``, entry ``(i, j)`` the top-left corner."""
    offsets = size - DIGIT + 1
    accuracy = torch.zeros(offsets, offsets)
    model.eval()
    for row in range(offsets):
        corners = torch.stack([torch.full((offsets,), row), torch.arange(offsets)], dim=1)
        canvas = paste(digits.repeat(offsets, 1, 1), corners.repeat_interleave(len(digits), dim=0), size)
        correct = (model(canvas).argmax(1) == targets.repeat(offsets)).float()
        accuracy[row] = correct.view(offsets, len(digits)).mean(1)
    return accuracy


def per_class(digits: Tensor, targets: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The first ``count`` digits of each class."""
    chosen = torch.cat([(targets == c).nonzero().flatten()[:count] for c in range(10)])
    return digits[chosen], targets[chosen]


def edge_summary(grid: torch.Tensor) -> dict[str, float]:
    """Mean of a per-position grid in the centre, at the near edges (first row or column) and the far edges."""
    near = torch.cat([grid[0, :], grid[1:, 0]])
    far = torch.cat([grid[-1, :], grid[:-1, -1]])
    return {"centre": float(grid[1:-1, 1:-1].mean()), "near": float(near.mean()), "far": float(far.mean())}


def class_stimuli(digits: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The first digit of each class: the blind-spot stimuli."""
    return [(digits[int((targets == c).nonzero()[0])], c) for c in range(10)]


# ----------------------------------------------------------------------------------------------- runs


def run(variant: str, seed: int, args: argparse.Namespace, data: dict[str, CanvasDigits]) -> dict[str, Any]:
    padding_mode, size = VARIANTS[variant]
    pl.seed_everything(seed, verbose=False)
    model = StridedCNN(padding_mode, width=args.width, lr=args.lr)
    keep = KeepBestOnValidation()
    common = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[keep], **common)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    trainer.fit(
        model,
        DataLoader(data["train"], batch_size=args.batch_size, shuffle=True, generator=generator),
        DataLoader(data["val"], batch_size=512),
    )
    seconds = time.perf_counter() - started
    # the monitor on the test split: mean maps and kernels of the kept weights, and its picture for seed 0
    monitor = SpatialBiasMonitor(layers=list(LAYERS), num_samples=args.probe, batch_size=256, pictures_every_n_epochs=0)
    tester = pl.Trainer(callbacks=[monitor], **common)
    test = data["test"]
    accuracy = tester.test(model, DataLoader(test, batch_size=512), verbose=False)[0]["test/acc"]
    values = monitor.last_values
    grid = position_accuracy(model, *per_class(test.digits, test.digit_targets, args.position_digits), size)
    maps = [
        blind_spot_map(model, stimulus, (1, size, size), target=target, batch_size=1024)
        for stimulus, target in class_stimuli(test.digits, test.digit_targets)
    ]
    blind = torch.stack(maps).mean(0)
    result = {
        "variant": variant,
        "seed": seed,
        "uneven_layers": len({u.path for u in uneven_padding(model, (1, size, size))}),
        "best_epoch": keep.epoch + 1,
        "val": 100 * keep.best,
        "test": 100 * accuracy,
        "position": {k: 100 * v for k, v in edge_summary(grid).items()},
        "blind_spot": {"mean": float(blind.mean()), **{k: v for k, v in edge_summary(blind).items()}},
        "map_lr": statistics.mean(values[f"{layer}/lr_asymmetry"] for layer in LAYERS),
        "map_tb": statistics.mean(values[f"{layer}/tb_asymmetry"] for layer in LAYERS),
        "kernel_lr": statistics.mean(values[f"{layer}/kernel_lr_asymmetry"] for layer in LAYERS),
        "kernel_tb": statistics.mean(values[f"{layer}/kernel_tb_asymmetry"] for layer in LAYERS),
        "seconds": seconds,
        "_grid": grid,
        "_blind": blind,
    }
    if seed == 0:
        result["_mean_maps"] = _mean_maps(model, test, args.probe)
    return result


@torch.no_grad()
def _mean_maps(model: StridedCNN, test: CanvasDigits, probe: int) -> dict[str, Tensor]:
    maps: dict[str, Tensor] = {}
    hooks = [
        model.get_submodule(layer).register_forward_hook(
            lambda _m, _a, out, layer=layer: maps.__setitem__(layer, out.abs().mean((0, 1)))
        )
        for layer in LAYERS
    ]
    model.eval()
    model(test.images[:probe])
    for hook in hooks:
        hook.remove()
    return maps


def _summary(values: Sequence[float], digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


COLUMNS = {
    "test acc %": (lambda r: r["test"], 1),
    "centre %": (lambda r: r["position"]["centre"], 1),
    "near edges %": (lambda r: r["position"]["near"], 1),
    "far edges %": (lambda r: r["position"]["far"], 1),
    "blind-spot p centre": (lambda r: r["blind_spot"]["centre"], 2),
    "p near edges": (lambda r: r["blind_spot"]["near"], 2),
    "p far edges": (lambda r: r["blind_spot"]["far"], 2),
    "map lr asym": (lambda r: r["map_lr"], 3),
    "map tb asym": (lambda r: r["map_tb"], 3),
    "kernel lr asym": (lambda r: r["kernel_lr"], 3),
    "kernel tb asym": (lambda r: r["kernel_tb"], 3),
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run; the best on validation is kept")
    parser.add_argument("--copies", type=int, default=3, help="random placements of each training digit")
    parser.add_argument("--width", type=int, default=24, help="channels of the first convolution")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe", type=int, default=256, help="test samples of SpatialBiasMonitor's probe")
    parser.add_argument("--position-digits", type=int, default=6, help="test digits per class swept over positions")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/mind_the_pad"))
    parser.add_argument("--quick", action="store_true", help="4 epochs, 1 seed, a narrow network: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.copies, args.width, args.position_digits = 4, 1, 1, 8, 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=240)
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for variant in args.variants:
        _, size = VARIANTS[variant]
        data = {
            "train": CanvasDigits("train", size, copies=args.copies, seed=1),
            "val": CanvasDigits("val", size, seed=2),
            "test": CanvasDigits("test", size, seed=3),
        }
        results[variant] = [run(variant, seed, args, data) for seed in range(args.seeds)]
        console.print(f"{variant}: {[round(r['test'], 1) for r in results[variant]]} % test accuracy")

    table = Table(title=f"Mind the Pad on 8x8 digits on a blank canvas ({args.seeds} seeds, mean ± std)")
    table.add_column("variant")
    table.add_column("uneven layers")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    rows = []
    for variant, runs in results.items():
        cells = [_summary([f(r) for r in runs], digits) for f, digits in COLUMNS.values()]
        rows.append([variant, str(runs[0]["uneven_layers"]), *cells])
        table.add_row(*rows[-1])
    console.print(table)
    markdown = "\n".join(
        ["| variant | uneven layers | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
        + ["| " + " | ".join(row) + " |" for row in rows]
    )
    console.print(markdown, markup=False, highlight=False)

    # two rows, each on its own colour scale shared by the variants (the lowest to the highest value of the row)
    blind = {
        f"{variant}: p(class)": torch.stack([r["_blind"] for r in runs]).mean(0) for variant, runs in results.items()
    }
    grids = {
        f"{variant}: accuracy": torch.stack([r["_grid"] for r in runs]).mean(0) for variant, runs in results.items()
    }
    rows_of_pictures = [
        render_blind_spot_maps(
            blind,
            title="blind spots: p(class) of one test digit per class swept over a blank canvas, mean over classes "
            f"and {args.seeds} seed(s); axes: the digit's top-left corner; dark: missed",
            label="p(class)",
            columns=len(results),
            vmin=None,
            vmax=None,
        ),
        render_blind_spot_maps(
            grids,
            title=f"accuracy per position: {args.position_digits} test digits per class at every position",
            label="accuracy",
            columns=len(results),
            vmin=None,
            vmax=None,
        ),
    ]
    width = max(p.shape[1] for p in rows_of_pictures)
    image = np.concatenate(
        [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in rows_of_pictures]
    )
    pictures = [*blind, *grids]
    _save_png(args.output_dir / "blind_spots.png", image)
    for variant, runs in results.items():
        title = f"mean |activation| per layer, {variant} (seed 0, {args.probe} test samples)"
        name = variant.replace(", ", "_")
        _save_png(args.output_dir / f"mean_maps_{name}.png", render_mean_maps(runs[0]["_mean_maps"], title))
    plain = {
        variant: [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
        for variant, runs in results.items()
    }
    (args.output_dir / "results.json").write_text(json.dumps(plain, indent=2))
    console.print(f"{time.perf_counter() - started:.0f} s; outputs in {args.output_dir}")
    return {"results": plain, "table": rows, "markdown": markdown, "pictures": sorted(pictures)}


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


if __name__ == "__main__":
    main()
