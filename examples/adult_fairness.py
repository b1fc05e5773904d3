"""Adult income: how much accuracy does it cost to make an MLP's decisions independent of sex x race?

An MLP predicts ``income > 50K`` on the UCI Adult table (sex and race are inputs). It is trained once
without a fairness term and then for each setting of one method:

* ``--method mi``: :class:`~lightning_xai.callbacks.MutualInformationRegularizer` at each ``--settings``
  weight (the mutual information between the soft predictions and the sex x race cells, Kokhlikyan et al.
  2022);
* ``--method constraint``: :class:`~lightning_xai.callbacks.FairnessConstraint` at each ``--settings`` bound on
  the demographic-parity difference of the training decisions (a Lagrange multiplier finds the weight).

The table is split 60 / 20 / 20 into train, validation and test, stratified by cell and label
(``--split-seed``). :class:`~lightning_xai.callbacks.FairnessMetrics` logs per-cell rates with 95 % intervals,
the gaps, the MI and the causal flip test on the validation split every epoch (CSV and TensorBoard). The
setting is chosen on validation (the best validation accuracy among the settings whose validation DP
difference meets ``--dp-target``), and only the chosen setting and the unregularized model meet the test
split, once, through ``trainer.test()``: the final numbers come from the callback.

    python examples/adult_fairness.py --data PATH/TO/adult.csv [--method constraint] [--cells 4] [--seeds 3]

``--cells 4`` groups race as White / other (4 cells); ``--cells 10`` keeps the five races (10 cells, the
smallest with a few dozen test rows).
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
from lightning_xai.callbacks import FairnessConstraint, FairnessMetrics, MutualInformationRegularizer  # noqa: E402
from lightning_xai.datasets.adult import SEX_VALUES, AdultIncome  # noqa: E402
from lightning_xai.samplers import StratifiedBatchSampler, stratified_split  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|litlogger|sync_dist).*")
ATTRIBUTES = ["sex", "race"]
GROUPINGS = {4: "white_other", 10: "all"}
DEFAULT_SETTINGS = {"mi": [1.0, 2.0, 4.0, 8.0], "constraint": [0.01, 0.02, 0.03, 0.05]}


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

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input"])
        self.log("test_acc", (logits.argmax(1) == batch["target"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_callbacks(method: str, setting: float, dataset: AdultIncome, args: argparse.Namespace) -> list[pl.Callback]:
    num_values = [len(SEX_VALUES), len(dataset.race_names)]
    callbacks: list[pl.Callback] = [
        FairnessMetrics(
            ATTRIBUTES,
            num_values,
            value_names={"sex": list(SEX_VALUES), "race": list(dataset.race_names)},
            counterfactual_fn=dataset.counterfactual,
            pictures_every_n_epochs=args.epochs,
        )
    ]
    if method == "mi" and setting > 0:
        callbacks.append(
            MutualInformationRegularizer(
                ATTRIBUTES, num_values, weight=setting, momentum=args.momentum, temperature=args.temperature
            )
        )
    elif method == "constraint":
        callbacks.append(FairnessConstraint(ATTRIBUTES, num_values, max_dp_difference=setting))
    return callbacks


def train(
    dataset: AdultIncome,
    rows: dict[str, list[int]],
    method: str,
    setting: float,
    seed: int,
    args: argparse.Namespace,
) -> tuple[pl.Trainer, IncomeMLP, dict[str, float]]:
    """Fits one model; returns its trainer, the model and its validation metrics (from FairnessMetrics)."""
    pl.seed_everything(seed, verbose=False)
    model = IncomeMLP(dataset.inputs.shape[1], lr=args.lr)
    sampler = StratifiedBatchSampler(dataset.cells[rows["train"]], args.batch_size, seed=seed)
    name = f"{method}_{setting:g}/seed_{seed}"
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=make_callbacks(method, setting, dataset, args),
        logger=[CSVLogger(args.output_dir / "csv", name=name), TensorBoardLogger(args.output_dir / "tb", name=name)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, DataLoader(Subset(dataset, rows["train"]), batch_sampler=sampler), loader(dataset, rows["val"]))
    return trainer, model, metrics_of(trainer.callback_metrics, "")


def loader(dataset: AdultIncome, rows: list[int]) -> DataLoader:
    return DataLoader(Subset(dataset, rows), batch_size=4096)


def metrics_of(logged: dict[str, torch.Tensor], prefix: str) -> dict[str, float]:
    """Accuracy and gaps (with their intervals) as FairnessMetrics and the module logged them."""
    keys = {
        "accuracy": "test_acc" if prefix else "val_acc",
        **{k: f"{prefix}fair/{k}" for k in ("dp_diff", "dp_diff_low", "dp_diff_high", "eo_diff", "mi")},
        "flip_sex": f"{prefix}fair/flip/sex/flip_rate",
    }
    return {name: float(logged[key]) if key in logged else float("nan") for name, key in keys.items()}


def mean_and_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = runs[0].keys()
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    std = {k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0 for k in keys}
    return mean, std


def plot(validation: dict[float, dict[str, float]], chosen: float | None, path: Path, args: argparse.Namespace) -> None:
    settings = sorted(validation)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [validation[s]["dp_diff"] for s in settings]
    ys = [100 * validation[s]["accuracy"] for s in settings]
    ax.plot(xs, ys, "o-", color="#4c72b0")
    for setting, x, y in zip(settings, xs, ys):
        label = ("weight" if args.method == "mi" else "bound") + f" {setting:g}" if setting else "no term"
        ax.annotate(
            label + (" (chosen)" if setting == chosen else ""),
            (x, y),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    ax.axvline(args.dp_target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"demographic-parity difference ({args.cells} cells, validation)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Adult: {args.method} settings on validation (mean of {args.seeds} seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the UCI Adult CSV (with a header row)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/adult_fairness"))
    parser.add_argument("--method", choices=sorted(DEFAULT_SETTINGS), default="constraint")
    parser.add_argument("--settings", type=float, nargs="+", help="weights (mi) or DP bounds (constraint)")
    parser.add_argument("--cells", type=int, choices=sorted(GROUPINGS), default=4)
    parser.add_argument("--dp-target", type=float, default=0.035, help="the validation DP difference to meet")
    parser.add_argument("--seeds", type=int, default=3, help="model seeds per setting")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--momentum", type=float, default=0.9, help="running cell statistics of the MI regularizer")
    parser.add_argument("--temperature", type=float, default=0.5, help="logits / T in the MI regularizer")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--limit-rows", type=int, default=None, help="use the first N rows (smoke runs)")
    args = parser.parse_args(argv)
    console = Console(width=150)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    dataset = AdultIncome(args.data, race_grouping=GROUPINGS[args.cells])
    strata = dataset.cells * 2 + dataset.targets
    if args.limit_rows:
        strata = strata[: args.limit_rows]
    parts = stratified_split(strata, [0.6, 0.2, 0.2], seed=args.split_seed)
    rows = {name: part.tolist() for name, part in zip(("train", "val", "test"), parts)}
    smallest = torch.bincount(dataset.cells[rows["test"]], minlength=2 * len(dataset.race_names)).min().item()
    console.print(
        f"Adult: {len(strata)} rows, {dataset.inputs.shape[1]} features, {args.cells} cells; "
        f"train {len(rows['train'])}, validation {len(rows['val'])}, test {len(rows['test'])} "
        f"(smallest test cell {smallest} rows)"
    )
    # 0 first: the unregularized model (no term), then the method's settings
    settings = [0.0, *sorted({s for s in args.settings or DEFAULT_SETTINGS[args.method] if s != 0.0})]
    validation, spread, models = {}, {}, {}
    for setting in settings:
        runs = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            method = args.method if setting else "none"
            trainer, model, values = train(dataset, rows, method, setting, seed, args)
            models[(setting, seed)] = (trainer, model)
            runs.append(values)
            console.print(
                f"  {method} {setting:g}, seed {seed}: validation accuracy {100 * values['accuracy']:.2f} %, "
                f"DP {values['dp_diff']:.3f}, EO {values['eo_diff']:.3f} ({time.perf_counter() - start:.0f} s)"
            )
        validation[setting], spread[setting] = mean_and_std(runs)

    meeting = [s for s in settings if s and validation[s]["dp_diff"] <= args.dp_target]
    chosen = max(meeting, key=lambda s: validation[s]["accuracy"]) if meeting else None
    table = Table(title=f"validation, mean ± std over {args.seeds} seeds ({args.method}; chosen: {chosen})")
    for column in ("setting", "accuracy %", "DP diff", "EO diff", "MI (nats)"):
        table.add_column(column, justify="right")
    for setting in settings:
        r, s = validation[setting], spread[setting]
        table.add_row(
            f"{setting:g}" + (" *" if setting == chosen else ""),
            f"{100 * r['accuracy']:.2f} ± {100 * s['accuracy']:.2f}",
            f"{r['dp_diff']:.3f} ± {s['dp_diff']:.3f}",
            f"{r['eo_diff']:.3f} ± {s['eo_diff']:.3f}",
            f"{r['mi']:.4f}",
        )
    console.print(table)
    plot(validation, chosen, args.output_dir / "validation_tradeoff.png", args)
    if chosen is None:
        console.print(f"No setting meets DP <= {args.dp_target:g} on validation; add stronger settings.")
        return {"validation": validation}

    # the test split, once: the unregularized model and the chosen setting, through trainer.test()
    results = {}
    for setting in (0.0, chosen):
        runs = []
        for seed in range(args.seeds):
            trainer, model = models[(setting, seed)]
            trainer.test(model, loader(dataset, rows["test"]), verbose=False)
            runs.append(metrics_of(trainer.callback_metrics, "test/"))
        results[setting] = mean_and_std(runs)
    (base, _), (fair, fair_std) = results[0.0], results[chosen]
    drop = 100 * (fair["accuracy"] - base["accuracy"])
    console.print(
        f"test split ({len(rows['test'])} rows), chosen {args.method} setting {chosen:g}: accuracy "
        f"{100 * fair['accuracy']:.2f} ± {100 * fair_std['accuracy']:.2f} % ({drop:+.2f} points against "
        f"{100 * base['accuracy']:.2f}), DP difference {fair['dp_diff']:.3f} ± {fair_std['dp_diff']:.3f} "
        f"(95 % interval of one seed's gap about ±{(fair['dp_diff_high'] - fair['dp_diff_low']) / 2:.3f}; "
        f"unregularized {base['dp_diff']:.3f}), EO difference {fair['eo_diff']:.3f}"
    )
    console.print(f"validation trade-off: {args.output_dir / 'validation_tradeoff.png'}; logs: {args.output_dir}")
    return {"validation": validation, "test_chosen": fair, "test_unregularized": base, "chosen": {"setting": chosen}}


if __name__ == "__main__":
    main()
