"""Adult income: how much accuracy does it cost to make an MLP's predictions independent of sex x race?

An MLP predicts ``income > 50K`` on the UCI Adult table (sex and race are inputs). It is trained once
without and then with a sweep of weights of :class:`~lightning_xai.callbacks.MutualInformationRegularizer`,
the mutual information between its soft predictions and the 10 intersectional sex x race cells
(Kokhlikyan et al. 2022). :class:`~lightning_xai.callbacks.FairnessMetrics` logs per-cell rates, gaps, the
MI and the causal flip test on the held-out split every epoch (CSV and TensorBoard). The script prints
accuracy, demographic-parity difference, equalized-odds difference and MI per weight, and draws the
accuracy / fairness trade-off as a PNG.

    python examples/adult_fairness.py --data PATH/TO/adult.csv [--weights 0 1 2 3 3.5 4 8] [--seeds 3] [--epochs 20]

The split (70/30, stratified by cell and label) is fixed by ``--split-seed``; ``--seeds`` model seeds are
trained per weight and the table reports their mean (± standard deviation).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from lightning_xai import XAIMixin  # noqa: E402
from lightning_xai.callbacks import FairnessMetrics, MutualInformationRegularizer  # noqa: E402
from lightning_xai.datasets.adult import RACE_VALUES, SEX_VALUES, AdultIncome  # noqa: E402
from lightning_xai.metrics import IntersectionalFairness  # noqa: E402
from lightning_xai.samplers import StratifiedBatchSampler  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|litlogger).*")
ATTRIBUTES, NUM_VALUES = ["sex", "race"], [len(SEX_VALUES), len(RACE_VALUES)]
VALUE_NAMES = {"sex": list(SEX_VALUES), "race": list(RACE_VALUES)}


class IncomeMLP(XAIMixin, pl.LightningModule):
    """Two hidden layers of 64 ReLU units; the regularizers read the logits of its own forward."""

    def __init__(self, in_features: int, lr: float = 1e-3, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["input"]), batch["target"])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input"])
        self.log("val_loss", F.cross_entropy(logits, batch["target"]))
        self.log("val_acc", (logits.argmax(1) == batch["target"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def split(dataset: AdultIncome, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split, stratified by cell and label, so that small cells appear in both parts."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    strata = dataset.cells * 2 + dataset.targets
    for stratum in torch.unique(strata).tolist():
        members = torch.nonzero(strata == stratum).squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)].tolist()
        cut = round(len(members) * test_fraction)
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


def evaluate(model: nn.Module, dataset: AdultIncome, rows: list[int]) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = model(dataset.inputs[rows])
    metric = IntersectionalFairness(NUM_VALUES)
    groups = torch.stack([dataset.sex[rows], dataset.race[rows]], 1)
    metric.update(logits, dataset.targets[rows], groups)
    values = metric.compute()
    return {
        "accuracy": (logits.argmax(1) == dataset.targets[rows]).float().mean().item(),
        "dp_diff": values["dp_diff"].item(),
        "eo_diff": values["eo_diff"].item(),
        "mi": values["mi"].item(),
        "positive_rate": (logits.argmax(1) == 1).float().mean().item(),
    }


def train(
    dataset: AdultIncome,
    rows: tuple[list[int], list[int]],
    weight: float,
    seed: int,
    args: argparse.Namespace,
) -> tuple[dict[str, float], float]:
    train_rows, test_rows = rows
    pl.seed_everything(seed, verbose=False)
    model = IncomeMLP(dataset.inputs.shape[1], lr=args.lr)
    sampler = StratifiedBatchSampler(dataset.cells[train_rows], args.batch_size, seed=seed)
    callbacks: list[pl.Callback] = [
        FairnessMetrics(
            ATTRIBUTES,
            NUM_VALUES,
            value_names=VALUE_NAMES,
            attribute_columns=dataset.attribute_columns,
            pictures_every_n_epochs=max(args.epochs // 2, 1),
        )
    ]
    if weight > 0:
        callbacks.append(
            MutualInformationRegularizer(
                ATTRIBUTES,
                NUM_VALUES,
                weight=weight,
                estimator=args.estimator,
                conditional_on_target=args.conditional,
                momentum=args.momentum,
                temperature=args.temperature,
                schedule="linear_warmup" if args.warmup_epochs > 0 else "constant",
                warmup_steps=max(1, round(args.warmup_epochs * len(sampler))),
            )
        )
    name = f"weight_{weight:g}/seed_{seed}"
    loggers = [
        CSVLogger(args.output_dir / "csv", name=name),
        TensorBoardLogger(args.output_dir / "tensorboard", name=name),
    ]
    train_loader = DataLoader(Subset(dataset, train_rows), batch_sampler=sampler)
    test_loader = DataLoader(Subset(dataset, test_rows), batch_size=4096)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader, test_loader)
    elapsed = time.perf_counter() - start
    result = evaluate(model, dataset, test_rows)
    flips = callbacks[0].last_values
    result["flip_sex"] = flips.get("flip/sex/flip_rate", float("nan"))
    result["flip_race"] = flips.get("flip/race/flip_rate", float("nan"))
    return result, elapsed


def mean_and_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = runs[0].keys()
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def plot(results: dict[float, dict[str, float]], spread: dict[float, dict[str, float]], path: Path) -> None:
    weights = sorted(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, gap, label in (
        (axes[0], "dp_diff", "demographic-parity difference"),
        (axes[1], "eo_diff", "equalized-odds difference"),
    ):
        xs = [results[w][gap] for w in weights]
        ys = [100 * results[w]["accuracy"] for w in weights]
        ax.errorbar(
            xs,
            ys,
            xerr=[spread[w][gap] for w in weights],
            yerr=[100 * spread[w]["accuracy"] for w in weights],
            fmt="o-",
            color="#4c72b0",
            capsize=3,
        )
        for w, x, y in zip(weights, xs, ys):
            ax.annotate(f"λ={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if gap == "dp_diff":  # the target: -70 % DP difference at <= 1.5 points of accuracy
            ax.axvline(0.3 * results[0.0]["dp_diff"], color="grey", linestyle=":", linewidth=1)
            ax.axhline(100 * results[0.0]["accuracy"] - 1.5, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"{label} (sex x race, test)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("Adult: accuracy vs intersectional fairness, MutualInformationRegularizer sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the UCI Adult CSV (with a header row)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/adult_fairness"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 3.5, 4.0, 8.0])
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per weight")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up of the regularizer weight")
    parser.add_argument("--estimator", choices=["plugin", "chi2", "hsic"], default="plugin")
    parser.add_argument("--conditional", action="store_true", help="regularize I(Yhat; S | Y) (equalized odds)")
    parser.add_argument("--momentum", type=float, default=0.9, help="running cell statistics of the regularizer")
    parser.add_argument(
        "--temperature", type=float, default=0.5, help="logits / T before the softmax: T < 1 targets decision rates"
    )
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=150)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    dataset = AdultIncome(args.data)
    rows = split(dataset, args.test_fraction, args.split_seed)
    console.print(
        f"Adult: {len(dataset)} rows, {dataset.inputs.shape[1]} features; train {len(rows[0])}, test {len(rows[1])}; "
        f"positive rate {dataset.targets.float().mean():.3f}"
    )
    weights = sorted(set([0.0, *args.weights]))
    results: dict[float, dict[str, float]] = {}
    spread: dict[float, dict[str, float]] = {}
    for weight in weights:
        runs = []
        for seed in range(args.seeds):
            run, elapsed = train(dataset, rows, weight, seed, args)
            runs.append(run)
            console.print(
                f"  weight {weight:g}, seed {seed}: accuracy {100 * run['accuracy']:.2f} %, "
                f"DP diff {run['dp_diff']:.3f}, EO diff {run['eo_diff']:.3f}, MI {run['mi']:.4f} ({elapsed:.0f} s)"
            )
        results[weight], spread[weight] = mean_and_std(runs)

    base = results[0.0]
    table = Table(
        title=f"Adult, sex x race (10 cells), test split of {len(rows[1])}, mean ± std over {args.seeds} seeds; "
        f"{args.estimator} MI regularizer, temperature {args.temperature:g}, momentum {args.momentum:g}"
    )
    columns = ("weight", "accuracy %", "Δacc (pts)", "DP diff", "DP reduction", "EO diff", "MI (nats)")
    for column in (*columns, "flip rate sex", "flip rate race"):
        table.add_column(column, justify="right")
    for weight in weights:
        r, s = results[weight], spread[weight]
        reduction = 1 - r["dp_diff"] / base["dp_diff"] if base["dp_diff"] > 0 else float("nan")
        table.add_row(
            f"{weight:g}",
            f"{100 * r['accuracy']:.2f} ± {100 * s['accuracy']:.2f}",
            f"{100 * (r['accuracy'] - base['accuracy']):+.2f}",
            f"{r['dp_diff']:.3f} ± {s['dp_diff']:.3f}",
            f"{100 * reduction:.0f} %",
            f"{r['eo_diff']:.3f} ± {s['eo_diff']:.3f}",
            f"{r['mi']:.4f}",
            f"{r['flip_sex']:.3f}",
            f"{r['flip_race']:.3f}",
        )
    console.print(table)
    meeting = [
        w
        for w in weights
        if w > 0
        and results[w]["dp_diff"] <= 0.3 * base["dp_diff"]
        and base["accuracy"] - results[w]["accuracy"] <= 0.015
    ]
    console.print(
        "Target (DP difference -70 % at <= 1.5 points of accuracy, seed means): "
        + (f"met by weight {', '.join(f'{w:g}' for w in meeting)}" if meeting else "not met by any weight")
    )
    plot(results, spread, args.output_dir / "tradeoff.png")
    console.print(f"trade-off curve: {args.output_dir / 'tradeoff.png'}; logs: {args.output_dir}/csv, /tensorboard")


if __name__ == "__main__":
    main()
