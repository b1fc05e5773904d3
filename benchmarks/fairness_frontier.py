"""Adult: every fairness method on one split and one MLP, settings chosen on validation, test reported once.

    python benchmarks/fairness_frontier.py --data PATH/TO/adult.csv [--protocols cells4 ffb_sex] [--seeds 3]

Protocols (``PROTOCOLS``):

* ``cells4``: sex x race (White / other), 4 intersectional cells, protected attributes among the inputs;
* ``cells10``: sex x the 5 races, 10 cells; the smallest test cells hold few rows (printed), so their rates
  are noisy (the per-cell Wilson intervals of ``FairnessMetrics`` show how noisy);
* ``ffb_sex``: FFB's (Han et al. 2024) sex protocol, sex removed from the inputs;
* ``ffb_race``: FFB's race protocol, White and Black rows only, race removed from the inputs.

The split is 60 / 20 / 20 (train / validation / test), stratified by cell and label, fixed by
``--split-seed``. Methods (``METHODS``), each a list of settings:

* ours, through the callbacks on the same MLP: ``MutualInformationRegularizer`` with the plug-in MI,
  chi-square and HSIC estimators (temperature 0.5, momentum 0.9), and ``FairnessConstraint`` with a bound
  on the demographic-parity (or equalized-odds) difference;
* baselines in our own terms: DiffDP (the soft rate gap at temperature 1, Chuang & Mroueh 2021), the
  prejudice remover (PRemover: the plug-in MI at temperature 1 on the batch, Kamishima et al. 2012) and
  adversarial debiasing (Zhang et al. 2018: an ``AdversarialConceptHead`` on the logits that predicts the
  cell, through gradient reversal; for equalized odds it also sees the label);
* fairlearn on the same features: ``ExponentiatedGradient`` (logistic regression, Agarwal et al. 2018)
  and ``ThresholdOptimizer`` (Hardt et al. 2016) on the unregularized MLP's scores, which uses the
  protected attribute at decision time.

For a target gap (``--dp-target``, ``--eo-target``), every method's setting is the one with the best mean
validation accuracy among those whose mean validation gap meets the target; its test accuracy and gap
(mean ± std over ``--seeds``) are reported once, beside the unregularized MLP's. Every setting's
validation and test means are written to ``frontier_<protocol>.json`` and drawn as accuracy vs gap.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_xai import XAIMixin  # noqa: E402
from lightning_xai.callbacks import (  # noqa: E402
    AdversarialConceptHead,
    FairnessConstraint,
    MutualInformationRegularizer,
)
from lightning_xai.datasets.adult import RACE_VALUES, AdultIncome  # noqa: E402
from lightning_xai.functional.fairness import (  # noqa: E402
    cell_confusion_counts,
    fairness_report,
    intersectional_cells,
)
from lightning_xai.samplers import StratifiedBatchSampler, stratified_split  # noqa: E402

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*(log_every_n_steps|does not have many workers|litlogger|sync_dist).*")


# ----------------------------------------------------------------------------------------------- protocols


@dataclass
class Task:
    """One protocol's tensors: inputs, labels, the protected cell of every row and its attribute codes."""

    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    groups: torch.Tensor  # (N, A) codes
    num_values: list[int]
    attributes: list[str]

    @property
    def cells(self) -> torch.Tensor:
        return intersectional_cells(self.groups, self.num_values, self.attributes)

    @property
    def num_cells(self) -> int:
        return int(np.prod(self.num_values))


def _without(data: AdultIncome, attributes: list[str]) -> torch.Tensor:
    dropped = {column for attribute in attributes for column in data.attribute_columns[attribute]}
    keep = [i for i in range(data.inputs.shape[1]) if i not in dropped]
    return data.inputs[:, keep]


def cells4(data: AdultIncome) -> Task:
    groups = torch.stack([data.sex, (data.race != RACE_VALUES.index("White")).long()], 1)
    return Task("cells4", data.inputs, data.targets, groups, [2, 2], ["sex", "race"])


def cells10(data: AdultIncome) -> Task:
    return Task("cells10", data.inputs, data.targets, torch.stack([data.sex, data.race], 1), [2, 5], ["sex", "race"])


def ffb_sex(data: AdultIncome) -> Task:
    return Task("ffb_sex", _without(data, ["sex"]), data.targets, data.sex[:, None], [2], ["sex"])


