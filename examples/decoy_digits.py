"""DecoyDigits with correct, incomplete and wrong feedback: every shortcut-mitigation method in one loop.

The XIL typology (Friedrich et al., Nature Machine Intelligence 2023) compares explanatory-interactive-learning
methods on DecoyMNIST with three kinds of feedback masks. This script runs the same protocol on
:class:`~lightning_xai.datasets.DecoyDigits` (sklearn's digits padded to 12x12; a 2x2 corner patch whose grey level
gives the class away in training and is random in validation and test):

* ``correct``: the mask covers the decoy patch;
* ``incomplete``: only half of it (the patch's top row is left out; HINT's relevant region keeps the lower half of
  the digit's pixels), as the typology removes the top half of the decoy's 4x4 patch;
* ``wrong``: a 2x4 strip of border on the side opposite the decoy (HINT is told to look there).

Methods (all through :class:`~lightning_xai.callbacks.ExplanationPenalty` or its siblings): vanilla, RRR,
RRR-G, HINT, RBR, CDEP, counterexamples (CE), Expected Gradients and ablation; plus a model trained on images
without the decoy (the ceiling). Each method's weight is chosen per feedback kind on the *validation* split with
seed 0 (from a grid over its documented range), the kept epoch of every run is the one with the best validation
accuracy, and the chosen setting then runs on every seed; the test split is read once per run. The table shows
test accuracy (mean ± std over seeds) next to the typology's DecoyMNIST numbers.

Run ``python examples/decoy_digits.py`` (``--help`` for the options; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_xai import XAIMixin
from lightning_xai.callbacks import ExplanationPenalty
from lightning_xai.datasets import DecoyDigits

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(LeafSpec|log_every_n_steps|does not have many workers|litlogger).*")

#: how each method is built: a factory of callbacks from (weight, seed)
METHODS: dict[str, Callable[[float, int], list[pl.Callback]]] = {
    "vanilla": lambda weight, seed: [],
    "rrr": lambda weight, seed: [ExplanationPenalty("rrr", weight=weight, seed=seed)],
    # RRR's first-order variant: the same penalty, a finite-difference parameter gradient, no double backward
    "rrr_finite_difference": lambda weight, seed: [
        ExplanationPenalty("rrr", weight=weight, seed=seed, differentiation="finite_difference")
    ],
    "rrr_gradcam": lambda weight, seed: [ExplanationPenalty("rrr_gradcam", weight=weight, seed=seed)],
    "hint": lambda weight, seed: [ExplanationPenalty("hint", weight=weight, relevant_key="relevant", seed=seed)],
    "rbr": lambda weight, seed: [ExplanationPenalty("rbr", weight=weight, seed=seed)],
    "cdep": lambda weight, seed: [ExplanationPenalty("cdep", weight=weight, cdep_variant="shift_invariant", seed=seed)],
    "counterexamples": lambda weight, seed: [ExplanationPenalty("counterexamples", weight=weight, seed=seed)],
    "expected_gradients": lambda weight, seed: [ExplanationPenalty("expected_gradients", weight=weight, seed=seed)],
    "ablation": lambda weight, seed: [ExplanationPenalty("ablation", weight=weight, seed=seed)],
}
CEILING = "no decoy"
#: the weights tried on validation (seed 0), per method: the ends and the middle of each documented range
WEIGHT_GRIDS: dict[str, tuple[float, ...]] = {
    "rrr": (1.0, 10.0, 100.0),
    "rrr_finite_difference": (1.0, 10.0, 100.0),
    "rrr_gradcam": (0.01, 0.1, 1.0),
    "hint": (0.001, 0.01, 0.1),
    "rbr": (1e3, 1e5),
    "cdep": (1.0, 10.0, 100.0),
    "counterexamples": (0.5, 1.0, 2.0),
    "expected_gradients": (1.0, 10.0, 100.0),
    "ablation": (1.0, 10.0),
}
#: the XIL typology on DecoyMNIST (Friedrich et al. 2023): test accuracy %, 5 seeds
TYPOLOGY = {
    "wrong": {"rrr": "82.2 ± 5.3", "rrr_gradcam": "83.1 ± 5.0", "rbr": "56.8 ± 38.5", "cdep": "96.7 ± 0.7",
              "hint": "83.0 ± 5.3", "counterexamples": "79.2 ± 2.0"},
    "incomplete": {"rrr": "98.5 ± 0.2", "rrr_gradcam": "88.4 ± 5.9", "rbr": "96.0 ± 0.6", "cdep": "96.8 ± 0.3",
                   "hint": "96.6 ± 0.5", "counterexamples": "85.6 ± 2.1"},
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- feedback


def _correct(digits: DecoyDigits, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return digits.masks, digit


def _incomplete(digits: DecoyDigits, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch without its first row; HINT keeps the lower half of the digit's rows."""
    partial = digits.masks.clone()
    rows = partial.amax(-1, keepdim=True)  # (N, 1, H, 1): the patch's rows
    partial[((rows.cumsum(-2) == 1) & (rows > 0)).expand_as(partial)] = 0
    half = digit.clone()
    digit_rows = digit.amax(-1, keepdim=True).cumsum(-2)
    half[(digit_rows <= digit_rows.amax(-2, keepdim=True) / 2).expand_as(half)] = 0
    return partial, half


