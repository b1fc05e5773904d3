"""Cost of the fairness and concept terms as a ratio to a vanilla training step, measured in one run.

Steps run through the real path (Trainer -> XAIMixin -> the callback). Models: the Adult example's MLP
(108 -> 64 -> 64 -> 2) on a batch of 512 rows with sex x race codes (10 cells), and the ColorDigits demo
CNN on 28x28 inputs (batch 256) with a concept head on its convolutional features. The MI regularizer
reads the step's own logits, so its physical minimum is one small matrix product and a handful of
(cells x classes) operations; a concept head costs its own linear layer.

Every configuration is measured in ``--rounds`` interleaved rounds; the fastest median step is kept
(interference on a shared machine only slows a run down). Besides the ratio, each row reports what the term adds
to a step in milliseconds: on the MLP that is the fixed cost the term pays whatever the model's size.

    python benchmarks/fairness_overhead.py [--steps 30] [--rounds 3] [--only adult|cnn]
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from adult_fairness import IncomeMLP  # noqa: E402
from color_digits import ColorCNN  # noqa: E402
from penalty_overhead import _median_step  # noqa: E402  (the same timing path as the penalties)

from lightning_xai.callbacks import (  # noqa: E402
    AdversarialConceptHead,
    ControlConceptHead,
    FairnessConstraint,
    MutualInformationRegularizer,
)

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class DemoCNN(ColorCNN):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input"]), batch["target"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["adult", "cnn"], help="measure one of the two models")
    args = parser.parse_args()
    console = Console(width=120)
    g = torch.Generator().manual_seed(0)
    tabular = {
        "input": torch.randn(512, 108, generator=g),
        "target": torch.randint(0, 2, (512,), generator=g),
        "sex": torch.randint(0, 2, (512,), generator=g),
        "race": torch.randint(0, 5, (512,), generator=g),
    }
    images = {
        "input": torch.rand(256, 3, 28, 28, generator=g),
        "target": torch.randint(0, 10, (256,), generator=g),
        "colour": torch.randint(0, 2, (256,), generator=g),
        "shape": torch.randint(0, 2, (256,), generator=g),
    }
    mi = {"attributes": ["sex", "race"], "num_values": [2, 5]}
    setups = [
        (
            "adult",
            "Adult MLP, batch 512, 10 cells",
            lambda: IncomeMLP(108),
            tabular,
            {
                "mi plugin": lambda: [MutualInformationRegularizer(**mi)],
                "mi plugin, momentum 0.9, T 0.5": lambda: [
                    MutualInformationRegularizer(**mi, momentum=0.9, temperature=0.5)
                ],
                "mi conditional": lambda: [MutualInformationRegularizer(**mi, conditional_on_target=True)],
                "chi2": lambda: [MutualInformationRegularizer(**mi, estimator="chi2")],
                "hsic": lambda: [MutualInformationRegularizer(**mi, estimator="hsic")],
                "FairnessConstraint (DP bound)": lambda: [FairnessConstraint(**mi, max_dp_difference=0.02)],
                "FairnessConstraint (EO bound)": lambda: [FairnessConstraint(**mi, max_eo_difference=0.05)],
            },
        ),
        (
            "cnn",
            "CNN 28x28, batch 256, heads on conv features",
            lambda: DemoCNN(28),
            images,
            {
                "adversarial head (reversal)": lambda: [AdversarialConceptHead("features", "colour", 2)],
                "adversarial + control head": lambda: [
                    AdversarialConceptHead("features", "colour", 2),
                    ControlConceptHead("features", "shape", 2),
                ],
                "adversarial head (decorrelation)": lambda: [
                    AdversarialConceptHead("features", "colour", 2, objective="decorrelation")
                ],
            },
        ),
    ]
    for key, title, factory, batch, configurations in setups:
        if args.only not in (None, key):
            continue
        best: dict[str, float] = {}
        names = ["vanilla", *configurations]
        for _ in range(args.rounds):
            for name in names:
                callbacks = [] if name == "vanilla" else configurations[name]()
                duration = _median_step(factory, batch, callbacks, args.steps)
                best[name] = min(best.get(name, float("inf")), duration)
        table = Table(title=f"{title}, {torch.get_num_threads()} CPU threads (fastest of {args.rounds} rounds)")
        for column in ("configuration", "ms / step", "+ ms / step", "x vanilla"):
            table.add_column(column, justify="left" if column == "configuration" else "right")
        for name in names:
            added = (best[name] - best["vanilla"]) * 1e3
            table.add_row(name, f"{best[name] * 1e3:.2f}", f"{added:+.2f}", f"{best[name] / best['vanilla']:.3f}")
        console.print(table)


if __name__ == "__main__":
    main()