def ffb_race(data: AdultIncome) -> Task:
    rows = (data.race == RACE_VALUES.index("White")) | (data.race == RACE_VALUES.index("Black"))
    race = (data.race[rows] == RACE_VALUES.index("Black")).long()
    return Task("ffb_race", _without(data, ["race"])[rows], data.targets[rows], race[:, None], [2], ["race"])


PROTOCOLS: dict[str, Callable[[AdultIncome], Task]] = {
    "cells4": cells4,
    "cells10": cells10,
    "ffb_sex": ffb_sex,
    "ffb_race": ffb_race,
}


def split(task: Task, seed: int) -> dict[str, torch.Tensor]:
    """Train / validation / test rows (60 / 20 / 20), stratified by cell and label."""
    parts = stratified_split(task.cells * 2 + task.targets, [0.6, 0.2, 0.2], seed=seed)
    return dict(zip(("train", "val", "test"), parts))


# ----------------------------------------------------------------------------------------------- the MLP


class IncomeMLP(XAIMixin, pl.LightningModule):
    def __init__(self, in_features: int, lr: float = 1e-3, hidden: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch["input"]), batch["target"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Rows(torch.utils.data.Dataset):
    def __init__(self, task: Task, rows: torch.Tensor) -> None:
        self.x, self.y, self.g, self.c = task.inputs[rows], task.targets[rows], task.groups[rows], task.cells[rows]
        self.attributes = task.attributes

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch in one indexing (the DataLoader's batched fetch): no per-row dicts to collate."""
        i = torch.as_tensor(indices)
        batch = {
            "input": self.x[i],
            "target": self.y[i],
            "cell": self.c[i],
            "cell_and_target": self.c[i] * 2 + self.y[i],
        }
        batch.update({a: self.g[i, k] for k, a in enumerate(self.attributes)})
        return batch


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def train_mlp(
    task: Task, rows: dict[str, torch.Tensor], callbacks: list[pl.Callback], seed: int, args: Any
) -> nn.Module:
    pl.seed_everything(seed, verbose=False)
    model = IncomeMLP(task.inputs.shape[1], lr=args.lr)
    dataset = Rows(task, rows["train"])
    sampler = StratifiedBatchSampler(dataset.c, args.batch_size, seed=seed)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        deterministic=True,
    )
    trainer.fit(model, DataLoader(dataset, batch_sampler=sampler, collate_fn=_as_batch))
    return model.eval()


def scores(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).softmax(1)[:, 1].numpy()


def measure(decisions: np.ndarray, task: Task, rows: torch.Tensor) -> dict[str, float]:
    target = task.targets[rows]
    decided = torch.as_tensor(np.asarray(decisions)).long()
    report = fairness_report(cell_confusion_counts(decided, target, task.cells[rows], task.num_cells))
    return {
        "accuracy": float((decided == target).float().mean()),
        "dp_diff": float(report["dp_diff"]),
        "eo_diff": float(report["eo_diff"]),
    }


# ----------------------------------------------------------------------------------------------- methods


@dataclass
class Method:
    """A family of settings; ``run(setting, task, rows, seed, args, cache)`` returns decisions per split."""

    label: str
    settings: list[float]
    run: Callable[..., dict[str, np.ndarray]]
    gap: str = "dp"  # which target its settings are selected for: "dp" or "eo"
    family: str = "ours"
    note: str = ""


def lightning_method(
    make_callbacks: Callable[[float, Task], list[pl.Callback]],
) -> Callable[..., dict[str, np.ndarray]]:
    def run(setting: float, task: Task, rows: dict[str, torch.Tensor], seed: int, args: Any, cache: dict) -> dict:
        model = train_mlp(task, rows, make_callbacks(setting, task), seed, args)
        return {part: (scores(model, task.inputs[rows[part]]) > 0.5).astype(int) for part in ("val", "test")}

    return run


def unregularized(task: Task, rows: dict[str, torch.Tensor], seed: int, args: Any, cache: dict) -> nn.Module:
    """The unregularized MLP of this protocol and seed, trained once and shared by the methods that need it."""
    key = (task.name, seed)
    if key not in cache:
        cache[key] = train_mlp(task, rows, [], seed, args)
    return cache[key]


def vanilla(setting: float, task: Task, rows: dict[str, torch.Tensor], seed: int, args: Any, cache: dict) -> dict:
    model = unregularized(task, rows, seed, args, cache)
    return {part: (scores(model, task.inputs[rows[part]]) > 0.5).astype(int) for part in ("val", "test")}


def regularizer(estimator: str, temperature: float, momentum: float, conditional: bool = False):
    def make(weight: float, task: Task) -> list[pl.Callback]:
        return [
            MutualInformationRegularizer(
                task.attributes,
                task.num_values,
                weight=weight,
                estimator=estimator,
                temperature=temperature,
                momentum=momentum,
                conditional_on_target=conditional,
            )
        ]

    return lightning_method(make)


def constraint(kind: str):
    def make(bound: float, task: Task) -> list[pl.Callback]:
        return [FairnessConstraint(task.attributes, task.num_values, **{kind: bound})]

    return lightning_method(make)


def adversary(conditional: bool):
    def make(reversal: float, task: Task) -> list[pl.Callback]:
        # Zhang et al.: the adversary sees the prediction (and, for equalized odds, the label); we give it the
        # logits and, for EO, predict cell x label so the label's own information is not what it removes
        concept, classes = ("cell_and_target", 2 * task.num_cells) if conditional else ("cell", task.num_cells)
        return [AdversarialConceptHead("net.4", concept, classes, reversal=reversal, hidden=16)]

    return lightning_method(make)


class _Prefit(ClassifierMixin, BaseEstimator):
    """The MLP's scores behind the scikit-learn interface ThresholdOptimizer(prefit=True) reads."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classes_ = np.array([0, 1])

    def fit(self, x: Any, y: Any) -> _Prefit:
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        positive = scores(self.model, torch.as_tensor(np.asarray(x), dtype=torch.float32))
        return np.stack([1 - positive, positive], 1).astype(np.float64)


def threshold_optimizer(constraints: str):
    def run(tol: float, task: Task, rows: dict[str, torch.Tensor], seed: int, args: Any, cache: dict) -> dict:
        from fairlearn.postprocessing import ThresholdOptimizer

        optimizer = ThresholdOptimizer(
            estimator=_Prefit(unregularized(task, rows, seed, args, cache)),
            constraints=constraints,
            prefit=True,
            predict_method="predict_proba",
            tol=tol if tol > 0 else None,
        )
        optimizer.fit(
            task.inputs[rows["train"]].numpy(),
            task.targets[rows["train"]].numpy(),
            sensitive_features=task.cells[rows["train"]].numpy(),
        )
        return {
            part: optimizer.predict(
                task.inputs[rows[part]].numpy(), sensitive_features=task.cells[rows[part]].numpy(), random_state=seed
            )
            for part in ("val", "test")
        }

    return run


def exponentiated_gradient(moment: str):
    def run(eps: float, task: Task, rows: dict[str, torch.Tensor], seed: int, args: Any, cache: dict) -> dict:
        from fairlearn.reductions import DemographicParity, EqualizedOdds, ExponentiatedGradient
        from sklearn.linear_model import LogisticRegression

        constraints = {"dp": DemographicParity, "eo": EqualizedOdds}[moment]()
        model = ExponentiatedGradient(LogisticRegression(max_iter=2000), constraints, eps=eps)
        model.fit(
            task.inputs[rows["train"]].numpy(),
            task.targets[rows["train"]].numpy(),
            sensitive_features=task.cells[rows["train"]].numpy(),
        )
        return {part: model.predict(task.inputs[rows[part]].numpy(), random_state=seed) for part in ("val", "test")}

    return run


# the settings of each method span its frontier from mild to strong; a run's pick among them is made on validation
WEIGHTS = [2.0, 8.0, 32.0]
METHODS: dict[str, Method] = {
    "mlp": Method("MLP, unregularized", [0.0], vanilla, family="reference"),
    "mi": Method("MI regularizer (plug-in)", WEIGHTS, regularizer("plugin", 0.5, 0.9)),
    "chi2": Method("chi-square regularizer", WEIGHTS, regularizer("chi2", 0.5, 0.9)),
    "hsic": Method("HSIC regularizer", [16.0, 64.0, 256.0], regularizer("hsic", 0.5, 0.9)),
    "constraint_dp": Method("FairnessConstraint (DP bound)", [0.01, 0.02, 0.03], constraint("max_dp_difference")),
    "diffdp": Method("DiffDP", [1.0, 4.0, 16.0], regularizer("rate_gap", 1.0, 0.0), family="baseline"),
    "premover": Method("PRemover", WEIGHTS, regularizer("plugin", 1.0, 0.0), family="baseline"),
    "adversary_dp": Method("adversarial debiasing", [1.0, 4.0], adversary(False), family="baseline"),
    "expgrad_dp": Method(
        "ExponentiatedGradient (LR)", [0.005, 0.01, 0.02, 0.04], exponentiated_gradient("dp"), family="fairlearn"
    ),
    "threshold_dp": Method(
        "ThresholdOptimizer (MLP scores)",
        [0.0, 0.01, 0.02, 0.04],
        threshold_optimizer("demographic_parity"),
        family="fairlearn",
        note="uses the attribute at decision time",
    ),
    "mi_eo": Method("conditional MI regularizer", WEIGHTS, regularizer("plugin", 0.5, 0.9, conditional=True), gap="eo"),
    "constraint_eo": Method("FairnessConstraint (EO bound)", [0.02, 0.04], constraint("max_eo_difference"), gap="eo"),
    "adversary_eo": Method("adversarial debiasing (EO)", [1.0, 4.0], adversary(True), gap="eo", family="baseline"),
    "expgrad_eo": Method(
        "ExponentiatedGradient (LR, EO)", [0.01, 0.04], exponentiated_gradient("eo"), gap="eo", family="fairlearn"
    ),
    "threshold_eo": Method(
        "ThresholdOptimizer (EO)",
        [0.0],
        threshold_optimizer("equalized_odds"),
        gap="eo",
        family="fairlearn",
        note="uses the attribute at decision time",
    ),
}
DP_METHODS = [name for name, method in METHODS.items() if method.gap == "dp"]


@dataclass
class Point:
    method: str
    setting: float
    runs: list[dict[str, dict[str, float]]] = field(default_factory=list)

    def mean(self, part: str, key: str) -> float:
        return statistics.fmean(run[part][key] for run in self.runs)

    def std(self, part: str, key: str) -> float:
        values = [run[part][key] for run in self.runs]
        return statistics.stdev(values) if len(values) > 1 else 0.0


def sweep(task: Task, rows: dict[str, torch.Tensor], methods: list[str], args: Any) -> list[Point]:
    points, cache = [], {}
    for name in methods:
        method = METHODS[name]
        for setting in method.settings:
            point = Point(name, setting)
            start = time.perf_counter()
            for seed in range(args.seeds):
                decisions = method.run(setting, task, rows, seed, args, cache)
                point.runs.append({part: measure(decisions[part], task, rows[part]) for part in ("val", "test")})
            points.append(point)
            print(
                f"  {task.name} {name} {setting:g}: val acc {100 * point.mean('val', 'accuracy'):.2f} "
                f"DP {point.mean('val', 'dp_diff'):.3f} EO {point.mean('val', 'eo_diff'):.3f} | test acc "
                f"{100 * point.mean('test', 'accuracy'):.2f} DP {point.mean('test', 'dp_diff'):.3f} "
                f"EO {point.mean('test', 'eo_diff'):.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return points


def select(points: list[Point], method: str, gap: str, target: float) -> Point | None:
    """The setting with the best mean validation accuracy among those whose mean validation gap meets the target."""
    meeting = [p for p in points if p.method == method and p.mean("val", f"{gap}_diff") <= target]
    return max(meeting, key=lambda p: p.mean("val", "accuracy")) if meeting else None


def report(task: Task, points: list[Point], args: Any, out: Path) -> str:
    base = next(p for p in points if p.method == "mlp")
    lines = [
        f"### {task.name}: {len(task.targets)} rows, {task.num_cells} cells; test cells of "
        f"{int(args.smallest_test_cell)}+ rows; {args.seeds} seeds, {args.epochs} epochs",
        "",
        "| method | target | setting (chosen on val) | test accuracy % | Δ vs MLP (pts) | test DP diff "
        "| test EO diff |",
        "|---|---|---|---|---|---|---|",
        f"| MLP, unregularized | - | - | {100 * base.mean('test', 'accuracy'):.2f} ± "
        f"{100 * base.std('test', 'accuracy'):.2f} | 0 | {base.mean('test', 'dp_diff'):.3f} ± "
        f"{base.std('test', 'dp_diff'):.3f} | {base.mean('test', 'eo_diff'):.3f} ± {base.std('test', 'eo_diff'):.3f} |",
    ]
    for name, method in METHODS.items():
        if name == "mlp" or not any(p.method == name for p in points):
            continue
        target = args.dp_target if method.gap == "dp" else args.eo_target
        chosen = select(points, name, method.gap, target)
        label = method.label + (f" ({method.note})" if method.note else "")
        if chosen is None:
            lines.append(f"| {label} | {method.gap.upper()} ≤ {target:g} | no setting meets it on val | | | | |")
            continue
        delta = 100 * (chosen.mean("test", "accuracy") - base.mean("test", "accuracy"))
        lines.append(
            f"| {label} | {method.gap.upper()} ≤ {target:g} | {chosen.setting:g} | "
            f"{100 * chosen.mean('test', 'accuracy'):.2f} ± {100 * chosen.std('test', 'accuracy'):.2f} | "
            f"{delta:+.2f} | "
            f"{chosen.mean('test', 'dp_diff'):.3f} ± {chosen.std('test', 'dp_diff'):.3f} | "
            f"{chosen.mean('test', 'eo_diff'):.3f} ± {chosen.std('test', 'eo_diff'):.3f} |"
        )
    (out / f"frontier_{task.name}.json").write_text(
        json.dumps(
            [
                {
                    "method": p.method,
                    "setting": p.setting,
                    **{
                        f"{part}_{k}": p.mean(part, k)
                        for part in ("val", "test")
                        for k in ("accuracy", "dp_diff", "eo_diff")
                    },
                    **{
                        f"{part}_{k}_std": p.std(part, k)
                        for part in ("val", "test")
                        for k in ("accuracy", "dp_diff", "eo_diff")
                    },
                }
                for p in points
            ],
            indent=1,
        )
    )
    plot(task, points, out / f"frontier_{task.name}.png")
    return "\n".join(lines)


FAMILY_STYLE = {"ours": "-", "baseline": "--", "fairlearn": ":", "reference": ""}


def plot(task: Task, points: list[Point], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    base = next(p for p in points if p.method == "mlp")
    for ax, gap in zip(axes, ("dp", "eo")):
        for name, method in METHODS.items():
            family = [p for p in points if p.method == name]
            if not family or (method.gap != gap and name != "mlp"):
                continue
            family.sort(key=lambda p: p.mean("test", f"{gap}_diff"))
            xs = [p.mean("test", f"{gap}_diff") for p in family]
            ys = [100 * p.mean("test", "accuracy") for p in family]
            ax.plot(
                xs,
                ys,
                FAMILY_STYLE[method.family] or "*",
                marker="o" if name != "mlp" else "*",
                markersize=5 if name != "mlp" else 12,
                label=method.label,
            )
        ax.axhline(100 * base.mean("test", "accuracy") - 1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"{'demographic-parity' if gap == 'dp' else 'equalized-odds'} difference (test, mean of seeds)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Adult {task.name}: accuracy vs fairness gap, every setting (dotted line: MLP - 1 point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the UCI Adult CSV (with a header row)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/fairness_frontier"))
    parser.add_argument("--protocols", nargs="+", choices=sorted(PROTOCOLS), default=["cells4", "ffb_sex"])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dp-target", type=float, default=0.035)
    parser.add_argument("--eo-target", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--limit-rows", type=int, default=None, help="use the first N rows (smoke runs)")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data = AdultIncome(args.data)
    methods = ["mlp", *[m for m in args.methods if m != "mlp"]]
    sections = []
    for protocol in args.protocols:
        task = PROTOCOLS[protocol](data)
        if args.limit_rows:
            task = Task(
                task.name,
                task.inputs[: args.limit_rows],
                task.targets[: args.limit_rows],
                task.groups[: args.limit_rows],
                task.num_values,
                task.attributes,
            )
        rows = split(task, args.split_seed)
        args.smallest_test_cell = torch.bincount(task.cells[rows["test"]], minlength=task.num_cells).min().item()
        print(f"{protocol}: train {len(rows['train'])}, val {len(rows['val'])}, test {len(rows['test'])}", flush=True)
        sections.append(report(task, sweep(task, rows, methods, args), args, args.output_dir))
        print(sections[-1], flush=True)
    text = "\n\n".join(sections)
    (args.output_dir / "frontier.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