def _wrong(digits: DecoyDigits, digit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x4 border strip in the corner diagonally opposite the decoy; HINT is told to look there."""
    size = digits.masks.shape[-1]
    wrong = torch.zeros_like(digits.masks)
    for corner in range(4):  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
        top = 0 if corner >= 2 else size - 2
        left = 0 if corner % 2 else size - 4
        wrong[digits.corners == corner, :, top : top + 2, left : left + 4] = 1
    return wrong, wrong


#: per feedback kind: (mask a penalty forbids, region HINT is told to look at) from the digits and their pixels
FEEDBACK_MASKS: dict[str, Callable[[DecoyDigits, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "correct": _correct,
    "incomplete": _incomplete,
    "wrong": _wrong,
}
FEEDBACK = tuple(FEEDBACK_MASKS)


def feedback_masks(digits: DecoyDigits, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, relevant)`` for one feedback kind: what a penalty forbids and where HINT is told to look."""
    if kind not in FEEDBACK_MASKS:
        raise ValueError(f"feedback must be one of {FEEDBACK}, got {kind!r}")
    return FEEDBACK_MASKS[kind](digits, ((digits.images * (1 - digits.masks)) > 0).float())


class Samples(Dataset[dict[str, torch.Tensor]]):
    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, relevant: torch.Tensor):
        self.images, self.targets, self.mask, self.relevant = images, targets, mask, relevant

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input": self.images[i], "target": self.targets[i], "mask": self.mask[i], "relevant": self.relevant[i]}


# ----------------------------------------------------------------------------------------------- model


class DigitsCNN(XAIMixin, pl.LightningModule):
    """Two convolutions and two linear layers, the typology's DecoyMNIST network at 12x12."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 9, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def validation_step(self, batch, batch_idx):
        accuracy = (self(batch["input"]).argmax(1) == batch["target"]).float().mean()
        self.log("val/acc", accuracy, on_epoch=True, batch_size=len(batch["target"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class KeepBestOnValidation(pl.Callback):
    """Keeps the weights of the best validation accuracy (in memory) and restores them when fitting ends."""

    def __init__(self) -> None:
        self.best, self.state = -1.0, None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        accuracy = float(trainer.callback_metrics["val/acc"])
        if not trainer.sanity_checking and accuracy > self.best:
            self.best, self.state = accuracy, copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)


# ----------------------------------------------------------------------------------------------- runs


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.splits = {split: DecoyDigits(split) for split in ("train", "val", "test")}
        self.runs: list[dict[str, Any]] = []

    def _data(self, split: str, kind: str, decoy: bool) -> Samples:
        digits = self.splits[split]
        images = digits.images if decoy else digits.images * (1 - digits.masks)
        mask, relevant = feedback_masks(digits, kind)
        return Samples(images, digits.targets, mask, relevant)

    def run(self, method: str, kind: str, weight: float | None, seed: int) -> dict[str, Any]:
        args = self.args
        pl.seed_everything(seed, verbose=False)
        model = DigitsCNN()
        keep = KeepBestOnValidation()
        callbacks = [keep, *(METHODS[method](weight, seed) if weight is not None else [])]
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_train_batches=args.limit_batches,
        )
        train = self._data("train", kind, decoy=method != CEILING)
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        trainer.fit(
            model,
            DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=generator),
            DataLoader(self._data("val", kind, True), batch_size=512),
        )
        seconds = time.perf_counter() - started
        test = self.splits["test"]
        model.eval()
        with torch.no_grad():
            accuracy = 100.0 * float((model(test.images).argmax(1) == test.targets).float().mean())
        result = {"method": method, "feedback": kind, "weight": weight, "seed": seed, "val": 100 * keep.best,
                  "test": accuracy, "seconds": seconds}  # fmt: skip
        self.runs.append(result)
        return result


def _summary(values: Sequence[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, CEILING], choices=[*METHODS, CEILING])
    parser.add_argument("--feedback", nargs="+", default=list(FEEDBACK), choices=FEEDBACK)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-batches", type=float, default=1.0, help="share of training batches per epoch")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/decoy_digits"))
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, one weight per method: a smoke run")
    args = parser.parse_args(argv)
    grids = dict(WEIGHT_GRIDS)
    if args.quick:
        args.epochs, args.seeds = 2, 1
        grids = {method: grid[len(grid) // 2 : len(grid) // 2 + 1] for method, grid in grids.items()}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    console = Console()
    experiment = Experiment(args)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    chosen: dict[tuple[str, str], float | None] = {}
    for kind in args.feedback:
        for method in args.methods:
            if method in ("vanilla", CEILING) and kind != args.feedback[0]:
                results[(method, kind)] = results[(method, args.feedback[0])]  # they read no mask
                chosen[(method, kind)] = None
                continue
            weight: float | None = None
            if method in grids:
                trials = [experiment.run(method, kind, w, seed=0) for w in grids[method]]
                best = max(trials, key=lambda r: r["val"])
                weight = best["weight"]
                grid_text = ", ".join(f"{r['weight']:g}: {r['val']:.1f}" for r in trials)
                console.print(f"  {kind} {method}: validation by weight {grid_text} -> {weight:g}")
                runs = [best]
            else:
                runs = [experiment.run(method, kind, None, seed=0)]
            runs += [experiment.run(method, kind, weight, seed) for seed in range(1, args.seeds)]
            results[(method, kind)] = runs
            chosen[(method, kind)] = weight
            console.print(f"{kind} {method}: test {_summary([r['test'] for r in runs])}")
    (args.output_dir / "runs.json").write_text(json.dumps(experiment.runs, indent=1))

    table = Table(title=f"DecoyDigits: test accuracy % ({args.seeds} seeds, weights chosen on validation)")
    table.add_column("method")
    for kind in args.feedback:
        table.add_column(f"{kind} (λ)")
    for kind in ("wrong", "incomplete"):
        if kind in args.feedback:
            table.add_column(f"typology {kind}")
    for method in args.methods:
        row = [method]
        for kind in args.feedback:
            weight = chosen[(method, kind)]
            row.append(
                _summary([r["test"] for r in results[(method, kind)]]) + ("" if weight is None else f" ({weight:g})")
            )
        row += [TYPOLOGY[kind].get(method, "") for kind in ("wrong", "incomplete") if kind in args.feedback]
        table.add_row(*row)
    console.print(table)
    seconds = sum(r["seconds"] for r in experiment.runs)
    console.print(
        f"{len(experiment.runs)} runs, {seconds / 60:.1f} min of training. Runs: {args.output_dir / 'runs.json'}"
    )
    return {"results": {f"{m}/{k}": [r["test"] for r in v] for (m, k), v in results.items()}, "chosen": chosen}


if __name__ == "__main__":
    main()
